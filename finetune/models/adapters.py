"""The PEFT adapter: a `LoraConfig` from the recipe, attached the way PEFT intends (k-bit preparation first)."""

from __future__ import annotations

from finetune.models.quantization import use_exact_4bit_kernels
from finetune.recipe import Recipe


def build_lora_config(recipe: Recipe, task_type: str, head_modules: list[str] | None = None):
    """A peft `LoraConfig`, or None for a full fine-tune."""
    a = recipe.adapter
    if a.type == "none":
        return None
    from peft import LoraConfig

    targets = a.target_modules
    target = "all-linear" if targets == ["all-linear"] else targets
    modules_to_save = list(a.modules_to_save or [])
    for head in head_modules or []:
        if head not in modules_to_save:
            modules_to_save.append(head)
    return LoraConfig(
        r=a.r,
        lora_alpha=a.alpha,
        lora_dropout=a.dropout,
        target_modules=target,
        use_rslora=a.use_rslora,
        use_dora=a.use_dora,
        bias=a.bias,
        modules_to_save=modules_to_save or None,
        task_type=task_type,
    )


def attach_adapter(model, recipe: Recipe, task_type: str, head_modules: list[str] | None = None):
    """Wrap the model with its adapter (and prepare a quantized base for training the way PEFT intends)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if recipe.is_quantized:
        use_exact_4bit_kernels(model)  # evaluations between training steps must not switch kernels
        # Casts norms and other small float params to fp32 for stable training and freezes the quantized base.
        # Checkpointing is switched on below with the non-deprecated transformers 5 API instead of PEFT's call.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if recipe.train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if recipe.adapter.type != "none":
            # Frozen embeddings produce no grad, so checkpointed blocks would see inputs without requires_grad.
            model.enable_input_require_grads()
    config = build_lora_config(recipe, task_type, head_modules)
    if config is None:
        return model
    return get_peft_model(model, config)
