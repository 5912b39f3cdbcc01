"""Confusion matrix, as an `evaluate` metric module that works offline.

Same inputs, arguments and result key as the hub's `confusion_matrix`; loaded by path with
`evaluate.load("/path/to/confusion_matrix.py")`. Unlike the hub module, the matrix comes back as nested
lists (JSON-ready), and the `multilabel` config works: it gives one 2x2 matrix per label
(scikit-learn's `multilabel_confusion_matrix`), where the hub module fails. Self-contained on purpose:
`evaluate` copies this one file into its modules cache and imports it from there, so it may import only
evaluate, datasets, sklearn and numpy.
"""

import datasets
import evaluate
from sklearn.metrics import confusion_matrix, multilabel_confusion_matrix

_DESCRIPTION = """
The confusion matrix counts, for each true class (row), the rows predicted as each class (column).
With the `multilabel` config: one matrix [[TN, FP], [FN, TP]] per label.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`, or of multi-hot `list` of `int` with config `multilabel`): Predicted labels.
    references (same shape as `predictions`): Ground-truth labels.
    labels (`list` of `int`): Labels that index the matrix, to reorder or select a subset; for multi-label,
        column indices. Defaults to all labels seen, sorted.
    sample_weight (`list` of `float`): Weight of each row. Defaults to None (counts).
    normalize (`"true"`, `"pred"`, `"all"` or `None`): Divide by the row sums, the column sums or the total
        (single-label only). Defaults to None (counts).

Returns:
    confusion_matrix (`list` of `list`): entry [i][j] counts rows of true label i predicted as label j;
        with config `multilabel`, a `list` of 2x2 matrices [[TN, FP], [FN, TP]], one per label.

Examples:
    >>> confusion = evaluate.load("finetune/metrics/confusion_matrix.py")
    >>> confusion.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'confusion_matrix': [[1, 0, 1], [0, 2, 0], [1, 1, 0]]}
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
        raise ValueError(f"unknown config {config_name!r} for confusion_matrix; choose one of {list(_CONFIGS)}")
    value = datasets.Value("int32")
    if config_name == "multilabel":
        value = datasets.Sequence(value)
    return datasets.Features({"predictions": value, "references": value})


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ConfusionMatrix(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_features(self.config_name),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.confusion_matrix.html"],
        )

    def _compute(self, predictions, references, labels=None, sample_weight=None, normalize=None):
        if self.config_name == "multilabel":
            if normalize is not None:
                raise ValueError("normalize is not supported with the multilabel config")
            matrix = multilabel_confusion_matrix(references, predictions, labels=labels, sample_weight=sample_weight)
        else:
            matrix = confusion_matrix(
                references, predictions, labels=labels, sample_weight=sample_weight, normalize=normalize
            )
        return {"confusion_matrix": matrix.tolist()}
