"""Reading rows: local files, folders of class folders, `package://` paths and hub datasets; bad-row bookkeeping
and the seeded held-out split."""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from finetune.data.cache import fingerprint
from finetune.errors import DataError, FinetuneError
from finetune.paths import PACKAGE_SCHEME, cache_dir, resolve_package_path
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
            found = read_text_folder(path, on_bad_row, source.encoding)
            ds, skipped = datasets.Dataset.from_list(found.rows), found.problems
        elif not path.is_file():
            raise DataError(f"data file not found: {source.path}")
        else:
            ds = _read_file(path, source.encoding)
    else:
        if source.encoding:
            raise DataError(f"{source.path}: `encoding` is for local text files; a hub dataset is decoded by `datasets`.")
        try:
            ds = datasets.load_dataset(source.path, source.name, split=source.split)
        except Exception as exc:
            raise DataError(
                f"data source {source.path!r}: not a local file and could not be loaded from the hub ({exc}). "
                "Offline? Point data paths at local .jsonl/.json/.csv/.parquet files or a folder of class folders."
            ) from None
    return _select_and_rename(ds, source), skipped


def _read_file(path: Path, encoding: str | None = None):
    """A local file's rows. Text files are checked first (encoding, emptiness, syntax), so a problem names its line;
    `datasets` then reads them (from a UTF-8 copy in the cache when the file is in another encoding or has a BOM)."""
    import datasets

    kind = LOCAL_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}, or a folder")
    readable = path
    if kind != "parquet":  # parquet is binary: its strings are UTF-8 by definition
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot be read ({exc.strerror})") from None
        text = decoded_text(path, raw, encoding)
        if path.suffix.lower() == ".jsonl":
            for _ in jsonl_rows(path, text=text):
                pass
        elif kind == "json":
            _check_json(path, text)
        else:
            _check_csv(path, text)
        if raw.startswith(codecs.BOM_UTF8) or (encoding and codecs.lookup(encoding).name != "utf-8"):
            readable = _utf8_copy(path, raw, text)
    try:
        return datasets.load_dataset(kind, data_files=str(readable), split="train")
    except Exception as exc:  # datasets' errors are opaque; name the file and the innermost cause
        cause = exc
        for _ in range(10):
            if (cause.__cause__ or cause.__context__) is None:
                break
            cause = cause.__cause__ or cause.__context__
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise DataError(f"{path}: could not be read as {kind}: {detail}") from None


def decoded_text(path: Path, raw: bytes, encoding: str | None = None) -> str:
    """The text of a data file: UTF-8 (a BOM is dropped) unless `encoding` names another. A byte that does not decode
    stops with the file, its line and what to do; a file with nothing but whitespace is empty."""
    codec = encoding or "utf-8"
    try:
        text = raw.decode(codec).removeprefix("\ufeff")  # a byte-order mark is not text
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].decode(codec, errors="replace").count("\n") + 1
        where = f"{path}, line {line}"
        byte = f"byte 0x{raw[exc.start]:02x} at offset {exc.start}"
        if encoding:
            raise DataError(f"{where}: not {encoding} text ({byte}); check the data source's `encoding`.") from None
        fixed = path.with_name(f"{path.stem}.utf8{path.suffix}")
        if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            what, name, iconv = "the file starts with a UTF-16 byte-order mark", "utf-16", "utf-16"
        else:
            what, name, iconv = byte, "latin-1", "latin1"
        raise DataError(
            f"{where}: not UTF-8 ({what}). Convert the file (from {name}: iconv -f {iconv} -t utf-8 {path} > {fixed}), "
            f"or give its encoding on the data source in the recipe ({{path: ..., encoding: {name}}})."
        ) from None
    if not text.strip():
        raise DataError(f"{path}: empty file (no rows)")
    return text


def _utf8_copy(path: Path, raw: bytes, text: str) -> Path:
    """A UTF-8 copy of `text` in the cache, named by the original's content, for `datasets` to read."""
    import os

    folder = cache_dir() / "utf8"
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / f"{path.stem}-{hashlib.sha256(raw).hexdigest()[:16]}{path.suffix.lower()}"
    if not copy.is_file():
        partial = copy.with_name(f"{copy.name}.partial-{os.getpid()}")
        partial.write_text(text, encoding="utf-8")
        partial.replace(copy)  # atomic: another process never reads half a copy
    return copy


def read_text_folder(folder: Path, on_bad_row: str = "error", encoding: str | None = None) -> Rows:
    """Rows {text, label, file} from a folder of class sub-folders of `.txt` files: the label is the sub-folder's name.

    `folder/sport/001.txt` becomes `{"text": <its content, stripped>, "label": "sport", "file": "<path>"}`. Folders and
    files are read in sorted order, so the rows (and a seeded split of them) are the same on every machine. Only
    `<folder>/<label>/*.txt` is read; hidden files and deeper folders are not. Text is UTF-8 (a BOM is dropped), or
    `encoding`; a file that does not decode stops the run, or is left out and counted with `on_bad_row: skip`.
    """
    out = Rows(rows=[])
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    for class_dir in classes:
        for file in sorted(f for f in class_dir.glob("*.txt") if f.is_file() and not f.name.startswith(".")):
            data = file.read_bytes()
            try:
                text = data.decode(encoding or "utf-8").removeprefix("\ufeff")  # a byte-order mark is not text
            except UnicodeDecodeError as exc:
                problem = f"{file}: not {encoding or 'UTF-8'} text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
                if on_bad_row == "error":
                    fix = ("check the data source's `encoding`" if encoding else
                           "re-encode it as UTF-8, or give the folder's encoding on the data source (encoding: latin-1)")
                    raise DataError(problem + f"  ({fix}, or set data.on_bad_row: skip to leave such files out)") from None
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


