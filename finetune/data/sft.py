"""SFT data: check every row's format, and turn rows into tokens and loss masks.

Rows are normalised to one of three shapes before tokenization:
- `messages`: a conversation; loss on assistant turns (unless `train_on_inputs`).
- `prompt`/`completion`: plain text pair; loss on the completion.
- `text`: raw text; loss on everything.
Masking is done here, not by the trainer, so it works with any chat template (no `{% generation %}` markers needed)
and can be tested directly. Checked rows and their tokens are cached (`finetune.data.cache`): a second run of the
same files reads two entries instead of reading, templating and tokenizing every row again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator

from finetune.data.cache import (
    code_digest, file_digest, fingerprint, read_dataset, read_json, tokenizer_fingerprint, write_dataset, write_json,
)
from finetune.data.rows import Rows, is_local, local_path, read_source
from finetune.errors import DataError, FinetuneError
from finetune.paths import cache_dir
from finetune.recipe import DataConfig, DataSource

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


ROLES = {"system", "user", "assistant", "tool"}


ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"


ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


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


def _row_formats(row: dict) -> list[str]:
    """The formats whose columns all hold a value in this row."""
    return [name for name, needed in FORMAT_COLUMNS.items() if all(row.get(c) is not None for c in needed)]


def _check_one_format(row: dict, fmt: str) -> None:
    """A row of another format in a file that mixes them (`datasets` gives every row every column, null-filled)."""
    present = _row_formats(row)
    if fmt not in present and present:
        other = present[0]
        raise ValueError(
            f"a {other} row ({', '.join(FORMAT_COLUMNS[other])}) in a file whose first row is {fmt}; "
            "one file holds one format: put these rows in a file of their own and list both under data.train"
        )


def load_rows(
    sources: list[DataSource], config: DataConfig, chat: bool, base_dir: Path | None = None, cache: Path | bool = True
) -> Rows:
    """Read and validate every row of `sources`; bad rows raise (or are skipped and counted, per `on_bad_row`).

    The checked rows, and what was skipped and why, are kept in `cache` (default: the kit's cache folder; False for
    none) under a key of the files' bytes and the options that shape rows, so a second run of the same data reads
    one JSON file instead of every row through `datasets`, and reports the same skipped rows. Hub datasets and
    folders are read every time (their content has no cheap fingerprint).
    """
    folder = cache_dir() / "rows" if cache is True else (cache or None)
    key = rows_key(sources, config, chat, base_dir) if folder is not None else None
    entry = folder / f"{key}.json" if key else None
    cached = read_json(entry, _rows_entry_ok) if entry is not None else None
    if cached is not None:
        return Rows(cached["rows"], cached["skipped"], cached["problems"], cached["origins"], key).checked(sources)
    out = _read_rows(sources, config, chat, base_dir).checked(sources)
    out.fingerprint = key
    if entry is not None:
        write_json(entry, {"rows": out.rows, "origins": out.origins, "skipped": out.skipped, "problems": out.problems})
    return out


def rows_key(sources: list[DataSource], config: DataConfig, chat: bool, base_dir: Path | None = None) -> str | None:
    """What the checked rows of `sources` depend on: each file's bytes and source options, the row options, and the
    code that reads and normalises rows. None when a source is not a local file."""
    digests = []
    for source in sources:
        try:
            path = local_path(source, base_dir) if is_local(source) else None
        except FinetuneError:  # a package that is not installed: reading the rows says so
            return None
        if path is None or not path.is_file():
            return None
        digests.append(file_digest(path))
    options = [s.model_dump(mode="json") for s in sources]
    return fingerprint("rows", _code(), options, digests, config.system_prompt, config.on_bad_row, chat)


def _code() -> str:
    """The modules whose code decides what an entry holds."""
    from finetune.data import cache, rows

    return code_digest(__file__, rows.__file__, cache.__file__)


def _rows_entry_ok(entry) -> bool:
    if not isinstance(entry, dict):
        return False
    rows, origins, problems = entry.get("rows"), entry.get("origins"), entry.get("problems")
    lists = all(isinstance(value, list) for value in (rows, origins, problems))
    return lists and len(rows) == len(origins) and isinstance(entry.get("skipped"), int)


def _read_rows(sources: list[DataSource], config: DataConfig, chat: bool, base_dir: Path | None = None) -> Rows:
    out = Rows(rows=[])
    for origin, build in row_builders(sources, config, chat, base_dir):
        out.add(origin, build, config.on_bad_row)
    return out


def row_builders(
    sources: list[DataSource], config: DataConfig, chat: bool, base_dir: Path | None = None
) -> Iterator[tuple[str, Callable[[], dict]]]:
    """(origin, build) of each row of `sources`, one at a time: `build()` is the row in canonical form, or raises the
    row's problem as a ValueError (`Rows.add` and the data report decide what a problem does)."""
    for source in sources:
        ds = read_source(source, base_dir)
        fmt = detect_format(ds.column_names, source)
        mixed = source.format == "auto" and sum(all(c in ds.column_names for c in cols) for cols in FORMAT_COLUMNS.values()) > 1
        if mixed and len(ds):  # the columns of several formats: the file's format is its first row's
            fmt = next(iter(_row_formats(ds[0])), fmt)
        offset = 1  # rows are numbered from 1 as users count them; JSONL row N is line N
        for index, row in enumerate(ds):

            def build(row=row) -> dict:
                if mixed:
                    _check_one_format(row, fmt)
                return normalise_row(row, fmt, config.system_prompt, chat)

            yield f"{source.path}, row {index + offset}", build


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


