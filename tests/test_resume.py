"""Resuming after a crash, stopping on Ctrl-C/SIGTERM, one run per folder: checked against an uninterrupted run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import yaml
from transformers import TrainerCallback

from finetune.errors import FinetuneError
from finetune.recipe import load_recipe
from support import REPO, capitals_data, free_port, sft_recipe

STEPS = 15  # 40 rows, batches of 8, 3 epochs
# Steps after resuming must follow the uninterrupted run: same weights, optimizer moments, schedule, data order and
# RNG. Measured here: bit-identical (difference 0.0); the tolerance leaves room for other thread counts only.
LOSS_TOLERANCE = 1e-4

DRIVER = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from finetune.commands.common import guarded
    from finetune.recipe import load_recipe
    from finetune.runner import run

    class SignalAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(sys.argv[2]):
                os.kill(os.getpid(), getattr(signal, sys.argv[3]))

    sys.exit(guarded(lambda: run(load_recipe(sys.argv[1]), callbacks=[SignalAt()]) and 0))
""")


def write(tmp_path, name: str, **sections):
    recipe = sft_recipe(tmp_path.parent / "model", tmp_path, **sections)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture
def recipe_file(llama64, tmp_path):
    recipe = sft_recipe(llama64, tmp_path, train={"epochs": 3, "save_checkpoints": True, "save_steps": 2,
                                                   "save_total_limit": 2, "learning_rate": 1e-2})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


class StepCounter(TrainerCallback):
    taken = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.taken += 1


def run_with_signal(recipe_file, step: int, signal_name: str) -> subprocess.CompletedProcess:
    driver = recipe_file.parent / "driver.py"
    driver.write_text(DRIVER)
    return subprocess.run([sys.executable, str(driver), str(recipe_file), str(step), signal_name],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


def losses(out) -> dict[int, float]:
    history = json.loads((out / "train_metrics.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.fixture(scope="module")
def uninterrupted(llama64, tmp_path_factory):
    from finetune.runner import run

    tmp = tmp_path_factory.mktemp("uninterrupted")
    recipe = sft_recipe(llama64, tmp, train={"epochs": 3, "save_checkpoints": True, "save_steps": 2,
                                             "save_total_limit": 2, "learning_rate": 1e-2})
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run(load_recipe(path))
    found = losses(tmp / "out")
    assert sorted(found) == list(range(1, STEPS + 1))
    return found


def test_a_killed_run_resumes_from_its_last_complete_checkpoint(recipe_file, uninterrupted, capsys):
    from finetune.runner import run

    killed = run_with_signal(recipe_file, 7, "SIGKILL")
    assert killed.returncode == -9
    out = recipe_file.parent / "out"
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-4", "checkpoint-6"}
    # A checkpoint being written when the process died: its trainer_state.json (written last) is cut short.
    half = out / "checkpoint-8"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"")
    (half / "trainer_state.json").write_text('{"global_step": 8, "log_hist')

    steps = StepCounter()
    result = run(load_recipe(recipe_file), callbacks=[steps])
    printed = capsys.readouterr().out
    assert "start            resumes from checkpoint-6 (step 6) of 15 steps" in printed
    assert steps.taken == STEPS - 6  # only the steps after the checkpoint were trained again
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1)) and result.trainer.state.global_step == STEPS
    differences = [abs(resumed[step] - uninterrupted[step]) / uninterrupted[step] for step in range(7, STEPS + 1)]
    print("largest relative loss difference after resuming:", max(differences))
    assert max(differences) < LOSS_TOLERANCE


def test_half_written_checkpoints_are_skipped_with_the_reason(tmp_path, caplog):
    from finetune.training.checkpoints import find_checkpoint

    for step, files in ((4, {"trainer_state.json": '{"global_step": 4}', "adapter_model.safetensors": "x",
                             "optimizer.pt": "x", "rng_state.pth": "x"}),
                        (6, {"adapter_model.safetensors": "x", "optimizer.pt": "x"}),
                        (8, {"trainer_state.json": '{"global_st'})):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
    point = find_checkpoint(tmp_path, world_size=1)
    assert point.checkpoint == tmp_path / "checkpoint-4"
    assert point.skipped == [
        "checkpoint-8: trainer_state.json is truncated (the save did not finish)",
        "checkpoint-6: no trainer_state.json (written last: the save did not finish)",
    ]
    assert find_checkpoint(tmp_path, world_size=2).skipped[-1] == (
        "checkpoint-4: no RNG state for 2 of 2 process(es) (rng_state_0.pth)"
    )


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_save_a_checkpoint_and_the_rerun_resumes(recipe_file, uninterrupted, signal_name):
    from finetune.runner import run

    stopped = run_with_signal(recipe_file, 3, signal_name)
    out = recipe_file.parent / "out"
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert (f"error: stopped by {signal_name} at step 3 of 15; checkpoint saved in {out / 'checkpoint-3'}. "
            "Run the same command again to resume from it.") in stopped.stderr
    assert (out / "checkpoint-3" / "trainer_state.json").is_file() and not (out / "train_metrics.json").exists()
    resumed = losses(run(load_recipe(recipe_file)).output_dir)
    assert resumed[STEPS] == pytest.approx(uninterrupted[STEPS], rel=LOSS_TOLERANCE)


