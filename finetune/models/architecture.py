"""A new model for pretraining from scratch: a Llama-style decoder built from the recipe's `model.config` keys, or any
causal LM from a config.json; what can be checked of it without building it; and the FLOPs a trained token costs."""

from __future__ import annotations

import json
import math
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.paths import PACKAGE_SCHEME, resolve_package_path
from finetune.recipe import ArchitectureConfig, Recipe

# Names a config.json gives the same thing under, across architectures (Llama-likes first, then GPT-2's).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions")
HIDDEN_KEYS = ("hidden_size", "n_embd")
HEAD_KEYS = ("num_attention_heads", "n_head")


def config_file(arch: ArchitectureConfig) -> Path:
    """The config.json `model.config.file` names (a folder holding one may be given)."""
    text = arch.file
    path = resolve_package_path(text, key="model.config.file") if text.startswith(PACKAGE_SCHEME) else Path(text).expanduser()
    return path / "config.json" if path.is_dir() else path


def read_config_json(path: Path, key: str) -> dict:
    if not path.is_file():
        raise FinetuneError(f"{key}: {path} not found.")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FinetuneError(f"{key}: {path} is not valid JSON ({exc}).") from None
    if not isinstance(value, dict) or not isinstance(value.get("model_type"), str):
        raise FinetuneError(f"{key}: {path} is not a transformers config.json (no model_type).")
    return value


def _first(config: dict, keys: tuple[str, ...]):
    return next((config[k] for k in keys if isinstance(config.get(k), int)), None)


def architecture_problems(recipe: Recipe) -> list[str]:
    """What is wrong with the model of a pretraining recipe that a config.json shows: heads that do not divide the
    hidden size, and a `data.max_length` longer than the positions the model has (a new model's keys are checked by
    the schema; a pretrained model's folder is read for its config.json, hub ids when they load)."""
    m = recipe.model
    if m.config is not None and m.config.from_file:
        key = "model.config.file"
        try:
            config = read_config_json(config_file(m.config), key)
        except FinetuneError as exc:
            return [str(exc)]
        problems = []
        hidden, heads = _first(config, HIDDEN_KEYS), _first(config, HEAD_KEYS)
        if hidden and heads and not config.get("head_dim") and hidden % heads:
            problems.append(
                f"{key}: {heads} attention heads do not divide hidden size {hidden} (each head takes hidden / heads "
                "dimensions)."
            )
    else:
        return []  # a loaded model's config: `checks.model_config_problems` compares it with data.max_length
    context = _first(config, CONTEXT_KEYS)
    if context and recipe.data.max_length > context:
        problems.append(
            f"data.max_length {recipe.data.max_length} is longer than the {context} positions of the model's position "
            f"embeddings ({key}); lower data.max_length to at most {context}."
        )
    return problems


def intermediate_size(arch: ArchitectureConfig) -> int:
    """Llama's MLP width: 8/3 of the hidden size (the SwiGLU MLP's three matrices cost what a 4x GELU MLP's two do),
    rounded up to a multiple of 32."""
    if arch.intermediate_size:
        return arch.intermediate_size
    return -(-(8 * arch.hidden_size // 3) // 32) * 32


def build_config(arch: ArchitectureConfig, tokenizer, trust_remote_code: bool = False):
    """The transformers config of the new model, its vocabulary the tokenizer's and its special ids the tokenizer's."""
    from transformers import AutoConfig, LlamaConfig

    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if arch.from_file:
        path = config_file(arch)
        try:
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            raise FinetuneError(f"model.config.file: {path}: {str(exc).strip().splitlines()[0]}") from None
        if config.vocab_size < len(tokenizer):
            raise FinetuneError(
                f"model.config.file: vocab_size {config.vocab_size} in {path} is smaller than the tokenizer's "
                f"{len(tokenizer)} tokens; raise it (or give a smaller tokenizer)."
            )
        for name, value in special.items():
            setattr(config, name, value)
        return config
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=intermediate_size(arch),
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads or arch.heads,
        max_position_embeddings=arch.context_length,
        tie_word_embeddings=arch.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta},
        initializer_range=arch.initializer_range,
        **special,
    )


def new_model(config, dtype, seed: int, attn_implementation: str | None = None):
    """A randomly initialised causal LM of `config`, the same for the same seed on every process."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **attention)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    return model


def training_flops_per_token(model, context: int) -> dict:
    """FLOPs one trained token costs, PaLM's way: 2 per weight of every matrix multiply forward and 4 backward (the
    input's gradient, and the weight's when it trains: 6 for a trained weight, 4 for a frozen one), plus attention's
    12 x layers x (heads x head dim) x context, counted without the causal half. Embedding lookups cost nothing."""
    import torch

    trained = frozen = 0
    seen = set()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or weight is None or id(weight) in seen:
            continue
        seen.add(id(weight))  # a tied head is one matrix multiply of its own, counted once here
        state = getattr(weight, "quant_state", None)  # bitsandbytes packs two 4-bit weights in a byte
        count = math.prod(state.shape) if getattr(state, "shape", None) is not None else weight.numel()
        if weight.requires_grad:
            trained += count
        else:
            frozen += count
    config = model.config
    config = getattr(config, "get_text_config", lambda: config)()
    layers = getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0)
    heads = _first(vars(config), HEAD_KEYS) or 0
    head_dim = getattr(config, "head_dim", None) or ((_first(vars(config), HIDDEN_KEYS) or 0) // max(1, heads))
    attention = 12 * layers * heads * head_dim * context
    return {
        "flops_per_token": 6 * trained + 4 * frozen + attention,
        "trained_matmul_weights": trained,
        "frozen_matmul_weights": frozen,
        "attention_flops_per_token": attention,
    }
