"""Classification with LoRA + a trained head on a tiny BERT and a tiny Llama: what the method guarantees, what a run
leaves behind (and that it reloads to the same numbers), `finetune predict`, and the folder / package:// data sources."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune.errors import DataError, FinetuneError, RecipeError
from finetune.recipe import validate_recipe
from support import FILLER, KEYWORDS, REPO, cls_recipe, keyword_rows, sft_recipe, write_jsonl


def eval_history(result) -> list[dict]:
    return [h for h in result.metrics["log_history"] if "eval_loss" in h]


@pytest.fixture(scope="module")
def bert_dir(tiny_bert_dir) -> Path:
    """The tiny BERT (conftest draws its weights with initializer_range 0.2 so LoRA learns reliably)."""
    return tiny_bert_dir


@pytest.fixture(scope="module")
def bert_run(bert_dir, tmp_path_factory):
    from finetune.runner import run

    recipe = validate_recipe(cls_recipe(bert_dir, tmp_path_factory.mktemp("cls-bert")))
    return recipe, run(recipe)


@pytest.fixture(scope="module")
def llama_run(tiny_llama_dir, tmp_path_factory):
    """The decoder run also exercises best-checkpoint selection: evaluate every epoch, keep the best by accuracy."""
    from finetune.runner import run

    train = {
        "learning_rate": 2e-2, "eval_steps": None, "save_checkpoints": True, "load_best_model_at_end": True,
        "metric_for_best_model": "accuracy", "early_stopping_patience": 3,
    }
    recipe = validate_recipe(cls_recipe(tiny_llama_dir, tmp_path_factory.mktemp("cls-llama"), train=train))
    return recipe, run(recipe)


# --------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------


def test_encoder_learns_from_chance(bert_run):
    _, result = bert_run
    history = eval_history(result)
    assert history[0]["step"] == 0  # evaluated before the first step: random head, zero LoRA update
    assert history[0]["eval_accuracy"] <= 0.4, history[0]  # 4 balanced classes: chance is 0.25
    assert result.metrics["eval"]["eval_accuracy"] >= 0.95, result.metrics["eval"]
    assert result.metrics["heads"] == ["classifier"]


def test_decoder_learns_from_chance_and_keeps_best_checkpoint(llama_run):
    recipe, result = llama_run
    history = eval_history(result)
    assert history[0]["step"] == 0 and history[0]["eval_accuracy"] <= 0.4, history[0]
    final = result.metrics["eval"]["eval_accuracy"]
    assert final >= 0.9, result.metrics["eval"]
    assert final == max(h["eval_accuracy"] for h in history)  # load_best_model_at_end by accuracy
    assert result.metrics["heads"] == ["score"]
    # Llama-style models pool the last non-pad token: the config must know the tokenizer's pad token.
    assert result.model.config.pad_token_id == result.tokenizer.pad_token_id is not None


def test_only_adapter_and_head_train(bert_run, bert_dir):
    from safetensors.torch import load_file

    _, result = bert_run
    trainable = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".classifier.modules_to_save." in n for n in trainable), trainable
    assert any(".classifier.modules_to_save." in n for n in trainable)
    original = load_file(str(bert_dir / "model.safetensors"))
    state = {k.replace(".base_layer", ""): v for k, v in result.model.get_base_model().bert.state_dict().items()}
    assert not [name for name in original if name not in state]
    assert [name for name, tensor in original.items() if not torch.equal(state[name], tensor)] == []


# --------------------------------------------------------------------------------------------
# What a run leaves behind, and reloading it
# --------------------------------------------------------------------------------------------


def test_run_folder_and_label_mapping(bert_run):
    from finetune.data.classification import LabelMap

    recipe, _ = bert_run
    out = Path(recipe.output.dir)
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "recipe.yaml", "labels.json",
                 "train_metrics.json", "eval_metrics.json", "loss_curve.png", "confusion_matrix.png"):
        assert (out / name).is_file(), name
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "labels.json").read_text()) == {
        "id2label": {"0": "bird", "1": "cat", "2": "dog", "3": "fish"},  # sorted: the same on every machine
        "label2id": {"bird": 0, "cat": 1, "dog": 2, "fish": 3},
        "multi_label": False,
    }
    assert LabelMap.load(out) == LabelMap(("bird", "cat", "dog", "fish"), multi_label=False)
    report = json.loads((out / "eval_metrics.json").read_text())
    assert report["num_examples"] == 80 and report["labels"] == ["bird", "cat", "dog", "fish"]
    assert sum(map(sum, report["confusion_matrix"])) == 80
    assert set(report["per_class"]) == {"bird", "cat", "dog", "fish"}


def test_saved_adapter_and_head_reproduce_eval_metrics(bert_run, bert_dir):
    """Plain transformers + PeftModel.from_pretrained on the run folder gives the logits and the report of the run."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.data.classification import LabelMap, prepare_classification_data
    from finetune.metrics.classification import predictions_from_logits
    from finetune.metrics import classification_report

    recipe, result = bert_run
    out = Path(recipe.output.dir)
    labels = LabelMap.load(out)
    base = AutoModelForSequenceClassification.from_pretrained(bert_dir, **labels.config_kwargs())
    reloaded = PeftModel.from_pretrained(base, out).eval()
    assert reloaded.config.id2label == {0: "bird", 1: "cat", 2: "dog", 3: "fish"}
    tokenizer = AutoTokenizer.from_pretrained(out)
    rows = prepare_classification_data(recipe).eval_rows
    inputs = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = reloaded(**inputs).logits
        expected = result.model.eval()(**inputs).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    references = [labels.label2id[r["labels"][0]] for r in rows]
    report = classification_report(predictions_from_logits(logits, False), references, list(labels.names))
    saved = json.loads((out / "eval_metrics.json").read_text())
    assert {k: v for k, v in saved.items() if k != "loss"} == json.loads(json.dumps(report))