def needs_chat_template(rows: list[dict], tokenizer) -> None:
    """Chat rows cannot be tokenized (nor masked) without a chat template."""
    if any("messages" in r for r in rows) and not tokenizer.chat_template:
        raise DataError(
            "the data holds chat `messages` but the tokenizer has no chat template: set model.chat_template "
            "(e.g. chatml, or a path to a .jinja file)."
        )


def first_loss_token(labels: list[int]) -> int | None:
    """Index of the first token that carries a loss, or None."""
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)


def learns_nothing(first_loss: int | None, max_length: int) -> bool:
    """A row with no loss token, or none before `max_length` (TRL keeps a row's start), teaches nothing."""
    return first_loss is None or first_loss >= max_length


def keep_learnable(rows: Rows, tokenizer, config: DataConfig, cache: Path | None = None, on_main_first=None):
    """`rows` tokenized, less those with no loss token within `data.max_length`: (the rows kept, their dataset).

    TRL 1.16 truncates from the right (`truncation_mode="keep_start"`, and BFD packing keeps the start too), so a
    row whose prompt fills the window keeps no completion token and teaches nothing; TRL drops such rows without a
    word. Here they follow `data.on_bad_row` (stop with file and row, or counted as skipped), and a split with no
    row left stops the run.
    """
    needs_chat_template(rows.rows, tokenizer)
    ds, first_loss = tokenize_rows(rows.rows, tokenizer, config.train_on_inputs, cache, on_main_first, rows.fingerprint)
    limit = config.max_length
    cut = []  # (index, why) of rows with nothing to learn within the window
    for index, first in enumerate(first_loss):
        if learns_nothing(first, limit):
            where = f"the prompt alone is {first} tokens" if first is not None else "no token carries a loss"
            cut.append((index, f"{rows.origins[index]}: no completion token within data.max_length={limit} ({where})"))
    if not cut:
        return rows, ds
    if len(cut) == len(rows.rows):
        raise DataError(
            f"no row has a completion token within data.max_length={limit}; raise data.max_length or shorten the "
            f"prompts. First: {cut[0][1]}"
        )
    if config.on_bad_row == "error":
        raise DataError(
            f"{cut[0][1]}  (raise data.max_length, shorten the prompt, or set data.on_bad_row: skip to drop such "
            "rows and count them)"
        )
    log.warning("Skipped %d row(s) with no completion token within data.max_length=%d; first: %s", len(cut), limit, cut[0][1])
    dropped = {index for index, _ in cut}
    kept = [i for i in range(len(rows.rows)) if i not in dropped]
    out = Rows(
        [rows.rows[i] for i in kept],
        rows.skipped + len(cut),
        rows.problems + [why for _, why in cut],
        [rows.origins[i] for i in kept],
    )
    return out, ds.select(kept)


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


def set_stop_tokens(generation_config, tokenizer) -> str | None:
    """Generation stops on the chat template's end-of-turn token (`check_stop_token`) and pads with the tokenizer's
    pad token; returns the note to warn with when the stop tokens had to change."""
    eos_ids, note = check_stop_token(tokenizer, generation_config)
    generation_config.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    if generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return note


