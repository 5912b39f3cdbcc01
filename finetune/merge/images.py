"""`finetune merge` of an image-classification LoRA run: the base rebuilt from the run's recipe (checkpoint loaded
as in training), the adapter and trained head put on it with PEFT and folded in (`merge_and_unload`), saved as a
plain model (a transformers folder, or the architecture's own state dict), reloaded from disk and checked against
base + adapter on fixed inputs."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from finetune.dtypes import name_of, torch_dtype
from finetune.errors import FinetuneError
from finetune.merge.plan import check_output_folder
from finetune.registry import traits

VERIFY_IMAGES = 8


@dataclass
class ImageRun:
    """What an image run's folder holds for a merge."""

    adapter_dir: Path
    recipe_path: Path
    recipe: object  # finetune.recipe.Recipe
    labels: object  # finetune.data.classification.LabelMap
    preprocessing: object  # finetune.data.images.Preprocessing
    folder: Path  # where labels.json and preprocessing.json are (the run folder, also for a checkpoint-N inside it)


def image_run(adapter_dir: Path) -> ImageRun | None:
    """The image run `adapter_dir` belongs to (the run folder or a checkpoint inside it), or None for any other
    adapter."""
    from finetune.data.classification import LabelMap
    from finetune.data.images import PREPROCESSING_FILE, Preprocessing
    from finetune.recipe import load_recipe

    adapter_dir = Path(adapter_dir)
    folder = next((d for d in (adapter_dir, adapter_dir.parent) if (d / "recipe.yaml").is_file()), None)
    if folder is None:
        return None
    recipe = load_recipe(folder / "recipe.yaml")
    if traits(recipe.task).inputs != "images":
        return None
    if not (folder / PREPROCESSING_FILE).is_file() or not (folder / "labels.json").is_file():
        raise FinetuneError(f"{folder}: an image run without labels.json / {PREPROCESSING_FILE}; it did not finish.")
    return ImageRun(adapter_dir, folder / "recipe.yaml", recipe, LabelMap.load(folder), Preprocessing.load(folder), folder)


def check_image_merge(run: ImageRun, out: Path, overwrite: bool, base, quantize, method) -> Path:
    """Options a transformers LLM merge takes that an image merge does not, and the output folder."""
    if base:
        raise FinetuneError("--base: an image run's base is rebuilt from its recipe (model and image.checkpoint); leave --base out.")
    if quantize:
        raise FinetuneError("--quantize is for language models; an image model is saved in full precision.")
    if method == "streaming":
        raise FinetuneError("--method streaming is for transformers language models; an image merge uses PEFT (--method peft).")
    if not (run.adapter_dir / "adapter_config.json").is_file():
        raise FinetuneError(
            f"{run.adapter_dir}: no adapter_config.json; this image run trained without LoRA (adapter: {run.recipe.adapter.type}) "
            "and its folder already holds the whole model."
        )
    return check_output_folder(out, overwrite, {"adapter": run.adapter_dir})  # the base is rebuilt: no folder


def verification_images(size: int):
    """Fixed inputs every layer sees: normal noise, the scale of normalized pixels."""
    import torch

    return torch.randn(VERIFY_IMAGES, 3, size, size, generator=torch.Generator().manual_seed(0))


def _logits(model, pixels):
    import torch

    with torch.no_grad():
        return model(pixel_values=pixels).logits.float()


