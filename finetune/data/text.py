"""Raw text for pretraining: the documents of the corpus, read one at a time, and which of them are held out.

A document is a text file (`.txt`, `.md`), every text file in a folder (recursively, in sorted order), a row of a
JSONL, JSON, CSV or parquet file (its `text` column; `columns: {text: body}` reads another), or a JSON file that holds
no rows (a book as nested objects of strings: its strings in file order, one per line). Only one document is in
memory at a time, so a corpus of any size streams through tokenization. A held-out split takes whole documents.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from finetune.data.cache import code_digest, file_digest, fingerprint
from finetune.data.rows import decoded_text, is_local, local_path, missing_source
from finetune.errors import DataError
from finetune.recipe import DataConfig, DataSource

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
EMPTY_CORPUS = "data.train: the training corpus is empty: no document has any text."
ROW_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def corpus_problems(data: DataConfig) -> list[str]:
    """What is wrong with the pretraining sources before reading them: hub names, file types, a row format."""
    problems = []
    for key, group in (("data.train", data.train), ("data.eval", data.eval or [])):
        for i, source in enumerate(group):
            where = f"{key}[{i}]" if len(group) > 1 else key
            suffix, readable = Path(source.path).suffix.lower(), ", ".join(TEXT_SUFFIXES + ROW_SUFFIXES)
            if not is_local(source):
                problems.append(
                    f"{where}: data file not found: {source.path}" if suffix in TEXT_SUFFIXES else
                    f"{where}: {source.path} is not a local file or folder; task: pretrain reads text files, folders of "
                    "them, and JSONL/JSON/CSV/parquet files with a text column (download a hub dataset to files first)."
                )
                continue
            if suffix and suffix not in TEXT_SUFFIXES + ROW_SUFFIXES and not missing_source(source):
                if not local_path(source).is_dir():
                    problems.append(f"{where}: {source.path}: task: pretrain reads {readable} files or folders.")
            if source.format not in ("auto", "text"):
                problems.append(
                    f"{where}.format: {source.format} rows are for sft; pretraining reads raw text (format: text or auto)."
                )
    return problems


def source_files(source: DataSource) -> list[Path]:
    """The files a source reads: itself, or a folder's text files (hidden ones left out) in sorted order."""
    path = local_path(source)
    if not path.is_dir():
        if not path.is_file():
            raise DataError(f"data file not found: {source.path}")
        return [path]
    def hidden(file: Path) -> bool:
        return any(part.startswith(".") for part in file.relative_to(path).parts)

    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not hidden(p))


@dataclass
class Tally:
    """What reading left out: empty documents (counted, nothing to learn) and unusable rows (with their problems)."""

    empty: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)


def read_documents(source: DataSource, on_bad_row: str, tally: Tally) -> Iterator[str]:
    """The non-empty documents of `source`, in order, one at a time (at most `source.limit` of them)."""
    count = 0
    for path in source_files(source):
        for origin, text in _file_documents(path, source, on_bad_row, tally):
            if not text.strip():
                tally.empty += 1
                continue
            yield text
            count += 1
            if source.limit and count >= source.limit:
                return


def _file_documents(path: Path, source: DataSource, on_bad_row: str, tally: Tally) -> Iterator[tuple[str, str]]:
    suffix = path.suffix.lower()
    column = source.columns.get("text", "text")
    if suffix in TEXT_SUFFIXES:
        raw = path.read_bytes()
        blank = not raw.removeprefix(codecs.BOM_UTF8).strip()  # decoded_text refuses an empty file; here it is no text
        yield str(path), ("" if blank else decoded_text(path, raw, source.encoding))
    elif suffix == ".jsonl":
        yield from _checked(_jsonl_values(path, source.encoding), column, on_bad_row, tally)
    elif suffix == ".csv":
        yield from _checked(_csv_values(path, source.encoding), column, on_bad_row, tally)
    elif suffix == ".parquet":
        yield from _checked(_parquet_values(path, column), column, on_bad_row, tally)
    elif suffix == ".json":
        yield from _json_documents(path, source.encoding, column, on_bad_row, tally)
    else:
        raise DataError(f"{path}: task: pretrain reads {', '.join(TEXT_SUFFIXES + ROW_SUFFIXES)} files")


def _checked(rows: Iterator[tuple[str, object]], column: str, on_bad_row: str, tally: Tally) -> Iterator[tuple[str, str]]:
    """(origin, text) of each row; a row whose `column` is missing or not a string is an error, or skipped and counted."""
    for origin, row in rows:
        value = row.get(column) if isinstance(row, dict) else None
        if isinstance(value, str):
            yield origin, value
            continue
        problem = f"{origin}: " + (f"no {column!r} column" if not isinstance(row, dict) or column not in row else
                                   f"{column!r} is {type(value).__name__}, not text")
        if on_bad_row == "error":
            raise DataError(problem + "  (set data.on_bad_row: skip to drop such rows and count them; "
                            "`columns: {text: NAME}` on the source reads another column)")
        tally.skipped += 1
        tally.problems.append(problem)


