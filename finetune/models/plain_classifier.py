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


class CachedFeatureClassifier(nn.Module):
    """Head-only training on features computed once: `forward(features, labels=None)` runs only the head of the
    whole model it holds (so checkpoints, parameter counts and the saved run keep the whole model, backbone frozen).

    The features are what the head module received in the full model's forward, so the logits are the full model's
    (in eval mode: a dropout before the head is not applied)."""

    main_input_name = "features"

    def __init__(self, model: nn.Module, head: str):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, features, labels=None):
        logits = self.model.get_submodule(self.head)(features)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)
