"""Distributed guards and DeepSpeed configs: world-size checks, bounded joins, threads/interfaces, ZeRO validation.

The join tests start real processes that wait on real sockets of 127.0.0.1 with a timeout of a few seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from finetune.distributed.guards import DEFAULT_JOIN_TIMEOUT, check_world_size, configure_threads_and_interfaces, join_timeout
from finetune.errors import FinetuneError
from finetune.recipe import validate_recipe
from finetune.distributed.zero import available_configs, deepspeed_problems, deepspeed_warnings, load_deepspeed_config, resolve_deepspeed_config
from support import free_port

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ["zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"]
# Seconds a child process may need beyond its timeout: importing torch on a busy 2-core machine.
STARTUP_SLACK = 12.0


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def run_python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout)


GUARDED = """
import sys
from finetune.commands.common import guarded
from finetune.distributed.guards import {name}
sys.exit(guarded(lambda: {call} and 0))
"""


def recipe(**sections):
    base = {"model": {"name_or_path": "m"}, "data": {"train": "d.jsonl"}, "output": {"dir": "out"}}
    base.update(sections)
    return validate_recipe(base)


# --------------------------------------------------------------------------------------------
# World size
# --------------------------------------------------------------------------------------------


def test_check_world_size_passes_on_match_and_without_expectation(monkeypatch):
    monkeypatch.delenv("FINETUNE_EXPECTED_WORLD_SIZE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert check_world_size(4) == 4
    assert check_world_size() == 4  # nothing expected: nothing to check
    monkeypatch.setenv("FINETUNE_EXPECTED_WORLD_SIZE", "4")
    assert check_world_size() == 4


def test_check_world_size_names_the_traps_when_processes_are_missing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(FinetuneError) as err:
        check_world_size(2)
    text = str(err.value)
    assert text.startswith("this process sees a world of 1 process(es), but the launch asked for 2 (FINETUNE_EXPECTED_WORLD_SIZE)")
    assert "each process would train alone" in text
    assert "`accelerate launch --cpu --num_processes N` starts ONE process" in text
    assert "--deepspeed_multinode_launcher standard" in text
    assert "--no_ssh --node_rank K" in text


def test_check_world_size_with_the_trainers_view(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FinetuneError, match=r"sees a world of 1 process\(es\), but the launch asked for 2"):
        check_world_size(2, actual=1)  # e.g. TrainingArguments.world_size of a script that ignored WORLD_SIZE
    with pytest.raises(FinetuneError, match="more processes than planned joined"):
        check_world_size(2, actual=3)


def test_expected_world_size_must_be_a_positive_integer(monkeypatch):
    monkeypatch.setenv("FINETUNE_EXPECTED_WORLD_SIZE", "two")
    with pytest.raises(FinetuneError, match=r"FINETUNE_EXPECTED_WORLD_SIZE='two': expected a positive integer"):
        check_world_size()


def test_a_one_process_world_expecting_two_fails_in_a_real_process():
    env = child_env(FINETUNE_EXPECTED_WORLD_SIZE="2")
    done = run_python(GUARDED.format(name="check_world_size", call="check_world_size()"), env)
    assert done.returncode == 1
    assert "error: this process sees a world of 1 process(es), but the launch asked for 2" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_accelerate_cpu_trap_is_caught(tmp_path):
    """`accelerate launch --cpu --num_processes 2` really starts one process; the guard turns that into an error."""
    script = tmp_path / "probe.py"
    script.write_text("import sys\nfrom finetune.commands.common import guarded\nfrom finetune.distributed.guards import check_world_size\n"
                      "print('started', flush=True)\nsys.exit(guarded(lambda: check_world_size() and 0))\n")  # fmt: skip
    accelerate = Path(sys.executable).parent / "accelerate"
    done = subprocess.run(
        [str(accelerate), "launch", "--cpu", "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
        env=child_env(FINETUNE_EXPECTED_WORLD_SIZE="2"), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stdout.count("started") == 1  # the trap: one process, not two
    assert "sees a world of 1 process(es), but the launch asked for 2" in done.stderr


# --------------------------------------------------------------------------------------------
# Join timeouts
# --------------------------------------------------------------------------------------------


def test_join_timeout_from_argument_env_and_default(monkeypatch):
    monkeypatch.delenv("FINETUNE_JOIN_TIMEOUT", raising=False)
    assert join_timeout() == DEFAULT_JOIN_TIMEOUT
    monkeypatch.setenv("FINETUNE_JOIN_TIMEOUT", "12.5")
    assert join_timeout() == 12.5
    assert join_timeout(3) == 3.0
    for bad in ("0", "-4", "soon"):
        with pytest.raises(FinetuneError, match="expected a positive number of seconds"):
            join_timeout(bad)


def test_a_rank_that_never_joins_fails_rank_0_within_the_timeout():
    """Without a launcher agent (the deepspeed launcher) rank 0 serves the store and would wait 30 minutes."""
    env = child_env(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), FINETUNE_JOIN_TIMEOUT="2")
    start = time.monotonic()
    done = run_python(GUARDED.format(name="join_process_group", call="join_process_group()"), env)
    elapsed = time.monotonic() - start
    assert done.returncode == 1
    assert "error: rank 0 of 2: not every process joined (Timed out after 2 seconds waiting for clients. 1/2 clients joined.)" in done.stderr
    assert "Waited 2 s; change it with --join-timeout or FINETUNE_JOIN_TIMEOUT." in done.stderr
    assert elapsed < 2 + STARTUP_SLACK


def test_a_rank_whose_main_process_never_starts_fails_within_the_timeout():
    port = free_port()
    env = child_env(WORLD_SIZE="2", RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FINETUNE_JOIN_TIMEOUT="2")
    start = time.monotonic()
    done = run_python(GUARDED.format(name="join_process_group", call="join_process_group()"), env)
    elapsed = time.monotonic() - start
    assert done.returncode == 1
    assert f"error: rank 1 of 2: the store at 127.0.0.1:{port} did not answer (Connection refused)" in done.stderr
    assert elapsed < 2 + STARTUP_SLACK


@pytest.mark.slow
def test_join_process_group_joins_and_reduces():
    port = free_port()
    code = """
        import torch, torch.distributed as dist
        from finetune.distributed.guards import join_process_group
        assert join_process_group()
        t = torch.tensor([dist.get_rank() + 1.0]); dist.all_reduce(t)
        print("sum", t.item(), "world", dist.get_world_size(), flush=True)
        dist.barrier(); dist.destroy_process_group()
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=child_env(WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FINETUNE_JOIN_TIMEOUT="60"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    assert [o[0].strip() for o in outputs] == ["sum 3.0 world 2", "sum 3.0 world 2"]


def test_wait_for_nodes_names_the_node_that_never_joined():
    port = free_port()
    start = time.monotonic()
    done = run_python(GUARDED.format(name="wait_for_nodes", call=f"wait_for_nodes('127.0.0.1', {port}, 0, 3, 2)"), child_env())
    elapsed = time.monotonic() - start
    assert done.returncode == 1
    assert "error: nodes 1, 2 of 3 did not join within 2 s (1/3 nodes joined)." in done.stderr
    assert elapsed < 2 + STARTUP_SLACK


def test_join_process_group_is_a_no_op_for_one_process(monkeypatch):
    from finetune.distributed.guards import join_process_group

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert join_process_group() is False


# --------------------------------------------------------------------------------------------
# Threads and interfaces
# --------------------------------------------------------------------------------------------


def test_threads_are_cores_divided_among_local_processes():
    env, notes = configure_threads_and_interfaces(3, cores=8)
    assert env == {"OMP_NUM_THREADS": "2"}
    assert notes == ["OMP_NUM_THREADS=2: 8 usable core(s) / 3 local process(es), so the processes do not fight over cores."]
    assert configure_threads_and_interfaces(4, cores=2)[0]["OMP_NUM_THREADS"] == "1"  # never 0
    assert configure_threads_and_interfaces(4, threads=5, cores=2)[0]["OMP_NUM_THREADS"] == "5"


def test_iface_sets_gloo_and_nccl_and_is_checked():
    env, notes = configure_threads_and_interfaces(1, iface="lo", cores=4)
    assert env == {"OMP_NUM_THREADS": "4", "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    assert "gloo (CPU) and NCCL (GPU) talk over lo" in notes[1]
    with pytest.raises(FinetuneError, match=r"--iface nosuch0: no such network interface here; this machine has .*\blo\b"):
        configure_threads_and_interfaces(1, iface="nosuch0")
    # For commands written for other machines the interface is not checked here.
    assert configure_threads_and_interfaces(1, iface="nosuch0", check_iface=False)[0]["GLOO_SOCKET_IFNAME"] == "nosuch0"
    with pytest.raises(FinetuneError, match="--nproc-per-node must be at least 1"):
        configure_threads_and_interfaces(0)


# --------------------------------------------------------------------------------------------
# DeepSpeed configs
# --------------------------------------------------------------------------------------------


def test_shipped_configs_resolve_by_name_with_or_without_json():
    assert set(SHIPPED) <= set(available_configs())
    for name in SHIPPED:
        path = resolve_deepspeed_config(name)
        assert path == REPO / "deepspeed_configs" / f"{name}.json"
        assert resolve_deepspeed_config(f"{name}.json") == path
        assert resolve_deepspeed_config(str(path)) == path


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_leave_batch_and_precision_to_the_recipe(name):
    config = load_deepspeed_config(name)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    assert "optimizer" not in config and "scheduler" not in config  # DeepSpeed's optimizers compile C++ ops
    zero = config["zero_optimization"]
    assert zero["stage"] == int(name[4])
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    offloaded = {k for k in ("offload_optimizer", "offload_param") if k in zero}
    assert offloaded == {"zero2_offload": {"offload_optimizer"}, "zero3_offload": {"offload_optimizer", "offload_param"}}.get(name, set())
    if offloaded:
        assert all(zero[k]["device"] == "cpu" for k in offloaded)
        # Keeps the Trainer's optimizer: otherwise accelerate swaps in DeepSpeedCPUAdam and compiles cpu_adam.
        assert config["zero_force_ds_cpu_optimizer"] is False
    for has_cuda in (False, True):
        assert deepspeed_problems(recipe(), config, has_cuda=has_cuda) == []


def test_configs_installed_as_data_files_are_found(tmp_path, monkeypatch):
    import finetune.distributed.zero as zero

    installed = tmp_path / "prefix" / "share" / "finetune-kit" / "deepspeed_configs"
    installed.mkdir(parents=True)
    (installed / "zero2.json").write_text('{"zero_optimization": {"stage": 2}}')
    monkeypatch.setattr(zero, "_PACKAGE_ROOT", tmp_path / "site-packages")  # a wheel install: no checkout beside it
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    assert resolve_deepspeed_config("zero2") == installed / "zero2.json"
    assert list(available_configs()) == ["zero2"]


def test_unknown_config_name_lists_names_with_a_hint():
    with pytest.raises(FinetuneError) as err:
        resolve_deepspeed_config("zero_2")
    text = str(err.value)
    assert text.startswith("deepspeed: no config named 'zero_2'. Did you mean 'zero2'? Shipped configs: zero1, zero2, zero2_offload, zero3, zero3_offload")
    with pytest.raises(FinetuneError, match=r"deepspeed: config file ./missing/ds.json not found. Shipped configs: zero1, "):
        resolve_deepspeed_config("./missing/ds.json")


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n')
    with pytest.raises(FinetuneError, match=rf"deepspeed: {path}:2:36: not valid JSON: Expecting property name enclosed in double quotes\."):
        load_deepspeed_config(str(path))
    path.write_text("[1, 2]")
    with pytest.raises(FinetuneError, match="a DeepSpeed config is a JSON object, got list"):
        load_deepspeed_config(str(path))


def zero3(**extra) -> dict:
    config = load_deepspeed_config("zero3")
    config["zero_optimization"].update(extra)
    return config


def test_zero3_with_4bit_needs_storage_dtype_equal_to_compute_dtype():
    qlora = recipe(adapter="qlora", quantization={"bits": 4}, train={"precision": "bf16"})
    assert deepspeed_problems(qlora, zero3(), has_cuda=True) == [
        "quantization.storage_dtype: uint8 with ZeRO-3: to partition a 4-bit model, ZeRO-3 (like FSDP) needs the packed "
        "weights stored in the dtype of the model's other weights (bf16). Set quantization.storage_dtype: bf16 "
        "(equal to the compute dtype: quantization.compute_dtype, or train.precision when that is auto)."
    ]
    fixed = recipe(adapter="qlora", quantization={"bits": 4, "storage_dtype": "bf16"}, train={"precision": "bf16"})
    assert deepspeed_problems(fixed, zero3(), has_cuda=True) == []
    on_cpu = recipe(adapter="qlora", quantization={"bits": 4, "storage_dtype": "bfloat16"})  # auto precision: fp32 on CPU
    assert "Set quantization.storage_dtype: fp32" in deepspeed_problems(on_cpu, zero3(), has_cuda=False)[0]
    # ZeRO-2 does not partition weights: no constraint.
    assert deepspeed_problems(qlora, load_deepspeed_config("zero2"), has_cuda=True) == []


def test_zero3_without_16bit_gather_is_refused():
    config = zero3(stage3_gather_16bit_weights_on_model_save=False)
    problems = deepspeed_problems(recipe(), config, has_cuda=False)
    assert problems == [
        "deepspeed: zero_optimization.stage3_gather_16bit_weights_on_model_save is not true: with ZeRO-3 each rank "
        "holds a slice of every weight, and without it a full fine-tune saves no weights (only DeepSpeed's sharded "
        "checkpoint, to rebuild with zero_to_fp32.py) and accelerate's get_state_dict refuses to gather. "
        "Set it to true (deepspeed_configs/zero3.json does)."
    ]
    del config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert deepspeed_problems(recipe(), config, has_cuda=False) == problems


def test_offload_and_stage_mismatches():
    config = load_deepspeed_config("zero2")
    config["zero_optimization"]["offload_param"] = {"device": "cpu"}
    assert deepspeed_problems(recipe(), config, has_cuda=False) == [
        "deepspeed: zero_optimization.offload_param only works with ZeRO stage 3 (stage is 2), DeepSpeed ignores it "
        "otherwise. Use stage 3 (deepspeed: zero3_offload) or remove offload_param."
    ]
    nvme = load_deepspeed_config("zero2")
    nvme["zero_optimization"]["offload_optimizer"] = {"device": "nvme"}
    assert deepspeed_problems(recipe(), nvme, has_cuda=True) == [
        "deepspeed: zero_optimization.offload_optimizer.device is nvme but nvme_path is not set: give a folder on the NVMe disk."
    ]
    assert deepspeed_problems(recipe(), {"zero_optimization": {"stage": 4}}, has_cuda=False) == [
        "deepspeed: zero_optimization.stage is 4; use 0, 1, 2 or 3."
    ]


def test_explicit_values_that_contradict_the_recipe():
    config = load_deepspeed_config("zero2")
    config.update(train_micro_batch_size_per_gpu=8, gradient_clipping=0.5, bf16={"enabled": True})
    r = recipe(train={"micro_batch_size": 4, "max_grad_norm": 1.0})
    assert deepspeed_problems(r, config, has_cuda=False) == [
        "deepspeed: train_micro_batch_size_per_gpu is 8 but train.micro_batch_size is 4; set train_micro_batch_size_per_gpu to \"auto\" so the recipe decides.",
        "deepspeed: gradient_clipping is 0.5 but train.max_grad_norm is 1.0; set gradient_clipping to \"auto\" so the recipe decides.",
        "deepspeed: bf16.enabled is true but the run's precision is fp32 (train.precision: auto); set bf16.enabled to \"auto\".",
    ]
    # On a GPU with precision auto, bf16 vs fp16 depends on the card: not judged here.
    assert len(deepspeed_problems(r, config, has_cuda=True)) == 2


def test_warnings_for_settings_that_compile_ops_or_override_the_recipe():
    config = load_deepspeed_config("zero2")
    config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto"}}
    config["scheduler"] = {"type": "WarmupLR"}
    warnings = deepspeed_warnings(recipe(), config, has_cuda=False)
    assert warnings[0].startswith('deepspeed: the "optimizer" block (AdamW) makes DeepSpeed JIT-compile its C++ optimizer op')
    assert "set optimizer.params.torch_adam: true" in warnings[0]
    assert warnings[1:] == [
        'deepspeed: the "optimizer" block replaces train.optimizer, train.learning_rate and train.weight_decay.',
        'deepspeed: the "scheduler" block replaces train.lr_scheduler and train.warmup_ratio.',
    ]
    config["optimizer"]["params"]["torch_adam"] = True
    assert not any("compile" in w for w in deepspeed_warnings(recipe(), config, has_cuda=False))
    # Optimizer offload without zero_force_ds_cpu_optimizer: false swaps in DeepSpeedCPUAdam (compiled) on CPU.
    offload = load_deepspeed_config("zero2_offload")
    del offload["zero_force_ds_cpu_optimizer"]
    assert any("compiles the cpu_adam op" in w for w in deepspeed_warnings(recipe(), offload, has_cuda=False))
    assert deepspeed_warnings(recipe(), offload, has_cuda=True) == []
    # pin_memory is a no-op on DeepSpeed's CPU accelerator: said once, not an error.
    shipped = deepspeed_warnings(recipe(), load_deepspeed_config("zero3_offload"), has_cuda=False)
    assert shipped == [
        "deepspeed: offload pin_memory has no effect without CUDA (DeepSpeed's CPU accelerator does not page-lock); "
        "harmless, and kept on in the shipped configs for GPU machines."
    ]


def test_recipe_deepspeed_key_and_runner_loader_agree(tmp_path):
    custom = tmp_path / "my_ds.json"
    custom.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert load_deepspeed_config(custom) == {"zero_optimization": {"stage": 1}}
    assert load_deepspeed_config(recipe(deepspeed="zero1").deepspeed)["zero_optimization"]["stage"] == 1
