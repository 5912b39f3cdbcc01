"""Data: formats, loss masks, bad rows with file + row numbers, the end-of-turn check, the token cache."""

from __future__ import annotations

import json

import pytest

from finetune.data.rows import split_rows
from finetune.data.sft import IGNORE_INDEX, check_stop_token, load_rows, normalise_row, tokenize_row, tokenize_rows
from finetune.errors import DataError
from finetune.recipe import DataConfig
from support import write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def config(path, **kw) -> DataConfig:
    return DataConfig(train=str(path), **kw)


CHAT = {"messages": [{"role": "user", "content": "what is the capital of france"}, {"role": "assistant", "content": "paris"}]}


def decoded_loss_tokens(tokenizer, encoded) -> list[str]:
    return [tokenizer.convert_ids_to_tokens(t) for t, lab in zip(encoded["input_ids"], encoded["labels"]) if lab != IGNORE_INDEX]


def test_chat_loss_only_on_assistant_turns(tokenizer):
    encoded = tokenize_row(normalise_row(CHAT, "messages", None, chat=True), tokenizer, train_on_inputs=False)
    assert len(encoded["input_ids"]) == len(encoded["labels"])
    # The assistant's answer and its end-of-turn token carry labels; the prompt (user turn, role headers) does not.
    assert decoded_loss_tokens(tokenizer, encoded) == ["paris", "<|im_end|>", "\n"]
    prompt_tokens = [tokenizer.convert_ids_to_tokens(t) for t, lab in zip(encoded["input_ids"], encoded["labels"]) if lab == IGNORE_INDEX]
    assert "france" in prompt_tokens and "user" in prompt_tokens
    assert all(lab == tok for tok, lab in zip(encoded["input_ids"], encoded["labels"]) if lab != IGNORE_INDEX)


def test_multi_turn_masks_every_assistant_turn(tokenizer):
    row = {
        "messages": [
            {"role": "system", "content": "you are a kit"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "what is the capital of italy"},
            {"role": "assistant", "content": "rome"},
        ]
    }
    encoded = tokenize_row(normalise_row(row, "messages", None, chat=True), tokenizer, train_on_inputs=False)
    assert decoded_loss_tokens(tokenizer, encoded) == ["hi", "<|im_end|>", "\n", "rome", "<|im_end|>", "\n"]


def test_train_on_inputs_trains_everything(tokenizer):
    encoded = tokenize_row(normalise_row(CHAT, "messages", None, chat=True), tokenizer, train_on_inputs=True)
    assert encoded["labels"] == encoded["input_ids"]


def test_prompt_completion_masks_prompt_and_appends_eos(tokenizer):
    row = normalise_row({"prompt": "what is the capital of spain", "completion": " madrid"}, "prompt_completion", None, chat=True)
    encoded = tokenize_row(row, tokenizer, train_on_inputs=False)
    assert decoded_loss_tokens(tokenizer, encoded) == ["madrid", "<|im_end|>"]
    assert tokenize_row(row, tokenizer, train_on_inputs=True)["labels"] == encoded["input_ids"]


def test_alpaca_becomes_a_conversation_or_a_prompt():
    row = {"instruction": "name a colour", "input": "", "output": "red"}
    assert normalise_row(row, "alpaca", None, chat=True) == {
        "messages": [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "red"}]
    }
    plain = normalise_row({**row, "input": "not blue"}, "alpaca", None, chat=False)
    assert plain == {
        "prompt": "### Instruction:\nname a colour\n\n### Input:\nnot blue\n\n### Response:\n",
        "completion": "red",
    }


def test_system_prompt_added_when_missing():
    row = normalise_row(CHAT, "messages", "be brief", chat=True)
    assert row["messages"][0] == {"role": "system", "content": "be brief"}


@pytest.mark.parametrize(
    "row, problem",
    [
        ({"messages": []}, "empty conversation"),
        ({"messages": "hello"}, "'messages' must be a list of {role, content}, got str"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no non-empty assistant message to learn from"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "message 0: unknown role 'robot' (expected one of ['assistant', 'system', 'tool', 'user'])"),
        ({"messages": [{"role": "user", "content": 3}]}, "message 0: content must be a string, got int"),
        ({"messages": [{"content": "x"}]}, "message 0 must have 'role' and 'content'"),
    ],
)
def test_bad_chat_rows_name_file_and_row(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "train.jsonl", [CHAT, CHAT, row])
    with pytest.raises(DataError) as err:
        load_rows([config(path).train[0]], config(path), chat=True)
    assert str(err.value) == f"{path}, row 3: {problem}  (set data.on_bad_row: skip to drop such rows and count them)"


def test_bad_alpaca_field_type(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x", "output": None}])
    with pytest.raises(DataError, match=r"a\.jsonl, row 2: 'output' is missing or empty"):
        load_rows(config(path).train, config(path), chat=True)


def test_skipped_rows_are_counted(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [CHAT, {"messages": []}, CHAT, {"messages": [{"role": "user", "content": "x"}]}])
    cfg = config(path, on_bad_row="skip")
    rows = load_rows(cfg.train, cfg, chat=True)
    assert len(rows.rows) == 2 and rows.skipped == 2
    assert rows.problems == [f"{path}, row 2: empty conversation", f"{path}, row 4: no non-empty assistant message to learn from"]


def test_invalid_json_line_is_located(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(CHAT) + "\n" + '{"messages": [oops\n')
    with pytest.raises(DataError) as err:
        load_rows(config(path).train, config(path), chat=True)
    assert str(err.value) == f"{path}, line 2: invalid JSON (Expecting value)"


def test_format_detection_and_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"conversations": CHAT["messages"]}])
    with pytest.raises(DataError, match="found a 'conversations' column; add `columns: {messages: conversations}`"):
        load_rows(config(path).train, config(path), chat=True)
    cfg = DataConfig(train={"path": str(path), "columns": {"messages": "conversations"}})
    assert load_rows(cfg.train, cfg, chat=True).rows == [CHAT]