def _jsonl_values(path: Path, encoding: str | None) -> Iterator[tuple[str, object]]:
    with open(path, encoding=encoding or "utf-8-sig", newline="\n") as fh:  # JSON strings may hold U+2028: split on \n only
        try:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}, line {number}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, line {number}: invalid JSON ({exc.msg})") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not {encoding or 'UTF-8'} text ({exc.reason}); give the source's encoding") from None


def _csv_values(path: Path, encoding: str | None) -> Iterator[tuple[str, object]]:
    csv.field_size_limit(2**31 - 1)  # a document may be long; Python's default limit is 128 KiB per field
    with open(path, encoding=encoding or "utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        try:
            for row in reader:
                yield f"{path}, line {reader.line_num}", row
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DataError(f"{path}, line {reader.line_num}: not readable CSV ({exc})") from None


def _parquet_values(path: Path, column: str) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a file that is not parquet
        raise DataError(f"{path}: not a parquet file ({exc})") from None
    if column not in file.schema_arrow.names:
        raise DataError(f"{path}: no {column!r} column (columns: {', '.join(file.schema_arrow.names)})")
    row = 0
    for batch in file.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            yield f"{path}, row {row}", {column: value}


def _json_documents(path: Path, encoding: str | None, column: str, on_bad_row: str, tally: Tally) -> Iterator[tuple[str, str]]:
    """A list of rows or of strings, an object of column lists, or else one document of every string in it."""
    try:
        value = json.loads(decoded_text(path, path.read_bytes(), encoding))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg})") from None
    if isinstance(value, list):
        if all(isinstance(item, str) for item in value):
            yield from ((f"{path}, item {i}", item) for i, item in enumerate(value, 1))
        else:
            yield from _checked(((f"{path}, row {i}", item) for i, item in enumerate(value, 1)), column, on_bad_row, tally)
    elif isinstance(value, dict) and isinstance(value.get(column), list):
        yield from _checked(((f"{path}, row {i}", {column: v}) for i, v in enumerate(value[column], 1)), column, on_bad_row, tally)
    else:
        yield str(path), "\n".join(_strings(value))


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


@dataclass
class Corpus:
    """The documents of a pretraining run: the training split and the held-out one (`data.eval`, or whole documents
    drawn by `data.eval_fraction`), read again from the files each time they are iterated."""

    data: DataConfig
    _held: set[int] | None = None  # indices of the training sources' documents held out by eval_fraction
    _fingerprint: str | None = None

    @property
    def has_eval(self) -> bool:
        return bool(self.data.eval or self.data.eval_fraction)

    def train_texts(self, tally: Tally | None = None) -> Iterator[str]:
        """The training documents; `tally` counts what was left out on the way."""
        held = self._held_out()
        for index, text in enumerate(self._documents(self.data.train, tally or Tally())):
            if index not in held:
                yield text

    def eval_texts(self, tally: Tally | None = None) -> Iterator[str]:
        """The held-out documents (none without data.eval or data.eval_fraction)."""
        if self.data.eval:
            yield from self._documents(self.data.eval, tally or Tally())
            return
        held = self._held_out()
        if held:
            yield from (text for index, text in enumerate(self._documents(self.data.train, Tally())) if index in held)

    def _documents(self, sources: list[DataSource], tally: Tally) -> Iterator[str]:
        for source in sources:
            yield from read_documents(source, self.data.on_bad_row, tally)

    def _held_out(self) -> set[int]:
        """The training documents `data.eval_fraction` holds out: whole documents, seeded, at least one on each side."""
        if not self.data.eval_fraction:
            return set()
        if self._held is None:
            count = sum(1 for _ in self._documents(self.data.train, Tally()))
            if count == 0:
                raise DataError(EMPTY_CORPUS)
            if count < 2:
                raise DataError(
                    f"data.eval_fraction holds out whole documents, and data.train has {count}; give a held-out file "
                    "in data.eval, or more documents (a folder of text files, or rows of a JSONL file)."
                )
            order = list(range(count))
            random.Random(self.data.seed).shuffle(order)
            self._held = set(order[: min(count - 1, max(1, round(count * self.data.eval_fraction)))])
        return self._held

    def fingerprint(self) -> str:
        """Names the corpus by content: every file's bytes, the source and split options, and the reading code."""
        if self._fingerprint is None:
            self._fingerprint = self._content_key()
        return self._fingerprint

    def _content_key(self) -> str:
        sources = []
        for source in [*self.data.train, *(self.data.eval or [])]:
            files = [(str(p.relative_to(local_path(source))) if local_path(source).is_dir() else p.name, file_digest(p))
                     for p in source_files(source)]
            sources.append((source.model_dump(mode="json"), files))
        split = (bool(self.data.eval), self.data.eval_fraction, self.data.seed if self.data.eval_fraction else None)
        return fingerprint("corpus", code_digest(__file__), sources, split, self.data.on_bad_row)
