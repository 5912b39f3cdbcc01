"""`finetune data`: duplicates and leakage found exactly on planted cases, truncation and trained tokens equal to what
training keeps, label balance per split, and the report's files (valid HTML, PNGs) written whole."""

from __future__ import annotations

import json
import random
from html.parser import HTMLParser

import pytest

from finetune.data.report import collect
from finetune.data.sft import IGNORE_INDEX
from finetune.recipe import validate_recipe
from support import keyword_rows, sft_recipe, write_jsonl

VOCAB = [f"w{i}" for i in range(3000)]  # unknown to the tests' tokenizer ([UNK]): duplicates are judged on words


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def words(rng: random.Random, n: int = 30) -> list[str]:
    return [rng.choice(VOCAB) for _ in range(n)]


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def planted(tmp_path):
    """Train and eval files with planted duplicates; returns the files and the (row, repeats, kind) expected."""
    rng = random.Random(7)
    train = [chat(" ".join(words(rng, 10)), " ".join(words(rng))) for _ in range(40)]
    held = [chat(" ".join(words(rng, 10)), " ".join(words(rng))) for _ in range(10)]

    def variant(row, change) -> dict:
        user, bot = row["messages"][0]["content"], row["messages"][1]["content"]
        return chat(change(user), change(bot))

    spaced = lambda text: "  " + text.upper().replace(" ", " \t ") + "\n"  # noqa: E731 - same words, case and spaces differ
    last_word = lambda text: " ".join(text.split()[:-1] + ["zzz"])  # noqa: E731 - one shingle of ~38 differs: similarity ~0.9
    every_fifth = lambda text: " ".join("yyy" if i % 5 == 2 else w for i, w in enumerate(text.split()))  # noqa: E731 - ~0.2
    train += [train[3], variant(train[5], spaced), variant(train[8], last_word), variant(train[11], every_fifth)]
    held += [train[14], variant(train[16], spaced), variant(train[20], last_word), variant(train[22], every_fifth)]
    t, e = write_jsonl(tmp_path / "planted_train.jsonl", train), write_jsonl(tmp_path / "planted_eval.jsonl", held)
    expected_dups = {(f"{t}, row 41", f"{t}, row 4", "exact"), (f"{t}, row 42", f"{t}, row 6", "exact"),
                     (f"{t}, row 43", f"{t}, row 9", "near")}
    expected_leaks = {(f"{e}, row 11", f"{t}, row 15", "exact"), (f"{e}, row 12", f"{t}, row 17", "exact"),
                      (f"{e}, row 13", f"{t}, row 21", "near")}
    return t, e, expected_dups, expected_leaks


def sft_report(tiny_llama_dir, tmp_path, tokenizer, samples: int = 3, **data):
    from finetune.tasks.sft import SFTTask

    recipe = validate_recipe(sft_recipe(tiny_llama_dir, tmp_path, data=data))
    return recipe, collect(SFTTask.data_facts(recipe, tokenizer), samples=samples)


def pairs(section: dict) -> set[tuple[str, str, str]]:
    return {(p["row"], p["repeats"], p["kind"]) for p in section["pairs"]}


def test_planted_duplicates_and_leakage_found_exactly(tiny_llama_dir, tmp_path, tokenizer):
    train, held, expected_dups, expected_leaks = planted(tmp_path)
    _, report = sft_report(tiny_llama_dir, tmp_path, tokenizer, train=str(train), eval=str(held), max_length=256)
    s = report.summary
    assert pairs(s["duplicates"]) == expected_dups
    assert pairs(s["leakage"]) == expected_leaks
    assert (s["leakage"]["rows"], s["leakage"]["exact"], s["leakage"]["near"], s["leakage"]["eval_rows"]) == (3, 2, 1, 14)
    near = [p for p in s["leakage"]["pairs"] if p["kind"] == "near"]
    assert 0.8 <= near[0]["similarity"] < 1.0
    assert s["verdict"] == (
        "3 held-out rows also appear in training (21.4%: 2 exact, 1 near): the held-out loss will flatter the model"
    )
    assert "3 training rows repeat another training row (6.8%: 2 exact, 1 near): they weigh double" in s["findings"]