def jsonl_rows(path: Path, encoding: str | None = None, text: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line; a syntax error or a non-object names its line."""
    if text is None:
        text = decoded_text(path, path.read_bytes(), encoding)
    for number, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: invalid JSON ({exc.msg})") from None
        if not isinstance(value, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, got {_json_type(value)}")
        yield number, value


def _lines(text: str) -> Iterator[str]:
    """The lines of `text`, split on "\\n" only (JSON strings may hold U+2028, which splitlines() splits on), one at
    a time: a list of a million lines would hold the file's text a second time."""
    start = 0
    while start <= len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end
        yield text[start:end]
        start = end + 1


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number"
    )


def _check_json(path: Path, text: str) -> None:
    """A `.json` file holds a list of objects (or an object of equal-length column lists, as `datasets` reads);
    a syntax error names its line (datasets only says the file failed)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg})") from None
    if isinstance(value, list):
        if not value:
            raise DataError(f"{path}: no rows (an empty JSON list)")
        for number, item in enumerate(value, 1):
            if not isinstance(item, dict):
                raise DataError(f"{path}, row {number}: expected a JSON object, got {_json_type(item)}")
        return
    columns = isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values())
    if not columns or len({len(v) for v in value.values()}) != 1:
        raise DataError(
            f"{path}: expected a JSON list of objects, one per row ([{{...}}, {{...}}]), got {_json_type(value)}"
            + (" (not one list per column)" if isinstance(value, dict) else "")
        )


def _check_csv(path: Path, text: str) -> None:
    """A header and rows with as many fields; a cut or unbalanced line names its line (pandas would pad it or fail)."""
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # Python's default (128 KiB) is not pandas'
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, rows = None, 0
    try:
        for fields in reader:
            if not fields or fields == [""]:  # a blank line, skipped as pandas does
                continue
            if header is None:
                header = fields
                continue
            rows += 1
            if len(fields) != len(header):
                raise DataError(
                    f"{path}, line {reader.line_num}: {len(fields)} field(s), but the header has {len(header)} "
                    f"({', '.join(header)}); is the line cut short, or a comma not quoted?"
                )
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({exc})") from None
    if not rows:
        raise DataError(f"{path}: a header line and no rows")


@dataclass
class Rows:
    """Checked rows of one split and what was dropped on the way."""

    rows: list[dict]
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)  # "FILE, row N" of each row, for problems found later
    # Names these rows' content (their files' bytes and reading options) without hashing every row; None: unknown.
    fingerprint: str | None = None

    def add(self, origin: str, build: Callable[[], dict], on_bad_row: str) -> None:
        """Append the row `build` returns; its ValueError is the row's problem: raised with `origin`, or counted."""
        row = checked_row(origin, build, on_bad_row, self)
        if row is not None:
            self.rows.append(row)
            self.origins.append(origin)

    def checked(self, sources: list[DataSource]) -> Rows:
        """Report what was skipped; no usable row at all is an error."""
        if self.skipped:
            log.warning("Skipped %d unusable row(s); first: %s", self.skipped, self.problems[0])
        if not self.rows:
            first = f"; the first problem: {self.problems[0]}" if self.problems else ""
            raise DataError(f"no usable rows in {', '.join(s.path for s in sources)}{first}")
        return self

    def split(self, fraction: float, seed: int) -> tuple[Rows, Rows]:
        """`split_rows` keeping each row's origin; what was skipped stays with the first part."""
        kept, held = split_rows(list(zip(self.rows, self.origins)), fraction, seed)

        def part(side: str) -> str | None:
            return fingerprint(self.fingerprint, "split", fraction, seed, side) if self.fingerprint else None

        return (
            Rows([r for r, _ in kept], self.skipped, self.problems, [o for _, o in kept], part("kept")),
            Rows([r for r, _ in held], origins=[o for _, o in held], fingerprint=part("held")),
        )


def checked_row(origin: str, build: Callable[[], dict], on_bad_row: str, tally) -> dict | None:
    """The row `build` returns; its ValueError is the row's problem: raised with `origin`, or counted in `tally`
    (anything with `skipped` and `problems`) and None returned."""
    try:
        return build()
    except ValueError as exc:
        problem = f"{origin}: {exc}"
        if on_bad_row == "error":
            raise DataError(problem + "  (set data.on_bad_row: skip to drop such rows and count them)") from None
        tally.skipped += 1
        tally.problems.append(problem)
        return None


def held_out_order(count: int, fraction: float, seed: int) -> list[int]:
    """The indices of the rows `split_rows` holds out of `count`, in the held-out split's order."""
    import random

    order = list(range(count))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(count * fraction))
    if n_eval >= count:
        raise DataError(f"data.eval_fraction {fraction} leaves no training rows out of {count}")
    return order[:n_eval]


def split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded held-out split; at least one row on each side."""
    order = held_out_order(len(rows), fraction, seed)
    held = set(order)
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in order]
