"""Broken data files, each through `finetune validate RECIPE --data` as a user runs it: one message naming the file
and its line or row, a non-zero exit, never a traceback; and the same stops in training, before the model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.errors import DataError
from finetune.recipe import validate_recipe
from support import sft_recipe, write_jsonl

CHAT = {"messages": [{"role": "user", "content": "what is the capital of france"}, {"role": "assistant", "content": "paris"}]}
PAIR = {"prompt": "what is the capital of italy", "completion": " rome"}
LONG = {"prompt": " ".join(["the"] * 40), "completion": " paris"}  # 40 prompt tokens: past max_length 16
SKIP_HINT = "  (set data.on_bad_row: skip to drop such rows and count them)"


def latin1_jsonl(folder: Path) -> tuple[Path, str]:
    path = folder / "latin1.jsonl"
    first = json.dumps(PAIR) + "\n"
    path.write_bytes(first.encode() + '{"prompt": "caf\u00e9 in paris", "completion": " yes"}\n'.encode("latin-1"))
    offset = len(first) + len('{"prompt": "caf')
    return path, (
        f"{path}, line 2: not UTF-8 (byte 0xe9 at offset {offset}). Convert the file (from latin-1: iconv -f latin1 "
        f"-t utf-8 {path} > {folder / 'latin1.utf8.jsonl'}), or give its encoding on the data source in the recipe "
        "({path: ..., encoding: latin-1})."
    )


def utf16_csv(folder: Path) -> tuple[Path, str]:
    path = folder / "utf16.csv"
    path.write_text("prompt,completion\nwhat is red, a colour\n", encoding="utf-16")
    return path, (
        f"{path}, line 1: not UTF-8 (the file starts with a UTF-16 byte-order mark). Convert the file (from utf-16: "
        f"iconv -f utf-16 -t utf-8 {path} > {folder / 'utf16.utf8.csv'}), or give its encoding on the data source in "
        "the recipe ({path: ..., encoding: utf-16})."
    )


def empty_file(folder: Path) -> tuple[Path, str]:
    path = folder / "empty.jsonl"
    path.write_bytes(b"")
    return path, f"{path}: empty file (no rows)"


def blank_lines(folder: Path) -> tuple[Path, str]:
    path = folder / "blank.jsonl"
    path.write_text("\n  \n\t\n")
    return path, f"{path}: empty file (no rows)"


def truncated_jsonl(folder: Path) -> tuple[Path, str]:
    path = folder / "cut.jsonl"
    path.write_text(json.dumps(PAIR) + "\n" + json.dumps(PAIR) + "\n" + json.dumps(PAIR)[:25])
    return path, f"{path}, line 3: invalid JSON (Unterminated string starting at)"


def truncated_json(folder: Path) -> tuple[Path, str]:
    path = folder / "cut.json"
    path.write_text("[\n" + json.dumps(PAIR) + ",\n" + json.dumps(PAIR)[:30])
    return path, f"{path}, line 3: invalid JSON (Unterminated string starting at)"


def json_not_a_list(folder: Path) -> tuple[Path, str]:
    path = folder / "object.json"
    path.write_text(json.dumps(PAIR))
    return path, f"{path}: expected a JSON list of objects, one per row ([{{...}}, {{...}}]), got an object (not one list per column)"


def json_list_of_strings(folder: Path) -> tuple[Path, str]:
    path = folder / "strings.json"
    path.write_text(json.dumps([PAIR, "what is blue"]))
    return path, f"{path}, row 2: expected a JSON object, got a string"


def cut_csv_line(folder: Path) -> tuple[Path, str]:
    path = folder / "cut.csv"
    path.write_text("prompt,completion\nwhat is red, a colour\nwhat is blue\n")
    return path, (
        f"{path}, line 3: 1 field(s), but the header has 2 (prompt, completion); is the line cut short, or a comma not quoted?"
    )


def unclosed_csv_quote(folder: Path) -> tuple[Path, str]:
    path = folder / "quote.csv"
    path.write_text('prompt,completion\nwhat is red, a colour\n"what is blue, a colour\n')
    return path, f"{path}, line 3: not valid CSV (unexpected end of data)"


def header_only_csv(folder: Path) -> tuple[Path, str]:
    path = folder / "header.csv"
    path.write_text("prompt,completion\n")
    return path, f"{path}: a header line and no rows"


def unknown_columns(folder: Path) -> tuple[Path, str]:
    path = write_jsonl(folder / "qa.jsonl", [{"question": "what is red", "answer": "a colour"}])
    return path, (
        f"{path}: cannot tell the format from columns ['question', 'answer']. Expected one of: messages (messages); "
        "alpaca (instruction, output); prompt_completion (prompt, completion); text (text). Set `format:` and "
        "`columns:` in the data source."
    )


def missing_value(folder: Path) -> tuple[Path, str]:
    path = write_jsonl(folder / "gap.jsonl", [PAIR, {"prompt": "what is blue", "completion": None}])
    return path, f"{path}, row 2: 'completion' is missing or empty" + SKIP_HINT


def mixed_formats(folder: Path) -> tuple[Path, str]:
    path = write_jsonl(folder / "mixed.jsonl", [CHAT, CHAT, PAIR])
    return path, (
        f"{path}, row 3: a prompt_completion row (prompt, completion) in a file whose first row is messages; "
        "one file holds one format: put these rows in a file of their own and list both under data.train" + SKIP_HINT
    )


def all_too_long(folder: Path) -> tuple[Path, str]:
    path = write_jsonl(folder / "long.jsonl", [LONG, LONG, LONG])
    return path, (
        "no row has a completion token within data.max_length=16; raise data.max_length or shorten the prompts. "
        f"First: {path}, row 1: no completion token within data.max_length=16 (the prompt alone is 40 tokens)"
    )


def some_too_long(folder: Path) -> tuple[Path, str]:
    path = write_jsonl(folder / "some_long.jsonl", [PAIR, LONG, PAIR])
    return path, (
        f"{path}, row 2: no completion token within data.max_length=16 (the prompt alone is 40 tokens)  (raise "
        "data.max_length, shorten the prompt, or set data.on_bad_row: skip to drop such rows and count them)"
    )


def chat_too_long(folder: Path) -> tuple[Path, str]:
    long_chat = {"messages": [{"role": "user", "content": " ".join(["the"] * 40)}, {"role": "assistant", "content": "paris"}]}
    path = write_jsonl(folder / "long_chat.jsonl", [long_chat])
    return path, (
        "no row has a completion token within data.max_length=16; raise data.max_length or shorten the prompts. "
        f"First: {path}, row 1: no completion token within data.max_length=16 (the prompt alone is 48 tokens)"
    )


# The table of the issue, each run as a user runs it (a subprocess); then more cases through the same command in
# this process (the same code path, without a second of interpreter start-up each).
BROKEN_SFT_FILES = [
    latin1_jsonl, utf16_csv, empty_file, blank_lines, truncated_jsonl, json_not_a_list, unknown_columns, all_too_long,
    mixed_formats,
]
MORE_BROKEN_SFT_FILES = [
    truncated_json, json_list_of_strings, cut_csv_line, unclosed_csv_quote, header_only_csv, missing_value,
    some_too_long, chat_too_long,
]


def write_recipe(folder: Path, recipe: dict) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def validate_data(recipe_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune.cli", "validate", str(recipe_path), "--data"],
        capture_output=True, text=True, cwd=recipe_path.parent, timeout=300,
    )


def validate_data_here(recipe_path: Path, capsys) -> subprocess.CompletedProcess:
    """`finetune validate RECIPE --data` through the CLI's own entry point, in this process."""
    from finetune.cli import main

    returncode = main(["validate", str(recipe_path), "--data"])
    out = capsys.readouterr()
    return subprocess.CompletedProcess([], returncode, out.out, out.err)


