"""The plan's memory estimate: exact for what is counted (weights, gradients, optimizer states under ZeRO), and for
activations a ceiling within 2x of what autograd really keeps for backward."""

from __future__ import annotations

import pytest
import torch

from finetune.recipe import validate_recipe
from finetune.training.memory import GIB, MemoryEstimate, estimate_memory, micro_batch_tokens, peak_memory


def recipe(**sections):
    base = {"model": {"name_or_path": "x"}, "data": {"train": "x.jsonl", "max_length": 64}, "output": {"dir": "o"}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return validate_recipe(base)


def llama_config(hidden=64, inter=128, layers=2, vocab=100):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def test_activations_counted_by_hand():
    # per token and layer: 9 x 64 + 4 x 32 (key-value width) + 4 x 128 = 1,216 values; fp32; the head 100 x 12 bytes
    plain = recipe(adapter={"type": "lora", "dropout": 0.0})
    estimate = estimate_memory(plain, llama_config(), 0, 0, 0, activation_bytes=4, tokens=10)
    assert estimate.activations == 2 * 1216 * 10 * 4 + 10 * 100 * 12
    checkpointed = recipe(adapter={"type": "lora", "dropout": 0.0}, train={"gradient_checkpointing": True})
    assert estimate_memory(checkpointed, llama_config(), 0, 0, 0, 4, tokens=10).activations == (2 * 64 + 1216) * 10 * 4 + 12000
    assert estimate_memory(plain, object(), 0, 0, 0, 4, tokens=10).activations is None  # no hidden_size: not guessed


def test_optimizer_and_gradients_follow_the_optimizer_and_zero_stage():
    def parts(optimizer="adamw_torch", **kwargs):
        e = estimate_memory(recipe(train={"optimizer": optimizer}), llama_config(), 1000, 100, 400, 4, tokens=1, **kwargs)
        return e.weights, e.gradients, e.optimizer

    assert parts() == (1000, 400, 800)  # AdamW: two fp32 moments per trainable fp32 parameter
    assert parts("adamw_8bit") == (1000, 400, 200)  # one byte per moment
    assert parts("sgd") == (1000, 400, 0)
    assert parts(world_size=2, zero_stage=1) == (1000, 400, 400)
    assert parts(world_size=2, zero_stage=2) == (1000, 200, 400)
    assert parts(world_size=2, zero_stage=3) == (500, 200, 400)
    assert parts(world_size=2, zero_stage=2, optimizer_offloaded=True) == (1000, 200, 0)


def test_micro_batch_tokens_from_the_longest_rows():
    from datasets import Dataset

    rows = Dataset.from_dict({"input_ids": [[1] * 5, [1] * 9, [1] * 3, [1] * 7]})
    assert micro_batch_tokens(rows, 2, max_length=8, padding_free=True) == 8 + 7  # rows cut to max_length
    assert micro_batch_tokens(rows, 2, max_length=8, padding_free=False) == 2 * 8
    assert micro_batch_tokens(rows, 2, max_length=100, padding_free=True) == 16
    assert micro_batch_tokens(Dataset.from_dict({"text": ["a"]}), 2, max_length=8, padding_free=True) == 16


@pytest.mark.parametrize("hidden, inter, layers, dropout, tokens", [(64, 172, 2, 0.0, 64), (128, 344, 3, 0.1, 128)])
def test_activation_estimate_is_a_ceiling_within_2x_of_what_autograd_keeps(hidden, inter, layers, dropout, tokens):
    """Bytes of every tensor saved for backward (parameters aside) in a LoRA Llama's forward pass, against the estimate."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = llama_config(hidden, inter, layers, vocab=1000)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear"))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, 1000, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)
    measured = sum(saved.values())
    estimate = estimate_memory(recipe(adapter={"type": "lora", "dropout": dropout}), config, 0, 0, 0, 4, tokens=tokens).activations
    assert measured <= estimate <= 2 * measured, (measured, estimate)


def test_render_and_peak():
    estimate = MemoryEstimate(weights=2 * GIB, gradients=3 * 2**20, optimizer=6 * 2**20, activations=GIB // 2, tokens=1024)
    assert estimate.render() == (
        "~2.51 GiB per process at most: weights 2.00 GiB + gradients 3.0 MiB + optimizer 6.0 MiB + activations 512.0 MiB "
        "(largest micro-batch: 1,024 tokens)"
    )
    assert estimate.as_dict()["total"] == estimate.total
    peak = peak_memory("cpu")
    assert set(peak) == {"rss_bytes"} and peak["rss_bytes"] > 50 * 2**20
