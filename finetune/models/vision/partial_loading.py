"""A plain state dict loaded partially into a model: matching keys load bit-exactly, the rest are reported."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from finetune.errors import FinetuneError


@dataclass
class LoadReport:
    """What a checkpoint gave the model: tensors loaded, and every key that did not load (with why)."""

    source: str
    loaded: int
    total: int  # tensors in the model's state dict
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint: newly initialised
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model: not used
    replaced: list[str] = field(default_factory=list)  # shapes differ: newly initialised (ignore_mismatched_sizes)

    def as_dict(self) -> dict:
        return asdict(self)

    def plan_lines(self) -> list[tuple[str, str]]:
        lines = [("checkpoint", f"{self.loaded:,} of {self.total:,} tensors loaded from {self.source}")]
        for what, keys in (("replaced", self.replaced), ("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                shown = ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
                lines.append((f"  {what}", f"{len(keys)}: {shown}"))
        return lines


def _shape(shape) -> str:
    return "(" + ", ".join(str(int(n)) for n in shape) + ")"


def mismatch_error(source: str, mismatched: list[tuple[str, tuple, tuple]], labels: int) -> FinetuneError:
    """The label count (or any shape) does not fit the checkpoint and the recipe did not allow replacing it."""
    shown = "; ".join(f"{k} is {_shape(a)} there and {_shape(b)} here" for k, a, b in mismatched[:3])
    more = f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
    return FinetuneError(
        f"image.ignore_mismatched_sizes is off, but {source} does not fit this model with {labels} labels: {shown}{more}. "
        "The checkpoint was trained for another number of classes (or another architecture). Set "
        "image.ignore_mismatched_sizes: true to replace those tensors with new ones (the head is then trained in full)."
    )


def load_partial(module, state_dict: dict, key_map: dict[str, str], ignore_mismatched: bool, source: str, labels: int) -> LoadReport:
    """Load the tensors of `state_dict` whose (renamed) key and shape match `module`'s, bit-exactly; report the rest.

    A shape mismatch is an error unless `ignore_mismatched`; a checkpoint none of whose keys match is an error
    (its key names say what `image.key_map` should rename)."""
    import torch

    renamed = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in key_map.items():
            key = re.sub(pattern, replacement, key)
        renamed[key] = tensor
    own = module.state_dict()
    matched, mismatched, unexpected = {}, [], []
    for key, tensor in renamed.items():
        if key not in own:
            unexpected.append(key)
        elif tuple(tensor.shape) != tuple(own[key].shape):
            mismatched.append((key, tuple(tensor.shape), tuple(own[key].shape)))
        else:
            matched[key] = tensor
    if not matched:
        raise FinetuneError(
            f"image.checkpoint: none of the {len(renamed)} keys of {source} is a key of the model "
            f"(checkpoint: {', '.join(list(renamed)[:3])}, ...; model: {', '.join(list(own)[:3])}, ...). "
            "Rename them with image.key_map (regular expression: replacement)."
        )
    if mismatched and not ignore_mismatched:
        raise mismatch_error(source, mismatched, labels)
    with torch.no_grad():
        for key, tensor in matched.items():
            own[key].copy_(tensor)  # state_dict() tensors share storage with the module's parameters and buffers
    replaced = [k for k, _, _ in mismatched]
    missing = [k for k in own if k not in matched and k not in replaced]
    return LoadReport(source, len(matched), len(own), sorted(missing), sorted(unexpected), sorted(replaced))
