"""A classifier's evaluation during training: predictions from logits, `compute_metrics` for the Trainer (the numbers
`eval.metrics` selects from the scikit-learn report), and the check that `train.metric_for_best_model` is one of
them. Shared by the text and image classification tasks and `finetune eval`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.errors import RecipeError
from finetune.recipe import Recipe

if TYPE_CHECKING:
    from finetune.data.classification import LabelMap


def predictions_from_logits(logits, multi_label: bool):
    """Class ids (argmax), or multi-hot rows (sigmoid > 0.5, i.e. logit > 0) for multi-label."""
    import numpy as np

    logits = np.asarray(logits)
    return (logits > 0).astype(int) if multi_label else logits.argmax(-1)


class ClassificationMetrics:
    """`compute_metrics` for the Trainer, on scikit-learn's scores (`finetune.metrics.classification_report`).

    Every evaluation computes the full report (per-class scores, confusion matrix) and keeps the latest in
    `last_report`; the Trainer gets only the numbers `eval.metrics` selects (all of the report's by default), since
    it logs and compares floats. Other names are loaded as `evaluate` modules up front (a path, or a hub name
    online), so a bad name fails before the model is loaded.
    """

    def __init__(self, labels: LabelMap, names: list[str]):
        from finetune.metrics import REPORT_METRICS, SHIPPED, load_metric

        self.labels = labels
        names = names or list(SHIPPED)
        self.keys = [key for n in names if n in REPORT_METRICS for key in REPORT_METRICS[n]]
        config = "multilabel" if labels.multi_label else None
        self.extra = {n: load_metric(n, config) for n in names if n not in REPORT_METRICS}
        self.last_report: dict = {}

    def known_keys(self) -> list[str] | None:
        """Metric names the Trainer will see (None when a custom module's keys are only known after computing it)."""
        return None if self.extra else ["loss", *self.keys]

    def __call__(self, eval_pred) -> dict[str, float]:
        from finetune.metrics import classification_report

        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        predictions = predictions_from_logits(logits, self.labels.multi_label)
        references = (eval_pred.label_ids > 0.5).astype(int) if self.labels.multi_label else eval_pred.label_ids
        report = classification_report(predictions, references, list(self.labels.names), self.labels.multi_label)
        scores = {key: report[key] for key in self.keys}
        for name, module in self.extra.items():
            result = module.compute(predictions=predictions, references=references)
            numbers = {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}
            report.update(numbers)
            scores.update(numbers)
        self.last_report = report
        return scores


def check_best_metric(recipe: Recipe, metrics: ClassificationMetrics) -> None:
    """`train.metric_for_best_model` must be a number the evaluation produces; caught before any model load."""
    name = recipe.train.metric_for_best_model
    known = metrics.known_keys()
    if name is None or known is None:
        return
    if name.removeprefix("eval_") not in known:
        import difflib

        hint = difflib.get_close_matches(name.removeprefix("eval_"), known, n=1)
        raise RecipeError(
            [f"train.metric_for_best_model: {name!r} is not computed for this run; choose one of: {', '.join(known)}."
             + (f" Did you mean '{hint[0]}'?" if hint else "")]
        )
