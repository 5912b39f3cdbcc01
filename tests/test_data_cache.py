"""The data cache: a second preparation of the same data reads its entries and gives the same datasets, skip counts
and warnings; a changed file, template or data option is never answered from a stale entry; a damaged entry is
rebuilt. Each is checked through `prepare_sft_data`, as a training run prepares its data."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import pytest

from finetune.errors import DataError
from finetune.recipe import validate_recipe
from support import CAPITALS, sft_recipe, write_jsonl

# Chat rows with prompts of 6 and of 26 words: a max_length of 24 cuts the long ones, 64 keeps them.
SHORT = [{"messages": [{"role": "user", "content": f"what is the capital of {c}"}, {"role": "assistant", "content": a}]}
         for c, a in CAPITALS.items()]
LONG = [{"messages": [{"role": "user", "content": "the " * 20 + f"what is the capital of {c}"},
                      {"role": "assistant", "content": a}]} for c, a in CAPITALS.items()]
BAD = {"messages": []}
OTHER_TEMPLATE = (  # renders other text than the default ChatML, prefix-stably as loss masking needs
    "{% for m in messages %}{{ m['role'] + ' : ' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant : ' }}{% endif %}"
)


@pytest.fixture
def tokenizer(tiny_llama_dir):
    """A fresh copy per test: some tests change its template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture
def data(tmp_path, tiny_llama_dir):
    """A recipe dict whose train file holds short, long and bad rows, skipped and counted, with a held-out split."""
    train = write_jsonl(tmp_path / "rows.jsonl", [*SHORT, BAD, *LONG, *SHORT])
    return sft_recipe(tiny_llama_dir, tmp_path, data={"train": str(train), "eval_fraction": 0.25, "max_length": 64,
                                                      "on_bad_row": "skip"})


def prepare(recipe: dict, tokenizer, cache, monkeypatch, main_first=None):
    """(train rows, eval rows, skipped) as plain lists, prepared with `cache` as the kit's cache folder."""
    from finetune.tasks.sft import prepare_sft_data

    monkeypatch.setenv("FINETUNE_CACHE", str(cache))
    train, held, skipped = prepare_sft_data(validate_recipe(recipe), tokenizer, main_first)
    return train.to_dict(), held.to_dict(), skipped


def forbid_reading(monkeypatch) -> None:
    """Reading a file or tokenizing a row again fails the test: the answer must come from the cache."""
    from finetune.data import sft

    def read_again(*args, **kwargs):
        raise AssertionError("read or tokenized again")

    monkeypatch.setattr(sft, "read_source", read_again)
    monkeypatch.setattr(sft, "tokenize_row", read_again)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_second_preparation_gives_the_same_data_from_the_cache(data, tokenizer, tmp_path, monkeypatch, caplog):
    from finetune.data import sft

    main_first_open = []

    @contextlib.contextmanager
    def main_first():  # stands for accelerate's main_process_first: the main rank tokenizes, the others wait
        main_first_open.append(True)
        yield
        main_first_open.pop()

    tokenize_row = sft.tokenize_row

    def tokenize_in_main_first(*args):
        assert main_first_open, "tokenized outside main_process_first: every rank would tokenize at once"
        return tokenize_row(*args)

    monkeypatch.setattr(sft, "tokenize_row", tokenize_in_main_first)
    with caplog.at_level(logging.WARNING):
        first = prepare(data, tokenizer, tmp_path / "cache", monkeypatch, main_first)
    cold_warnings = warnings_of(caplog)
    assert first[2] == 1  # the bad row; max_length 64 cuts none
    assert any("Skipped 1 unusable row(s)" in w for w in cold_warnings)

    caplog.clear()
    forbid_reading(monkeypatch)
    with caplog.at_level(logging.WARNING):
        again = prepare(data, tokenizer, tmp_path / "cache", monkeypatch, main_first)
    assert again == first
    assert warnings_of(caplog) == cold_warnings


