"""A text classifier's model: the head's modules, the pad token decoders pool with, the length the model reads, and
a head that must stay unquantized. Used by training (tasks/classification.py) and by inference (evaluation/)."""

from __future__ import annotations

import logging

from finetune.errors import RecipeError
from finetune.recipe import Recipe

log = logging.getLogger("finetune")


def head_modules(model) -> list[str]:
    """The task head's top-level modules: every child of the model outside its base model that holds weights.

    `classifier` for BERT/RoBERTa, `score` for Llama-style decoders, `pre_classifier` + `classifier` for DistilBERT.
    They are newly initialised, so they are trained in full and saved with the adapter (`modules_to_save`).
    """
    base = model.base_model_prefix
    return [name for name, child in model.named_children() if name != base and next(child.parameters(), None) is not None]


def match_pad_token(model, tokenizer) -> None:
    """Decoders pool the last non-pad token, found through `config.pad_token_id`; it must be the tokenizer's pad.

    Llama-style checkpoints have no pad token: `load_tokenizer` pads with eos, and the config is told so here.
    """
    if tokenizer.pad_token_id is not None and model.config.pad_token_id != tokenizer.pad_token_id:
        if model.config.pad_token_id is not None:
            log.info("config.pad_token_id %s -> %s (the tokenizer's pad token)", model.config.pad_token_id, tokenizer.pad_token_id)
        model.config.pad_token_id = tokenizer.pad_token_id


def check_max_length(recipe: Recipe, path: str, tokenizer) -> int:
    """`data.max_length`, capped at what the model can read: its position table (512 for BERT-style models) and
    the tokenizer's `model_max_length` (RoBERTa's table has 514 rows for 512 tokens; "unknown" is a huge number)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    limits = [getattr(config.get_text_config(), "max_position_embeddings", None), tokenizer.model_max_length]
    limit = min((n for n in limits if n and n < 1_000_000), default=None)
    if limit and recipe.data.max_length > limit:
        log.warning("data.max_length %d > the %d tokens this model reads: truncating to %d.", recipe.data.max_length, limit, limit)
        return limit
    return recipe.data.max_length


def check_quantized_head(model, heads: list[str]) -> None:
    """A head quantized by bitsandbytes could neither be trained nor saved; say which key keeps it full precision."""
    for name in heads:
        for sub, module in getattr(model, name).named_modules():
            if "4bit" in type(module).__name__ or "8bit" in type(module).__name__:
                raise RecipeError(
                    [f"quantization.skip_modules: the head module '{name}' ({name}.{sub}) was quantized; "
                     f"add '{name}' to quantization.skip_modules."]
                )
