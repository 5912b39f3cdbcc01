"""PEFT's own path: a base loaded with its adapter (the reference a merge is checked against) and the fallback
merge through `merge_and_unload`."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch

from finetune.models.adapters import load_adapter
from finetune.models.loading import load_checkpoint, quiet_transformers

log = logging.getLogger(__name__)


def load_base_with_adapter(
    base_dir: Path, adapter_dir: Path, model_class, overrides: dict, vocab_size: int | None,
    round_to: torch.dtype = torch.float32,
):  # fmt: skip
    """Base in fp32 with the adapter attached (unmerged), as PEFT runs it. `overrides` set config fields such as
    the classification labels; `vocab_size` resizes the embeddings first when the run resized them; `round_to`
    rounds the base weights to that dtype (kept in fp32 storage), as the merged checkpoint rounds them."""
    with quiet_transformers():
        model = load_checkpoint(model_class, base_dir, None, dtype=torch.float32, **overrides)
        if vocab_size is not None and vocab_size != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(vocab_size)
        if round_to != torch.float32:
            for param in model.parameters():  # one tensor at a time: no second copy of the model
                param.data = param.data.to(round_to).float()
        # The merge checks the adapter against the base it was given (--base may be a copy under another name).
        model = load_adapter(model, adapter_dir, check_base=False)
    return model.eval()


def peft_merge(
    base_dir: Path, adapter_dir: Path, model_class, overrides: dict, vocab_size: int | None,
    dtype: torch.dtype, out_dir: Path, max_shard_size: int,
) -> None:  # fmt: skip
    """Merge with PEFT's `merge_and_unload` into the fp32 base, then cast and save (needs the whole model in RAM)."""
    model = load_base_with_adapter(base_dir, adapter_dir, model_class, overrides, vocab_size)
    with quiet_transformers():
        merged = model.merge_and_unload(safe_merge=True).to(dtype)
        merged.config.dtype = dtype
        merged.save_pretrained(out_dir, max_shard_size=max_shard_size)
    del model, merged  # one model in memory at a time: free before the caller loads the next
    gc.collect()
