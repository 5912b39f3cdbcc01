"""`finetune launch`: exact per-node commands for each launcher, SLURM scripts, guards, and real local runs.

Only 127.0.0.1 is ever contacted; other addresses appear in generated text only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.cli import main as cli_main
from finetune.errors import FinetuneError, RecipeError
from finetune.commands.launch import add_arguments
from finetune.launcher import RUN_SCRIPT, build_plan, check_hosts, dry_run_text, node_command, node_environment, parse_hostfile, slurm_script
from support import free_port

REPO = Path(__file__).resolve().parent.parent
ZERO2 = str(REPO / "deepspeed_configs" / "zero2.json")
STARTUP_SLACK = 12.0  # importing torch in a child process on a busy 2-core machine


def write_recipe(folder: Path, name: str = "r.yaml", **extra: str) -> str:
    lines = ["model: {name_or_path: tiny}", "data: {train: d.jsonl}", "output: {dir: out}", "train: {device: cpu}"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def cpu_recipe(tmp_path) -> str:
    return write_recipe(tmp_path)


@pytest.fixture
def zero2_recipe(tmp_path) -> str:
    return write_recipe(tmp_path, "z2.yaml", deepspeed="zero2")


def plan(*argv: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return build_plan(parser.parse_args([str(a) for a in argv]))


# --------------------------------------------------------------------------------------------
# Commands per launcher
# --------------------------------------------------------------------------------------------


def test_accelerate_commands_from_nnodes_and_address(cpu_recipe):
    p = plan(cpu_recipe, "train.max_steps=3", "--nnodes", 2, "--main-address", "10.1.2.3", "--main-port", 29555,
             "--nproc-per-node", 2, "--join-timeout", 60)  # fmt: skip
    assert p.world_size == 4
    assert node_command(p, 1) == [
        "accelerate", "launch", "--multi_gpu",
        "--num_processes", "4", "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.1.2.3",
        "--main_process_port", "29555", "--rdzv_conf", "timeout=60", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(RUN_SCRIPT), cpu_recipe, "train.max_steps=3",
    ]  # fmt: skip


def test_accelerate_deepspeed_uses_the_standard_multinode_launcher(zero2_recipe):
    p = plan(zero2_recipe, "--nnodes", 2, "--main-address", "10.1.2.3", "--nproc-per-node", 1)
    assert node_command(p, 0) == [
        "accelerate", "launch", "--use_deepspeed", "--deepspeed_config_file", ZERO2,
        "--num_processes", "2", "--num_machines", "2", "--machine_rank", "0", "--main_process_ip", "10.1.2.3",
        "--deepspeed_multinode_launcher", "standard",
        "--main_process_port", "29500", "--rdzv_conf", "timeout=300", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(RUN_SCRIPT), zero2_recipe,
    ]  # fmt: skip


def test_accelerate_on_one_machine(cpu_recipe):
    two = node_command(plan(cpu_recipe, "--nproc-per-node", 2), 0)
    assert two[:6] == ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines"]
    assert "--machine_rank" not in two
    one = node_command(plan(cpu_recipe), 0)
    assert one[:5] == ["accelerate", "launch", "--cpu", "--num_processes", "1"]
    gpu = node_command(plan(cpu_recipe, "--device", "cuda", "--nproc-per-node", 1), 0)
    assert gpu[2:4] == ["--num_processes", "1"]


def test_the_one_process_trap_is_never_generated(tmp_path):
    """`accelerate launch --cpu --num_processes N` starts one process: --cpu only ever appears for a 1-process job."""
    recipes = {False: write_recipe(tmp_path, "a.yaml"), True: write_recipe(tmp_path, "b.yaml", deepspeed="zero2")}
    for nnodes, nproc, ds, device in itertools.product((1, 2, 3), (1, 2), (False, True), ("cpu", "cuda")):
        p = plan(recipes[ds], "--nnodes", nnodes, "--main-address", "10.0.0.1", "--nproc-per-node", nproc, "--device", device)
        for rank in range(nnodes):
            cmd = node_command(p, rank)
            world = nnodes * nproc
            assert ("--cpu" in cmd) == (world == 1 and device == "cpu" and not ds), (nnodes, nproc, ds, device)
            assert cmd[cmd.index("--num_processes") + 1] == str(world)
            assert ("--deepspeed_multinode_launcher" in cmd) == (ds and nnodes > 1)
            env, _ = node_environment(p, rank, for_shell=True)
            assert env["FINETUNE_EXPECTED_WORLD_SIZE"] == str(world)


def test_torchrun_commands_from_a_hostfile(tmp_path, cpu_recipe):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two machines\nalpha slots=2\n\nbeta slots=3  # the big one\n")
    p = plan(cpu_recipe, "--launcher", "torchrun", "--hostfile", hostfile)
    assert (p.world_size, p.main_address) == (5, "alpha")
    assert node_command(p, 1) == [
        "torchrun", "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "3",
        "--master-addr", "alpha", "--master-port", "29500", "--rdzv-backend", "static", "--rdzv-conf", "timeout=300",
        str(RUN_SCRIPT), cpu_recipe,
    ]  # fmt: skip
    assert node_command(p, 0)[6] == "2"


def test_deepspeed_commands_from_a_hostfile(tmp_path, zero2_recipe):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("alpha slots=2\nbeta slots=2\n")
    p = plan(zero2_recipe, "--launcher", "deepspeed", "--hostfile", hostfile, "--main-address", "192.168.7.1", "--join-timeout", 30)
    assert node_command(p, 1) == [
        "deepspeed", "--hostfile", str(hostfile.resolve()), "--no_ssh", "--node_rank", "1",
        "--master_addr", "192.168.7.1", "--master_port", "29500", "--no_local_rank", str(RUN_SCRIPT), zero2_recipe,
    ]  # fmt: skip
    env, _ = node_environment(p, 1, for_shell=True)
    assert env["FINETUNE_JOIN_TIMEOUT"] == "30"
    assert env["TORCH_EXTENSIONS_DIR"] == f"${{TORCH_EXTENSIONS_DIR:-{REPO / '.cache' / 'torch_extensions'}}}"


def test_dry_run_prints_every_node_and_a_hostfile(zero2_recipe):
    p = plan(zero2_recipe, "--launcher", "deepspeed", "--nnodes", 2, "--main-address", "10.0.0.1", "--nproc-per-node", 2, "--iface", "eth1")
    text = dry_run_text(p)
    assert "cat > finetune-hostfile <<'EOF'\n10.0.0.1 slots=2\nnode1 slots=2\nEOF" in text
    exports = [line for line in text.splitlines() if line.startswith("export ")]
    assert len(exports) == 2
    assert exports[0] == (
        "export FINETUNE_EXPECTED_WORLD_SIZE=4 FINETUNE_JOIN_TIMEOUT=300 "
        'OMP_NUM_THREADS="$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))" GLOO_SOCKET_IFNAME=eth1 NCCL_SOCKET_IFNAME=eth1 '
        f'TORCH_EXTENSIONS_DIR="${{TORCH_EXTENSIONS_DIR:-{REPO / ".cache" / "torch_extensions"}}}"'
    )
    assert "deepspeed --hostfile finetune-hostfile --no_ssh --node_rank 1 --master_addr 10.0.0.1" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_slurm_script(tmp_path, cpu_recipe):
    text = slurm_script(plan(cpu_recipe, "--nnodes", 4, "--nproc-per-node", 2, "--slurm", "-"))
    assert "#SBATCH --nodes=4\n#SBATCH --ntasks-per-node=1\n#SBATCH --exclusive\n" in text
    assert "--gpus-per-node" not in text  # CPU job
    assert 'export MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
    assert (
        'exec accelerate launch --multi_gpu --num_processes 8 --num_machines 4 --machine_rank "$SLURM_NODEID" '
        '--main_process_ip "$MAIN_ADDR" --main_process_port 29500 --rdzv_conf timeout=300' in text
    )
    assert "export FINETUNE_EXPECTED_WORLD_SIZE=8 " in text
    assert text.rstrip().endswith('srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 bash "finetune-node-$SLURM_JOB_ID.sh"')
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0

    gpu = slurm_script(plan(cpu_recipe, "--nnodes", 2, "--nproc-per-node", 8, "--device", "cuda", "--launcher", "torchrun", "--slurm", "-"))
    assert "#SBATCH --gpus-per-node=8" in gpu
    assert '--node-rank "$SLURM_NODEID" --nproc-per-node 8 --master-addr "$MAIN_ADDR"' in gpu

    out = tmp_path / "job.sbatch"
    assert cli_main(["launch", cpu_recipe, "--nnodes", "2", "--launcher", "deepspeed", "--slurm", str(out)]) == 0
    ds = out.read_text()
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots=1/" > "$FINETUNE_HOSTFILE"' in ds
    assert 'exec deepspeed --hostfile "$FINETUNE_HOSTFILE" --no_ssh --node_rank "$SLURM_NODEID" --master_addr "$MAIN_ADDR"' in ds


# --------------------------------------------------------------------------------------------
# Guards
# --------------------------------------------------------------------------------------------


def test_layout_errors(tmp_path, cpu_recipe):
    with pytest.raises(FinetuneError, match="--nnodes > 1 needs --main-address"):
        plan(cpu_recipe, "--nnodes", 2)
    with pytest.raises(FinetuneError, match=r"--node-rank 2: this job has nodes 0 to 1\."):
        plan(cpu_recipe, "--nnodes", 2, "--main-address", "10.0.0.1", "--node-rank", 2)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=2\nb slots=1\n")
    with pytest.raises(FinetuneError, match=r"--hostfile already gives the nodes"):
        plan(cpu_recipe, "--hostfile", hostfile, "--nnodes", 2)
    with pytest.raises(FinetuneError, match=r"accelerate starts the same number of processes on every machine; .* \(a=2, b=1\)"):
        plan(cpu_recipe, "--hostfile", hostfile)
    assert plan(cpu_recipe, "--hostfile", hostfile, "--launcher", "torchrun").world_size == 3


def test_bad_hostfiles(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("a slots=2\nb\nc slots=0\na slots=1\n")
    with pytest.raises(FinetuneError) as err:
        parse_hostfile(path)
    assert str(err.value) == (
        "bad hostfile:\n"
        f"  - {path}:2: expected `HOST slots=N` with N >= 1, got 'b'\n"
        f"  - {path}:3: expected `HOST slots=N` with N >= 1, got 'c slots=0'\n"
        f"  - {path}:4: host a is listed twice"
    )
    path.write_text("# nothing\n")
    with pytest.raises(FinetuneError, match="no hosts"):
        parse_hostfile(path)
    with pytest.raises(FinetuneError, match="file not found"):
        parse_hostfile(tmp_path / "none")


def test_check_hosts_with_local_sockets_only():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert check_hosts(["127.0.0.1"], port=server.getsockname()[1]) == []
    closed = free_port()
    assert check_hosts(["127.0.0.1"], port=closed, timeout=1) == [f"127.0.0.1:{closed} is unreachable (Connection refused)"]


def test_recipe_problems_stop_the_launch(tmp_path, capsys):
    bad = write_recipe(tmp_path, "q.yaml", adapter="qlora", quantization="{bits: 4}", deepspeed="zero3")
    assert cli_main(["launch", bad, "--nproc-per-node", "2", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: 1 problem in {bad}:\n  - quantization.storage_dtype: uint8 with ZeRO-3")


def test_options_and_overrides_in_any_order(cpu_recipe, capsys):
    """`launch RECIPE --nproc-per-node 2 key.path=value`: overrides after (and between) options reach every node."""
    assert cli_main(["launch", cpu_recipe, "--nproc-per-node", "2", "train.max_steps=2", "--dry-run", "train.seed=3"]) == 0
    assert f"{RUN_SCRIPT} {cpu_recipe} train.max_steps=2 train.seed=3\n" in capsys.readouterr().out
    assert cli_main(["launch", cpu_recipe, "--dry-run", "train.seed=true"]) == 2  # and go through the recipe's checks
    assert capsys.readouterr().err == f"error: 1 problem in {cpu_recipe}:\n  - train.seed: expected an integer, got True (bool).\n"


def test_several_nodes_need_a_node_rank(cpu_recipe, capsys):
    assert cli_main(["launch", cpu_recipe, "--nnodes", "2", "--main-address", "127.0.0.1"]) == 1
    assert "which node is this machine? Pass --node-rank K (0 .. 1) on each machine" in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["launch", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--launcher", "--hostfile", "--nnodes", "--main-address", "--node-rank", "--dry-run", "--slurm", "--local-nodes", "--iface", "--join-timeout"):
        assert flag in out


# --------------------------------------------------------------------------------------------
# Real runs on this machine
# --------------------------------------------------------------------------------------------


def launch(*argv, timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "launch", *map(str, argv)],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    return done, time.monotonic() - start


def test_a_node_that_never_starts_fails_node_0_within_the_timeout(cpu_recipe):
    port = free_port()
    done, elapsed = launch(cpu_recipe, "--launcher", "torchrun", "--nnodes", 2, "--main-address", "127.0.0.1",
                           "--main-port", port, "--node-rank", 0, "--join-timeout", 2)  # fmt: skip
    assert done.returncode == 1
    assert "error: node 1 of 2 did not join within 2 s (1/2 nodes joined)." in done.stderr
    assert "+ torchrun" not in done.stdout  # the launcher itself never started
    assert elapsed < 2 + STARTUP_SLACK


def test_a_node_whose_main_node_never_starts_fails_within_the_timeout(cpu_recipe):
    port = free_port()
    done, elapsed = launch(cpu_recipe, "--nnodes", 2, "--main-address", "127.0.0.1", "--main-port", port,
                           "--node-rank", 1, "--join-timeout", 2)  # fmt: skip
    assert done.returncode == 1
    assert f"error: node 1 of 2: node 0 at 127.0.0.1:{port} did not answer within 2 s (Connection refused)." in done.stderr
    assert elapsed < 2 + STARTUP_SLACK


PROBE = """
import json, os, sys
import torch, torch.distributed as dist
from finetune.distributed.guards import check_world_size, join_process_group
join_process_group()
check_world_size()
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
# One file per rank: two nodes share this machine's stdout, where their lines can interleave.
report = {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item(), "args": sys.argv[1:],
          "threads": os.environ["OMP_NUM_THREADS"]}
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"probe-rank{dist.get_rank()}.json"), "w") as fh:
    json.dump(report, fh)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate", "deepspeed"])