def test_clean_data_has_no_duplicates_and_an_ok_verdict(tiny_llama_dir, tmp_path, tokenizer):
    rng = random.Random(3)
    train = write_jsonl(tmp_path / "clean.jsonl", [chat(" ".join(words(rng, 10)), " ".join(words(rng))) for _ in range(60)])
    _, report = sft_report(tiny_llama_dir, tmp_path, tokenizer, train=str(train), eval_fraction=0.25, max_length=256)
    s = report.summary
    assert s["duplicates"]["rows"] == 0 and s["leakage"]["rows"] == 0 and s["leakage"]["eval_rows"] == 15
    assert s["findings"] == []
    assert s["verdict"].startswith("OK: no leakage, no duplicates, nothing cut: 45 training rows, ")


def truncation_rows() -> list[dict]:
    """Short rows, rows whose answer max_length cuts, and rows whose prompt alone fills it (nothing left to learn)."""
    rng = random.Random(1)
    vocab = "paris london rome red green blue cat dog bird sun moon tree river city".split()
    say = lambda n: " ".join(rng.choice(vocab) for _ in range(n))  # noqa: E731
    rows = [chat(say(4), say(3)) for _ in range(10)]
    rows += [chat(say(4), say(40)) for _ in range(6)]  # cut
    rows += [chat(say(40), say(3)) for _ in range(4)]  # dropped
    rng.shuffle(rows)
    return rows


def test_truncation_counts_and_trained_tokens_equal_what_training_keeps(tiny_llama_dir, tmp_path, tokenizer):
    from finetune.tasks.sft import prepare_sft_data

    train = write_jsonl(tmp_path / "lengths.jsonl", truncation_rows())
    recipe, report = sft_report(tiny_llama_dir, tmp_path, tokenizer, samples=20, train=str(train), eval_fraction=0.3,
                                max_length=24, on_bad_row="skip")
    train_ds, eval_ds, skipped = prepare_sft_data(recipe, tokenizer)
    s = report.summary
    for split, ds in (("train", train_ds), ("eval", eval_ds)):
        info = s["splits"][split]
        assert info["rows"] - info["dropped_rows"] == len(ds)
        assert info["tokens_kept"] == sum(len(ids) for ids in ds["input_ids"])
        assert info["trained_tokens_kept"] == sum(sum(t != IGNORE_INDEX for t in labels) for labels in ds["labels"])
    assert s["splits"]["train"]["dropped_rows"] + s["splits"]["eval"]["dropped_rows"] == skipped == 4
    assert s["splits"]["train"]["truncated_rows"] + s["splits"]["eval"]["truncated_rows"] == 6
    dropped = [f for f in s["findings"] if "nothing to learn within data.max_length=24 (" in f]
    assert dropped and all(f.endswith("of the split): training leaves them out") for f in dropped)
    # The rendered rows: the trained tokens are those the training labels mark, in order.
    shown = [sample for sample in s["samples"] if sample["split"] == "train" and not sample["dropped"]]
    assert len(shown) >= 5
    for sample, labels, ids in zip(shown, train_ds["labels"], train_ds["input_ids"]):
        flags = [label != IGNORE_INDEX for label in labels]
        assert "".join(text for text, state in sample["segments"] if state == "trained") == decoded(tokenizer, ids, flags, True)
        assert "".join(text for text, state in sample["segments"] if state != "cut") == decoded(tokenizer, ids, flags, None)


