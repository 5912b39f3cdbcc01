"""Attention for padding-free batches: each example of the packed row attends to itself only, at the cost of its own
length, with no host synchronisation inside forward or backward.

A padding-free batch is one row holding several examples back to back, with `position_ids` restarting at each
(TRL's `padding_free` collator; it also passes the example boundaries as `cu_seq_lens_q` and the longest example as
`max_length_q`, computed on the host). Two implementations, registered with transformers' `AttentionInterface`:

- `varlen_packed` (CUDA, bf16/fp16): PyTorch's own variable-length flash kernel, `torch.nn.attention.varlen`: one
  kernel call per layer over the whole row; the boundaries are a device tensor sent once per batch with the rest of
  it, and the longest length is the collator's host integer.
- `sdpa_packed` (everywhere else): SDPA run causally on each example's slice, the slices cut at boundaries the
  collator gave as host integers (`packed_bounds`), so no layer reads a device tensor.

Without them transformers builds a block-diagonal mask over the whole row (its size grows with the square of the
row: 256 MB of booleans for a 16k-token row, built every forward after a host read of the position ids). The kit's
loss passes `packed_mask` instead (see `padding_free_inputs`), which transformers takes as a prepared mask and these
implementations take as "the boundaries are in the batch". Generation and padded batches carry no boundaries: they
run SDPA with transformers' own masks, unchanged.
"""

from __future__ import annotations

import functools
import inspect

PACKED_SDPA = "sdpa_packed"
PACKED_VARLEN = "varlen_packed"
PACKED = (PACKED_SDPA, PACKED_VARLEN)
CAUSAL_WINDOW = (-1, 0)  # varlen_attn's causal attention; a list compares unequal to it and runs non-causal


def _sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _packed(query, key, attention_mask, kwargs: dict) -> bool:
    """Whether this call is a padding-free row with its boundaries (else it is generation or a padded batch)."""
    has_bounds = kwargs.get("packed_bounds") is not None or kwargs.get("cu_seq_lens_q") is not None
    if not has_bounds or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        if is_packed_mask(attention_mask):
            raise ValueError("a padding-free forward (packed_mask) without its example boundaries (packed_bounds)")
        return False
    return True


BATCH_KEYS = ("packed_bounds", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _without_batch_keys(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in BATCH_KEYS}


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, per example on padding-free rows; everything else goes to SDPA unchanged."""
    import torch

    if not _packed(query, key, attention_mask, kwargs):
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, **_without_batch_keys(kwargs))
    edges = kwargs.get("packed_bounds")
    if edges is None:  # a caller that passed only the device boundaries (the model called by hand): one read per layer
        edges = kwargs["cu_seq_lens_q"].tolist()
    rest = _without_batch_keys(kwargs)
    parts = [
        _sdpa(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None, dropout, scaling,
              is_causal=True, **rest)[0]
        for start, end in zip(edges, edges[1:])
        if end > start
    ]  # fmt: skip
    return torch.cat(parts, dim=1), None


def varlen_kernel():
    """`torch.nn.attention.varlen.varlen_attn`, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=4)
def _parameters(kernel) -> tuple[str, ...]:
    return tuple(inspect.signature(kernel).parameters)


def varlen_arguments(query, key, value, bounds, longest: int, scaling) -> tuple[tuple, dict]:
    """The varlen kernel's arguments for one padding-free row: (tokens, heads, head_dim) tensors, the device
    boundaries twice (queries and keys), the host's longest length twice, and causal attention in the form this
    torch's kernel takes (`window_size=(-1, 0)` from torch 2.10, `is_causal=True` before)."""
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (1, heads, tokens, dim) -> (tokens, heads, dim)
    params = _parameters(varlen_kernel())
    options = {"scale": scaling}
    if "window_size" in params:
        options["window_size"] = CAUSAL_WINDOW
    else:
        options["is_causal"] = True
    if q.shape[1] != k.shape[1]:  # grouped-query attention
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return (q, k, v, bounds, bounds, longest, longest), options


def varlen_runs(query) -> bool:
    """Whether the flash kernel takes this query (a CUDA tensor in bf16 or fp16)."""
    import torch

    return query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)


def packed_varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Padding-free rows through PyTorch's variable-length flash kernel, one call per layer; everything else (and
    fp32 under autocast, attention dropout: the kernel does neither) goes to the per-example SDPA."""
    longest = kwargs.get("max_length_q")
    bounds = kwargs.get("cu_seq_lens_q")
    usable = varlen_runs(query) and not (dropout and module.training) and bounds is not None and longest is not None
    if not usable or not _packed(query, key, attention_mask, kwargs):
        return packed_sdpa_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    args, options = varlen_arguments(query, key, value, bounds, int(longest), scaling)
    return varlen_kernel()(*args, **options)[None], None


def packed_mask(device):
    """What the kit passes as `attention_mask` for a padding-free row: an empty 4-D mask. transformers returns a 4-D
    mask as prepared (no block-diagonal mask, no host read of the position ids), and the packed implementations take
    their boundaries from the batch instead. Any other attention given it fails (it broadcasts to no row), rather
    than attending across examples."""
    import torch

    return torch.empty((1, 1, 0, 0), dtype=torch.bool, device=device)


def is_packed_mask(mask) -> bool:
    return mask is not None and mask.dim() == 4 and mask.numel() == 0


def padding_free_inputs(model, inputs: dict) -> dict:
    """`inputs` for a padding-free row of a model switched to a packed attention, with `packed_mask` as the mask;
    unchanged for anything else."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in PACKED or inputs.get("packed_bounds") is None:
        return inputs
    return {**inputs, "attention_mask": packed_mask(inputs["input_ids"].device)}


def register_packed_attention() -> None:
    """Make both packed implementations attention implementations transformers models can be switched to."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionInterface.register(PACKED_VARLEN, packed_varlen_attention)
    # Outside padding-free training (generation, evaluation of padded rows) the model needs SDPA's own masks.
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    AttentionMaskInterface.register(PACKED_VARLEN, sdpa_mask)


def varlen_usable(device, dtype) -> str | None:
    """Why the varlen kernel cannot run padding-free rows here, or None when it can (CUDA, bf16/fp16, a flash-capable
    GPU, a torch that has `torch.nn.attention.varlen`)."""
    import torch

    if getattr(device, "type", device) != "cuda":
        return "not on CUDA"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"{str(dtype).removeprefix('torch.')} (the flash kernel takes bf16 or fp16)"
    if varlen_kernel() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "a GPU older than Ampere"
    return None


def use_packed_attention(model, device="cpu", dtype=None) -> str | None:
    """Switch a model that runs SDPA to a packed implementation: varlen where it can run (`device`, `dtype`: where
    and how the model will train), else SDPA per example. Returns the implementation, or None when the model runs
    something else (eager, flash attention: both keep packed examples apart themselves) or cannot switch."""
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa" or not model._can_set_attn_implementation():
        return None
    register_packed_attention()
    name = PACKED_VARLEN if varlen_usable(device, dtype or model.dtype) is None else PACKED_SDPA
    model.set_attn_implementation(name)
    return name if config._attn_implementation == name else None


def use_packed_sdpa(model) -> bool:
    """Switch a model that runs SDPA to SDPA per example (see `use_packed_attention`)."""
    return use_packed_attention(model, device="cpu") == PACKED_SDPA
