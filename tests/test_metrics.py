"""The shipped evaluate metric modules agree with scikit-learn and load by path offline (conftest sets offline)."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import evaluate
import numpy as np
import pytest
from sklearn import metrics as sk

from finetune.errors import FinetuneError
from finetune.metrics import METRICS_DIR, SHIPPED, classification_report, load_metric, plot_confusion_matrix

SEEDS = (0, 1, 2)
NUM_CLASSES = 5
SCORES = {"precision": sk.precision_score, "recall": sk.recall_score, "f1": sk.f1_score}


def _load(name: str, config_name: str | None = None) -> evaluate.EvaluationModule:
    """Load a shipped module straight from its file, the way `evaluate` users would."""
    return evaluate.load(str(METRICS_DIR / f"{name}.py"), config_name, keep_in_memory=True)


@pytest.fixture(scope="module")
def modules() -> dict[tuple[str, str | None], evaluate.EvaluationModule]:
    return {(name, config): _load(name, config) for name in SHIPPED for config in (None, "multilabel")}


def _multiclass(seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random labels where predictions agree with references ~half the time, plus random sample weights."""
    rng = np.random.default_rng(seed)
    references = rng.integers(0, NUM_CLASSES, n)
    predictions = np.where(rng.random(n) < 0.5, references, rng.integers(0, NUM_CLASSES, n))
    return predictions, references, rng.random(n)


def _multilabel(seed: int, n: int = 120, width: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    references = (rng.random((n, width)) < 0.4).astype(int)
    flips = rng.random((n, width)) < 0.25
    return np.where(flips, 1 - references, references), references


def test_modules_load_offline_from_the_temporary_modules_cache(modules):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    cache = Path(evaluate.config.HF_MODULES_CACHE)
    assert cache.is_relative_to(os.environ["HF_HOME"])
    # Every metric got its own importable module (evaluate names it after the file stem), copied into the cache.
    module_names = {type(m).__module__ for m in modules.values()}
    assert len(module_names) == len(SHIPPED)
    for name in SHIPPED:
        copies = list((cache / "evaluate_modules" / "metrics" / name).glob(f"*/{name}.py"))
        assert [c.read_text() for c in copies] == [(METRICS_DIR / f"{name}.py").read_text()]
        assert modules[(name, None)].name == name


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["precision", "recall", "f1"])
def test_multiclass_scores_match_sklearn(modules, name, seed):
    predictions, references, weights = _multiclass(seed)
    metric = modules[(name, None)]
    for average in ("macro", "micro", "weighted", None):
        for sample_weight in (None, weights):
            got = metric.compute(
                predictions=predictions, references=references, average=average, sample_weight=sample_weight
            )[name]
            expected = SCORES[name](references, predictions, average=average, sample_weight=sample_weight)
            np.testing.assert_allclose(got, expected, rtol=1e-12)
            assert isinstance(got, float if average else list)
    # A subset of labels, in a chosen order.
    got = metric.compute(predictions=predictions, references=references, labels=[4, 0, 2], average=None)[name]
    np.testing.assert_allclose(got, SCORES[name](references, predictions, labels=[4, 0, 2], average=None))


@pytest.mark.parametrize("name", ["precision", "recall", "f1"])
def test_binary_and_zero_division_match_sklearn(modules, name):
    rng = np.random.default_rng(7)
    references, predictions = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    metric = modules[(name, None)]
    assert metric.compute(predictions=predictions, references=references)[name] == pytest.approx(
        SCORES[name](references, predictions)
    )
    assert metric.compute(predictions=predictions, references=references, pos_label=0)[name] == pytest.approx(
        SCORES[name](references, predictions, pos_label=0)
    )
    # Class 2 is never predicted and never true: its score is whatever zero_division says.
    for zero_division in (0, 1):
        got = metric.compute(
            predictions=predictions, references=references, labels=[0, 1, 2], average=None, zero_division=zero_division
        )[name]
        expected = SCORES[name](references, predictions, labels=[0, 1, 2], average=None, zero_division=zero_division)
        np.testing.assert_allclose(got, expected)
        assert got[2] == zero_division


