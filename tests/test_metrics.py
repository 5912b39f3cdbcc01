"""Classification metrics offline: the report agrees with scikit-learn, `eval.metrics` names select from it, and other
names load as `evaluate` modules by path (conftest sets offline)."""

from __future__ import annotations

import struct
import textwrap

import numpy as np
import pytest
from sklearn import metrics as sk

from finetune.errors import FinetuneError
from finetune.metrics import REPORT_METRICS, SHIPPED, classification_report, load_metric, plot_confusion_matrix

SEEDS = (0, 1, 2)
NUM_CLASSES = 5


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


# An evaluate metric module of the user's own, in evaluate's format, loaded by path.
RECALL_SCRIPT = textwrap.dedent('''
    import datasets
    import evaluate
    from sklearn.metrics import recall_score


    class MyRecall(evaluate.Metric):
        def _info(self):
            value = datasets.Value("int32")
            if self.config_name == "multilabel":
                value = datasets.Sequence(value)
            return evaluate.MetricInfo(description="recall", citation="", inputs_description="",
                                       features=datasets.Features({"predictions": value, "references": value}))

        def _compute(self, predictions, references, average="binary"):
            return {"recall": float(recall_score(references, predictions, average=average, zero_division=0))}
''')


def test_every_offline_name_selects_numbers_of_the_report():
    """`eval.metrics: [f1]` works offline: each shipped name is served by the report, from one table."""
    from finetune.data.classification import LabelMap
    from finetune.metrics.classification import ClassificationMetrics

    assert SHIPPED == ("accuracy", "f1", "precision", "recall", "confusion_matrix") and set(REPORT_METRICS) == set(SHIPPED)
    predictions, references, _ = _multiclass(0)
    report = classification_report(predictions, references, LABELS)
    for name, keys in REPORT_METRICS.items():
        assert set(keys) <= set(report), name
    labels = LabelMap(tuple(LABELS))
    logits = np.eye(NUM_CLASSES)[predictions]

    class EvalPrediction:
        label_ids = references

    EvalPrediction.predictions = logits
    scores = ClassificationMetrics(labels, ["f1"])(EvalPrediction)
    assert scores == {f"f1_{average}": pytest.approx(sk.f1_score(references, predictions, average=average))
                      for average in ("macro", "micro", "weighted")}  # fmt: skip
    everything = ClassificationMetrics(labels, [])
    assert everything.known_keys() == ["loss", "accuracy", *[f"{n}_{a}" for n in ("f1", "precision", "recall")
                                                             for a in ("macro", "micro", "weighted")]]  # fmt: skip
    assert everything(EvalPrediction)["accuracy"] == pytest.approx(sk.accuracy_score(references, predictions))


def test_load_metric_loads_scripts_by_path(tmp_path):
    # A folder holding <folder>.py, as evaluate expects, and the file itself.
    folder = tmp_path / "my_recall"
    folder.mkdir()
    (folder / "my_recall.py").write_text(RECALL_SCRIPT)
    for path in (folder, folder / "my_recall.py"):
        recall = load_metric(str(path))
        assert recall.name == "my_recall"
        assert recall.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 1]) == {"recall": 0.5}
    multi = load_metric(str(folder), "multilabel")
    assert multi.compute(predictions=[[0, 1, 1], [1, 1, 0]], references=[[0, 1, 1], [0, 1, 0]], average="macro") == {
        "recall": pytest.approx(2 / 3)
    }
    with pytest.raises(FinetuneError) as err:
        load_metric(str(tmp_path / "missing.py"))
    assert str(err.value) == f"no evaluate metric script at {tmp_path / 'missing.py'}: expected a .py file"
    with pytest.raises(FinetuneError) as err:
        load_metric(str(tmp_path))
    assert str(err.value) == f"no evaluate metric script at {tmp_path}: expected a folder holding {tmp_path.name}.py"
    with pytest.raises(ValueError, match=r"^metric 'f1' is served by classification_report, not loaded as a module$"):
        load_metric("f1")


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
