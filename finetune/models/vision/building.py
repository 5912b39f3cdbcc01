"""The image model built for the recipe's labels: transformers' `AutoModelForImageClassification`, timm or
`MODULE:CALLABLE`, its checkpoint loaded (partially for a plain state dict), new weights drawn from `train.seed`."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.models.checkpoint import local_name, model_config
from finetune.models.vision.partial_loading import LoadReport, load_partial, mismatch_error
from finetune.models.vision.source import VisionSource, checkpoint_path, read_state_dict, vision_source
from finetune.recipe import Recipe

log = logging.getLogger("finetune")

def plain_classifier(module):
    """`module` (a timm or package-built classifier) wrapped for the Trainer and PEFT."""
    from finetune.models.plain_classifier import PlainImageClassifier

    return PlainImageClassifier(module)


def build_plain(source: VisionSource, args: dict, num_classes: int):
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
            model = plain_classifier(build_plain(source, dict(c.architecture_args), n))
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
                return BuiltModel(plain_classifier(build_plain(source, dict(recipe.image.architecture_args), num_classes)), source, None, None)
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
