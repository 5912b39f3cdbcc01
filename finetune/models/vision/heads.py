"""The head and the frozen backbone: the head's modules found, the backbone's weights and BatchNorm statistics
frozen, the features the head receives computed once, and the input size checked with one forward pass."""

from __future__ import annotations

from finetune.errors import FinetuneError
from finetune.models.vision.building import BuiltModel


def find_heads(built: BuiltModel, num_labels: int, configured: str | None) -> list[str]:
    """The head's module names (in the wrapped model): `image.head`, else a transformers classifier's children
    outside its base model, else timm's classifier, else the last linear layer with one output per label."""
    from torch import nn

    model = built.model
    prefix = "" if built.source.is_hf else "model."
    names = dict(model.named_modules())
    if configured:
        name = prefix + configured
        if name not in names or not any(True for _ in names[name].parameters()):
            layers = [n.removeprefix(prefix) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise FinetuneError(f"image.head: the model has no layer named '{configured}' with weights; its linear layers: {', '.join(layers[-5:])}.")
        return [name]
    if built.source.is_hf:
        base = model.base_model_prefix
        heads = [n for n, child in model.named_children() if n != base and next(child.parameters(), None) is not None]
        if heads:
            return heads
    if built.source.kind == "timm" and hasattr(model.model, "get_classifier"):
        classifier = model.model.get_classifier()
        found = [n for n, m in model.named_modules() if m is classifier]
        if found and found[0]:
            return found
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
    if not linear:
        raise FinetuneError(
            f"model.name_or_path: the model built has no linear layer with {num_labels} outputs (one per label); "
            "does its builder take num_classes? Name the head in image.head."
        )
    return [linear[-1]]


def in_heads(name: str, heads: list[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)


def freeze_backbone(model, heads: list[str]) -> int:
    """Head-only training: every parameter outside the head stops learning. Returns the frozen parameter count."""
    frozen = 0
    for name, param in model.named_parameters():
        if not in_heads(name, heads):
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def freeze_norm_statistics(model, heads: list[str]) -> int:
    """Keep the backbone's BatchNorm layers in eval mode whatever `model.train()` says: they normalize with, and
    never update, the checkpoint's running statistics. A forward pre-hook sets each one back to eval before it runs
    (the Trainer calls `model.train()` every step). Returns how many layers were frozen."""
    from torch.nn.modules.batchnorm import _BatchNorm

    def keep_eval(module, args):
        if module.training:
            module.eval()

    count = 0
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and not in_heads(name, heads):
            module.register_forward_pre_hook(keep_eval)
            count += 1
    return count


def head_inputs(model, head: str, dataset, batch_size: int = 64):
    """What `head` receives in `model`'s forward (eval mode, no gradients) for every row of `dataset`: the frozen
    backbone's features, computed once. Returns (features, labels) tensors in the dataset's order."""
    import torch

    captured = []
    hook = model.get_submodule(head).register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    was_training = model.training
    model.eval()
    labels = []
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                model(pixel_values=torch.stack([item["pixel_values"] for item in items]))
                labels += [item["labels"] for item in items]
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured), torch.tensor(labels)


def check_input_size(model, size: int, source: str) -> None:
    """One forward pass on a blank `size` x `size` image, in eval mode: an input size the model cannot take fails
    here, in a second, with the model's own reason, instead of in the first training step."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            dtype = next(model.parameters()).dtype
            model(pixel_values=torch.zeros(1, 3, size, size, dtype=dtype))
    except Exception as exc:  # any layer can refuse a size: a fixed position table, a pooling too large
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fixed = getattr(getattr(model, "config", None), "image_size", None)
        hint = f" This model takes {fixed}x{fixed} images (its config's image_size)." if isinstance(fixed, int) and fixed != size else ""
        raise FinetuneError(f"image.size: {source} cannot take {size}x{size} images: {reason}.{hint}") from None
    finally:
        model.train(was_training)