def test_a_recipe_change_that_breaks_resuming_is_refused_naming_the_keys(recipe_file):
    killed = run_with_signal(recipe_file, 5, "SIGKILL")
    assert killed.returncode == -9
    changed = load_recipe(recipe_file, ["train.learning_rate=0.02", "train.micro_batch_size=4", "train.logging_steps=2"])
    from finetune.runner import run

    with pytest.raises(FinetuneError) as err:
        run(changed)
    out = recipe_file.parent / "out"
    assert str(err.value) == (
        f"cannot resume {out / 'checkpoint-4'}: the recipe changed since it was saved, and resuming would not continue "
        "the same training: train.learning_rate (0.01 -> 0.02); train.micro_batch_size (8 -> 4). Run with the saved "
        f"recipe ({out / 'recipe.yaml'}), or set output.overwrite=true to start over, or choose another output.dir."
    )
    with pytest.raises(FinetuneError, match=r"train.resume is never"):
        run(load_recipe(recipe_file, ["train.resume=never"]))


def test_one_run_per_folder_and_a_finished_run_is_kept(recipe_file):
    from finetune.runner import run
    from finetune.training.lock import RunLock

    recipe = load_recipe(recipe_file, ["train.epochs=1"])
    other = RunLock(recipe.output.dir).acquire()
    try:
        with pytest.raises(FinetuneError, match=r"is in use by another run \(process \d+ on .*, started .*\)\. Wait"):
            run(recipe)
    finally:
        other.release()
    run(recipe)
    with pytest.raises(FinetuneError, match=r"holds a finished run \(train_metrics.json\)"):
        run(recipe)
    assert run(load_recipe(recipe_file, ["train.epochs=1", "output.overwrite=true"])).trainer.state.global_step == 5


ZERO2_STEPS = 24  # killed once checkpoint-8 is complete: 16 more steps and 4 saves to go, so the kill lands mid-run
# (with 12 steps an idle machine once finished the last 4 between the poll and the kill)


def launch_zero2(llama_dir, data, out, log) -> subprocess.Popen:
    """Two processes under DeepSpeed ZeRO-2 (1 node x 2, accelerate)."""
    import os

    command = [
        sys.executable, "-m", "finetune.cli", "launch", str(REPO / "recipes" / "tiny_zero2.yaml"),
        f"model.name_or_path={llama_dir}", f"data.train={data}", f"output.dir={out}", f"train.max_steps={ZERO2_STEPS}",
        "train.num_threads=1", "train.save_checkpoints=true", "train.save_steps=4", "train.save_total_limit=3",
        "--nproc-per-node", "2", "--main-port", str(free_port()), "--join-timeout", "120",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Output to a file: a pipe nobody reads fills up and stalls the job.
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_a_killed_zero2_job_of_two_processes_resumes_on_every_rank(tiny_llama_dir, tmp_path):
    import signal
    import time

    data = capitals_data(tmp_path / "train.jsonl")
    whole = launch_zero2(tiny_llama_dir, data, tmp_path / "whole", tmp_path / "whole.log")
    assert whole.wait(timeout=600) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    expected = losses(tmp_path / "whole")

    out = tmp_path / "killed"
    job = launch_zero2(tiny_llama_dir, data, out, tmp_path / "killed.log")
    deadline = time.monotonic() + 600
    while not (out / "checkpoint-8" / "trainer_state.json").is_file():  # two complete checkpoints, then SIGKILL
        assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.2)
    # Every process at once, as a lost node or an out-of-memory kill does (torchrun's workers are in a session of
    # their own: killing the launcher's group would leave them running).
    import psutil

    for process in [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]:
        process.send_signal(signal.SIGKILL)
    job.wait()
    psutil.wait_procs(psutil.Process().children(recursive=True), timeout=0)
    assert not (out / "train_metrics.json").exists()

    again = launch_zero2(tiny_llama_dir, data, out, tmp_path / "again.log")
    again.wait(timeout=600)
    printed = (tmp_path / "again.log").read_text()
    assert again.returncode == 0, printed[-3000:]
    start = re.search(r"start            resumes from checkpoint-(\d+)", printed)
    assert start, printed[-3000:]
    resumed_from = int(start.group(1))  # the latest complete checkpoint when the kill landed: 8 or later
    assert 8 <= resumed_from < ZERO2_STEPS, resumed_from
    resumed = losses(out)
    assert sorted(resumed) == list(range(1, ZERO2_STEPS + 1))
    for step in range(resumed_from + 1, ZERO2_STEPS + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=LOSS_TOLERANCE), step
