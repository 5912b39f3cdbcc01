"""Padding-free SFT batches: the same loss, gradients and tokens as padded batches, with no compute on padding."""

from __future__ import annotations

import pytest
import torch

from finetune.recipe import validate_recipe
from support import packed_row, sft_recipe, uneven_chat_rows


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_each_packed_example_sees_only_itself(tiny_llama_dir, attention):
    """The logits of a packed row equal those of each example run alone, with the kit's per-example SDPA and with
    eager attention (transformers' block-diagonal mask from the position_ids)."""
    from transformers import AutoModelForCausalLM

    from finetune.models.attention import PACKED_SDPA, use_packed_sdpa

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation=attention).eval()
    switched = use_packed_sdpa(model)
    assert switched == (attention == "sdpa")
    assert model.config._attn_implementation == (PACKED_SDPA if attention == "sdpa" else "eager")
    gen = torch.Generator().manual_seed(0)
    examples = [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 1, 12, 7)]
    ids, positions, bounds = packed_row(examples)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([ex]), use_cache=False).logits[0] for ex in examples])
        # Without the example boundaries the second example would see the first: the check can fail.
        leaked = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0]
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    assert not torch.allclose(leaked[5:], alone[5:], atol=1e-3)


def test_packed_sdpa_leaves_generation_unchanged(tiny_llama_dir):
    """Generation (KV cache, padded prompts) runs SDPA as before once the model is switched."""
    from transformers import AutoModelForCausalLM

    from finetune.models.attention import use_packed_sdpa

    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    switched = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert use_packed_sdpa(switched)
    ids = torch.tensor([[0, 0, 5, 6, 7], [4, 9, 5, 6, 7]])  # left-padded first row
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(plain.generate(ids, **kwargs), switched.generate(ids, **kwargs))


def _run(tiny_llama_dir, tmp_path, padding_free: bool, **train):
    from finetune.runner import run

    data = uneven_chat_rows(tmp_path / "uneven.jsonl")
    recipe = validate_recipe(sft_recipe(
        tiny_llama_dir, tmp_path,
        data={"train": str(data), "max_length": 48, "padding_free": padding_free, "eval_fraction": 0.25},
        train={"epochs": 1, "max_steps": 3, "micro_batch_size": 6, "learning_rate": 1e-2, **train},
        output={"dir": str(tmp_path / f"out-{padding_free}")},
    ))  # fmt: skip
    return run(recipe)


def test_padding_free_training_equals_padded(tiny_llama_dir, tmp_path):
    """Same rows, same order: every step's loss, the eval loss, the trained adapter and the count of real tokens
    are those of padded batches (rows here are up to 48 tokens, many far shorter: a padded batch here is about a quarter padding,
    and some rows are cut at max_length)."""
    padded = _run(tiny_llama_dir, tmp_path, padding_free=False)
    free = _run(tiny_llama_dir, tmp_path, padding_free=True)

    for result in (padded, free):  # rows were cut at max_length (TRL cuts no row in padding-free mode: the kit does)
        assert max(len(ids) for ids in result.trainer.train_dataset["input_ids"]) == 48
    batch = next(iter(free.trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one row, no padding
    padded_batch = next(iter(padded.trainer.get_train_dataloader()))
    assert (padded_batch["attention_mask"] == 0).float().mean() > 0.15  # the padded run did pad (the test can fail)

    losses = {name: [h["loss"] for h in r.metrics["log_history"] if "loss" in h] for name, r in (("padded", padded), ("free", free))}
    assert len(losses["free"]) == 3
    assert losses["free"] == pytest.approx(losses["padded"], abs=1e-5)
    assert free.metrics["eval"]["eval_loss"] == pytest.approx(padded.metrics["eval"]["eval_loss"], abs=1e-5)
    trained = {n: p for n, p in padded.model.named_parameters() if p.requires_grad}
    for name, param in free.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, trained[name], rtol=1e-4, atol=1e-5, msg=name)
    # Real tokens: the padded run counts its attention mask, the padding-free run every token of its rows.
    assert free.metrics["num_input_tokens_seen"] == padded.metrics["num_input_tokens_seen"] > 0
    assert free.metrics["summary"]["training_tokens"] == free.metrics["num_input_tokens_seen"]


def test_plan_says_how_batches_are_built(tiny_llama_dir, tmp_path, capsys):
    _run(tiny_llama_dir, tmp_path, padding_free=True, max_steps=1)
    assert "padding-free (examples back to back, attention per example: sdpa_packed, SDPA per example; the varlen flash kernel is not used: not on CUDA)" in capsys.readouterr().out


@pytest.mark.parametrize("padding_free", [False, True])
def test_completion_loss_equals_trls(tiny_llama_dir, tmp_path, padding_free):
    """The kit's loss (LM head on labelled positions only) against TRL's own on the same batch: loss and every
    adapter gradient."""
    from trl import SFTTrainer

    result = _run(tiny_llama_dir, tmp_path, padding_free=padding_free, max_steps=1)
    trainer, model = result.trainer, result.model
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.train()
    grads = {}
    for name, compute in (("kit", trainer.compute_loss), ("trl", lambda m, b: SFTTrainer.compute_loss(trainer, m, b))):
        model.zero_grad()
        loss = compute(model, dict(batch))
        loss.backward()
        grads[name] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads["kit"][0] == pytest.approx(grads["trl"][0], abs=1e-5)
    assert grads["kit"][1].keys() == grads["trl"][1].keys() and grads["kit"][1]
    for name, grad in grads["kit"][1].items():
        torch.testing.assert_close(grad, grads["trl"][1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_tokens_per_second_leaves_evaluation_out(tiny_llama_dir, tmp_path):
    """Evaluations made slow on purpose (1 s each) do not count in training_seconds, so tokens/s stays that of the
    training steps; the Trainer's train_runtime includes them."""
    import time

    from transformers import TrainerCallback

    from finetune.runner import run

    class SlowEvaluation(TrainerCallback):
        def on_evaluate(self, *args, **kwargs):
            time.sleep(1.0)

    recipe = validate_recipe(sft_recipe(
        tiny_llama_dir, tmp_path, data={"eval_fraction": 0.2},
        train={"epochs": 1, "max_steps": 3, "eval_steps": 1, "logging_steps": 1},
    ))  # fmt: skip
    metrics = run(recipe, callbacks=[SlowEvaluation()]).metrics
    summary = metrics["summary"]
    evaluations = sum(1 for h in metrics["log_history"] if "eval_loss" in h)
    assert evaluations >= 3
    assert summary["train_runtime"] - summary["training_seconds"] >= evaluations * 1.0
    assert summary["training_tokens"] == metrics["num_input_tokens_seen"] > 0
    # training_seconds is rounded to the millisecond; this tiny run trains for well under a second
    assert summary["tokens_per_second"] == pytest.approx(summary["training_tokens"] / summary["training_seconds"], rel=0.02)
