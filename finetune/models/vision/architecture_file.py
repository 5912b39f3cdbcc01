"""Saving and rebuilding a plain (non-transformers) image model: `architecture.json` says how."""

from __future__ import annotations

from finetune.errors import FinetuneError
from finetune.models.vision.building import build_plain
from finetune.models.vision.source import BUILDER, VisionSource
from finetune.recipe import Recipe

ARCHITECTURE_FILE = "architecture.json"  # how a run or merged folder of a non-transformers model is rebuilt


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
    return build_plain(source, dict(record.get("architecture_args") or {}), int(record["num_classes"]))
