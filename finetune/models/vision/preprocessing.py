"""The input size, mean and std a checkpoint was trained with, from wherever its source keeps them."""

from __future__ import annotations

import json

from finetune.models.vision.building import BuiltModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