def write_image_merge(run: ImageRun, tmp: Path, dtype, verify: bool, tolerance: float | None) -> dict:
    """Merge into `tmp`; returns what the report records. Raises (nothing is published) when a layer cannot be merged
    or the merged model's logits differ from base + adapter by more than the tolerance."""
    import torch
    from safetensors.torch import save_file

    from finetune.merge.verify import default_tolerance
    from finetune.models.adapters import load_adapter
    from finetune.models.loading import quiet_transformers
    from finetune.models.vision import ARCHITECTURE_FILE, architecture_record, build_image_model, prepare_for_saved_adapter

    recipe, labels = run.recipe, run.labels
    dtype = torch_dtype(dtype) if isinstance(dtype, str) else (dtype or torch_dtype(recipe.merge.dtype or "fp32"))
    seconds = {}
    t0 = time.perf_counter()
    with quiet_transformers():
        built = build_image_model(recipe, labels, dtype=torch.float32)
    prepare_for_saved_adapter(built.model, run.adapter_dir)
    model = load_adapter(built.model, run.adapter_dir).eval()
    grouped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and getattr(m.get_base_layer(), "groups", 1) > 1]
    if grouped:
        raise FinetuneError(
            f"the adapter has LoRA on grouped (depthwise) convolutions ({', '.join(grouped[:3])}), which PEFT cannot "
            "merge; use the run with its adapter (finetune predict), or train without them in adapter.target_modules."
        )
    pixels = verification_images(run.preprocessing.size)
    reference = _logits(model, pixels)
    with model.disable_adapter():
        base = _logits(model, pixels)
    lora_layers = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and m.lora_A)
    heads = sorted(model.peft_config["default"].modules_to_save or [])
    merged = model.merge_and_unload(safe_merge=True).to(dtype)
    if built.source.is_hf:
        merged.config.dtype = dtype
        with quiet_transformers():
            merged.save_pretrained(tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(run.preprocessing.hf_processor_config(), indent=2) + "\n")
    else:
        state = {k: v.detach().contiguous().clone() for k, v in merged.model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / ARCHITECTURE_FILE).write_text(json.dumps(architecture_record(recipe, labels), indent=2) + "\n")
    architecture = type(merged.model if not built.source.is_hf else merged).__name__
    del model, merged
    seconds["merge"] = round(time.perf_counter() - t0, 2)

    verification = None
    if verify:
        t0 = time.perf_counter()
        reloaded = load_merged_image_model(tmp, built.source.is_hf)
        diff = float((_logits(reloaded, pixels) - reference).abs().max())
        effect = float((reference - base).abs().max())
        scale = float(reference.abs().max())
        rule = "given (--tolerance / merge.tolerance)"
        if tolerance is None:
            tolerance, rule = default_tolerance(dtype, scale, effect)
        verification = {
            "images": VERIFY_IMAGES, "max_abs_logit_diff": diff, "max_abs_logit": scale, "adapter_effect": effect,
            "tolerance": tolerance, "tolerance_rule": rule, "passed": diff <= tolerance,
            "seconds": round(time.perf_counter() - t0, 2),
        }  # fmt: skip
        seconds["verify"] = verification["seconds"]
        if not verification["passed"]:
            raise FinetuneError(
                f"verification failed: the merged model's logits differ from base + adapter by up to {diff:.4g}, over "
                f"the tolerance {tolerance:.4g} ({rule})."
            )
    files = sorted(p.name for p in tmp.glob("*.safetensors"))
    return {
        "files": files,
        "total_bytes": sum((tmp / f).stat().st_size for f in files),
        "merged_modules": lora_layers,
        "carried_over": heads,
        "architecture": architecture,
        "dtype": name_of(dtype),
        "verification": verification,
        "seconds": seconds,
        "hf": built.source.is_hf,
    }


def load_merged_image_model(folder: Path, hf: bool):
    """The merged folder loaded back with nothing of the kit's training code: transformers, or the architecture with
    `load_state_dict(strict=True)`; fp32, eval mode."""
    import torch

    from finetune.merge.verify import load_merged
    from finetune.models.vision import ARCHITECTURE_FILE, build_plain_from_record, plain_classifier

    if hf:
        from transformers import AutoModelForImageClassification

        return load_merged(folder, AutoModelForImageClassification, dtype=torch.float32)
    from safetensors.torch import load_file

    module = build_plain_from_record(json.loads((folder / ARCHITECTURE_FILE).read_text()))
    module.load_state_dict(load_file(str(folder / "model.safetensors")))
    return plain_classifier(module).float().eval()


def image_model_card(run: ImageRun, out: Path, result: dict) -> str:
    """README.md of the merged folder: what it is, how it was checked, and how to load it."""
    recipe = run.recipe
    c = run.recipe.adapter
    v = result["verification"]
    check = f"max |logit diff| {v['max_abs_logit_diff']:.3g} ≤ {v['tolerance']:.3g} on {v['images']} fixed inputs" if v else "skipped"
    if result["hf"]:
        use = (
            "```python\nfrom transformers import AutoModelForImageClassification\n\n"
            f'model = AutoModelForImageClassification.from_pretrained("{out}")\n```\n\n'
            "`preprocessor_config.json` holds the size and mean/std the run evaluated with.\n"
        )
    else:
        use = (
            f"`model.safetensors` is the state dict of `{recipe.model.name_or_path}` built with "
            f"`{dict(recipe.image.architecture_args)}` and `num_classes={len(run.labels.names)}` (`architecture.json`): "
            "build it and `load_state_dict` (strict). `preprocessing.json` holds the size and mean/std.\n"
        )
    return (
        f"# {out.name}\n\n`{recipe.model.name_or_path}` fine-tuned for image classification with LoRA "
        f"(r={c.r}, alpha={c.alpha:g}) and a new head, merged by `finetune merge`.\n\n"
        f"| | |\n| --- | --- |\n| labels | {', '.join(run.labels.names)} |\n"
        f"| checkpoint | {recipe.image.checkpoint or recipe.model.name_or_path} |\n"
        f"| merge | PEFT merge_and_unload, {result['merged_modules']} layer(s), saved as {result['dtype']} |\n"
        f"| verification | {check} |\n\n## Use\n\n{use}"
    )
