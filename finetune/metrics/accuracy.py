"""Accuracy, as an `evaluate` metric module that works offline.

Same inputs, arguments and result key as the hub's `accuracy`; loaded by path with
`evaluate.load("/path/to/accuracy.py")`. Self-contained on purpose: `evaluate` copies this one file
into its modules cache and imports it from there, so it may import only evaluate, datasets, sklearn
and numpy.
"""

import datasets
import evaluate
from sklearn.metrics import accuracy_score

_DESCRIPTION = """
Accuracy is the fraction of correct predictions: (TP + TN) / (TP + TN + FP + FN).
With the `multilabel` config it is subset accuracy: a row counts only when all its labels are right.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`, or of multi-hot `list` of `int` with config `multilabel`): Predicted labels.
    references (same shape as `predictions`): Ground-truth labels.
    normalize (`bool`): Return the fraction of correct rows (default) rather than their count.
    sample_weight (`list` of `float`): Weight of each row. Defaults to None (all equal).

Returns:
    accuracy (`float`): Fraction (or count, with `normalize=False`) of correct predictions.

Examples:
    >>> accuracy = evaluate.load("finetune/metrics/accuracy.py")
    >>> accuracy.compute(references=[0, 1, 2, 0], predictions=[0, 1, 1, 0])
    {'accuracy': 0.75}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""

_CONFIGS = ("default", "multilabel")


def _features(config_name: str) -> datasets.Features:
    """Single-label rows are one int; `multilabel` rows are a multi-hot list of ints."""
    if config_name not in _CONFIGS:
        raise ValueError(f"unknown config {config_name!r} for accuracy; choose one of {list(_CONFIGS)}")
    value = datasets.Value("int32")
    if config_name == "multilabel":
        value = datasets.Sequence(value)
    return datasets.Features({"predictions": value, "references": value})


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_features(self.config_name),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        score = accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight)
        return {"accuracy": float(score)}