def decoded(tokenizer, ids, flags, keep) -> str:
    """`ids` decoded per run of equal `flags` (as the report decodes a row), joined: the runs flagged `keep`, or all."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or flags[i] != flags[start]:
            if keep is None or flags[start] == keep:
                out.append(tokenizer.decode(ids[start:i]))
            start = i
    return "".join(out)


def test_label_balance_per_split(tiny_tokenizer_dir, tmp_path, tokenizer):
    from finetune.data.classification import prepare_classification_data
    from finetune.tasks.classification import ClassificationTask
    from support import cls_recipe

    rows = keyword_rows(120, weights=[12, 6, 3, 1], seed=2)
    recipe = validate_recipe(cls_recipe(tiny_tokenizer_dir, tmp_path, rows))
    s = collect(ClassificationTask.data_facts(recipe, tokenizer)).summary
    data = prepare_classification_data(recipe)
    for split, split_rows in (("train", data.train_rows), ("eval", data.eval_rows)):
        expected = {}
        for row in split_rows:
            expected[str(row["labels"][0])] = expected.get(str(row["labels"][0]), 0) + 1
        assert s["labels"][split] == expected
    assert s["splits"]["eval"]["rows"] == len(data.eval_rows) == 24
    # A label only in the held-out file, and one with no held-out rows.
    held = write_jsonl(tmp_path / "eval.jsonl", [{"text": "moon cat", "label": "cat"}, {"text": "sun owl", "label": "owl"}])
    recipe = validate_recipe(cls_recipe(tiny_tokenizer_dir, tmp_path, rows, data={"eval_fraction": None, "eval": str(held)}))
    s = collect(ClassificationTask.data_facts(recipe, tokenizer)).summary
    assert s["labels"]["only_in_eval"] == ["owl"]
    assert s["labels"]["only_in_train"] == ["bird", "dog", "fish"]
    assert "label(s) owl occur only in the held-out rows: the model has no class for them (training stops on them)" in s["findings"]


class Balanced(HTMLParser):
    """Every element that is opened is closed, in order (void elements aside)."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_command_writes_the_report(tiny_llama_dir, tmp_path, capsys):
    from finetune.cli import main

    train, held, _, _ = planted(tmp_path)
    recipe = sft_recipe(tiny_llama_dir, tmp_path, data={"train": str(train), "eval": str(held), "max_length": 24})
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    assert main(["data", str(path), "data.on_bad_row=skip"]) == 0
    out = tmp_path / "out-data"  # beside output.dir
    assert sorted(p.name for p in out.iterdir()) == ["data_report.html", "data_report.json", "data_report.md", "lengths.png"]
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "data_report.json").read_text())
    printed = capsys.readouterr().out
    assert printed.startswith(f"Verdict: {summary['verdict']}\n")
    assert summary["verdict"].startswith("3 held-out rows also appear in training")
    parser = Balanced()
    page = (out / "data_report.html").read_text()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    assert page.startswith("<!DOCTYPE html>") and parser.tags.count("img") == 1
    assert '<span class="trained">' in page and '<span class="cut">' in page
    md = (out / "data_report.md").read_text()
    assert f"**Verdict:** {summary['verdict']}" in md and "![lengths.png](lengths.png)" in md


def test_train_prints_the_verdict_and_records_leakage(tiny_llama_dir, tmp_path, capsys):
    from finetune.runner import run

    train, held, _, _ = planted(tmp_path)
    recipe = validate_recipe(sft_recipe(tiny_llama_dir, tmp_path, data={"train": str(train), "eval": str(held)},
                                        train={"max_steps": 1, "epochs": 1}))
    result = run(recipe)
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.strip().startswith("data report "))
    assert "3 held-out rows also appear in training (21.4%: 2 exact, 1 near)" in line
    saved = json.loads((tmp_path / "out" / "train_metrics.json").read_text())
    assert saved["data_report"]["leakage"] == {"eval_rows": 14, "rows": 3, "exact": 2, "near": 1, "fraction": 0.2143}
    assert result.metrics["data_report"] == saved["data_report"]