@pytest.mark.parametrize("broken", BROKEN_SFT_FILES, ids=lambda f: f.__name__)
def test_broken_sft_file_is_one_message_naming_file_and_line(broken, tiny_llama_dir, tmp_path):
    path, message = broken(tmp_path)
    recipe = sft_recipe(tiny_llama_dir, tmp_path, data={"train": str(path), "max_length": 16})
    result = validate_data(write_recipe(tmp_path, recipe))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 3, (result.returncode, result.stderr)
    assert result.stderr.splitlines()[-1] == f"error: {message}"


@pytest.mark.parametrize("broken", MORE_BROKEN_SFT_FILES, ids=lambda f: f.__name__)
def test_more_broken_sft_files(broken, tiny_llama_dir, tmp_path, capsys):
    path, message = broken(tmp_path)
    recipe = sft_recipe(tiny_llama_dir, tmp_path, data={"train": str(path), "max_length": 16})
    result = validate_data_here(write_recipe(tmp_path, recipe), capsys)
    assert result.returncode == 3, (result.returncode, result.stderr)
    assert result.stderr.splitlines()[-1] == f"error: {message}"


@pytest.mark.parametrize(
    "broken, source, usable",
    [
        (latin1_jsonl, {"encoding": "latin-1"}, "data.train: 2 usable rows"),
        (utf16_csv, {"encoding": "utf-16"}, "data.train: 1 usable rows"),
        (some_too_long, {}, "data.train: 2 usable rows, 1 unusable skipped"),
        (mixed_formats, {}, "data.train: 2 usable rows, 1 unusable skipped"),
    ],
    ids=["latin1-with-encoding", "utf16-with-encoding", "too-long-skipped", "mixed-skipped"],
)
def test_named_encoding_is_read_and_skip_mode_counts(broken, source, usable, tiny_llama_dir, tmp_path, capsys):
    path, _ = broken(tmp_path)
    data = {"train": {"path": str(path), **source}, "max_length": 16, "on_bad_row": "skip"}
    result = validate_data_here(write_recipe(tmp_path, sft_recipe(tiny_llama_dir, tmp_path, data=data)), capsys)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"  {usable}"


