"""SFT with LoRA on a tiny Llama: what the method guarantees, what a run leaves behind, and the launchers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from finetune.recipe import validate_recipe
from support import REPO, sft_recipe


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory):
    """One LoRA SFT run shared by the tests that inspect its results."""
    from finetune.runner import run

    tmp = tmp_path_factory.mktemp("sft")
    recipe = validate_recipe(sft_recipe(tiny_llama_dir, tmp, data={"eval_fraction": 0.2}, eval={"prompts": ["what is the capital of italy"]}))
    return recipe, run(recipe)


def test_loss_falls_on_learnable_task(trained):
    _, result = trained
    losses = [h["loss"] for h in result.metrics["log_history"] if "loss" in h]
    assert len(losses) >= 10
    # Random init: loss ≈ ln(vocab) ≈ 4.8; the capitals are learnable, so the last losses are far below.
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses
    evals = [h["eval_loss"] for h in result.metrics["log_history"] if "eval_loss" in h]
    assert evals[-1] < evals[0]


def test_base_weights_frozen_and_adapter_trained(trained, tiny_llama_dir):
    from safetensors.torch import load_file

    _, result = trained
    original = load_file(str(tiny_llama_dir / "model.safetensors"))
    base = result.model.get_base_model()
    state = {k: v for k, v in base.state_dict().items() if "lora_" not in k}
    checked = set()
    for name, tensor in original.items():
        key = name if name in state else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(state[key], tensor), f"base weight {name} changed"
        checked.add(key)
    # Every base weight of the trained model was compared with the checkpoint: none left unchecked, none missing.
    assert checked == set(state), sorted(set(state) ^ checked)
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.requires_grad for p in lora_b)
    # PEFT initialises lora_B to zero, so any non-zero B was learned.
    assert all(p.abs().sum() > 0 for p in lora_b)
    assert not any(p.requires_grad for n, p in result.model.named_parameters() if "lora_" not in n)


def test_saved_adapter_reloads_with_same_logits(trained, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe, result = trained
    out = Path(recipe.output.dir)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out).eval()
    trained_model = result.model.eval()
    ids = result.tokenizer("what is the capital of france paris", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = trained_model(input_ids=ids).logits
        actual = reloaded(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_run_folder_has_everything(trained):
    recipe, result = trained
    out = Path(recipe.output.dir)
    for name in ("recipe.yaml", "train_metrics.json", "loss_curve.png", "tokenizer.json", "samples.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert validate_recipe(saved) == recipe  # the resolved recipe round-trips
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["plan"]["trainable_params"] == sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    assert metrics["plan"]["effective_batch_size"] == 8
    assert metrics["summary"]["tokens_per_second"] > 0
    assert metrics["samples"][0]["prompt"] == "what is the capital of italy"


def test_a_finished_run_and_a_foreign_folder_are_refused(trained, tmp_path):
    from finetune.errors import FinetuneError
    from finetune.runner import run

    recipe, _ = trained
    with pytest.raises(FinetuneError, match=r"output\.dir: .* holds a finished run \(train_metrics\.json\)\. Choose another "):
        run(recipe)
    (tmp_path / "notes.txt").write_text("mine")
    foreign = recipe.model_copy(update={"output": recipe.output.model_copy(update={"dir": str(tmp_path)})})
    with pytest.raises(FinetuneError, match=r"is not empty and holds no checkpoint of a run to resume \(notes\.txt\)"):
        run(foreign)


def test_full_finetune_and_packing(tiny_llama_dir, tmp_path):
    """`adapter: none` trains every weight; packing runs on pre-tokenized, masked rows."""
    from finetune.runner import run

    recipe = validate_recipe(sft_recipe(tiny_llama_dir, tmp_path, adapter="none", data={"packing": True}, train={"epochs": 1, "learning_rate": 1e-3}))
    result = run(recipe)
    assert not hasattr(result.model, "peft_config")
    assert all(p.requires_grad for p in result.model.parameters())
    assert (Path(recipe.output.dir) / "model.safetensors").is_file()
    assert result.metrics["plan"]["train_rows"] < 40  # 40 short conversations packed into fewer 64-token rows


def env_for_subprocess() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_end_to_end_through_accelerate_launch(tiny_llama_dir, tmp_path):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(sft_recipe(tiny_llama_dir, tmp_path, train={"epochs": 2, "report_to": "tensorboard"})))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "finetune" / "run.py"), str(recipe_path), "train.learning_rate=0.01",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env_for_subprocess(), cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Plan:" in result.stdout
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file()
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["train"]["learning_rate"] == 0.01  # the override reached the run and its saved recipe
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["last_loss"] < metrics["first_loss"]
    assert list((out / "runs").rglob("events.out.tfevents.*")), "report_to: tensorboard wrote no event file"


STEP_LINE = re.compile(r"^step +(\d+)/(\d+) \| loss \d+\.\d{4} \| lr \d\.\d\de[-+]\d\d \| \d+ tokens/s \| \d+:\d\d elapsed, \d+:\d\d left$")
EVAL_LINE = re.compile(r"^eval at step (\d+)/(\d+) \| loss \d+\.\d{4}( \| [a-z0-9_]+ -?\d+\.\d{4})* \| \d+\.\d s$")


def test_log_lines_are_one_line_per_log():
    from finetune.training.progress import clock_time, eval_line, step_line

    logs = {"loss": 2.41734, "grad_norm": 1.425, "learning_rate": 0.0019375, "entropy": 2.1, "epoch": 0.09}
    assert step_line(10, 112, logs, 612.4, 41.2, 422.0) == "step  10/112 | loss 2.4173 | lr 1.94e-03 | 612 tokens/s | 0:41 elapsed, 7:02 left"
    assert step_line(1, 5, {"loss": 3.0}, None, None, None) == "step 1/5 | loss 3.0000"
    evaluated = {"eval_loss": 1.23401, "eval_accuracy": 0.912, "eval_f1_macro": 0.90512, "eval_runtime": 3.14,
                 "eval_samples_per_second": 25.5, "eval_steps_per_second": 1.6, "epoch": 1.0}  # fmt: skip
    assert eval_line(56, 112, evaluated) == "eval at step 56/112 | loss 1.2340 | accuracy 0.9120 | f1_macro 0.9051 | 3.1 s"
    assert STEP_LINE.match(step_line(10, 112, logs, 612.4, 41.2, 422.0)) and EVAL_LINE.match(eval_line(56, 112, evaluated))
    assert [clock_time(s) for s in (0.4, 41, 422, 3909)] == ["0:00", "0:41", "7:02", "1:05:09"]


def test_training_prints_lines_and_keeps_the_full_history(tiny_llama_dir, tmp_path, capsys):
    """One line per logging step and per evaluation instead of the Trainer's dictionaries; train_metrics.json and
    TensorBoard still get every logged number."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from finetune.runner import run
    from finetune.training.progress import ProgressLines

    recipe = validate_recipe(sft_recipe(tiny_llama_dir, tmp_path, data={"eval_fraction": 0.2},
                                        train={"epochs": 2, "logging_steps": 2, "report_to": "tensorboard"}))  # fmt: skip
    result = run(recipe)
    printed = capsys.readouterr().out.splitlines()
    assert not [line for line in printed if line.startswith("{")], printed  # no dictionaries
    history = result.metrics["log_history"]
    steps = [line for line in printed if line.startswith("step ")]
    assert all(STEP_LINE.match(line) for line in steps), steps
    assert [int(STEP_LINE.match(line)[1]) for line in steps] == [h["step"] for h in history if "loss" in h]
    evals = [line for line in printed if line.startswith("eval at ")]
    assert all(EVAL_LINE.match(line) for line in evals), evals
    assert [int(EVAL_LINE.match(line)[1]) for line in evals] == [h["step"] for h in history if "eval_loss" in h]
    printers = [type(cb) for cb in result.trainer.callback_handler.callbacks if isinstance(cb, (ProgressCallback, PrinterCallback))]
    assert printers == [ProgressLines]
    saved = json.loads((Path(recipe.output.dir) / "train_metrics.json").read_text())["log_history"]
    assert saved == json.loads(json.dumps(history)) and all("grad_norm" in h for h in saved if "loss" in h)
    events = EventAccumulator(str(next((Path(recipe.output.dir) / "runs").rglob("events.out.tfevents.*")))).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [h["step"] for h in history if "loss" in h]
    assert [e.step for e in events.Scalars("eval/loss")] == [h["step"] for h in history if "eval_loss" in h]


def test_bad_data_fails_before_model_load_without_traceback(tiny_llama_dir, tmp_path):
    recipe = sft_recipe(tiny_llama_dir, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    recipe["data"]["train"] = str(bad)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    result = subprocess.run(
        [sys.executable, str(REPO / "finetune" / "run.py"), str(recipe_path)],
        capture_output=True, text=True, env=env_for_subprocess(), timeout=300,
    )
    assert result.returncode == 3
    assert f"error: {bad}, row 1: empty conversation" in result.stderr
    assert "Traceback" not in result.stderr
