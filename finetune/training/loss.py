"""The causal LM loss on the positions that carry a label only.

SFT takes its loss on completions (assistant turns), often half of the tokens or less. TRL 1.16 projects every
position through the LM head on devices without Triton (CPUs among them) and projects it again in backward to save
memory: with SmolLM2's 49k vocabulary the head is a fifth of the model's FLOPs, so that is ~20% of a step spent on
logits nobody uses. Here the model's own forward projects only the positions whose next token is a target
(`logits_to_keep`, which transformers' causal LMs take as a tensor of positions); the backward then runs through
those alone, once.
"""

from __future__ import annotations

import inspect

from finetune.data.sft import IGNORE_INDEX


def supports_positions(model) -> bool:
    """Whether the causal LM under `model` (PEFT wrappers unwrapped) takes `logits_to_keep`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = type(base).forward
    return "logits_to_keep" in inspect.signature(forward).parameters


def completion_loss(model, inputs: dict, num_items_in_batch=None, positions=None, fused: bool = False):
    """(summed cross-entropy over the labelled positions / the label count, logits of those positions, their
    targets). `num_items_in_batch` is the label count over all micro-batches of the step, as the Trainer passes it
    for gradient accumulation; without it, this batch's own count. `positions`: the labelled positions, as the
    collator found them on the host (data/batches.py); found here otherwise, with a host read on a GPU. `fused`: the
    model's forward is Liger's (`train.kernels: liger`), which takes the targets of the kept positions
    (`shift_labels`) and returns the loss of its fused linear cross-entropy without the logits (None here)."""
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"]
    targets = labels[:, 1:]
    # Position t predicts token t+1: keep the columns where some row has a target next.
    keep = positions if positions is not None else (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
    if keep.numel() == 0:  # nothing to learn in this batch: a differentiable zero from one position
        keep = torch.zeros(1, dtype=torch.long, device=labels.device)
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    kept = targets[:, keep]
    if fused:
        # Liger divides the summed loss by num_items_in_batch when given, else takes the mean over labelled tokens.
        out = model(**forward, use_cache=False, logits_to_keep=keep, shift_labels=kept, num_items_in_batch=num_items_in_batch)
        return out.loss, None, kept
    logits = model(**forward, use_cache=False, logits_to_keep=keep).logits.float()
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), kept.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (kept != IGNORE_INDEX).sum().clamp(min=1)
    return total / count, logits.detach(), kept