def test_finetune_predict_reproduces_eval_accuracy(bert_run, tmp_path, capsys):
    from finetune.data.classification import prepare_classification_data
    from finetune.cli import main

    recipe, _ = bert_run
    rows = prepare_classification_data(recipe).eval_rows
    texts = write_jsonl(tmp_path / "eval.jsonl", [{"text": r["text"]} for r in rows])
    recipe_file = tmp_path / "recipe.yaml"
    shutil.copy(Path(recipe.output.dir) / "recipe.yaml", recipe_file)  # a recipe works as well as its run folder
    assert main(["predict", str(recipe_file), "--file", str(texts), "--json", "--top-k", "2"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert [p["text"] for p in predictions] == [r["text"] for r in rows]
    assert all(len(p["scores"]) == 2 and p["scores"][0]["label"] == p["predicted"][0] for p in predictions)
    assert all(p["scores"][0]["score"] >= p["scores"][1]["score"] for p in predictions)
    accuracy = sum(p["predicted"] == [r["labels"][0]] for p, r in zip(predictions, rows)) / len(rows)
    saved = json.loads((Path(recipe.output.dir) / "eval_metrics.json").read_text())
    assert accuracy == saved["accuracy"]

    assert main(["predict", recipe.output.dir, "--text", "the dog is in the city", "--top-k", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "the dog is in the city"
    assert table[1].split() == ["*", "dog", table[1].split()[-1]] and float(table[1].split()[-1]) > 0.5


def test_predict_help_exits_zero():
    result = subprocess.run([sys.executable, "-m", "finetune.cli", "predict", "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: finetune predict") and "--top-k" in result.stdout


def test_predict_needs_a_run_folder(tmp_path):
    from finetune.evaluation.classifier import run_folder

    with pytest.raises(FinetuneError, match=r"not a finished classification run \(no labels\.json / recipe\.yaml\)"):
        run_folder(tmp_path)


def run_folder_without_model(folder: Path, recipe: dict, labels: tuple[str, ...] = ()) -> Path:
    """A run folder's recipe.yaml (and labels.json), as training leaves them, for a model that does not exist:
    a command that loads the model fails on it, so the tests below see what is said before any load."""
    from finetune.data.classification import LabelMap
    from finetune.recipe import save_recipe

    save_recipe(validate_recipe(recipe), folder)
    if labels:
        LabelMap(labels).save(folder)
    return folder


def test_a_run_of_the_wrong_task_names_the_command_for_it(tmp_path, capsys):
    from finetune.cli import main

    cls = run_folder_without_model(tmp_path / "cls", cls_recipe(tmp_path / "no-model", tmp_path), ("a", "b"))
    sft = run_folder_without_model(tmp_path / "sft", sft_recipe(tmp_path / "no-model", tmp_path))
    for base in ([], ["--base"]):  # chat loads the base as a causal LM either way
        assert main(["chat", str(cls), "--prompt", "hi", *base]) == 1
        assert capsys.readouterr().err == (
            f"error: {cls} is a classification run (task: classification in its recipe.yaml); `finetune chat` answers "
            f'prompts with an SFT run. `finetune predict` labels texts with it: finetune predict {cls} --text "..."\n'
        )
    assert main(["predict", str(sft), "--text", "hi"]) == 1
    assert capsys.readouterr().err == (
        f"error: {sft} is an SFT run (task: sft in its recipe.yaml); `finetune predict` labels texts with a "
        f'classification run. `finetune chat` answers prompts with it: finetune chat {sft} --prompt "..."\n'
    )
    assert main(["predict", str(sft / "recipe.yaml"), "--text", "hi"]) == 1  # a recipe: the hint names its output.dir
    assert capsys.readouterr().err == (
        f"error: {sft / 'recipe.yaml'} is an SFT recipe (task: sft); `finetune predict` labels texts with a "
        f'classification run. `finetune chat` answers prompts with it: finetune chat {tmp_path / "out"} --prompt "..."\n'
    )


def test_predict_refuses_an_empty_text_naming_it(tmp_path, capsys):
    from finetune.cli import main

    run = run_folder_without_model(tmp_path / "cls", cls_recipe(tmp_path / "no-model", tmp_path), ("a", "b"))
    cases = [
        (["--text", ""], "--text is empty: there is nothing to classify in it."),
        (["--text", "a dog", "--text", " \t"], "--text number 2 is empty (only whitespace): there is nothing to classify in it."),
    ]
    (tmp_path / "texts.txt").write_text("a dog\n\na cat\n")
    cases.append((["--file", str(tmp_path / "texts.txt")],
                  f"{tmp_path / 'texts.txt'}, line 2 is empty: one text per line, and this line has none."))  # fmt: skip
    write_jsonl(tmp_path / "texts.jsonl", [{"text": "a dog"}, {"text": "   "}])
    cases.append((["--file", str(tmp_path / "texts.jsonl")],
                  f"{tmp_path / 'texts.jsonl'}, line 2: 'text' is empty (only whitespace): there is nothing to classify in it."))  # fmt: skip
    for args, message in cases:
        assert main(["predict", str(run), *args]) == 1, args
        assert capsys.readouterr().err == f"error: {message}\n"
    # Blank lines after the last text only end the file.
    from argparse import Namespace

    from finetune.commands.predict import read_texts
    from finetune.recipe import load_recipe

    (tmp_path / "texts.txt").write_text("a dog\na cat\n\n \n")
    args = Namespace(text=["a bird"], file=str(tmp_path / "texts.txt"))
    assert read_texts(args, load_recipe(run / "recipe.yaml")) == (["a bird", "a dog", "a cat"], None)


# --------------------------------------------------------------------------------------------
# Multi-label, class weights, QLoRA
# --------------------------------------------------------------------------------------------


def test_multi_label_learns(bert_dir, tmp_path):
    from finetune.runner import run

    rng = random.Random(1)
    rows = []
    for _ in range(400):
        present = [k for k in KEYWORDS[:3] if rng.random() < 0.5]
        words = [rng.choice(FILLER) for _ in range(4 - len(present))] + present
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "tags": present})
    recipe = validate_recipe(
        cls_recipe(bert_dir, tmp_path, rows, classification={"label_column": "tags", "multi_label": True}, train={"epochs": 10})
    )
    result = run(recipe)
    out = Path(recipe.output.dir)
    assert json.loads((out / "labels.json").read_text())["multi_label"] is True
    assert result.model.config.problem_type == "multi_label_classification"
    history = eval_history(result)
    assert history[0]["eval_f1_micro"] < 0.7, history[0]
    assert result.metrics["eval"]["eval_f1_micro"] >= 0.95, result.metrics["eval"]
    report = json.loads((out / "eval_metrics.json").read_text())
    assert len(report["confusion_matrix"]) == 3 and all(len(m) == 2 == len(m[0]) for m in report["confusion_matrix"])
    assert not (out / "confusion_matrix.png").exists()  # one 2x2 matrix per label, kept in the JSON


def test_balanced_weights_and_weighted_loss():
    import torch.nn.functional as F

    from finetune.data.classification import LabelMap
    from finetune.training.class_weights import WeightedLoss, balanced_weights

    labels = LabelMap(("a", "b", "c"))
    weights = balanced_weights([0] * 6 + [1] * 3 + [2], labels)
    torch.testing.assert_close(weights, torch.tensor([10 / 18, 10 / 9, 10 / 3]))  # n / (classes * count)
    logits, target = torch.randn(5, 3), torch.tensor([0, 2, 1, 0, 2])
    loss = WeightedLoss(weights, multi_label=False)({"logits": logits}, target, num_items_in_batch=10)
    per_row = F.cross_entropy(logits, target, reduction="none") * weights[target]
    torch.testing.assert_close(loss, per_row.sum() / 10)

    multi = LabelMap(("a", "b"), multi_label=True)
    hot = [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
    pos_weight = balanced_weights(hot, multi)
    torch.testing.assert_close(pos_weight, torch.tensor([1 / 3, 3.0]))  # negatives / positives
    logits = torch.randn(4, 2)
    loss = WeightedLoss(pos_weight, multi_label=True)({"logits": logits}, torch.tensor(hot), num_items_in_batch=None)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, torch.tensor(hot), pos_weight=pos_weight))


def test_class_weights_learn_the_rare_class(bert_dir, tmp_path, caplog):
    from finetune.runner import run

    from finetune.data.classification import prepare_classification_data

    rows = keyword_rows(400, keywords=("cat", "dog"), seed=2, weights=(0.85, 0.15))
    recipe = validate_recipe(cls_recipe(bert_dir, tmp_path, rows, classification={"class_weights": "balanced"}))
    with caplog.at_level("INFO", logger="finetune"):
        result = run(recipe)
    train_rows = prepare_classification_data(recipe).train_rows  # the weights come from the training part only
    cats = sum(r["labels"] == ("cat",) for r in train_rows)
    dogs = len(train_rows) - cats
    assert dogs < 0.2 * len(train_rows)
    expected = {"cat": round(len(train_rows) / (2 * cats), 4), "dog": round(len(train_rows) / (2 * dogs), 4)}
    assert f"Class weights (balanced): {expected}" in caplog.messages
    report = json.loads((Path(recipe.output.dir) / "eval_metrics.json").read_text())
    assert report["recall_macro"] >= 0.95 and report["per_class"]["dog"]["recall"] >= 0.9, report["per_class"]
    assert result.metrics["eval"]["eval_recall_macro"] == report["recall_macro"]

    # The Trainer really uses the weighted loss: the same untrained model (same seed) scores a different eval loss.
    (tmp_path / "plain").mkdir()
    plain = validate_recipe(cls_recipe(bert_dir, tmp_path / "plain", rows, train={"max_steps": 1}))
    before_weighted, before_plain = eval_history(result)[0], eval_history(run(plain))[0]
    assert before_weighted["eval_accuracy"] == before_plain["eval_accuracy"]
    assert abs(before_weighted["eval_loss"] - before_plain["eval_loss"]) > 1e-3, (before_weighted, before_plain)


def test_qlora_classifier_keeps_head_full_precision(llama64, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from finetune.evaluation.classifier import load_classifier, predict_logits
    from finetune.runner import run

    recipe = validate_recipe(
        cls_recipe(llama64, tmp_path, adapter={"type": "qlora"}, train={"learning_rate": 2e-2, "epochs": 4})
    )
    result = run(recipe)
    base = result.model.get_base_model()
    head = base.score.modules_to_save["default"]
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32 and head.weight.requires_grad
    assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert eval_history(result)[0]["eval_accuracy"] <= 0.4
    assert result.metrics["eval"]["eval_accuracy"] >= 0.9
    # `finetune predict` loads the base 4-bit again, so its logits are the ones evaluated in training.
    classifier = load_classifier(recipe.output.dir)
    texts = ["the cat is red", "a dog on the moon"]
    inputs = result.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = result.model.eval()(**inputs).logits
    torch.testing.assert_close(predict_logits(classifier, texts), expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Rows and labels: clear errors before any model is loaded
# --------------------------------------------------------------------------------------------


def test_unseen_eval_label_is_a_clear_error(tiny_bert_dir, tmp_path):
    from finetune.runner import run

    eval_file = write_jsonl(tmp_path / "eval.jsonl", [{"text": "a cat", "label": "cat"}, {"text": "a bird", "label": "bird"}])
    rows = [{"text": "a cat", "label": "cat"}, {"text": "a dog", "label": "dog"}]
    data = {"eval": str(eval_file), "eval_fraction": None}
    recipe = validate_recipe(cls_recipe(tiny_bert_dir, tmp_path, rows, data=data))
    with pytest.raises(DataError) as err:
        run(recipe)
    assert str(err.value) == (
        f"{eval_file}, row 2: label 'bird' does not occur in the training data (labels: cat, dog). "
        "The model has no class for it: fix the row, or add training rows with this label."
    )


def test_bad_rows_name_file_and_row_or_are_counted(tiny_bert_dir, tmp_path):
    from finetune.data.classification import load_classification_rows

    rows = [{"text": "a cat", "label": "cat"}, {"text": "a dog", "label": None}, {"text": "", "label": "dog"}]
    recipe = validate_recipe(cls_recipe(tiny_bert_dir, tmp_path, rows))
    train = recipe.data.train
    with pytest.raises(DataError, match=r"train\.jsonl, row 2: 'label' must be a string or an integer, got NoneType  \(set data\.on_bad_row: skip"):
        load_classification_rows(train, recipe)
    recipe.data.on_bad_row = "skip"
    found = load_classification_rows(train, recipe)
    assert [r["labels"] for r in found.rows] == [("cat",)] and found.skipped == 2
    assert found.problems[1].endswith("train.jsonl, row 3: 'text' is missing or empty")
    recipe.classification.label_column = "topic"
    with pytest.raises(DataError, match=r"no column\(s\) \['topic'\]; the data has \['text', 'label'\]"):
        load_classification_rows(train, recipe)


def test_integer_labels_sort_numerically_and_text_pairs_tokenize(tiny_bert_dir):
    from transformers import AutoTokenizer

    from finetune.data.classification import LabelMap, tokenize_classification

    labels = LabelMap.from_training([(10,), (2,), (1,), (2,)], multi_label=False)
    assert labels.names == ("1", "2", "10") and labels.encode((10,)) == 2
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    rows = [{"text": "the cat", "text_pair": "a dog is red", "labels": (2,)}]
    ds = tokenize_classification(rows, tokenizer, labels, max_length=6)
    assert len(ds[0]["input_ids"]) == 6  # truncated: [CLS] 2 words [SEP] ... [SEP] within 6 tokens
    assert ds[0]["token_type_ids"][-1] == 1 and ds[0]["labels"] == 1


def test_unknown_best_metric_is_refused_before_loading(tiny_bert_dir, tmp_path):
    from finetune.runner import run

    train = {"metric_for_best_model": "f1_macr", "load_best_model_at_end": True, "save_checkpoints": True}
    recipe = validate_recipe(cls_recipe(tiny_bert_dir, tmp_path, keyword_rows(20), train=train, eval={"metrics": ["accuracy", "f1"]}))
    with pytest.raises(RecipeError) as err:
        run(recipe)
    assert err.value.problems == [
        "train.metric_for_best_model: 'f1_macr' is not computed for this run; choose one of: loss, accuracy, "
        "f1_macro, f1_micro, f1_weighted. Did you mean 'f1_macro'?"
    ]


# --------------------------------------------------------------------------------------------
# Data sources: a folder of class folders, and package:// paths
# --------------------------------------------------------------------------------------------


def make_folder(root: Path) -> Path:
    for label, texts in {"sport": ["goal!", "a match"], "tech": ["a chip", "\ufeffnew phone\n"]}.items():
        (root / label).mkdir(parents=True)
        for i, text in enumerate(texts):
            (root / label / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    (root / "README.md").write_text("not a class")
    (root / "tech" / "notes.md").write_text("not a .txt file")
    return root


def test_folder_of_class_folders_reads_sorted_rows(tmp_path):
    from finetune.data.rows import read_source, read_source_with_skips
    from finetune.recipe import DataSource

    folder = make_folder(tmp_path / "news")
    ds = read_source(DataSource(path=str(folder)))
    assert ds.column_names == ["text", "label", "file"]
    assert [(r["label"], r["text"]) for r in ds] == [("sport", "goal!"), ("sport", "a match"), ("tech", "a chip"), ("tech", "new phone")]
    assert ds[3]["file"] == str(folder / "tech" / "001.txt")

    (folder / "tech" / "002.txt").write_bytes("price: \u00a3300".encode("latin-1"))
    with pytest.raises(DataError) as err:
        read_source(DataSource(path=str(folder)))
    assert str(err.value) == (
        f"{folder / 'tech' / '002.txt'}: not UTF-8 text (byte 0xa3 at offset 7)  "
        "(re-encode it as UTF-8, or give the folder's encoding on the data source (encoding: latin-1), "
        "or set data.on_bad_row: skip to leave such files out)"
    )
    ds, skipped = read_source_with_skips(DataSource(path=str(folder)), on_bad_row="skip")
    assert len(ds) == 4 and skipped == [f"{folder / 'tech' / '002.txt'}: not UTF-8 text (byte 0xa3 at offset 7)"]

    with pytest.raises(DataError, match="no text files in class sub-folders; expected"):
        read_source(DataSource(path=str(tmp_path / "news" / "sport")))


def test_folder_rows_name_their_file_and_skips_reach_the_plan(tiny_bert_dir, tmp_path):
    from finetune.data.classification import prepare_classification_data

    folder = make_folder(tmp_path / "news")
    (folder / "tech" / "002.txt").write_bytes(b"\xff\xfe")
    (folder / "sport" / "009.txt").write_text("   ")
    recipe = validate_recipe(cls_recipe(tiny_bert_dir, tmp_path, data={"train": str(folder), "eval_fraction": None, "on_bad_row": "skip"}))
    data = prepare_classification_data(recipe)
    assert data.skipped == 2 and data.labels.names == ("sport", "tech")
    assert [r["origin"] for r in data.train_rows][:1] == [str(folder / "sport" / "000.txt")]
    recipe.data.on_bad_row = "error"
    (folder / "tech" / "002.txt").unlink()
    with pytest.raises(DataError, match="^" + re.escape(f"{folder / 'sport' / '009.txt'}: 'text' is missing or empty")):
        prepare_classification_data(recipe)


@pytest.fixture
def fake_package(tmp_path, monkeypatch) -> Path:
    """An importable package `fakepkg_cls` with a model folder and a data folder inside, found via sys.path."""
    package = tmp_path / "site" / "fakepkg_cls"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    make_folder(package / "corpus" / "data")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return package


def test_package_paths_with_a_sub_path(fake_package):
    from finetune.data.rows import read_source
    from finetune.models.loading import resolve_model_path
    from finetune.recipe import DataSource, ModelConfig

    (fake_package / "model" / "config.json").write_text("{}")
    (fake_package / "model" / "model.safetensors").write_bytes(b"")  # resolving checks that the files are there
    assert resolve_model_path(ModelConfig(name_or_path="package://fakepkg_cls/model")) == str(fake_package / "model")
    with pytest.raises(FinetuneError) as err:
        resolve_model_path(ModelConfig(name_or_path="package://fakepkg_cls"))
    assert str(err.value) == (
        f"model.name_or_path: {fake_package} is a folder but not a model: it has no config.json. "
        "Model folders inside it: model."
    )
    assert len(read_source(DataSource(path="package://fakepkg_cls/corpus/data"))) == 4
    with pytest.raises(FinetuneError) as err:
        resolve_model_path(ModelConfig(name_or_path="package://fakepkg_cls/weights"))
    assert str(err.value) == f"model.name_or_path: no 'weights' in package 'fakepkg_cls' (installed at {fake_package})."
    with pytest.raises(FinetuneError, match=r"^data source package://nopkg_xyz/data: package 'nopkg_xyz' is not installed\."):
        read_source(DataSource(path="package://nopkg_xyz/data"))


def test_max_length_is_capped_at_what_the_model_reads(tiny_bert_dir, tmp_path, caplog):
    from transformers import AutoTokenizer

    from finetune.models.text_classifier import check_max_length

    recipe = validate_recipe(cls_recipe(tiny_bert_dir, tmp_path, keyword_rows(4), data={"max_length": 1024}))
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    with caplog.at_level("WARNING", logger="finetune"):
        assert check_max_length(recipe, str(tiny_bert_dir), tokenizer) == 128  # 128 positions in the tiny BERT
    assert caplog.messages == ["data.max_length 1024 > the 128 tokens this model reads: truncating to 128."]
    recipe.data.max_length = 64
    assert check_max_length(recipe, str(tiny_bert_dir), tokenizer) == 64
