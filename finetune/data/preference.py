"""Preference data: pairs `{prompt, chosen, rejected}` (text or chat), chosen/rejected conversations that share their
prompt, and unpaired `{prompt, completion, label}` rows (KTO); every row checked, then tokenized.

Templating is the SFT code's (`finetune.data.sft`): a chat row is rendered whole with the model's chat template and
tokenized once, and its answer is the tokens from the end of the prompt as the template renders it with the
generation prompt, so the answer ends with the template's end-of-turn token and no BOS is added inside the text; a
text row is `prompt` (with the tokenizer's BOS) then `answer + eos`. A row is never truncated: one longer than
`data.max_length` is a bad row, named with its file and row, following `data.on_bad_row`.
"""

from __future__ import annotations

import logging

from finetune.data.rows import Rows, read_source
from finetune.data.sft import ROLES, _render, needs_chat_template, tokenize_row
from finetune.errors import DataError
from finetune.recipe import DataConfig, DataSource

log = logging.getLogger(__name__)

PAIRED = ("prompt", "chosen", "rejected")
UNPAIRED = ("prompt", "completion", "label")


def detect_shape(columns: list[str], source: DataSource) -> str:
    """`pairs` (chosen and rejected answers) or `unpaired` (one completion and a desirable/undesirable label)."""
    if "chosen" in columns and "rejected" in columns:
        return "pairs"
    if all(c in columns for c in UNPAIRED):
        return "unpaired"
    raise DataError(
        f"{source.path}: preference rows need columns prompt, chosen, rejected (or chosen and rejected conversations "
        f"that share their prompt; or prompt, completion, label for KTO); found {columns}. Map yours with "
        "`columns: {chosen: your_name}`."
    )


def _messages(value, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{key}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"'{key}' message {i} must have 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise ValueError(f"'{key}' message {i}: unknown role {msg['role']!r} (expected one of {sorted(ROLES)})")
        if not isinstance(msg["content"], str):
            raise ValueError(f"'{key}' message {i}: content must be a string, got {type(msg['content']).__name__}")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _answer(value, key: str) -> str:
    """An answer: a string, or a conversation's one assistant message."""
    if value is None:
        raise ValueError(f"'{key}' is missing")
    if isinstance(value, list):
        messages = _messages(value, key)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise ValueError(f"'{key}' must be one assistant message (the answer), got {len(messages)} message(s)")
        value = messages[0]["content"]
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string or an assistant message, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"'{key}' is an empty answer")
    return value


def _prompt(value, system_prompt: str | None):
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError("'prompt' is missing or empty")
    if isinstance(value, list):
        messages = _messages(value, "prompt")
        if messages[-1]["role"] == "assistant":
            raise ValueError("'prompt' ends with an assistant message; the answer goes in chosen/rejected")
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        return messages
    if not isinstance(value, str):
        raise ValueError(f"'prompt' must be a string or a list of messages, got {type(value).__name__}")
    return value


def _implicit_prompt(chosen, rejected) -> tuple[list[dict], list[dict], list[dict]]:
    """Chosen and rejected conversations without `prompt`: the shared messages are the prompt, the last one the answer."""
    chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
        raise ValueError(
            "chosen and rejected conversations must share every message but the last (the prompt); they differ "
            "earlier, so the prompt is not a prefix of both"
        )
    return chosen[:-1], chosen[-1:], rejected[-1:]


def normalise_pair(row: dict, system_prompt: str | None) -> dict:
    """{prompt (text or messages), chosen, rejected}; ValueError says what is wrong."""
    prompt = row.get("prompt")
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if prompt is None and isinstance(chosen, list) and isinstance(rejected, list):
        prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
    prompt = _prompt(prompt, system_prompt)
    chosen, rejected = _answer(chosen, "chosen"), _answer(rejected, "rejected")
    if chosen.strip() == rejected.strip():
        raise ValueError("chosen and rejected are the same answer: the pair prefers nothing")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def normalise_unpaired(row: dict, system_prompt: str | None) -> dict:
    """{prompt, completion, label (True: desirable)}; ValueError says what is wrong."""
    label = row.get("label")
    if not isinstance(label, bool):
        raise ValueError(f"'label' must be true (desirable) or false (undesirable), got {label!r}")
    return {"prompt": _prompt(row.get("prompt"), system_prompt), "completion": _answer(row.get("completion"), "completion"),
            "label": label}


