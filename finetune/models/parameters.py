"""Trainable and total parameters and weight memory, measured from the loaded tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune.dtypes import ITEMSIZE, canonical


@dataclass
class ParamCounts:
    trainable: int
    total: int
    weight_bytes: int  # bytes the weights take as loaded (quantized where quantized)
    weight_bytes_unquantized: int  # the same weights in the compute dtype
    trainable_bytes: int = 0  # bytes the trainable parameters take (their gradients take as much)

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)


def count_parameters(model, unquantized_bytes_per_param: int) -> ParamCounts:
    """Trainable/total parameters and weight memory, measured from the loaded tensors.

    bitsandbytes packs two 4-bit values per uint8, so a Params4bit's numel is half the logical count;
    its `quant_state.shape` holds the real shape.
    """
    trainable = total = loaded = unquantized = trainable_bytes = 0
    seen = set()
    for param in model.parameters():
        if id(param) in seen:  # tied weights counted once
            continue
        seen.add(id(param))
        logical = param.numel()
        state = getattr(param, "quant_state", None)
        if state is not None and getattr(state, "shape", None) is not None:
            logical = int(math.prod(state.shape))
        total += logical
        if param.requires_grad:
            trainable += logical
            trainable_bytes += param.numel() * param.element_size()
        quantized = state is not None or not param.dtype.is_floating_point  # Params4bit (uint8) / Int8Params
        loaded += param.numel() * param.element_size()
        unquantized += logical * (unquantized_bytes_per_param if quantized else param.element_size())
        if state is not None:  # 4-bit: absmax and friends of the quantization state
            loaded += sum(t.numel() * t.element_size() for t in _state_tensors(state))
        scb = getattr(param, "SCB", None)  # 8-bit: one scale per row
        if scb is not None:
            loaded += scb.numel() * scb.element_size()
    return ParamCounts(trainable, total, loaded, unquantized, trainable_bytes)


def _state_tensors(state):
    import torch

    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif hasattr(value, "absmax"):  # nested (double-quantization) state
            yield from _state_tensors(value)


def dtype_bytes(name: str) -> int:
    return ITEMSIZE[canonical(name)]
