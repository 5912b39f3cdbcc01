"""Data: read local files or hub datasets, check every row, and turn rows into tokens and loss masks.

Rows are normalised to one of three shapes before tokenization:
- `messages`: a conversation; loss on assistant turns (unless `train_on_inputs`).
- `prompt`/`completion`: plain text pair; loss on the completion.
- `text`: raw text; loss on everything.
Masking is done here, not by the trainer, so it works with any chat template (no `{% generation %}` markers needed)
and can be tested directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from finetune.errors import DataError, FinetuneError
from finetune.models import PACKAGE_SCHEME, resolve_package_path
from finetune.recipe import DataConfig, DataSource

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ROLES = {"system", "user", "assistant", "tool"}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"

# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Formats: detect, validate, normalise
# --------------------------------------------------------------------------------------------

FORMAT_COLUMNS = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


def detect_format(columns: list[str], source: DataSource) -> str:
    if source.format != "auto":
        needed = [c for c in FORMAT_COLUMNS[source.format] if c not in columns]
        if needed:
            raise DataError(
                f"{source.path}: format {source.format} needs column(s) {needed}; found {columns}. "
                "Map yours with `columns: {format_name: your_name}`."
            )
        return source.format
    for name, needed in FORMAT_COLUMNS.items():
        if all(c in columns for c in needed):
            return name
    if "conversations" in columns:
        raise DataError(f"{source.path}: found a 'conversations' column; add `columns: {{messages: conversations}}`")
    raise DataError(
        f"{source.path}: cannot tell the format from columns {columns}. Expected one of: "
        + "; ".join(f"{k} ({', '.join(v)})" for k, v in FORMAT_COLUMNS.items())
        + ". Set `format:` and `columns:` in the data source."
    )


def _text(row: dict, key: str, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ValueError(f"'{key}' is missing or empty")
        return None
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def normalise_row(row: dict, fmt: str, system_prompt: str | None, chat: bool) -> dict:
    """One row in canonical form ({messages} or {prompt, completion} or {text}); ValueError says what is wrong."""
    if fmt == "messages":
        messages = row.get("messages")
        if not isinstance(messages, list):
            raise ValueError(f"'messages' must be a list of {{role, content}}, got {type(messages).__name__}")
        if not messages:
            raise ValueError("empty conversation")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
                raise ValueError(f"message {i} must have 'role' and 'content'")
            if msg["role"] not in ROLES:
                raise ValueError(f"message {i}: unknown role {msg['role']!r} (expected one of {sorted(ROLES)})")
            if not isinstance(msg["content"], str):
                raise ValueError(f"message {i}: content must be a string, got {type(msg['content']).__name__}")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise ValueError("no non-empty assistant message to learn from")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        return {"messages": messages}
    if fmt == "alpaca":
        instruction, output = _text(row, "instruction"), _text(row, "output")
        extra = _text(row, "input", required=False)
        if chat:
            user = instruction if not extra else f"{instruction}\n\n{extra}"
            return normalise_row(
                {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}]},
                "messages",
                system_prompt,
                chat,
            )
        template = ALPACA_PROMPT_WITH_INPUT if extra else ALPACA_PROMPT
        return {"prompt": template.format(instruction=instruction, input=extra), "completion": output}
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt-completion
            return normalise_row({"messages": [*prompt, *completion]}, "messages", system_prompt, chat)
        return {"prompt": _text(row, "prompt"), "completion": _text(row, "completion")}
    return {"text": _text(row, "text")}


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


def load_rows(sources: list[DataSource], config: DataConfig, chat: bool, base_dir: Path | None = None) -> Rows:
    """Read and validate every row of `sources`; bad rows raise (or are skipped and counted, per `on_bad_row`)."""
    out = Rows(rows=[])
    for source in sources:
        ds = read_source(source, base_dir)
        fmt = detect_format(ds.column_names, source)
        offset = 1  # rows are numbered from 1 as users count them; JSONL row N is line N
        for index, row in enumerate(ds):
            out.add(
                f"{source.path}, row {index + offset}",
                lambda row=row: normalise_row(row, fmt, config.system_prompt, chat),
                config.on_bad_row,
            )
    return out.checked(sources)


# --------------------------------------------------------------------------------------------
# Tokenization and loss masks
# --------------------------------------------------------------------------------------------


def tokenize_row(row: dict, tokenizer, train_on_inputs: bool) -> dict:
    """`input_ids` and `labels` (IGNORE_INDEX where no loss is taken) for one canonical row."""
    if "messages" in row:
        return _tokenize_chat(row["messages"], tokenizer, train_on_inputs)
    eos = tokenizer.eos_token or ""
    if "text" in row:
        ids = tokenizer(row["text"] + eos, add_special_tokens=True)["input_ids"]
        return {"input_ids": ids, "labels": list(ids)}
    prompt_ids = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
    full_ids = tokenizer(row["prompt"] + row["completion"] + eos, add_special_tokens=True)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:  # a merge across the boundary; tokenize the parts separately
        full_ids = prompt_ids + tokenizer(row["completion"] + eos, add_special_tokens=False)["input_ids"]
    labels = list(full_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    return {"input_ids": full_ids, "labels": labels}


def _render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _tokenize_chat(messages: list[dict], tokenizer, train_on_inputs: bool) -> dict:
    text = _render(tokenizer, messages)
    spans = []  # character spans of assistant turns (content + end-of-turn marker)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        if not text.startswith(upto) or not upto.startswith(before):
            raise DataError(
                "the chat template does not render conversations prefix-stably (a turn changes how earlier turns "
                "are rendered), so assistant turns cannot be located for loss masking. Set data.train_on_inputs: "
                "true, or give model.chat_template."
            )
        spans.append((len(before), len(upto)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if train_on_inputs:
        return {"input_ids": ids, "labels": list(ids)}
    labels = [
        tok if any(start <= s < end for start, end in spans) else IGNORE_INDEX
        for tok, (s, _e) in zip(ids, encoded["offset_mapping"])
    ]
    return {"input_ids": ids, "labels": labels}


def end_of_turn_token(tokenizer) -> tuple[int | None, str]:
    """The token the chat template puts right after an assistant message, and its text."""
    probe = "Xq7Zk"
    text = _render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
    tail = text[text.rindex(probe) + len(probe) :]
    if not tail:
        return None, ""
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    return (ids[0] if ids else None), tail


def check_stop_token(tokenizer, generation_config) -> tuple[list[int], str | None]:
    """Make sure generation stops on the token that ends assistant turns.

    Returns the eos ids generation should use and a message when they had to change (None when all was well).
    A model fine-tuned to end turns with `<|im_end|>` but generating until `</s>` rambles on forever.
    """
    turn_end, tail = end_of_turn_token(tokenizer)
    eos = generation_config.eos_token_id if generation_config is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if turn_end is None:
        return eos_ids, (
            "the chat template puts nothing after an assistant message, so the model cannot learn where a turn ends; "
            "generation will only stop at max_new_tokens. Use a template with an end-of-turn token."
        )
    if turn_end in eos_ids:
        return eos_ids, None
    name = tokenizer.convert_ids_to_tokens(turn_end)
    special = turn_end in set(tokenizer.all_special_ids)
    note = (
        f"the chat template ends assistant turns with {name!r} (id {turn_end}) but generation stops on "
        f"{eos_ids}; adding {turn_end} to generation_config.eos_token_id so the fine-tuned model stops where it learned to."
    )
    if not special:
        note += f" Note: {tail!r} is not a special token, so stopping on it may cut words; prefer a template with one."
    return [*eos_ids, turn_end], note


def fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return fingerprint(vocab, tokenizer.chat_template, tokenizer.eos_token, tokenizer.bos_token, type(tokenizer).__name__)


def tokenize_rows(rows: list[dict], tokenizer, train_on_inputs: bool, cache: Path | None = None, on_main_first=None):
    """A tokenized `datasets.Dataset` (`input_ids`, `labels`), cached under `cache` keyed by content.

    The key covers the rows themselves, the tokenizer (vocab, template, specials) and the masking option, so a
    changed file or template never reuses stale tokens. `on_main_first` (accelerate's `main_process_first`) makes
    rank 0 tokenize while the other ranks wait, then load the cache, instead of all ranks tokenizing at once.
    """
    import contextlib

    import datasets

    key = fingerprint(rows, tokenizer_fingerprint(tokenizer), train_on_inputs, "v1")
    path = cache / key if cache is not None else None
    ctx = on_main_first() if on_main_first is not None else contextlib.nullcontext()
    with ctx:
        if path is not None and (path / "dataset_info.json").is_file():
            return datasets.load_from_disk(str(path))
        ds = datasets.Dataset.from_list([tokenize_row(r, tokenizer, train_on_inputs) for r in rows])
        if path is not None:
            import os
            import shutil

            tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
            ds.save_to_disk(str(tmp))
            try:
                tmp.rename(path)
            except OSError:  # another process (e.g. another node's main rank) finished first: use its copy
                shutil.rmtree(tmp, ignore_errors=True)
            ds = datasets.load_from_disk(str(path))
        return ds


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

