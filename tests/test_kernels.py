"""`train.kernels: liger`: refused before any model loads where it cannot run (CPU, no package, a classifier), and
the kit's loss hands Liger's fused forward the targets of exactly the positions it keeps. Liger's Triton kernels
need a CUDA GPU: the fused forward is stood in for here by the model's own forward plus a cross-entropy with
Liger's reduction (summed / `num_items_in_batch`, else the mean over labelled tokens)."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from finetune.checks import recipe_problems
from finetune.recipe import validate_recipe
from finetune.runtime import resolve_runtime
from support import cls_recipe, sft_recipe


def _problems(recipe: dict, device: str):
    recipe = validate_recipe(recipe)
    runtime = replace(resolve_runtime(recipe, device="cpu"), device=device, problems=())
    return [p for p in recipe_problems(recipe, runtime) if p.startswith("train.kernels")]


def test_liger_is_refused_on_cpu(tiny_llama_dir, tmp_path):
    recipe = sft_recipe(tiny_llama_dir, tmp_path, train={"kernels": "liger", "device": "cpu"})
    assert _problems(recipe, "cpu") == [
        "train.kernels: liger runs Triton kernels on CUDA GPUs, and this run is on cpu. Remove train.kernels (the kit's "
        "own loss already projects only the labelled positions) or train on a GPU."
    ]
    assert _problems(sft_recipe(tiny_llama_dir, tmp_path), "cpu") == []


def test_liger_needs_its_package(tiny_llama_dir, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else find_spec(name, *a))
    assert _problems(sft_recipe(tiny_llama_dir, tmp_path, train={"kernels": "liger"}), "cuda") == [
        "train.kernels: liger needs liger_kernel, which is not installed here: pip install 'finetune-kit[kernels]' "
        "(CUDA only) (or remove train.kernels)."
    ]


def test_liger_is_refused_for_a_classifier(tiny_llama_dir, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "liger_kernel" else find_spec(name, *a))
    recipe = cls_recipe(tiny_llama_dir, tmp_path, train={"kernels": "liger"})
    assert _problems(recipe, "cuda") == [
        "train.kernels: liger patches causal LMs (their norms, MLP and loss); a classification run trains a "
        "classifier. Remove train.kernels."
    ]


def test_liger_sets_the_trainers_switch(tiny_llama_dir, tmp_path):
    from trl import SFTConfig

    from finetune.training.arguments import training_arguments

    recipe = validate_recipe(sft_recipe(tiny_llama_dir, tmp_path, train={"kernels": "liger"}))
    runtime = resolve_runtime(recipe, device="cpu")
    assert training_arguments(recipe, runtime, tmp_path / "o", False, SFTConfig).use_liger_kernel
    plain = validate_recipe(sft_recipe(tiny_llama_dir, tmp_path))
    assert not training_arguments(plain, runtime, tmp_path / "o", False, SFTConfig).use_liger_kernel


def test_fused_loss_gets_the_kept_positions_targets(tiny_llama_dir, monkeypatch):
    """With a stand-in for Liger's forward, the fused loss and its gradients equal the kit's own loss."""
    from transformers import AutoModelForCausalLM

    from finetune.training.loss import IGNORE_INDEX, completion_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    original = type(model).forward

    def liger_like(self, *args, logits_to_keep=0, shift_labels=None, num_items_in_batch=None, **kwargs):
        out = original(self, *args, logits_to_keep=logits_to_keep, **kwargs)
        logits = out.logits.float()
        assert shift_labels.shape == logits.shape[:2]
        total = F.cross_entropy(logits.flatten(0, 1), shift_labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        out.loss = total / (num_items_in_batch if num_items_in_batch is not None else (shift_labels != IGNORE_INDEX).sum())
        return out

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=gen)
    labels = ids.clone()
    labels[0, :6] = IGNORE_INDEX
    labels[1, :3] = IGNORE_INDEX
    labels[1, 8:] = IGNORE_INDEX
    inputs = {"input_ids": ids, "labels": labels}
    results = []
    for fused in (False, True):
        monkeypatch.setattr(type(model), "forward", liger_like if fused else original)
        for count in (None, torch.tensor(11)):
            model.zero_grad()
            loss, logits, kept = completion_loss(model, inputs, count, fused=fused)
            loss.backward()
            results.append((loss.detach(), model.model.layers[0].mlp.up_proj.weight.grad.clone()))
            assert (logits is None) == fused
    for plain, fused in zip(results[:2], results[2:]):
        torch.testing.assert_close(fused[0], plain[0])
        torch.testing.assert_close(fused[1], plain[1])
    assert not torch.equal(results[0][0], results[1][0])  # num_items_in_batch did change the loss
