"""Small factories from recipe sections to library objects: bitsandbytes config, LoRA config, model + adapter."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from finetune.errors import FinetuneError
from finetune.recipe import Recipe
from finetune.runtime import TORCH_DTYPES, Runtime

log = logging.getLogger(__name__)

# Heads that must stay trainable and full precision in a classifier (BERT-style, Llama-style, RoBERTa).
CLASSIFIER_HEADS = ("classifier", "score")


def compute_dtype_name(recipe: Recipe, runtime: Runtime) -> str:
    name = recipe.quantization.compute_dtype
    return runtime.dtype_name if name == "auto" else name


def build_bnb_config(recipe: Recipe, runtime: Runtime):
    """A `BitsAndBytesConfig` for the recipe's quantization section, or None when the base stays full precision."""
    q = recipe.quantization
    if q.bits is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    skip = q.skip_modules
    if recipe.task == "classification" and skip is None:
        skip = list(CLASSIFIER_HEADS)
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype_name(recipe, runtime)),
        bnb_4bit_quant_storage=getattr(torch, q.storage_dtype),
        llm_int8_skip_modules=skip,
    )


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


def load_base(recipe: Recipe):
    """The base model's loadable path and its tokenizer.

    The main process resolves the path first (a GGUF is converted once and cached); the other ranks then read
    its cache instead of converting at the same time.
    """
    from accelerate import PartialState

    from finetune.models import resolve_model_path

    with PartialState().main_process_first():
        path = resolve_model_path(recipe.model)
    return path, load_tokenizer(recipe, path)


def load_tokenizer(recipe: Recipe, path: str):
    from transformers import AutoTokenizer

    from finetune.templates import resolve_chat_template

    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
    )
    if recipe.model.chat_template:
        tokenizer.chat_template = resolve_chat_template(recipe.model.chat_template)
    if tokenizer.pad_token is None:
        # Padding positions are masked out of the loss and attention, so reusing eos is safe here.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class _OnceFilter(logging.Filter):
    """Let each distinct message through once: bitsandbytes warns on every 8-bit matmul call."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def load_model(recipe: Recipe, runtime: Runtime, path: str, auto_class, **kwargs):
    """Load the base model in the runtime's dtype, quantized when the recipe asks."""
    import torch

    bnb = build_bnb_config(recipe, runtime)
    dtype_name = recipe.model.dtype if recipe.model.dtype != "auto" else runtime.dtype_name
    if bnb is not None:
        # Non-quantized modules (norms, head) stay in the compute dtype; bitsandbytes owns the linear weights.
        dtype_name = compute_dtype_name(recipe, runtime)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
        if not any(isinstance(f, _OnceFilter) for f in bnb_log.filters):
            bnb_log.addFilter(_OnceFilter())
        kwargs.setdefault("device_map", {"": local_rank if runtime.device == "cuda" else "cpu"})
    try:
        model = auto_class.from_pretrained(
            path,
            dtype=getattr(torch, dtype_name),
            quantization_config=bnb,
            revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
            attn_implementation=recipe.model.attn_implementation,
            **kwargs,
        )
    except OSError as exc:
        raise FinetuneError(f"model.name_or_path: cannot load {path!r}: {exc}") from None
    return model


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


@dataclass
class ParamCounts:
    trainable: int
    total: int
    weight_bytes: int  # bytes the weights take as loaded (quantized where quantized)
    weight_bytes_unquantized: int  # the same weights in the compute dtype

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)


def count_parameters(model, unquantized_bytes_per_param: int) -> ParamCounts:
    """Trainable/total parameters and weight memory, measured from the loaded tensors.

    bitsandbytes packs two 4-bit values per uint8, so a Params4bit's numel is half the logical count;
    its `quant_state.shape` holds the real shape.
    """
    trainable = total = loaded = unquantized = 0
    seen = set()
    for param in model.parameters():
        if id(param) in seen:  # tied weights counted once
            continue
        seen.add(id(param))
        logical = param.numel()
        state = getattr(param, "quant_state", None)
        if state is not None and getattr(state, "shape", None) is not None:
            logical = int(math.prod(state.shape))
        total += logical
        if param.requires_grad:
            trainable += logical
        quantized = state is not None or not param.dtype.is_floating_point  # Params4bit (uint8) / Int8Params
        loaded += param.numel() * param.element_size()
        unquantized += logical * (unquantized_bytes_per_param if quantized else param.element_size())
        if state is not None:  # 4-bit: absmax and friends of the quantization state
            loaded += sum(t.numel() * t.element_size() for t in _state_tensors(state))
        scb = getattr(param, "SCB", None)  # 8-bit: one scale per row
        if scb is not None:
            loaded += scb.numel() * scb.element_size()
    return ParamCounts(trainable, total, loaded, unquantized)


def _state_tensors(state):
    import torch

    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif hasattr(value, "absmax"):  # nested (double-quantization) state
            yield from _state_tensors(value)


def dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[TORCH_DTYPES.get(name, name)]
