"""Held-out evaluation of a classifier: the classification report (accuracy, macro F1, per class, confusion
matrix) of each variant, with rows read and tokenized as in training."""

from __future__ import annotations

from dataclasses import replace

HEADLINE = ("accuracy", "f1_macro", "precision_macro", "recall_macro")


def classify(classifier, model, rows: list[dict], batch_size: int = 32) -> tuple[dict, object, list]:
    """The report for `model` (a variant of `classifier`'s model) on `rows`, its logits and its predictions."""
    import numpy as np

    from finetune.evaluation.classifier import predict_logits
    from finetune.metrics import classification_report
    from finetune.metrics.classification import predictions_from_logits

    labels = classifier.labels
    texts = [r["text"] for r in rows]
    pairs = [r["text_pair"] for r in rows] if rows and rows[0].get("text_pair") is not None else None
    logits = predict_logits(replace(classifier, model=model), texts, pairs, batch_size=batch_size)
    predictions = predictions_from_logits(logits.numpy(), labels.multi_label)
    references = np.asarray([labels.encode(r["labels"]) for r in rows])
    if labels.multi_label:
        references = (references > 0.5).astype(int)
    report = classification_report(predictions, references, list(labels.names), labels.multi_label)
    return report, logits, _names(predictions, labels)


def _names(predictions, labels) -> list:
    if labels.multi_label:
        return [[labels.names[i] for i, on in enumerate(row) if on] for row in predictions]
    return [labels.names[int(i)] for i in predictions]


def table_metrics(report: dict) -> dict[str, float]:
    """The numbers a report table shows: the headline scores, then each class's F1."""
    numbers = {key: report[key] for key in HEADLINE}
    numbers.update({f"f1[{name}]": scores["f1"] for name, scores in report["per_class"].items()})
    return numbers
