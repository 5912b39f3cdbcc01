"""A finished classification run's model for inference, loaded the way training loaded it: `finetune predict`
and `finetune eval` use it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError


@dataclass
class Classifier:
    """A run's model, ready for inference, with what is needed to use it the way it was trained."""

    model: object
    tokenizer: object
    labels: object  # finetune.classify.LabelMap
    max_length: int
    recipe: object


def run_folder(target: str | Path) -> Path:
    """A run's folder from a run folder, or from a recipe (its `output.dir`)."""
    from finetune.data.classification import LABELS_FILE
    from finetune.recipe import load_recipe

    target = Path(target)
    folder = Path(load_recipe(target).output.dir) if target.is_file() else target
    if not (folder / LABELS_FILE).is_file() or not (folder / "recipe.yaml").is_file():
        raise FinetuneError(
            f"{folder}: not a finished classification run (no {LABELS_FILE} / recipe.yaml). "
            "Give a run's output.dir, or the recipe that trained it."
        )
    return folder


def load_classifier(target: str | Path) -> Classifier:
    """Base model with a head for the run's labels, then the run's adapter and trained head on top (eval mode).

    The base is loaded the way training loaded it (dtype, and quantized for a QLoRA run), so the logits match
    the ones evaluated at the end of training. A full fine-tune (`adapter: none`) is loaded from the run folder.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.data.classification import LabelMap
    from finetune.models.loading import (
        load_model,
        quiet_transformers,
        resolve_model_path,
    )
    from finetune.models.quantization import use_exact_4bit_kernels
    from finetune.recipe import load_recipe
    from finetune.runtime import resolve_runtime
    from finetune.models.text_classifier import check_max_length, match_pad_token

    folder = run_folder(target)
    recipe = load_recipe(folder / "recipe.yaml")
    labels = LabelMap.load(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=recipe.model.trust_remote_code)
    base = resolve_model_path(recipe.model)
    has_adapter = (folder / "adapter_config.json").is_file()
    runtime = resolve_runtime(recipe)
    with quiet_transformers():  # its load report lists the head as "newly initialized": the adapter brings it next
        model = load_model(
            recipe, runtime, base if has_adapter else str(folder), AutoModelForSequenceClassification, **labels.config_kwargs()
        )
    match_pad_token(model, tokenizer)
    if recipe.is_quantized:
        use_exact_4bit_kernels(model)  # the kernel training and its evaluation used: predictions reproduce them
    if has_adapter:
        from finetune.models.adapters import load_adapter

        model = load_adapter(model, folder)
    model.eval()
    return Classifier(model, tokenizer, labels, check_max_length(recipe, base, tokenizer), recipe)


def predict_logits(classifier: Classifier, texts: list[str], pairs: list[str] | None = None, batch_size: int = 32):
    """Logits (rows x labels, float32 on CPU) for `texts` (and their `pairs`), tokenized as in training."""
    import torch

    model, tokenizer = classifier.model, classifier.tokenizer
    device = next(model.parameters()).device
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            batch_pairs = pairs[start : start + batch_size] if pairs is not None else None
            inputs = tokenizer(batch, batch_pairs, truncation=True, max_length=classifier.max_length, padding=True, return_tensors="pt")
            chunks.append(model(**inputs.to(device)).logits.float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, len(classifier.labels.names))


def top_labels(classifier: Classifier, logits, top_k: int) -> list[dict]:
    """Per row: the `top_k` labels by probability (softmax, or per-label sigmoid for multi-label) and the prediction."""
    multi = classifier.labels.multi_label
    probs = logits.sigmoid() if multi else logits.softmax(-1)
    names = classifier.labels.names
    results = []
    for row in probs:
        order = row.argsort(descending=True)[:top_k].tolist()
        predicted = [names[i] for i in range(len(names)) if row[i] > 0.5] if multi else [names[int(row.argmax())]]
        results.append({"predicted": predicted, "scores": [{"label": names[i], "score": round(float(row[i]), 6)} for i in order]})
    return results