def test_csv_and_parquet_sources(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["what is red", "what is blue"], "completion": [" a colour", " a colour"]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        cfg = config(tmp_path / name)
        assert load_rows(cfg.train, cfg, chat=True).rows[1] == {"prompt": "what is blue", "completion": " a colour"}


def test_missing_file_and_unknown_hub_dataset(tmp_path):
    cfg = config(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="data file not found"):
        load_rows(cfg.train, cfg, chat=True)
    cfg = config("someone/some-dataset")
    with pytest.raises(DataError, match="not a local file and could not be loaded from the hub"):
        load_rows(cfg.train, cfg, chat=True)


def test_split_is_seeded_and_disjoint():
    rows = [{"text": str(i)} for i in range(50)]
    train, held = split_rows(rows, 0.2, seed=1)
    assert len(held) == 10 and len(train) == 40
    assert split_rows(rows, 0.2, seed=1) == (train, held)
    assert {r["text"] for r in train}.isdisjoint({r["text"] for r in held})


def test_stop_token_mismatch_is_fixed_and_reported(tiny_tokenizer_dir):
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    turn_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert check_stop_token(tok, GenerationConfig(eos_token_id=turn_end)) == ([turn_end], None)
    # A base model whose generation stops on another token than the one the template ends turns with.
    bos = tok.bos_token_id
    ids, note = check_stop_token(tok, GenerationConfig(eos_token_id=bos))
    assert ids == [bos, turn_end]
    assert note == (
        f"the chat template ends assistant turns with '<|im_end|>' (id {turn_end}) but generation stops on "
        f"[{bos}]; adding {turn_end} to generation_config.eos_token_id so the fine-tuned model stops where it learned to."
    )


def test_template_without_end_of_turn_is_reported(tiny_tokenizer_dir):
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
    ids, note = check_stop_token(tok, GenerationConfig(eos_token_id=tok.eos_token_id))
    assert ids == [tok.eos_token_id]
    assert note.startswith("the chat template puts nothing after an assistant message")


def test_token_cache_is_keyed_by_content(tokenizer, tmp_path):
    rows = [normalise_row(CHAT, "messages", None, chat=True)]
    first, _ = tokenize_rows(rows, tokenizer, False, cache=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    again, _ = tokenize_rows(rows, tokenizer, False, cache=tmp_path)
    assert again["input_ids"] == first["input_ids"] and len(list(tmp_path.iterdir())) == 1
    tokenize_rows(rows, tokenizer, True, cache=tmp_path)  # other masking → other entry
    changed = [{"messages": [*rows[0]["messages"][:1], {"role": "assistant", "content": "rome"}]}]
    tokenize_rows(changed, tokenizer, False, cache=tmp_path)  # other content → other entry
    assert len(list(tmp_path.iterdir())) == 3


def test_alpaca_rows_with_a_text_column_are_not_a_mixed_file(tmp_path):
    """Alpaca exports often carry the rendered `text` beside instruction/output: every row has both, nothing mixes."""
    row = {"instruction": "name a colour", "output": "red", "text": "### Instruction: name a colour ### Response: red"}
    path = write_jsonl(tmp_path / "alpaca.jsonl", [row, row])
    rows = load_rows(config(path).train, config(path), chat=True)
    assert rows.rows[0] == {"messages": [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "red"}]}


def test_held_out_split_keeps_each_rows_origin(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": f"row {i}"} for i in range(1, 11)])
    rows = load_rows(config(path).train, config(path), chat=True)
    kept, held = rows.split(0.2, seed=3)
    assert [r["text"] for r in held.rows] == [r["text"] for r in split_rows(rows.rows, 0.2, seed=3)[1]]
    for part in (kept, held):
        assert [f"{path}, row {r['text'].split()[1]}" for r in part.rows] == part.origins


def test_jsonl_lines_split_on_newlines_only(tmp_path):
    path = tmp_path / "sep.jsonl"
    path.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n" + json.dumps({"text": "c"}) + "\n")
    rows = load_rows(config(path).train, config(path), chat=True)
    assert [r["text"] for r in rows.rows] == ["a\u2028b", "c"]


def test_no_usable_row_names_the_first_problem(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": []}, {"messages": []}])
    cfg = config(path, on_bad_row="skip")
    with pytest.raises(DataError) as err:
        load_rows(cfg.train, cfg, chat=True)
    assert str(err.value) == f"no usable rows in {path}; the first problem: {path}, row 1: empty conversation"


def test_bom_and_named_encodings_are_read(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(CHAT).encode() + b"\n")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("prompt,completion\ncaf\u00e9,\" cr\u00e8me\"\n".encode("latin-1"))
    cfg = DataConfig(train=[str(bom), {"path": str(latin), "encoding": "latin-1"}])
    assert load_rows(cfg.train, cfg, chat=True).rows == [CHAT, {"prompt": "caf\u00e9", "completion": " cr\u00e8me"}]