@pytest.mark.parametrize("seed", SEEDS)
def test_multilabel_scores_match_sklearn(modules, seed):
    predictions, references = _multilabel(seed)
    for name, score in SCORES.items():
        metric = modules[(name, "multilabel")]
        for average in ("macro", "micro", "weighted", "samples", None):
            got = metric.compute(predictions=predictions, references=references, average=average, zero_division=0)
            np.testing.assert_allclose(got[name], score(references, predictions, average=average, zero_division=0))
    subset_accuracy = modules[("accuracy", "multilabel")].compute(predictions=predictions, references=references)
    assert subset_accuracy == {"accuracy": pytest.approx(sk.accuracy_score(references, predictions))}
    assert subset_accuracy["accuracy"] < np.mean(predictions == references)  # whole rows, not single cells


@pytest.mark.parametrize("seed", SEEDS)
def test_accuracy_matches_sklearn(modules, seed):
    predictions, references, weights = _multiclass(seed)
    accuracy = modules[("accuracy", None)]
    assert accuracy.compute(predictions=predictions, references=references)["accuracy"] == pytest.approx(
        np.mean(predictions == references)
    )
    assert accuracy.compute(predictions=predictions, references=references, normalize=False)["accuracy"] == (
        np.sum(predictions == references)
    )
    weighted = accuracy.compute(predictions=predictions, references=references, sample_weight=weights)["accuracy"]
    assert weighted == pytest.approx(sk.accuracy_score(references, predictions, sample_weight=weights))


@pytest.mark.parametrize("seed", SEEDS)
def test_confusion_matrix_matches_sklearn(modules, seed):
    predictions, references, weights = _multiclass(seed)
    confusion = modules[("confusion_matrix", None)]
    got = confusion.compute(predictions=predictions, references=references)["confusion_matrix"]
    assert got == sk.confusion_matrix(references, predictions).tolist()
    reordered = confusion.compute(predictions=predictions, references=references, labels=[3, 1])["confusion_matrix"]
    assert reordered == sk.confusion_matrix(references, predictions, labels=[3, 1]).tolist()
    normalized = confusion.compute(
        predictions=predictions, references=references, sample_weight=weights, normalize="true"
    )["confusion_matrix"]
    np.testing.assert_allclose(
        normalized, sk.confusion_matrix(references, predictions, sample_weight=weights, normalize="true")
    )
    ml_predictions, ml_references = _multilabel(seed)
    per_label = modules[("confusion_matrix", "multilabel")].compute(
        predictions=ml_predictions, references=ml_references
    )
    assert per_label["confusion_matrix"] == sk.multilabel_confusion_matrix(ml_references, ml_predictions).tolist()


def test_unknown_config_is_rejected():
    expected = r"^unknown config 'multiclass' for f1; choose one of \['default', 'multilabel'\]$"
    with pytest.raises(ValueError, match=expected):
        _load("f1", "multiclass")


LABELS = ["anger", "joy", "fear", "love", "surprise"]


@pytest.mark.parametrize("seed", SEEDS)
def test_classification_report_matches_sklearn(seed):
    predictions, references, _ = _multiclass(seed)
    predictions[predictions == 3] = 0  # class 3 is never predicted: its precision is 0 by zero_division
    report = classification_report(predictions, references, LABELS)
    expected = sk.classification_report(
        references, predictions, labels=range(NUM_CLASSES), target_names=LABELS, output_dict=True, zero_division=0
    )
    assert report["num_examples"] == len(references)
    assert report["accuracy"] == pytest.approx(expected["accuracy"])
    for average in ("macro", "weighted"):
        for name, key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert report[f"{name}_{average}"] == pytest.approx(expected[f"{average} avg"][key])
    # Single-label micro averages all equal accuracy.
    for name in ("precision", "recall", "f1"):
        assert report[f"{name}_micro"] == pytest.approx(expected["accuracy"])
    assert list(report["per_class"]) == LABELS
    for label in LABELS:
        got, want = report["per_class"][label], expected[label]
        assert got == {
            "precision": pytest.approx(want["precision"]),
            "recall": pytest.approx(want["recall"]),
            "f1": pytest.approx(want["f1-score"]),
            "support": want["support"],
        }
    assert report["per_class"]["love"]["precision"] == 0.0
    assert report["labels"] == LABELS
    expected_matrix = sk.confusion_matrix(references, predictions, labels=range(NUM_CLASSES))
    assert report["confusion_matrix"] == expected_matrix.tolist()


