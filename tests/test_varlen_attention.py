"""The CUDA path of padding-free attention (`varlen_packed`: torch.nn.attention.varlen, one flash kernel call per
layer). On CPU the kernel cannot run: a stand-in with the kernel's signature checks the arguments the kit prepares
(causal as the tuple `(-1, 0)`: a list silently runs non-causal; boundaries as given; the host's longest length)
and computes the per-example causal attention they describe, which must give the per-example SDPA's logits. The
real kernel is compared on a GPU (marked `gpu`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finetune.models import attention
from support import packed_row


def fake_varlen(calls: list):
    """A stand-in for varlen_attn with torch 2.13's signature; records every call."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):  # fmt: skip
        calls.append(dict(window_size=window_size, max_q=max_q, max_k=max_k, cu=cu_seq_q, same=cu_seq_k is cu_seq_q,
                          enable_gqa=enable_gqa, shapes=(query.shape, key.shape), scale=scale))  # fmt: skip
        assert window_size == (-1, 0), "varlen_attn runs causal only for the tuple (-1, 0)"
        assert cu_seq_q.dtype == torch.int32 and query.dim() == 3
        edges = cu_seq_q.tolist()
        parts = []
        for start, end in zip(edges, edges[1:]):
            q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # (heads, tokens, dim)
            parts.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa).transpose(0, 1))
        return torch.cat(parts)

    return varlen_attn


def test_varlen_arguments_match_per_example_sdpa(tiny_llama_dir, monkeypatch):
    """The same packed row through `varlen_packed` (kernel stand-in) and `sdpa_packed`: equal logits; the kernel got
    causal as a tuple, the row's boundaries, the longest example from the host, and GQA (the tiny model has 4 query
    heads on 2 key/value heads)."""
    from transformers import AutoModelForCausalLM

    calls = []
    monkeypatch.setattr(attention, "varlen_kernel", lambda: fake_varlen(calls))
    monkeypatch.setattr(attention, "varlen_runs", lambda query: True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    gen = torch.Generator().manual_seed(0)
    examples = [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 1, 12, 7)]
    ids, positions, bounds = packed_row(examples)
    batch = dict(input_ids=ids, position_ids=positions, cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=12,
                 max_length_k=12, packed_bounds=tuple(bounds.tolist()), use_cache=False)  # fmt: skip
    logits = {}
    for name in (attention.PACKED_VARLEN, attention.PACKED_SDPA):
        attention.register_packed_attention()
        model.set_attn_implementation(name)
        with torch.no_grad():
            logits[name] = model(**attention.padding_free_inputs(model, batch)).logits[0]
    torch.testing.assert_close(logits[attention.PACKED_VARLEN], logits[attention.PACKED_SDPA], rtol=0, atol=1e-5)
    assert len(calls) == model.config.num_hidden_layers  # one kernel call per layer, for the whole row
    call = calls[0]
    assert isinstance(call["window_size"], tuple) and call["window_size"] == (-1, 0)
    assert (call["max_q"], call["max_k"]) == (12, 12) and call["same"] and call["cu"].tolist() == [0, 5, 6, 18, 25]
    assert call["enable_gqa"] and call["shapes"] == (torch.Size([25, 4, 8]), torch.Size([25, 2, 8]))
    assert call["scale"] == pytest.approx(8**-0.5)


def test_older_varlen_signature_gets_is_causal(monkeypatch):
    """torch before 2.10 took `is_causal=True` and no `enable_gqa`: the kit passes what the kernel takes."""

    def old_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None, scale=None):
        return query

    monkeypatch.setattr(attention, "varlen_kernel", lambda: old_varlen_attn)
    q, kv = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    args, options = attention.varlen_arguments(q, kv, kv, torch.tensor([0, 6], dtype=torch.int32), 6, 0.5)
    assert options == {"scale": 0.5, "is_causal": True}
    assert args[1].shape == (6, 4, 8)  # key/value heads repeated for the query heads


def test_varlen_falls_back_off_cuda(tiny_llama_dir):
    """On CPU (and for fp32 queries) `varlen_packed` runs the per-example SDPA; the plan's choice says why."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert attention.varlen_usable("cpu", torch.bfloat16) == "not on CUDA"
    assert attention.use_packed_attention(model, "cpu", torch.float32) == attention.PACKED_SDPA


def test_packed_mask_is_refused_by_plain_sdpa():
    """The empty 4-D mask of padding-free rows cannot reach plain SDPA unnoticed: it broadcasts to no row."""
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, q, q, attn_mask=attention.packed_mask("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_varlen_kernel_matches_per_example_sdpa_on_cuda(tiny_llama_dir):
    """The real kernel in bf16 on a GPU: logits and LoRA-free input gradients of a packed row equal the per-example
    SDPA's to bf16 rounding, and the plan's choice on CUDA is varlen."""
    from transformers import AutoModelForCausalLM

    assert attention.varlen_usable("cuda", torch.bfloat16) is None, attention.varlen_usable("cuda", torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).cuda()
    assert attention.use_packed_attention(model, "cuda", torch.bfloat16) == attention.PACKED_VARLEN
    gen = torch.Generator().manual_seed(0)
    examples = [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in (37, 1, 120, 64, 9)]
    ids, positions, bounds = packed_row(examples)
    batch = dict(input_ids=ids.cuda(), position_ids=positions.cuda(), cu_seq_lens_q=bounds.cuda(),
                 cu_seq_lens_k=bounds.cuda(), max_length_q=120, max_length_k=120,
                 packed_bounds=tuple(bounds.tolist()), use_cache=False)  # fmt: skip
    results = {}
    for name in (attention.PACKED_VARLEN, attention.PACKED_SDPA):
        model.set_attn_implementation(name)
        model.zero_grad()
        out = model(**attention.padding_free_inputs(model, batch)).logits.float()
        out.square().mean().backward()
        results[name] = (out.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.float().clone())
    torch.testing.assert_close(results[attention.PACKED_VARLEN][0], results[attention.PACKED_SDPA][0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(results[attention.PACKED_VARLEN][1], results[attention.PACKED_SDPA][1], rtol=5e-2, atol=5e-2)
