"""Classification metrics that work offline: the full report every evaluation writes, computed with scikit-learn,
and the names a recipe's `eval.metrics` selects from it (`REPORT_METRICS`, the one place they are defined).

Any other name in `eval.metrics` is an `evaluate` module: a path to its script, or a hub name when online.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from finetune.errors import FinetuneError
from finetune.metrics.plots import plot_confusion_matrix

if TYPE_CHECKING:
    import evaluate

__all__ = ["REPORT_METRICS", "SHIPPED", "load_metric", "classification_report", "plot_confusion_matrix"]

_AVERAGES = ("macro", "micro", "weighted")
# `eval.metrics` name -> the numbers of `classification_report` the Trainer logs for it; all of them by default.
REPORT_METRICS: dict[str, list[str]] = {
    "accuracy": ["accuracy"],
    **{name: [f"{name}_{average}" for average in _AVERAGES] for name in ("f1", "precision", "recall")},
    "confusion_matrix": [],  # not a number: in eval_metrics.json and confusion_matrix.png, not in the Trainer's logs
}
SHIPPED = tuple(REPORT_METRICS)  # the names that work offline


def load_metric(name: str, config_name: str | None = None, **load_kwargs: Any) -> evaluate.EvaluationModule:
    """Load an `evaluate` module for an `eval.metrics` name the report does not serve: a path to a script or a
    folder holding one, else a hub name (online only).

    `config_name="multilabel"` selects multi-hot inputs. Results are kept in memory unless
    `keep_in_memory=False` is passed (it must be, for distributed evaluation with `num_process > 1`).
    """
    if name in REPORT_METRICS:
        raise ValueError(f"metric {name!r} is served by classification_report, not loaded as a module")
    import evaluate  # slow to import (pulls in datasets): only when a metric is needed

    load_kwargs.setdefault("keep_in_memory", load_kwargs.get("num_process", 1) == 1)
    path = Path(name).expanduser()
    if path.exists() or name.endswith(".py") or name.startswith((".", "/", "~")):
        return evaluate.load(_script_path(path), config_name, **load_kwargs)
    try:
        return evaluate.load(name, config_name, **load_kwargs)
    except ImportError as err:  # the hub script needs a package that is not installed
        raise FinetuneError(f"metric {name!r}: {err}") from err
    except OSError as err:  # FileNotFoundError offline or for an unknown name; ConnectionError
        close = difflib.get_close_matches(name, SHIPPED, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise FinetuneError(
            f"metric {name!r} is not shipped with finetune-kit and could not be loaded from the Hugging Face Hub "
            f"(offline, or no such metric).{hint} Metrics that work offline: {', '.join(SHIPPED)}; "
            "or give the path to an evaluate metric script."
        ) from err


def metric_problems(names: list[str]) -> list[str]:
    """`eval.metrics` entries that cannot load, found without importing evaluate: a script path that is not there,
    a name that is not shipped and looks like a typo of one that is, a hub name while the hub is offline."""
    problems = []
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE"))
    for name in names:
        if name in SHIPPED:
            continue
        path = Path(name).expanduser()
        if path.exists() or name.endswith(".py") or name.startswith((".", "/", "~")):
            try:
                _script_path(path)
            except FinetuneError as exc:
                problems.append(f"eval.metrics: {exc}.")
            continue
        close = difflib.get_close_matches(name, SHIPPED, n=1)
        if close or offline:
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            why = "the hub is offline here (HF_HUB_OFFLINE)" if offline else f"write evaluate-metric/{name} for the hub's module"
            problems.append(
                f"eval.metrics: '{name}' is not a metric shipped with the kit{hint}; {why}. "
                f"Shipped metrics (offline): {', '.join(SHIPPED)}; or the path to an evaluate metric script."
            )
    return problems


def _script_path(path: Path) -> str:
    """The script evaluate would load for `path`, checked here so a bad path is a user error, not a hub lookup."""
    script = path / f"{path.name}.py" if path.is_dir() else path
    if script.suffix != ".py" or not script.is_file():
        expected = f"a folder holding {path.name}.py" if path.is_dir() else "a .py file"
        raise FinetuneError(f"no evaluate metric script at {path}: expected {expected}")
    return str(script.resolve())


def classification_report(
    predictions: Any, references: Any, label_names: list[str], multi_label: bool = False
) -> dict[str, Any]:
    """Accuracy, macro/micro/weighted precision-recall-F1, per-class scores and the confusion matrix.

    Computed with scikit-learn. Single-label: `predictions`/`references` are class ids in `[0, len(label_names))`.
    Multi-label: multi-hot rows of width `len(label_names)`; accuracy is then subset accuracy (every label of a row
    right) and the confusion matrix is one `[[TN, FP], [FN, TP]]` per label. Every class counts in the macro averages
    even when absent from the data, and a score whose denominator is zero is 0 (scikit-learn's `zero_division=0`).
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, multilabel_confusion_matrix, precision_recall_fscore_support

    predictions, references = np.asarray(predictions), np.asarray(references)
    _check_shapes(predictions, references, len(label_names), multi_label)
    labels = list(range(len(label_names)))

    report: dict[str, Any] = {"num_examples": len(references), "accuracy": float(accuracy_score(references, predictions))}
    for average in _AVERAGES:
        scores = precision_recall_fscore_support(references, predictions, labels=labels, average=average, zero_division=0)
        for name, score in zip(("precision", "recall", "f1"), scores[:3]):
            report[f"{name}_{average}"] = float(score)
    per_class = dict(zip(("precision", "recall", "f1"), precision_recall_fscore_support(
        references, predictions, labels=labels, average=None, zero_division=0)[:3]))

    if multi_label:
        matrix = multilabel_confusion_matrix(references, predictions, labels=labels).tolist()
    else:
        matrix = confusion_matrix(references, predictions, labels=labels).tolist()
    # Support is the number of rows whose true label is the class: a row sum, or FN + TP per label.
    support = [sum(row) for row in matrix] if not multi_label else [fn + tp for _, (fn, tp) in matrix]
    report["per_class"] = {
        label: {
            "precision": float(per_class["precision"][i]),
            "recall": float(per_class["recall"][i]),
            "f1": float(per_class["f1"][i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(label_names)
    }
    report["labels"] = list(label_names)
    report["confusion_matrix"] = matrix
    return report


def _check_shapes(predictions: np.ndarray, references: np.ndarray, num_labels: int, multi_label: bool) -> None:
    """Catch ids or widths that do not match `label_names`; scikit-learn would silently drop such labels."""
    if predictions.shape != references.shape:
        raise ValueError(f"predictions {predictions.shape} and references {references.shape} differ in shape")
    if multi_label:
        if predictions.ndim != 2 or predictions.shape[1] != num_labels:
            raise ValueError(f"multi-label rows must be multi-hot of width {num_labels}, got shape {predictions.shape}")
    elif predictions.ndim != 1:
        raise ValueError(f"single-label predictions must be a 1-d sequence of class ids, got shape {predictions.shape}")
    else:
        ids = np.concatenate([predictions, references])
        if ids.size and (ids.min() < 0 or ids.max() >= num_labels):
            raise ValueError(f"class ids must lie in [0, {num_labels}), got {ids.min()}..{ids.max()}")
