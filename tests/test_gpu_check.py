"""scripts/gpu_check.sh cannot rot between GPU sessions: its dry run lists every check, and every recipe it runs
passes the kit's checks for a CUDA machine (the same pretend-GPU runtime `finetune launch` uses on a login node)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.gpu_check import checks
from finetune.checks import check_recipe
from finetune.commands.launch import add_arguments
from finetune.distributed.guards import check_one_process_per_gpu
from finetune.launcher import build_plan
from finetune.errors import FinetuneError
from finetune.recipe import load_recipe
from finetune.runtime import resolve_runtime
from support import REPO

NAMES = ["lora_bf16", "lora_bf16_padded", "lora_bf16_batch32", "qlora", "qlora_gradients", "llama1b_lora", "llama1b_qlora", "merge_qlora", "eval_qlora", "lora_8bit",
         "classification", "zero2", "zero3", "two_ranks_one_gpu"]


def test_dry_run_lists_every_check_with_its_command():
    out = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    listed = [line.split(":", 1)[0] for line in out.stdout.splitlines() if line and not line.startswith(" ")]
    assert listed == NAMES
    commands = [line.strip() for line in out.stdout.splitlines() if line.startswith("  ")]
    assert len(commands) == len(NAMES)
    assert all("train.device=cuda" in c for c in commands if " train " in c or " launch " in c)


@pytest.mark.parametrize("weights", ["real", "random"])
def test_every_recipe_of_the_check_passes_the_checks_for_a_gpu(tiny_llama_dir, tmp_path, weights):
    """With the embedded models (real) or the bundle's folders (random: here a tiny Llama stands in for them, with
    Llama-3.2-1B's context length, since the checks compare `data.max_length` with the model's config)."""
    stand_in = tmp_path / "stand-in"
    shutil.copytree(tiny_llama_dir, stand_in)
    config = json.loads((stand_in / "config.json").read_text())
    (stand_in / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    models = {"llama1b": str(stand_in), "smollm2": "package", "minilm": "package", "bbc": "package"}
    if weights == "random":
        models.update(smollm2=str(stand_in))
    todo = [c for c in checks(3, models, tmp_path / "runs", gpus=1) if c is not None]
    assert [c.name for c in todo] == NAMES
    recipes = [c for c in todo if c.kind in ("train", "launch")]
    assert len(recipes) == 11
    for check in recipes:
        recipe = load_recipe(str(REPO / check.recipe), check.overrides)
        assert recipe.train.device == "cuda" and recipe.train.max_steps == 3, check.name
        runtime = resolve_runtime(recipe, device="cpu")
        precision = "bf16" if recipe.train.precision == "auto" else recipe.train.precision
        check_recipe(recipe, replace(runtime, device="cuda", precision=precision, problems=()), source=check.name)
    by_name = {c.name: c for c in todo}
    qlora = load_recipe(str(REPO / "recipes" / "llama_qlora.yaml"), by_name["qlora"].overrides)
    assert (qlora.quantization.bits, qlora.quantization.quant_type, qlora.quantization.double_quant) == (4, "nf4", True)
    assert (qlora.quantization.compute_dtype, qlora.train.optimizer) == ("bf16", "paged_adamw_8bit")
    assert load_recipe(str(REPO / "recipes" / "llama_lora.yaml"), by_name["zero3"].overrides).deepspeed == "zero3"


def test_more_processes_than_gpus_is_refused_before_launching(tmp_path, monkeypatch):
    import torch

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: tiny}\ndata: {train: d.jsonl}\noutput: {dir: out}\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    message = (
        "2 processes per node on CUDA, but this machine has 1 GPU: NCCL runs one process per GPU (two on one GPU fail "
        "with 'Duplicate GPU detected'). Use --nproc-per-node 1 or fewer, or --device cpu for more processes than GPUs."
    )
    with pytest.raises(FinetuneError) as error:
        build_plan(parser.parse_args([str(recipe), "--nproc-per-node", "2", "--device", "cuda"]))
    assert str(error.value) == message
    assert build_plan(parser.parse_args([str(recipe), "--nproc-per-node", "1", "--device", "cuda"])).world_size == 1
    assert build_plan(parser.parse_args([str(recipe), "--nproc-per-node", "2", "--device", "cpu"])).world_size == 2
    check_one_process_per_gpu(4, 0)  # a login node without GPUs launches for others: nothing to compare with
    with pytest.raises(FinetuneError, match="8 processes per node on CUDA, but this machine has 4 GPUs"):
        check_one_process_per_gpu(8, 4)


def test_script_is_executable_and_documents_its_modes():
    script = Path(REPO / "scripts" / "gpu_check.sh")
    assert script.stat().st_mode & 0o111
    text = script.read_text()
    for mode in ("--dry-run", "--offline DIR", "--pack DIR"):
        assert mode in text
    usage = subprocess.run(["bash", str(script), "--offline"], capture_output=True, text=True, cwd=REPO)
    assert usage.returncode == 2 and "usage:" in usage.stderr