def tokenize_rows(
    rows: list[dict], tokenizer, train_on_inputs: bool, cache: Path | None = None, on_main_first=None,
    rows_fingerprint: str | None = None,
):
    """A tokenized `datasets.Dataset` (`input_ids`, `labels`) and each row's first loss token (None: no token carries
    a loss), cached under `cache`.

    The key covers the rows (`rows_fingerprint` from `load_rows`, else a hash of the rows themselves), the tokenizer
    (vocab, template, specials), the masking option, the tokenizing libraries and this code, so a changed file or
    template never reuses stale tokens. `data.max_length` is not in it: tokens do not depend on it, and the rows it
    cuts are found from the first loss tokens. `on_main_first` (accelerate's `main_process_first`) makes rank 0
    tokenize while the other ranks wait, then load the cache, instead of all ranks tokenizing at once.
    """
    import contextlib

    import datasets
    import tokenizers
    import transformers

    folder = None
    if cache is not None:
        content = rows_fingerprint or fingerprint(rows)
        versions = (transformers.__version__, tokenizers.__version__)
        key = fingerprint("tokens", _code(), content, tokenizer_fingerprint(tokenizer), train_on_inputs, versions)
        folder = cache / key
    ctx = on_main_first() if on_main_first is not None else contextlib.nullcontext()
    with ctx:
        hit = read_dataset(folder, len(rows), _first_loss_ok) if folder is not None else None
        if hit is not None:
            return hit[0], hit[1]["first_loss"]
        encoded = [tokenize_row(r, tokenizer, train_on_inputs) for r in rows]
        first_loss = [first_loss_token(e["labels"]) for e in encoded]
        ds = datasets.Dataset.from_list(encoded)
        if folder is not None:
            ds = write_dataset(folder, ds, {"first_loss": first_loss})
        return ds, first_loss


def _first_loss_ok(meta: dict) -> bool:
    first_loss = meta.get("first_loss")
    ok = isinstance(first_loss, list) and len(first_loss) == meta["rows"]
    return ok and all(f is None or isinstance(f, int) for f in first_loss)


# --------------------------------------------------------------------------------------------
# The data report (`finetune data`)
# --------------------------------------------------------------------------------------------


def report_facts(config: DataConfig, tokenizer, batching: str, micro_batch_size: int):
    """The rows as `prepare_sft_data` reads them, one at a time, for the data report: the same reading, templating,
    masking, held-out split and `max_length` rule (a row with nothing to learn within it is dropped; a longer row
    is cut to its start). Rows are read twice under `data.eval_fraction`: once to count them for the split."""
    from finetune.data.report import DataFacts, Tally

    tally = Tally()
    facts = DataFacts(rows=(), batching=batching, max_length=config.max_length, micro_batch_size=micro_batch_size,
                      tally=tally, decode=tokenizer.decode, drop_stops_training=config.on_bad_row == "error")
    facts.rows = _row_facts(config, tokenizer, tally)
    return facts


def _usable(sources: list[DataSource], config: DataConfig, chat: bool, tally) -> Iterator[tuple[str, dict]]:
    from finetune.data.rows import checked_row

    for origin, build in row_builders(sources, config, chat):
        row = checked_row(origin, build, config.on_bad_row, tally)
        if row is not None:
            yield origin, row


def _row_facts(config: DataConfig, tokenizer, tally):
    from finetune.data.report import Tally
    from finetune.data.rows import held_out_order

    chat = bool(tokenizer.chat_template)
    held: set[int] = set()
    if config.eval_fraction:  # counted first, as `Rows.split` splits the usable rows of data.train
        count = sum(1 for _ in _usable(config.train, config, chat, Tally()))
        held = set(held_out_order(count, config.eval_fraction, config.seed)) if count else set()
    groups = [("train", config.train)] + ([("eval", config.eval)] if config.eval else [])
    for split, sources in groups:
        count = 0
        for index, (origin, row) in enumerate(_usable(sources, config, chat, tally)):
            needs_chat_template([row], tokenizer)
            count += 1
            yield row_facts(row, origin, "eval" if index in held else split, tokenizer, config)
        if not count:
            Rows([], tally.skipped, list(tally.problems)).checked(sources)  # no usable row: the same error as training


def row_facts(row: dict, origin: str, split: str, tokenizer, config: DataConfig):
    """One canonical row's `RowFacts`: tokenized and masked by `tokenize_row`, then what `keep_learnable` and
    `truncate` do to it."""
    from finetune.data.report import RowFacts

    encoded = tokenize_row(row, tokenizer, config.train_on_inputs)
    ids, labels = encoded["input_ids"], encoded["labels"]
    mask = [label != IGNORE_INDEX for label in labels]
    limit = config.max_length
    dropped = learns_nothing(first_loss_token(labels), limit)
    return RowFacts(
        split=split, origin=origin, text=row_text(row), tokens=len(ids), trained=sum(mask),
        kept=0 if dropped else min(len(ids), limit), trained_kept=0 if dropped else sum(mask[:limit]),
        dropped=dropped, ids=ids, trained_mask=mask,
    )


def row_text(row: dict) -> str:
    """What two rows are compared on for duplicates: the conversation's words less its system prompt (shared by
    every row when `data.system_prompt` adds one), the prompt and completion, or the text."""
    if "messages" in row:
        return "\n".join(m["content"] for m in row["messages"] if m["role"] != "system")
    if "text" in row:
        return row["text"]
    return f"{row['prompt']}\n{row['completion']}"