def test_pretraining_blocks_equal_what_training_packs(tmp_path):
    from finetune.data.packing import Blocks, report_facts, tokenize_corpus
    from finetune.data.text import Corpus
    from finetune.models.tokenizer_training import train_bpe
    from finetune.recipe import DataConfig

    folder = tmp_path / "docs"
    folder.mkdir()
    rng = random.Random(5)
    texts = [" ".join(rng.choice(VOCAB[:200]) for _ in range(20 + 7 * i)) for i in range(12)]
    for i, text in enumerate(texts):
        (folder / f"{i:02d}.txt").write_text(text)
    (folder / "12.txt").write_text(texts[0].upper())  # a training document again, in capitals: an exact duplicate
    tokenizer = train_bpe(texts, 400)
    config = DataConfig(train=[str(folder)], eval_fraction=0.25, max_length=16)
    s = collect(report_facts(Corpus(config), tokenizer, 16, 4)).summary
    tokens = tokenize_corpus(Corpus(config), tokenizer, tmp_path / "cache")
    blocks = Blocks(tokens.train, 16)
    assert s["splits"]["train"]["tokens"]["total"] == tokens.train.tokens
    assert s["splits"]["eval"]["tokens"]["total"] == tokens.eval.tokens
    assert s["batching"]["sequences"] == len(blocks) and s["batching"]["tokens_left_over"] == blocks.dropped
    assert s["batching"]["batches_per_epoch"] == -(-len(blocks) // 4)
    assert s["splits"]["train"]["truncated_rows"] == 0  # documents longer than a block are packed, not cut
    assert s["duplicates"]["rows"] + s["leakage"]["rows"] == 1


def test_a_bad_row_stops_with_the_message_validate_gives(tiny_llama_dir, tmp_path, tokenizer):
    from finetune.errors import DataError
    from finetune.tasks.sft import SFTTask

    rows = [chat("hello", "hi"), {"messages": [{"role": "user", "content": "hello"}]}, chat("thanks", "please")]
    train = write_jsonl(tmp_path / "bad.jsonl", rows)
    recipe = validate_recipe(sft_recipe(tiny_llama_dir, tmp_path, data={"train": str(train)}))
    with pytest.raises(DataError) as validate_error:
        SFTTask.read_rows(recipe, recipe.data.train, tokenizer)
    with pytest.raises(DataError) as report_error:
        collect(SFTTask.data_facts(recipe, tokenizer))
    assert str(report_error.value) == str(validate_error.value) == (
        f"{train}, row 2: no non-empty assistant message to learn from  (set data.on_bad_row: skip to drop such rows "
        "and count them)"
    )
    recipe = validate_recipe(sft_recipe(tiny_llama_dir, tmp_path, data={"train": str(train), "on_bad_row": "skip"}))
    s = collect(SFTTask.data_facts(recipe, tokenizer)).summary
    assert s["skipped_rows"] == 1 and s["splits"]["train"]["rows"] == 2
    assert s["findings"][-1] == (f"1 unusable row is skipped (data.on_bad_row: skip); first: {train}, row 2: no "
                                 "non-empty assistant message to learn from")


def test_image_labels_per_split_and_a_copied_image(tmp_path):
    import shutil

    from finetune.data.images import prepare_image_data
    from finetune.tasks.image_classification import ImageClassificationTask
    from support import image_recipe, write_toy_images

    images = write_toy_images(tmp_path / "images", per_class=8)
    shutil.copy(images / "red" / "003.png", images / "red" / "100.png")  # the same image twice
    recipe = validate_recipe(image_recipe(str(tmp_path / "model"), images, tmp_path / "out"))
    s = collect(ImageClassificationTask.data_facts(recipe)).summary
    data = prepare_image_data(recipe)
    for split, rows in (("train", data.train_rows), ("eval", data.eval_rows)):
        counts = {}
        for row in rows:
            counts[row["labels"][0]] = counts.get(row["labels"][0], 0) + 1
        assert s["labels"][split] == counts
    assert s["splits"]["train"]["rows"] + s["splits"]["eval"]["rows"] == 25 and s["splits"]["eval"]["rows"] == 6
    assert s["duplicates"]["rows"] + s["leakage"]["rows"] == 1 and s["batching"]["mode"] == "images"
    pair = (s["duplicates"]["pairs"] + s["leakage"]["pairs"])[0]
    assert {pair["row"], pair["repeats"]} == {str(images / "red" / "003.png"), str(images / "red" / "100.png")}
    assert pair["kind"] == "exact"


def test_train_reuses_the_record_of_finetune_data(tiny_llama_dir, tmp_path, tokenizer):
    from finetune.data.report import run_record, save_record
    from finetune.tasks.sft import SFTTask

    train, held, _, _ = planted(tmp_path)
    recipe, report = sft_report(tiny_llama_dir, tmp_path, tokenizer, train=str(train), eval=str(held))
    save_record(recipe, tokenizer, report)
    assert run_record(recipe, lambda: pytest.fail("the data was read again"), tokenizer) == report.record()
    faster = validate_recipe(sft_recipe(tiny_llama_dir, tmp_path, data={"train": str(train), "eval": str(held)},
                                        train={"learning_rate": 0.5}))
    assert run_record(faster, lambda: pytest.fail("the data was read again"), tokenizer) == report.record()
    write_jsonl(held, [chat("hello", "hi")])  # new bytes: read again
    record = run_record(recipe, lambda: SFTTask.data_facts(recipe, tokenizer), tokenizer)
    assert record["leakage"] == {"eval_rows": 1, "rows": 0, "exact": 0, "near": 0, "fraction": 0.0}


def test_training_does_not_read_large_data_twice(tiny_llama_dir, tmp_path, tokenizer, monkeypatch):
    """Past TRAIN_REPORT_MAX_BYTES and with no report cached, training's record says how to get the report instead
    of reading every row a second time (the main process would keep the other ranks waiting); a cached one is used."""
    from finetune.data import report

    recipe = validate_recipe(sft_recipe(tiny_llama_dir, tmp_path))
    monkeypatch.setattr(report, "TRAIN_REPORT_MAX_BYTES", 100)  # the capitals file is a few KiB

    def unread():
        raise AssertionError("the rows were read")

    record = report.run_record(recipe, unread, tokenizer)
    assert record["computed"] is False and record["verdict"].startswith("not read while training (0 MiB of data)")
    monkeypatch.setattr(report, "TRAIN_REPORT_MAX_BYTES", 10**9)
    from finetune.tasks.sft import SFTTask

    read = report.run_record(recipe, lambda: SFTTask.data_facts(recipe, tokenizer), tokenizer)  # now read and cached
    assert "computed" not in read and read["verdict"]
    monkeypatch.setattr(report, "TRAIN_REPORT_MAX_BYTES", 100)
    assert report.run_record(recipe, unread, tokenizer) == read  # large again, but cached: reused


def preference_files(tmp_path):
    """Text pairs, one held-out pair repeating training pair 6; returns the recipe and the planted (row, repeats)."""
    rng = random.Random(3)
    train = [{"prompt": " ".join(words(rng, 8)), "chosen": " ".join(words(rng, 6)), "rejected": " ".join(words(rng, 5))}
             for _ in range(12)]
    held = [{"prompt": " ".join(words(rng, 8)), "chosen": " ".join(words(rng, 6)), "rejected": " ".join(words(rng, 5))}
            for _ in range(3)] + [dict(train[5])]
    t, e = write_jsonl(tmp_path / "pairs_train.jsonl", train), write_jsonl(tmp_path / "pairs_eval.jsonl", held)
    return t, e, (f"{e}, row 4", f"{t}, row 6", "exact")


def preference_recipe(tiny_llama_dir, tmp_path, train, held) -> dict:
    recipe = sft_recipe(tiny_llama_dir, tmp_path, data={"train": str(train), "eval": str(held), "max_length": 64})
    recipe["task"] = "preference"
    return recipe


def test_preference_pairs_leakage_and_trained_tokens_equal_the_tasks_rows(tiny_llama_dir, tmp_path, tokenizer):
    from finetune.runtime import resolve_runtime
    from finetune.tasks.preference import PreferenceTask

    train, held, leak = preference_files(tmp_path)
    recipe = validate_recipe(preference_recipe(tiny_llama_dir, tmp_path, train, held))
    s = collect(PreferenceTask.data_facts(recipe, tokenizer)).summary
    assert pairs(s["leakage"]) == {leak} and s["duplicates"]["rows"] == 0
    assert s["verdict"].startswith("1 held-out row also appears in training")
    assert s["batching"] == {"mode": "pairs", "micro_batch_size": recipe.train.micro_batch_size,
                             "batches_per_epoch": -(-12 // recipe.train.micro_batch_size)}
    # The task's own prepared rows (prepare_data, as training reads them): the answers are what carries the loss.
    task = PreferenceTask(recipe, resolve_runtime(recipe))
    task.prepare_data(tokenizer, str(tiny_llama_dir), None)
    for split, ds in (("train", task.train_dataset), ("eval", task.eval_dataset)):
        answers = sum(len(c) + len(r) for c, r in zip(ds["chosen_ids"], ds["rejected_ids"]))
        assert s["splits"][split]["rows"] == len(ds)
        assert s["splits"][split]["trained_tokens_kept"] == answers
        assert s["splits"][split]["tokens_kept"] == sum(map(len, ds["prompt_ids"])) + answers
        assert s["splits"][split]["tokens_cut"] == 0
    sample, first = s["samples"][0], task.train_dataset[0]
    assert [state for _, state in sample["segments"]] == ["context", "trained"]
    assert sample["segments"][1][0] == tokenizer.decode(first["chosen_ids"])


def test_preference_rows_over_max_length_are_bad_rows_never_cut(tiny_llama_dir, tmp_path, tokenizer):
    from finetune.errors import DataError
    from finetune.tasks.preference import PreferenceTask

    train, held, _ = preference_files(tmp_path)
    long = {"prompt": " ".join(["w1"] * 80), "chosen": "w2", "rejected": "w3"}
    write_jsonl(train, [*(json.loads(line) for line in train.read_text().splitlines()), long])
    recipe = preference_recipe(tiny_llama_dir, tmp_path, train, held)
    with pytest.raises(DataError, match=rf"{train}, row 13: the prompt and chosen answer are \d+ tokens, over data.max_length=64"):
        collect(PreferenceTask.data_facts(validate_recipe(recipe), tokenizer))
    recipe["data"]["on_bad_row"] = "skip"
    s = collect(PreferenceTask.data_facts(validate_recipe(recipe), tokenizer)).summary
    assert s["skipped_rows"] == 1 and s["splits"]["train"]["rows"] == 12 and s["splits"]["train"]["truncated_rows"] == 0


def test_command_writes_the_report_for_preference_pairs(tiny_llama_dir, tmp_path, capsys):
    from finetune.cli import main

    train, held, _ = preference_files(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(preference_recipe(tiny_llama_dir, tmp_path, train, held)))
    assert main(["data", str(path)]) == 0
    out = tmp_path / "out-data"
    assert sorted(p.name for p in out.iterdir()) == ["data_report.html", "data_report.json", "data_report.md", "lengths.png"]
    summary = json.loads((out / "data_report.json").read_text())
    assert summary["leakage"]["rows"] == 1 and capsys.readouterr().out.startswith(f"Verdict: {summary['verdict']}\n")


def test_preference_kto_rows_and_eval_fraction_are_trainings(tiny_llama_dir, tmp_path, tokenizer):
    """KTO trains each pair as two unpaired rows; data.eval_fraction holds out the pairs prepare_data holds out."""
    from finetune.runtime import resolve_runtime
    from finetune.tasks.preference import PreferenceTask

    train, _, _ = preference_files(tmp_path)
    recipe = preference_recipe(tiny_llama_dir, tmp_path, train, train)
    recipe["data"] = {"train": str(train), "eval_fraction": 0.25, "max_length": 64}
    recipe["preference"] = {"loss": "kto"}
    recipe = validate_recipe(recipe)
    s = collect(PreferenceTask.data_facts(recipe, tokenizer)).summary
    task = PreferenceTask(recipe, resolve_runtime(recipe))
    task.prepare_data(tokenizer, str(tiny_llama_dir), None)
    assert s["batching"]["mode"] == "padded"
    for split, ds in (("train", task.train_dataset), ("eval", task.eval_dataset)):
        assert s["splits"][split]["rows"] == len(ds)
        assert s["splits"][split]["trained_tokens_kept"] == sum(map(len, ds["completion_ids"]))
        assert s["splits"][split]["tokens_kept"] == sum(map(len, ds["prompt_ids"])) + sum(map(len, ds["completion_ids"]))
    assert s["splits"]["train"]["rows"] == 18 and s["leakage"]["rows"] == 0
