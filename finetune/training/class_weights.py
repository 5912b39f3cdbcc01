"""Class weights for a classifier's loss (`classification.class_weights: balanced`), and the weighted loss the
Trainer calls (text classification)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.data.classification import LabelMap


def balanced_weights(encoded: list, labels: LabelMap):
    """Loss weights for `class_weights: balanced`.

    Single-label: n_rows / (n_classes * rows_of_class), scikit-learn's "balanced" (1 for every class when balanced).
    Multi-label: BCE `pos_weight` = negatives / positives per label, so each label's positives weigh as much as its
    negatives. A class without training rows gets weight 1 (it never occurs as a target, so the value is unused).
    """
    import torch

    if labels.multi_label:
        hot = torch.tensor(encoded, dtype=torch.float64)
        positives = hot.sum(0)
        negatives = len(encoded) - positives
        return torch.where(positives > 0, negatives / positives.clamp(min=1), torch.ones_like(positives)).float()
    counts = torch.bincount(torch.tensor(encoded), minlength=len(labels.names)).double()
    weights = len(encoded) / (len(labels.names) * counts.clamp(min=1))
    return torch.where(counts > 0, weights, torch.ones_like(weights)).float()


class WeightedLoss:
    """`compute_loss_func` for the Trainer: class-weighted cross-entropy, or BCE with `pos_weight` for multi-label.

    Summed over items and divided by `num_items_in_batch` (the items of the whole accumulated batch, counted by the
    Trainer), so gradient accumulation gives the same update as one big batch; a plain mean when it is not given (eval).
    """

    def __init__(self, weights, multi_label: bool):
        self.weights = weights
        self.multi_label = multi_label

    def __call__(self, outputs, labels, num_items_in_batch=None):
        import torch.nn.functional as F

        logits = outputs["logits"]
        weights = self.weights.to(device=logits.device, dtype=logits.dtype)
        if self.multi_label:
            loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), pos_weight=weights, reduction="sum")
        else:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), weight=weights, reduction="sum")
        return loss / (num_items_in_batch if num_items_in_batch is not None else labels.numel())
