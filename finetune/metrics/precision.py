"""Precision, as an `evaluate` metric module that works offline.

Same inputs, arguments and result key as the hub's `precision`; loaded by path with
`evaluate.load("/path/to/precision.py")`. Unlike the hub module, per-class scores (`average=None`) come back
as a list of floats, not a numpy array, so results can be written to JSON as they are. Self-contained
on purpose: `evaluate` copies this one file into its modules cache and imports it from there, so it may
import only evaluate, datasets, sklearn and numpy.
"""

import datasets
import evaluate
from sklearn.metrics import precision_score

_DESCRIPTION = """
Precision is the fraction of predicted positives that are right: TP / (TP + FP).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`, or of multi-hot `list` of `int` with config `multilabel`): Predicted labels.
    references (same shape as `predictions`): Ground-truth labels.
    labels (`list` of `int`): Labels to include (and their order when `average=None`); for multi-label,
        column indices. Defaults to all labels seen, sorted.
    pos_label (`int`): The positive class when `average="binary"`. Defaults to 1.
    average (`str` or `None`): `"binary"` (default, as on the hub), `"micro"`, `"macro"`, `"weighted"`,
        `"samples"` (multi-label only), or `None` for one score per label.
    sample_weight (`list` of `float`): Weight of each row. Defaults to None (all equal).
    zero_division (`"warn"`, `0`, `1` or `nan`): Score of a label with no predicted rows.
        Defaults to `"warn"` (0 with a warning), as in scikit-learn.

Returns:
    precision (`float`, or `list` of `float` when `average=None`): between 0 and 1, higher is better.

Examples:
    >>> precision = evaluate.load("finetune/metrics/precision.py")
    >>> precision.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 2, 1, 0, 0, 1], average="micro")
    {'precision': 0.3333333333333333}
    >>> evaluate.load("finetune/metrics/precision.py", "multilabel").compute(
    ...     references=[[0, 1, 1], [0, 1, 0]], predictions=[[0, 1, 1], [1, 1, 0]], average="macro")
    {'precision': 0.6666666666666666}
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
        raise ValueError(f"unknown config {config_name!r} for precision; choose one of {list(_CONFIGS)}")
    value = datasets.Value("int32")
    if config_name == "multilabel":
        value = datasets.Sequence(value)
    return datasets.Features({"predictions": value, "references": value})


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Precision(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=_features(self.config_name),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.precision_score.html"],
        )

    def _compute(
        self,
        predictions,
        references,
        labels=None,
        pos_label=1,
        average="binary",
        sample_weight=None,
        zero_division="warn",
    ):
        score = precision_score(
            references,
            predictions,
            labels=labels,
            pos_label=pos_label,
            average=average,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
        return {"precision": float(score) if average is not None else score.tolist()}