def test_classification_report_multilabel_matches_sklearn():
    predictions, references = _multilabel(3, width=4)
    names = LABELS[:4]
    report = classification_report(predictions, references, names, multi_label=True)
    expected = sk.classification_report(references, predictions, target_names=names, output_dict=True, zero_division=0)
    assert report["accuracy"] == pytest.approx(sk.accuracy_score(references, predictions))
    for average in ("macro", "micro", "weighted"):
        for name, key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert report[f"{name}_{average}"] == pytest.approx(expected[f"{average} avg"][key])
    for label in names:
        assert report["per_class"][label]["f1"] == pytest.approx(expected[label]["f1-score"])
        assert report["per_class"][label]["support"] == expected[label]["support"]
    assert report["confusion_matrix"] == sk.multilabel_confusion_matrix(references, predictions).tolist()


def test_classification_report_rejects_ids_outside_the_label_names():
    with pytest.raises(ValueError, match=r"^class ids must lie in \[0, 2\), got 0\.\.2$"):
        classification_report([0, 1, 2], [0, 1, 1], ["neg", "pos"])
    with pytest.raises(ValueError, match=r"^multi-label rows must be multi-hot of width 3, got shape \(2, 2\)$"):
        classification_report([[0, 1], [1, 0]], [[0, 1], [1, 1]], ["a", "b", "c"], multi_label=True)


def test_confusion_matrix_png(tmp_path):
    predictions, references, _ = _multiclass(0)
    matrix = classification_report(predictions, references, LABELS)["confusion_matrix"]
    path = plot_confusion_matrix(matrix, LABELS, tmp_path / "plots" / "confusion_matrix.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    assert data[-8:-4] == b"IEND"
    with pytest.raises(ValueError, match=r"^confusion matrix of shape \(5, 5\) does not match 2 label names$"):
        plot_confusion_matrix(matrix, ["a", "b"], tmp_path / "bad.png")


def test_load_metric_resolves_shipped_names_and_paths(tmp_path):
    f1 = load_metric("f1", "multilabel")
    assert (f1.name, f1.config_name) == ("f1", "multilabel")
    assert f1.compute(predictions=[[0, 1, 1], [1, 1, 0]], references=[[0, 1, 1], [0, 1, 0]], average="macro") == {
        "f1": pytest.approx(2 / 3)
    }
    # A folder holding <folder>.py, as evaluate expects, and the file itself.
    folder = tmp_path / "my_recall"
    folder.mkdir()
    shutil.copy(METRICS_DIR / "recall.py", folder / "my_recall.py")
    for path in (folder, folder / "my_recall.py"):
        recall = load_metric(str(path))
        assert recall.name == "recall"
        assert recall.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 1]) == {"recall": 0.5}
    with pytest.raises(FinetuneError) as err:
        load_metric(str(tmp_path / "missing.py"))
    assert str(err.value) == f"no evaluate metric script at {tmp_path / 'missing.py'}: expected a .py file"
    with pytest.raises(FinetuneError) as err:
        load_metric(str(tmp_path))
    assert str(err.value) == f"no evaluate metric script at {tmp_path}: expected a folder holding {tmp_path.name}.py"


def test_unknown_metric_offline_names_the_shipped_ones():
    with pytest.raises(FinetuneError) as err:
        load_metric("bleu")
    assert str(err.value) == (
        "metric 'bleu' is not shipped with finetune-kit and could not be loaded from the Hugging Face Hub "
        "(offline, or no such metric). Metrics that work offline: accuracy, f1, precision, recall, confusion_matrix; "
        "or give the path to an evaluate metric script."
    )
    with pytest.raises(FinetuneError, match=r"\(offline, or no such metric\)\. Did you mean 'accuracy'\? Metrics"):
        load_metric("acuracy")
