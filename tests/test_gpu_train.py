"""benchmarks/gpu_train.py between GPU sessions: every variant's command is what its tool accepts (the kit's recipe
loader, TRL's own argument parser), and `--dry-run` runs every variant end to end on CPU (tiny shapes)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_train import VARIANTS, variant_command, write_rows

REPO = Path(__file__).resolve().parent.parent


def trl_arguments(argv: list[str]):
    """TRL's own parser on `argv` (its SFTConfig warns about its own deprecated default names)."""
    import warnings

    from trl.scripts.sft import make_parser

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return make_parser().parse_args_and_config(argv, fail_with_unknown_args=True)


def settings(device: str = "cuda") -> argparse.Namespace:
    return argparse.Namespace(device=device, steps=30, warmup=5, batch=16, max_length=2048, dry_run=False)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_runs_what_its_tool_takes(name, tmp_path):
    from finetune.recipe import load_recipe

    data = write_rows(tmp_path / "data", 4, (5, 10)).parent
    cmd = variant_command(name, tmp_path, tmp_path / "model", data, settings())
    rest = cmd[cmd.index("--") + 1 :] if "--" in cmd else []
    if name.startswith("kit"):
        recipe = load_recipe(rest[1], rest[2:])
        assert (recipe.train.precision, recipe.train.max_steps, recipe.data.max_length) == ("bf16", 35, 2048)
        assert recipe.data.padding_free and recipe.train.micro_batch_size == 16
        assert (recipe.train.kernels == "liger") == (name == "kit-liger")
        assert (recipe.quantization.bits == 4) == (name == "kit-8b-qlora")
    elif name.startswith("trl"):
        _, config, model, _ = trl_arguments(rest + ["--use_cpu", "true"])  # parsed here, on a machine without a GPU
        assert config.bf16 and model.dtype == "bfloat16" and config.max_steps == 35 and model.lora_r == 16
        assert config.packing == (name == "trl-packing")
    else:
        assert "--child-loop" in cmd


def test_trl_on_cpu_runs_in_fp32_like_the_kit(tmp_path):
    cmd = variant_command("trl", tmp_path, tmp_path / "model", tmp_path, settings("cpu"))
    _, config, model, _ = trl_arguments(cmd[cmd.index("--") + 1 :])
    assert not config.bf16 and model.dtype == "float32" and config.use_cpu


@pytest.mark.slow
def test_dry_run_runs_every_variant(tmp_path):
    """~2 minutes on 2 busy cores: six processes, each importing the libraries and training 3 steps."""
    out = tmp_path / "gpu_train.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_train", "--dry-run", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    for name, results in runs.items():
        if name == "kit-liger":  # refused before loading, on CPU
            assert results[0]["status"].startswith("refused: train.kernels: liger runs Triton kernels on CUDA GPUs"), results
        else:
            assert results[0]["status"] == "ok", (name, results[0].get("log_tail"))
            assert results[0]["real_tokens"] > 0 and results[0]["steps"] == 2


@pytest.mark.parametrize("bf16", [False, True])
def test_cpu_benchmark_runs_trl_at_the_kits_precision(tmp_path, bf16):
    """benchmarks/sft_throughput.py: `trl` in fp32 like the kit (TRL 1.16 defaults to bf16); `trl-bf16` keeps it."""
    from benchmarks.sft_throughput import trl_command

    args = argparse.Namespace(batch=8, max_length=128, steps=40)
    cmd = trl_command({"model": tmp_path / "m", "data": tmp_path / "d"}, tmp_path / "o", args, packing=False, bf16=bf16)
    assert cmd[1] == "sft"
    _, config, model, _ = trl_arguments(cmd[2:])
    assert config.bf16 == bf16 and config.use_cpu and model.dtype == "float32"
