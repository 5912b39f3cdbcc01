"""bitsandbytes quantization: the config a recipe asks for, and keeping 4-bit layers trainable on CPU."""

from __future__ import annotations

from finetune.dtypes import torch_dtype
from finetune.recipe import Recipe
from finetune.registry import traits
from finetune.runtime import Runtime

# Heads that must stay trainable and full precision in a classifier (BERT-style, Llama-style, RoBERTa).
CLASSIFIER_HEADS = ("classifier", "score")


def compute_dtype_name(recipe: Recipe, runtime: Runtime) -> str:
    """`fp32`, `bf16` or `fp16`: the recipe's quantization.compute_dtype, or the run's precision when that is auto."""
    name = recipe.quantization.compute_dtype
    return runtime.precision if name == "auto" else name


def build_bnb_config(recipe: Recipe, runtime: Runtime):
    """A `BitsAndBytesConfig` for the recipe's quantization section, or None when the base stays full precision."""
    q = recipe.quantization
    if q.bits is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    skip = q.skip_modules
    if traits(recipe.task).head and skip is None:
        skip = list(CLASSIFIER_HEADS)
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(compute_dtype_name(recipe, runtime)),
        bnb_4bit_quant_storage=torch.uint8 if q.storage_dtype == "uint8" else torch_dtype(q.storage_dtype),
        llm_int8_skip_modules=skip,
    )


def use_exact_4bit_kernels(model) -> None:
    """Keep every bitsandbytes 4-bit layer on its autograd-capable kernel, in training and evaluation alike.

    On CPUs with AVX512-bf16, bitsandbytes 0.50's `Linear4bit.forward` repacks the weight into an inference layout
    the first time it runs in eval mode on an input without grad (every evaluation), for good: absmax goes to bf16,
    double quantization is undone, and every later call, training included, goes to `gemv_4bit`, which has no
    autograd. The gradient through each frozen 4-bit layer to the layers before it is then lost. The repacking is
    gated on this per-module flag; `tests/test_quantization.py` pins that gate, so a bitsandbytes that moves it fails.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def repacked_4bit_layers(model) -> list[str]:
    """Names of 4-bit layers whose weights bitsandbytes repacked for inference (see `use_exact_4bit_kernels`)."""
    return [
        name
        for name, module in model.named_modules()
        if hasattr(module, "support_avx512bf16_for_cpu")  # bitsandbytes' Linear4bit, not PEFT's wrapper around it
        and getattr(module.weight.quant_state, "packing_format_for_cpu", False)
    ]
