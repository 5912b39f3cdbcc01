"""A plain `nn.Module` image classifier (timm, or an installed package's function) given the interface the Trainer
and PEFT use: `forward(pixel_values, labels=None)` returns the logits and the cross-entropy loss. Its own module
(imported only when such a model is built): it imports torch, and `finetune validate` must not."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput


class PlainImageClassifier(nn.Module):
    """The architecture's weights live under `model.` (its own key names, as its checkpoints have them)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, labels=None):
        logits = self.model(pixel_values)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)
