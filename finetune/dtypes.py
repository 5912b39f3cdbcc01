"""One spelling for floating-point dtypes in recipes, CLI flags, plans and reports: `fp32`, `bf16`, `fp16`, as
accelerate (`mixed_precision`), DeepSpeed (`"bf16": {...}`) and the Trainer (`bf16=True`) write them. The torch
names (`float32`, `bfloat16`, `float16`, and `float`/`half`) are accepted as aliases and read as the short ones.
"""

from __future__ import annotations

from typing import Any

NAMES = ("fp32", "bf16", "fp16")
TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


def canonical(value: Any) -> Any:
    """`value` in the kit's spelling when it names a float dtype (`torch.bfloat16`, "bfloat16" -> "bf16"), else
    unchanged, so a schema's own check still rejects it with the list of choices."""
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        return ALIASES.get(key, key if key in NAMES else value)
    name = str(value).removeprefix("torch.")  # a torch.dtype
    return ALIASES.get(name, value)


def torch_dtype(name: str):
    """The torch dtype for a name in either spelling."""
    import torch

    short = canonical(name)
    if short not in NAMES:
        raise ValueError(f"dtype {name!r}: choose one of {', '.join(NAMES)}.")
    return getattr(torch, TORCH_NAMES[short])


def name_of(dtype) -> str:
    """The kit's spelling of a torch dtype (`torch.bfloat16` -> "bf16"); other dtypes keep torch's name."""
    short = canonical(dtype)
    return short if short in NAMES else str(dtype).removeprefix("torch.")
