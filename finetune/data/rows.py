"""Reading rows: local files, folders of class folders, `package://` paths and hub datasets; bad-row bookkeeping
and the seeded held-out split."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from finetune.errors import DataError, FinetuneError
from finetune.paths import PACKAGE_SCHEME, resolve_package_path
from finetune.recipe import DataSource

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def is_local(source: DataSource) -> bool:
    """A file or folder on this machine (or in an installed package), as opposed to a hub dataset name."""
    path = source.path
    return path.startswith(PACKAGE_SCHEME) or Path(path).suffix.lower() in LOCAL_SUFFIXES or Path(path).exists()


def local_path(source: DataSource, base_dir: Path | None = None) -> Path:
    """The file or folder a local source names: `package://NAME/sub/path` inside an installed package, or a path
    (taken relative to `base_dir` when it exists there)."""
    if source.path.startswith(PACKAGE_SCHEME):
        return resolve_package_path(source.path, key=f"data source {source.path}")
    path = Path(source.path)
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    return path


def missing_source(source: DataSource, base_dir: Path | None = None) -> str | None:
    """Why a local source cannot be read before reading it (not found, package not installed), or None."""
    try:
        path = local_path(source, base_dir)
    except FinetuneError as exc:
        return str(exc)
    return None if path.is_file() or path.is_dir() else f"data file not found: {source.path}"


def read_source(source: DataSource, base_dir: Path | None = None):
    """A `datasets.Dataset` with the source's rows (columns renamed per `columns`)."""
    return read_source_with_skips(source, base_dir)[0]


def read_source_with_skips(source: DataSource, base_dir: Path | None = None, on_bad_row: str = "error"):
    """`read_source`, and the problems of the records it left out under `on_bad_row: skip`.

    Only a folder source has records that can fail while reading (a file that is not UTF-8); a broken
    JSON line or CSV stops the run either way, since nothing after it could be trusted.
    """
    import datasets

    skipped: list[str] = []
    if is_local(source):
        path = local_path(source, base_dir)
        if path.is_dir():
            found = read_text_folder(path, on_bad_row)
            ds, skipped = datasets.Dataset.from_list(found.rows), found.problems
        elif not path.is_file():
            raise DataError(f"data file not found: {source.path}")
        else:
            ds = _read_file(path)
    else:
        try:
            ds = datasets.load_dataset(source.path, source.name, split=source.split)
        except Exception as exc:
            raise DataError(
                f"data source {source.path!r}: not a local file and could not be loaded from the hub ({exc}). "
                "Offline? Point data paths at local .jsonl/.json/.csv/.parquet files or a folder of class folders."
            ) from None
    return _select_and_rename(ds, source), skipped


def _read_file(path: Path):
    import datasets

    kind = LOCAL_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}, or a folder")
    if kind == "json":
        _check_json(path)
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # datasets' errors are opaque; name the file at least
        raise DataError(f"{path}: could not be read as {kind}: {exc}") from None


def read_text_folder(folder: Path, on_bad_row: str = "error") -> Rows:
    """Rows {text, label, file} from a folder of class sub-folders of `.txt` files: the label is the sub-folder's name.

    `folder/sport/001.txt` becomes `{"text": <its content, stripped>, "label": "sport", "file": "<path>"}`. Folders and
    files are read in sorted order, so the rows (and a seeded split of them) are the same on every machine. Only
    `<folder>/<label>/*.txt` is read; hidden files and deeper folders are not. Text is UTF-8 (a BOM is dropped);
    a file that is not UTF-8 stops the run, or is left out and counted with `on_bad_row: skip`.
    """
    out = Rows(rows=[])
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    for class_dir in classes:
        for file in sorted(f for f in class_dir.glob("*.txt") if f.is_file() and not f.name.startswith(".")):
            data = file.read_bytes()
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                problem = f"{file}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
                if on_bad_row == "error":
                    raise DataError(
                        problem + "  (re-encode it as UTF-8, or set data.on_bad_row: skip to leave such files out)"
                    ) from None
                out.skipped += 1
                out.problems.append(problem)
                continue
            out.rows.append({"text": text.strip(), "label": class_dir.name, "file": str(file)})
    if not out.rows:
        unreadable = f" ({out.skipped} unreadable)" if out.skipped else ""
        raise DataError(f"{folder}: no text files in class sub-folders{unreadable}; expected {folder}/<label>/<name>.txt")
    return out  # the caller reports what was left out, with the rows it skipped itself


def _select_and_rename(ds, source: DataSource):
    if source.limit:
        ds = ds.select(range(min(source.limit, len(ds))))
    missing = [old for old in source.columns.values() if old not in ds.column_names]
    if missing:
        raise DataError(f"{source.path}: columns {missing} named in `columns` are not in the data ({ds.column_names})")
    renames = {old: new for new, old in source.columns.items() if old != new}
    if renames:
        ds = ds.rename_columns(renames)
    return ds


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line; a syntax error or a non-object names its line."""
    with path.open() as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: invalid JSON ({exc.msg})") from None
            if not isinstance(value, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(value).__name__}")
            yield number, value


def _check_json(path: Path) -> None:
    """Find the exact line of a JSON syntax error (datasets only says the file failed)."""
    if path.suffix.lower() == ".jsonl":
        for _ in jsonl_rows(path):
            pass
    else:
        try:
            value = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(value, (list, dict)):
            raise DataError(f"{path}: expected a list of objects")


@dataclass
class Rows:
    """Checked rows of one split and what was dropped on the way."""

    rows: list[dict]
    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def add(self, origin: str, build: Callable[[], dict], on_bad_row: str) -> None:
        """Append the row `build` returns; its ValueError is the row's problem: raised with `origin`, or counted."""
        try:
            self.rows.append(build())
        except ValueError as exc:
            problem = f"{origin}: {exc}"
            if on_bad_row == "error":
                raise DataError(problem + "  (set data.on_bad_row: skip to drop such rows and count them)") from None
            self.skipped += 1
            self.problems.append(problem)

    def checked(self, sources: list[DataSource]) -> Rows:
        """Report what was skipped; no usable row at all is an error."""
        if self.skipped:
            log.warning("Skipped %d unusable row(s); first: %s", self.skipped, self.problems[0])
        if not self.rows:
            raise DataError(f"no usable rows in {', '.join(s.path for s in sources)}")
        return self


def split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded held-out split; at least one row on each side."""
    import random

    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * fraction))
    if n_eval >= len(rows):
        raise DataError(f"data.eval_fraction {fraction} leaves no training rows out of {len(rows)}")
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in order[:n_eval]]
