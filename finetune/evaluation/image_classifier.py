"""A finished image-classification run's model for inference, rebuilt the way training built it: `finetune predict
--image` uses it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError


@dataclass
class ImageClassifierRun:
    """A run's model (eval mode) with its labels and the preprocessing its evaluation used."""

    model: object
    labels: object  # finetune.data.classification.LabelMap
    preprocessing: object  # finetune.data.images.Preprocessing
    recipe: object


def load_run_model(folder: Path, recipe, labels):
    """The run's model in fp32: the base rebuilt from the recipe with the run's adapter and head on it (LoRA), or the
    whole model the run saved (head-only and full fine-tunes)."""
    import torch

    from finetune.models.loading import load_checkpoint, quiet_transformers
    from finetune.models.vision import (
        ARCHITECTURE_FILE,
        build_image_model,
        build_plain_from_record,
        plain_classifier,
        prepare_for_saved_adapter,
    )

    if (folder / "adapter_config.json").is_file():
        from finetune.models.adapters import load_adapter

        with quiet_transformers():
            base = build_image_model(recipe, labels, dtype=torch.float32).model
        prepare_for_saved_adapter(base, folder)
        return load_adapter(base, folder)
    if (folder / "config.json").is_file():
        from transformers import AutoModelForImageClassification

        with quiet_transformers():
            return load_checkpoint(AutoModelForImageClassification, folder, None, dtype=torch.float32)
    if not (folder / ARCHITECTURE_FILE).is_file() or not (folder / "model.safetensors").is_file():
        raise FinetuneError(f"{folder}: no adapter, no config.json and no {ARCHITECTURE_FILE} + model.safetensors: not a finished image run.")
    from safetensors.torch import load_file

    model = plain_classifier(build_plain_from_record(json.loads((folder / ARCHITECTURE_FILE).read_text())))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))  # strict: every key of the run's model
    return model.float()


def load_image_classifier(target: str | Path) -> ImageClassifierRun:
    from finetune.data.classification import LabelMap
    from finetune.data.images import PREPROCESSING_FILE, Preprocessing
    from finetune.evaluation.classifier import run_folder
    from finetune.recipe import load_recipe

    folder = run_folder(target)
    recipe = load_recipe(folder / "recipe.yaml")
    if not (folder / PREPROCESSING_FILE).is_file():
        raise FinetuneError(f"{folder}: no {PREPROCESSING_FILE}; not a finished image-classification run.")
    labels = LabelMap.load(folder)
    model = load_run_model(folder, recipe, labels)
    model.eval()
    return ImageClassifierRun(model, labels, Preprocessing.load(folder), recipe)


def image_files(paths: list[str]) -> list[Path]:
    """The image files named, a folder standing for the images inside it (sorted, recursively)."""
    from finetune.data.images import IMAGE_SUFFIXES

    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise FinetuneError(f"--image: {path} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
            files += inside
        elif path.is_file():
            files.append(path)
        else:
            raise FinetuneError(f"--image: {path} not found.")
    return files


def predict_image_logits(classifier: ImageClassifierRun, files: list[Path], batch_size: int = 32):
    """Logits (images x labels, float32) of `files`, prepared as evaluation prepared them; an unreadable file is
    named."""
    import torch

    from finetune.data.images import open_image

    chunks = []
    with torch.no_grad():
        for start in range(0, len(files), batch_size):
            batch = []
            for file in files[start : start + batch_size]:
                try:
                    batch.append(classifier.preprocessing(open_image(str(file), str(file))))
                except ValueError as exc:
                    raise FinetuneError(f"--image: {exc}") from None
            chunks.append(classifier.model(pixel_values=torch.stack(batch)).logits.float())
    return torch.cat(chunks) if chunks else torch.empty(0, len(classifier.labels.names))
