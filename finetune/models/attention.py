"""Attention for padding-free batches without flash-attention: each example of the packed row attends to itself
only, at the cost of its own length.

A padding-free batch is one row holding several examples back to back, with `position_ids` restarting at each
(TRL's `padding_free` collator; it also passes the example boundaries as `cu_seq_lens_q`). flash-attention's varlen
kernel keeps the examples apart from those boundaries; PyTorch's SDPA has no such kernel, and transformers instead
builds a block-diagonal mask over the whole row, whose cost grows with the square of the row: by FLOP count a row
of 8 chat examples (~1,000 tokens) would spend nearly half as much in attention as in all the linear layers
together (SmolLM2-135M). Here SDPA runs causally on each example's slice instead, so the cost is that of the
padded batch without its padding.
"""

from __future__ import annotations

PACKED_SDPA = "sdpa_packed"


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, per example when the batch carries padding-free boundaries (`cu_seq_lens_q`,
    one row); everything else (generation, padded batches) goes to SDPA unchanged."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop("cu_seq_lens_q", None)
    kwargs.pop("cu_seq_lens_k", None)
    if bounds is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    edges = bounds.tolist()
    parts = [
        sdpa_attention_forward(
            module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None,
            dropout=dropout, scaling=scaling, is_causal=True, **kwargs,
        )[0]
        for start, end in zip(edges, edges[1:])
        if end > start
    ]  # fmt: skip
    return torch.cat(parts, dim=1), None


def register_packed_sdpa() -> str:
    """Make `PACKED_SDPA` an attention implementation transformers models can be switched to."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    # Outside padding-free training (generation, evaluation of padded rows) the model needs SDPA's own masks.
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA


def use_packed_sdpa(model) -> bool:
    """Switch a model that runs SDPA to the per-example version; False when it runs something else (eager, flash
    attention: both keep packed examples apart themselves) or cannot switch (no attention interface)."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or not model._can_set_attn_implementation():
        return False
    model.set_attn_implementation(register_packed_sdpa())
    return config._attn_implementation == PACKED_SDPA
