"""LoRA on image backbones: the targets resolved per architecture (depthwise convolutions left out), and
"same"-padding 1x1 convolutions swapped for plain ones PEFT can wrap, in training and before a saved adapter loads."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.models.vision.heads import in_heads
from finetune.recipe import Recipe
from finetune.recipe.schema import is_pattern

log = logging.getLogger("finetune")


def _adaptable(module) -> bool:
    """A layer PEFT's LoRA can add an update to that lines up with the layer's output: a linear layer, a plain
    convolution, or a 1x1 convolution of a subclass (a "same"-padding convolution pads inside its own forward, which
    LoRA's parallel convolution would not, so its output would not line up for a larger kernel)."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and (type(module) is nn.Conv2d or module.kernel_size == (1, 1))


def _depthwise(module) -> bool:
    from torch import nn

    return isinstance(module, nn.Conv2d) and module.groups > 1


def _named(target: str, name: str) -> bool:
    """As PEFT matches a target: a regular expression against the whole name, a name against itself or a suffix."""
    return re.fullmatch(target, name) is not None if is_pattern(target) else name == target or name.endswith("." + target)


def lora_targets(model, recipe: Recipe, heads: list[str]) -> list[str]:
    """Full names of the layers LoRA adapts. `all-linear` (the default): every linear layer and 2-D convolution of
    the backbone, depthwise convolutions left out (a low-rank update of a per-channel filter saves nothing, and PEFT
    cannot merge it); named targets match by suffix, as PEFT matches them. A target that matches nothing, or a
    grouped convolution whose groups do not divide `adapter.r`, is an error here rather than PEFT's traceback."""
    a = recipe.adapter
    modules = [(n, m) for n, m in model.named_modules() if n and not in_heads(n, heads)]
    if a.target_modules == ["all-linear"]:
        names = [n for n, m in modules if _adaptable(m) and not _depthwise(m)]
        if not names:
            raise FinetuneError("adapter.target_modules: all-linear: the backbone has no linear or convolution layer to adapt.")
        return names
    names, unmatched = [], []
    for target in a.target_modules:
        found = [n for n, m in modules if _named(target, n) and _adaptable(m)]
        names += [n for n in found if n not in names]
        if not found:
            unmatched.append(target)
    if unmatched:
        kinds = sorted({n.rsplit(".", 1)[-1] for n, m in modules if _adaptable(m)})
        raise FinetuneError(
            f"adapter.target_modules: {', '.join(unmatched)} match(es) no linear or 2-D convolution layer of the backbone "
            f"(the head is trained in full anyway). Its layers are named: {', '.join(kinds[:20])}"
            f"{' ...' if len(kinds) > 20 else ''}; or use all-linear."
        )
    named = dict(model.named_modules())
    for name in names:
        module = named[name]
        if _depthwise(module) and a.r % module.groups:
            raise FinetuneError(
                f"adapter.r: {a.r} does not fit {name}, a grouped (depthwise) convolution with groups={module.groups}: "
                f"PEFT's LoRA on a grouped convolution needs a rank divisible by its groups. Use a multiple of "
                f"{module.groups}, or leave depthwise layers out of adapter.target_modules."
            )
    if any(_depthwise(named[n]) for n in names):
        log.warning("LoRA on grouped (depthwise) convolutions: PEFT cannot merge them, so `finetune merge` will refuse this run.")
    return names


def plain_convolutions(model, names: list[str]) -> list[str]:
    """Swap each 1x1 convolution among `names` whose class is a subclass of `nn.Conv2d` for a plain `nn.Conv2d`
    holding the same parameters, when the two give the same output (checked on a random input): PEFT builds its
    LoRA layers with the base layer's own class, and a "same"-padding subclass (EfficientNet ports, timm's
    Conv2dSame) cannot be built that way. Returns the names swapped; a subclass that computes something else
    (weight standardization, say) raises."""
    import torch
    from torch import nn

    swapped = []
    named = dict(model.named_modules())
    for name in names:
        module = named[name]
        if not isinstance(module, nn.Conv2d) or type(module) is nn.Conv2d:
            continue
        plain = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                          module.dilation, module.groups, module.bias is not None)  # fmt: skip
        plain.weight, plain.bias = module.weight, module.bias  # the same Parameters: key names and values unchanged
        probe = torch.randn(2, module.in_channels, 7, 7, dtype=module.weight.dtype, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            same = torch.allclose(module(probe), plain(probe), rtol=1e-5, atol=1e-6)
        if not same:
            raise FinetuneError(
                f"adapter.target_modules: {name} ({type(module).__name__}) does more than a convolution in its forward, "
                "so LoRA's update would not line up with it; leave it out of adapter.target_modules."
            )
        parent, _, attr = name.rpartition(".")
        setattr(named[parent] if parent else model, attr, plain)
        swapped.append(name)
    return swapped


def prepare_for_saved_adapter(model, adapter_dir: Path) -> None:
    """Before PEFT loads a saved image adapter onto a rebuilt base: the same plain convolutions training made. PEFT
    saves many targets as the shortest suffixes that select them, so names match as PEFT matches them."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        return
    names = [n for n, _ in model.named_modules() if n and any(n == t or n.endswith("." + t) for t in targets)]
    plain_convolutions(model, names)