def test_classification_row_with_empty_text(tiny_bert_dir, tmp_path):
    from support import cls_recipe

    rows = [{"text": "a cat", "label": "cat"}, {"text": "  \n ", "label": "dog"}, {"text": "a dog", "label": "dog"}]
    recipe = cls_recipe(tiny_bert_dir, tmp_path, rows)
    result = validate_data(write_recipe(tmp_path, recipe))
    assert "Traceback" not in result.stderr and result.returncode == 3, result.stderr
    assert result.stderr.splitlines()[-1] == f"error: {tmp_path / 'train.jsonl'}, row 2: 'text' is missing or empty" + SKIP_HINT


def test_classification_folder_in_a_named_encoding(tiny_bert_dir, tmp_path, capsys):
    from support import cls_recipe

    for label, text in (("cat", "le chat co\u00fbte \u00a33"), ("dog", "le chien")):
        (tmp_path / "news" / label).mkdir(parents=True)
        (tmp_path / "news" / label / "001.txt").write_bytes(text.encode("latin-1"))
    data = {"train": str(tmp_path / "news"), "eval_fraction": None}
    path = write_recipe(tmp_path, cls_recipe(tiny_bert_dir, tmp_path, data=data))
    result = validate_data_here(path, capsys)
    assert result.returncode == 3
    assert result.stderr.splitlines()[-1] == (
        f"error: {tmp_path / 'news' / 'cat' / '001.txt'}: not UTF-8 text (byte 0xfb at offset 10)  (re-encode it as "
        "UTF-8, or give the folder's encoding on the data source (encoding: latin-1), or set data.on_bad_row: skip "
        "to leave such files out)"
    )
    data["train"] = {"path": str(tmp_path / "news"), "encoding": "latin-1"}
    result = validate_data_here(write_recipe(tmp_path, cls_recipe(tiny_bert_dir, tmp_path, data=data)), capsys)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "  data.train: 2 usable rows"


@pytest.mark.parametrize("broken", [latin1_jsonl, all_too_long], ids=lambda f: f.__name__)
def test_training_stops_with_the_same_message_before_the_model_loads(broken, tiny_llama_dir, tmp_path, monkeypatch):
    import finetune.models.loading
    import finetune.runner

    def no_model_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(finetune.models.loading, "load_model", no_model_load)  # what Task.load_model calls
    path, message = broken(tmp_path)
    recipe = validate_recipe(sft_recipe(tiny_llama_dir, tmp_path, data={"train": str(path), "max_length": 16}))
    with pytest.raises(DataError) as err:
        finetune.runner.run(recipe)
    assert str(err.value) == message


def test_training_counts_rows_cut_off_by_max_length(tiny_llama_dir, tmp_path):
    """Under `on_bad_row: skip` a row with no completion token in the window is dropped and counted, and the datasets
    the trainer gets hold only rows with a loss token within max_length."""
    from transformers import AutoTokenizer

    from finetune.data.sft import IGNORE_INDEX
    from finetune.tasks.sft import prepare_sft_data

    path = write_jsonl(tmp_path / "rows.jsonl", [PAIR, LONG, PAIR, LONG, PAIR])  # not train.jsonl: sft_recipe writes that
    held = write_jsonl(tmp_path / "eval.jsonl", [LONG, PAIR])
    data = {"train": str(path), "eval": str(held), "max_length": 16, "on_bad_row": "skip"}
    recipe = validate_recipe(sft_recipe(tiny_llama_dir, tmp_path, data=data))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    train_ds, eval_ds, skipped = prepare_sft_data(recipe, tokenizer)
    assert (len(train_ds), len(eval_ds), skipped) == (3, 1, 3)
    for labels in [*train_ds["labels"], *eval_ds["labels"]]:
        assert any(label != IGNORE_INDEX for label in labels[:16])
