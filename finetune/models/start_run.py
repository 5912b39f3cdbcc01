"""A finished SFT LoRA run as the starting point of another run (`preference.from_run`): checked without a model,
then its adapter loaded, trainable, onto the base."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.recipe import Recipe

ADAPTER_CONFIG = "adapter_config.json"


def start_run_problems(recipe: Recipe, key: str, folder: str) -> list[str]:
    """What rules out `folder` as the run to start from: not a finished LoRA run, another base, another template."""
    from finetune.models.adapters import same_model
    from finetune.recipe import load_recipe

    path = Path(folder)
    if not (path / "recipe.yaml").is_file() or not (path / ADAPTER_CONFIG).is_file():
        return [f"{key}: {folder} is not a finished LoRA run (no recipe.yaml and {ADAPTER_CONFIG}); train the SFT run "
                "first, or give its output.dir."]
    try:
        run = load_recipe(path / "recipe.yaml")
    except FinetuneError as exc:
        return [f"{key}: {folder}/recipe.yaml does not load: {exc}"]
    problems = []
    if not same_model(str(run.model.name_or_path), str(recipe.model.name_or_path)):
        problems.append(
            f"{key}: {folder} was trained on {run.model.name_or_path}, but model.name_or_path is "
            f"{recipe.model.name_or_path}: its adapter only fits its own base; set model.name_or_path: {run.model.name_or_path}."
        )
    if run.model.chat_template != recipe.model.chat_template:
        problems.append(
            f"{key}: {folder} was trained with model.chat_template {run.model.chat_template!r}, this recipe has "
            f"{recipe.model.chat_template!r}: the answers would be templated differently; use the run's."
        )
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        problems.append(f"{key}: {folder} holds a {config.get('peft_type')} adapter; only a LoRA run can be continued.")
    taken = sorted(recipe.adapter.model_fields_set - {"type"})
    if taken:
        problems.append(
            f"adapter.{taken[0]}: with {key}, the run's LoRA keeps training with its own settings (rank, alpha, "
            f"targets; see {folder}/{ADAPTER_CONFIG}); remove adapter.{', adapter.'.join(taken)}."
        )
    if recipe.adapter.type == "none":
        problems.append(f"{key}: continuing {folder}'s LoRA needs adapter.type lora or qlora, not none.")
    return problems


def start_run_adapter(folder: str) -> dict:
    """The run's LoRA settings, for the plan."""
    config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    return {"r": config.get("r"), "alpha": config.get("lora_alpha"), "targets": config.get("target_modules")}


def attach_run_adapter(model, folder: str, recipe: Recipe):
    """`model` (the base) with the run's adapter loaded trainable as the adapter `default`, prepared as
    `models.adapters.attach_adapter` prepares a new one (k-bit preparation, gradient checkpointing)."""
    from peft import PeftModel, prepare_model_for_kbit_training

    from finetune.models.adapters import read_adapter_config
    from finetune.models.quantization import use_exact_4bit_kernels

    read_adapter_config(Path(folder))  # damaged files and pickled weights, named
    if recipe.is_quantized:
        use_exact_4bit_kernels(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if recipe.train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return PeftModel.from_pretrained(model, folder, is_trainable=True)