def test_local_nodes_run_a_real_two_node_job(tmp_path, cpu_recipe, launcher):
    """Two nodes of one process each, on this machine: both ranks see world 2 and the all_reduce spans them."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    done, _ = launch(cpu_recipe, "train.max_steps=2", "--launcher", launcher, "--nnodes", 2, "--local-nodes",
                     "--main-port", free_port(), "--join-timeout", 60, "--script", probe)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("probe-rank*.json"))]
    assert [(r["rank"], r["world"], r["sum"]) for r in reports] == [(0, 2, 3.0), (1, 2, 3.0)]
    assert all(r["args"] == [cpu_recipe, "train.max_steps=2"] for r in reports)


def test_zero3_with_eval_prompts_on_several_processes_is_refused_before_launching(tmp_path):
    """Measured: such a run trained, then hung in the main process's generation (ZeRO-3 partitions the weights)."""
    recipe = write_recipe(tmp_path, "z3.yaml", deepspeed="zero3", eval='{prompts: ["Who are you?"]}')
    with pytest.raises(RecipeError) as error:
        plan(recipe, "--nproc-per-node", 2)
    assert error.value.problems == [
        "eval.prompts: the answers (samples) after training are generated on the main process, which hangs under ZeRO-3 "
        "with 2 processes (each holds a slice of the weights). Remove eval.prompts and ask the finished run with "
        "`finetune chat`, or use ZeRO-2."
    ]
    assert plan(recipe, "--nproc-per-node", 1).world_size == 1  # one process holds every weight: nothing to refuse
    assert plan(write_recipe(tmp_path, "z2.yaml", deepspeed="zero2", eval='{prompts: ["hi"]}'), "--nproc-per-node", 2).world_size == 2