def load_preference_rows(sources: list[DataSource], config: DataConfig) -> Rows:
    """Every row of `sources` checked; bad rows raise with file and row, or are skipped and counted (`on_bad_row`).
    All sources hold one shape: pairs, or unpaired rows."""
    out, shapes = Rows(rows=[]), set()
    for source in sources:
        ds = read_source(source)
        shape = detect_shape(ds.column_names, source)
        shapes.add(shape)
        normalise = normalise_pair if shape == "pairs" else normalise_unpaired
        for index, row in enumerate(ds):
            out.add(f"{source.path}, row {index + 1}", lambda row=row: normalise(row, config.system_prompt), config.on_bad_row)
    if len(shapes) > 1:
        raise DataError("the data mixes pairs (chosen/rejected) and unpaired rows (completion/label); use one shape")
    return out.checked(sources)


def rows_shape(rows: list[dict]) -> str:
    return "unpaired" if rows and "completion" in rows[0] else "pairs"


def tokenize_answer(prompt, answer: str, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) as SFT tokenizes the row: the answer ends with the end-of-turn token (chat) or eos."""
    if isinstance(prompt, list):
        before = _render(tokenizer, prompt, generation_prompt=True)
        text = _render(tokenizer, [*prompt, {"role": "assistant", "content": answer}])
        if not text.startswith(before):
            raise ValueError(
                "the chat template renders the prompt differently once the answer follows it, so the prompt is not a "
                "prefix of prompt+answer; give model.chat_template a template that renders turns prefix-stably"
            )
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        split = next((i for i, (start, _end) in enumerate(offsets) if start >= len(before)), len(ids))
        return ids[:split], ids[split:]
    tokens = tokenize_row({"prompt": prompt, "completion": answer}, tokenizer, train_on_inputs=False)
    split = next(i for i, label in enumerate(tokens["labels"]) if label != -100)
    return tokens["input_ids"][:split], tokens["input_ids"][split:]


def tokenize_preference_row(row: dict, tokenizer, max_length: int) -> dict:
    """`prompt_ids` and `chosen_ids`/`rejected_ids` (or `completion_ids` and `label`); ValueError for a row that
    `max_length` would cut, or whose answers tokenize after different prompts."""
    answers = ("chosen", "rejected") if "chosen" in row else ("completion",)
    out: dict = {}
    for key in answers:
        prompt_ids, answer_ids = tokenize_answer(row["prompt"], row[key], tokenizer)
        if "prompt_ids" in out and out["prompt_ids"] != prompt_ids:
            raise ValueError("the prompt tokenizes differently before chosen and before rejected (a token merges "
                             "across the boundary); end the prompt with a space or newline")
        if not answer_ids:
            raise ValueError(f"'{key}' tokenizes to nothing")
        total = len(prompt_ids) + len(answer_ids)
        if total > max_length:
            raise ValueError(
                f"the prompt and {key} answer are {total} tokens, over data.max_length={max_length}: a cut answer "
                "would be scored on part of itself; raise data.max_length or shorten the row"
            )
        out["prompt_ids"] = prompt_ids
        out[f"{key}_ids"] = answer_ids
    if "label" in row:
        out["label"] = row["label"]
    return out


def tokenize_preference_rows(rows: Rows, tokenizer, config: DataConfig) -> tuple[Rows, list[dict]]:
    """The rows that fit `data.max_length`, and their tokens; the others follow `data.on_bad_row`."""
    needs_chat_template([{"messages": r["prompt"]} for r in rows.rows if isinstance(r["prompt"], list)], tokenizer)
    kept = Rows(rows=[], skipped=rows.skipped, problems=list(rows.problems))
    tokens = []
    for row, origin in zip(rows.rows, rows.origins):
        before = len(kept.rows)
        kept.add(origin, lambda row=row: {"row": row, "tokens": tokenize_preference_row(row, tokenizer, config.max_length)},
                 config.on_bad_row)
        if len(kept.rows) > before:
            entry = kept.rows.pop()
            kept.rows.append(entry["row"])
            tokens.append(entry["tokens"])
    if not kept.rows:
        raise DataError(f"no usable preference row left; the first problem: {kept.problems[0]}")
    if kept.skipped > rows.skipped:
        log.warning("Skipped %d row(s) that do not tokenize within data.max_length; first: %s",
                    kept.skipped - rows.skipped, kept.problems[len(rows.problems)])
    return kept, tokens