OPTION_CHANGES = {"max_length": 24, "train_on_inputs": True, "system_prompt": "you are a kit", "eval_fraction": 0.5}


def changed(change: str, recipe: dict, tokenizer):
    """The recipe and tokenizer after one change."""
    data = dict(recipe["data"])
    if change == "file":
        write_jsonl(Path(data["train"]), [*SHORT, BAD, *LONG, *SHORT[:2]])  # the same path, other bytes
    elif change == "template":
        tokenizer.chat_template = OTHER_TEMPLATE
    else:
        data[change] = OPTION_CHANGES[change]
    return {**recipe, "data": data}, tokenizer


@pytest.mark.parametrize("change", ["file", "template", *OPTION_CHANGES])
def test_a_change_is_never_answered_from_a_stale_entry(change, data, tokenizer, tmp_path, monkeypatch):
    """After a change, the warm cache gives what an empty cache gives, and that differs from before the change."""
    cache = tmp_path / "cache"
    before = prepare(data, tokenizer, cache, monkeypatch)
    recipe, tokenizer = changed(change, data, tokenizer)
    after = prepare(recipe, tokenizer, cache, monkeypatch)
    assert after == prepare(recipe, tokenizer, tmp_path / "empty", monkeypatch)
    assert after != before


def test_max_length_reuses_the_tokens_and_counts_the_rows_it_cuts(data, tokenizer, tmp_path, monkeypatch):
    """Tokens do not depend on max_length: a new one re-decides which rows it cuts without tokenizing again."""
    prepare(data, tokenizer, tmp_path / "cache", monkeypatch)
    forbid_reading(monkeypatch)
    recipe = {**data, "data": {**data["data"], "max_length": 24}}
    train, held, skipped = prepare(recipe, tokenizer, tmp_path / "cache", monkeypatch)
    assert skipped == 1 + len(LONG)
    assert len(train["input_ids"]) + len(held["input_ids"]) == 2 * len(SHORT)


def test_on_bad_row_error_still_stops_after_a_skipping_run(data, tokenizer, tmp_path, monkeypatch):
    prepare(data, tokenizer, tmp_path / "cache", monkeypatch)
    recipe = {**data, "data": {**data["data"], "on_bad_row": "error"}}
    with pytest.raises(DataError, match="row 6: empty conversation"):
        prepare(recipe, tokenizer, tmp_path / "cache", monkeypatch)


def _cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _first_loss_spoiled(path: Path) -> None:
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "first_loss": ["?"] * meta["rows"]}))


DAMAGE = {  # what is damaged (files of the cache folder) and how
    "rows entry cut short": ("rows/*.json", _cut_short),
    "rows entry not JSON": ("rows/*.json", lambda path: path.write_bytes(b"\xff\x00")),
    "rows entry of another shape": ("rows/*.json", lambda path: path.write_text('{"rows": [], "origins": ["x"]}')),
    "tokens cut short": ("tokenized/*/data-*.arrow", _cut_short),
    "tokens without their meta": ("tokenized/*/entry.json", Path.unlink),
    "tokens meta of another size": ("tokenized/*/entry.json", lambda path: path.write_text('{"rows": 1}')),
    "tokens meta with no first loss tokens": ("tokenized/*/entry.json", _first_loss_spoiled),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_entry_is_ignored_and_rebuilt(damage, data, tokenizer, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    first = prepare(data, tokenizer, cache, monkeypatch)
    pattern, spoil = DAMAGE[damage]
    files = list(cache.glob(pattern))
    assert files
    for path in files:
        spoil(path)
    with caplog.at_level(logging.WARNING):
        assert prepare(data, tokenizer, cache, monkeypatch) == first
    assert any(w.startswith("Ignoring a damaged cache entry") for w in warnings_of(caplog))
    forbid_reading(monkeypatch)  # rebuilt: the next run reads it
    assert prepare(data, tokenizer, cache, monkeypatch) == first
