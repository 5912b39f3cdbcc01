"""The data cache: entries named by a fingerprint of what made them (file bytes, options, tokenizer, the kit's code),
written whole or not at all, and read back as a miss when damaged, so a bad entry costs a rebuild, never a run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


def fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks (hashlib.file_digest is Python 3.11+)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def code_digest(*files: str | Path) -> str:
    """The source of the modules that make an entry: upgrading or editing them retires the entries they made, with
    no version number to remember to bump."""
    return fingerprint(*(file_digest(Path(f)) for f in files))


def tokenizer_fingerprint(tokenizer) -> str:
    """The whole tokenizer (vocab, merges, normalizer, added tokens), its chat template and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    # Hash the serialised vocab directly: quoting a multi-megabyte string through json.dumps would double the cost.
    return fingerprint(
        hashlib.sha256(vocab.encode()).hexdigest(), tokenizer.chat_template, tokenizer.eos_token, tokenizer.bos_token,
        type(tokenizer).__name__,
    )


def _damaged(path: Path, exc: Exception) -> None:
    log.warning("Ignoring a damaged cache entry %s (%s: %s); rebuilding it", path, type(exc).__name__, exc)


def read_json(path: Path, ok: Callable[[Any], bool] = lambda value: True) -> Any | None:
    """A JSON entry's value; None when there is none, or when it does not parse or `ok` refuses it (warned)."""
    try:
        value = json.loads(path.read_bytes())
        if not ok(value):
            raise ValueError("not what this kit writes")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # cut short, not UTF-8, not JSON, not the expected shape
        _damaged(path, exc)
        return None
    return value


def _writer() -> str:
    """A temporary name no other writer uses, on this machine or another sharing the cache folder."""
    return f"partial-{socket.gethostname()}-{os.getpid()}"


def write_json(path: Path, value: Any) -> None:
    """Write `value` to a temporary file and rename it into place: a reader sees all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{_writer()}")
    partial.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    partial.replace(path)


DATASET_META = "entry.json"  # written into the folder before it is renamed into place: no meta, no entry


def read_dataset(folder: Path, rows: int, meta_ok: Callable[[dict], bool] = lambda meta: True):
    """A `datasets.Dataset` entry and its meta, or None. An entry that does not load, does not hold `rows` rows, or
    whose meta `meta_ok` refuses is warned about, removed and treated as a miss."""
    import datasets

    if not folder.exists():
        return None
    try:
        meta = json.loads((folder / DATASET_META).read_bytes())
        if not isinstance(meta, dict) or meta.get("rows") != rows or not meta_ok(meta):
            raise ValueError(f"its {DATASET_META} is not what this kit writes for {rows} rows")
        ds = datasets.load_from_disk(str(folder))  # reads every arrow record batch: a file cut short fails here
        if len(ds) != rows:
            raise ValueError(f"expected {rows} rows, the entry holds {len(ds)}")
    except Exception as exc:  # noqa: BLE001 - datasets and pyarrow raise many types for one damaged folder
        _damaged(folder, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return ds, meta


def write_dataset(folder: Path, ds, meta: dict):
    """Save `ds` and `meta` into a temporary folder and rename it into place; returns the saved dataset
    (memory-mapped, so the rows need not stay in RAM)."""
    import datasets

    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f"{folder.name}.{_writer()}")
    ds.save_to_disk(str(partial))
    (partial / DATASET_META).write_text(json.dumps({**meta, "rows": len(ds)}))
    try:
        partial.rename(folder)  # a damaged entry was removed by `read_dataset`; a sound one is never replaced
    except OSError:  # another process (another node's main rank) finished first: use its copy
        shutil.rmtree(partial, ignore_errors=True)
    return datasets.load_from_disk(str(folder))
