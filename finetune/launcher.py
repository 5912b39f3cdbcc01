"""`finetune launch`: run one recipe on several processes and machines with accelerate, torchrun or deepspeed.

It writes the launcher command for every node (printed with --dry-run, or as a SLURM batch script with
--slurm) and runs this machine's one (--node-rank K), or every node on this machine (--local-nodes, for
testing). Each command exports FINETUNE_EXPECTED_WORLD_SIZE, which the trainer checks, so a launcher that
quietly starts fewer processes fails instead of training alone; nodes meet first (finetune.distributed.
wait_for_nodes) and the launchers get a rendezvous timeout, so a node that never starts is an error, not a hang.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from finetune.errors import FinetuneError

LAUNCHERS = ("accelerate", "torchrun", "deepspeed")
DEFAULT_PORT = 29500
RUN_SCRIPT = Path(__file__).resolve().parent / "run.py"  # finetune/run.py
REPO_ROOT = Path(__file__).resolve().parents[1]
# Where scripts/build_deepspeed_ops.sh caches DeepSpeed's JIT-compiled ops (deepspeed_shm_comm on CPU).
DEFAULT_EXTENSIONS_DIR = REPO_ROOT / ".cache" / "torch_extensions"
HOSTFILE_NAME = "finetune-hostfile"


@dataclass(frozen=True)
class Node:
    host: str
    slots: int  # processes on this node


@dataclass
class LaunchPlan:
    """Everything the per-node commands are made from; built once from the arguments and the recipe."""

    launcher: str
    nodes: list[Node]
    main_address: str
    main_port: int
    script: str
    script_args: list[str]
    deepspeed_config: str | None
    use_cpu: bool
    join_timeout: float
    threads: int | None = None
    iface: str | None = None
    hostfile: str | None = None  # the user's hostfile; generated from `nodes` when None
    notes: list[str] = field(default_factory=list)

    @property
    def nnodes(self) -> int:
        return len(self.nodes)

    @property
    def world_size(self) -> int:
        return sum(n.slots for n in self.nodes)

    @property
    def uses_deepspeed(self) -> bool:
        return self.deepspeed_config is not None or self.launcher == "deepspeed"

    def summary(self) -> str:
        per_node = sorted({n.slots for n in self.nodes})
        slots = str(per_node[0]) if len(per_node) == 1 else "/".join(str(n.slots) for n in self.nodes)
        device = "CPU" if self.use_cpu else "GPU"
        zero = f", DeepSpeed {Path(self.deepspeed_config).name}" if self.deepspeed_config else ""
        return (
            f"{self.nnodes} node(s) x {slots} process(es) = {self.world_size} processes on {device}, "
            f"launcher {self.launcher}{zero}, main {self.main_address}:{self.main_port}, join timeout {self.join_timeout:g} s"
        )


# --------------------------------------------------------------------------------------------
# Hosts
# --------------------------------------------------------------------------------------------


def parse_hostfile(path: str | os.PathLike) -> list[Node]:
    """Nodes of a DeepSpeed-style hostfile (`host slots=N` per line, `#` comments), in order: node 0 first."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"--hostfile {path}: file not found.")
    nodes: list[Node] = []
    problems = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not match or int(match.group(2)) < 1:
            problems.append(f"{path}:{number}: expected `HOST slots=N` with N >= 1, got {raw.strip()!r}")
            continue
        host = match.group(1)
        if any(n.host == host for n in nodes):
            problems.append(f"{path}:{number}: host {host} is listed twice")
            continue
        nodes.append(Node(host, int(match.group(2))))
    if not nodes and not problems:
        problems.append(f"{path}: no hosts (expected lines like `node1 slots=8`)")
    if problems:
        raise FinetuneError("bad hostfile:\n" + "\n".join(f"  - {p}" for p in problems))
    return nodes


def hostfile_text(nodes: list[Node]) -> str:
    return "".join(f"{n.host} slots={n.slots}\n" for n in nodes)


def check_hosts(hosts: list[str], port: int = 22, timeout: float = 3.0) -> list[str]:
    """Hosts that do not accept a TCP connection on `port` within `timeout` seconds, each with the reason."""
    problems = []
    for host in hosts:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                pass
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            problems.append(f"{host}:{port} is unreachable ({reason})")
    return problems


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


def build_plan(args: argparse.Namespace) -> LaunchPlan:
    """Validate the recipe and the layout and decide every value the commands need."""
    from finetune.distributed.guards import join_timeout
    from finetune.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.hostfile:
        if args.nnodes is not None or args.nproc_per_node is not None:
            raise FinetuneError("--hostfile already gives the nodes and their slots: drop --nnodes / --nproc-per-node.")
        nodes = parse_hostfile(args.hostfile)
        main_address = args.main_address or nodes[0].host
    else:
        nnodes = args.nnodes or 1
        if nnodes < 1:
            raise FinetuneError(f"--nnodes must be at least 1, got {nnodes}.")
        main_address = args.main_address
        if main_address is None:
            if nnodes > 1 and not args.local_nodes and not args.slurm:
                raise FinetuneError("--nnodes > 1 needs --main-address: the address of node 0 as the other nodes reach it.")
            main_address = "127.0.0.1"
        nproc = args.nproc_per_node if args.nproc_per_node is not None else _default_nproc(args.device, recipe)
        if nproc < 1:
            raise FinetuneError(f"--nproc-per-node must be at least 1, got {nproc}.")
        # Without a hostfile the host names are labels (node 0 is the main address); only deepspeed's hostfile uses them.
        nodes = [Node(main_address if k == 0 else f"node{k}", nproc) for k in range(nnodes)]

    if args.launcher == "accelerate" and len({n.slots for n in nodes}) > 1:
        raise FinetuneError(
            "accelerate starts the same number of processes on every machine; the hostfile's slots differ "
            f"({', '.join(f'{n.host}={n.slots}' for n in nodes)}). Use equal slots, or --launcher torchrun / deepspeed."
        )
    if args.node_rank is not None and not 0 <= args.node_rank < len(nodes):
        raise FinetuneError(f"--node-rank {args.node_rank}: this job has nodes 0 to {len(nodes) - 1}.")

    use_cpu = _uses_cpu(args.device, recipe)
    if not use_cpu and (len(nodes) == 1 or args.local_nodes) and not args.hostfile:
        import torch

        from finetune.distributed.guards import check_one_process_per_gpu

        # Every node runs on this machine; a login node without GPUs (0 here) launches for others and is not checked.
        check_one_process_per_gpu(sum(n.slots for n in nodes), torch.cuda.device_count())
    plan = LaunchPlan(
        launcher=args.launcher,
        nodes=nodes,
        main_address=main_address,
        main_port=args.main_port,
        script=str(Path(args.script).resolve()) if args.script else str(RUN_SCRIPT),
        script_args=[args.recipe, *args.overrides],
        deepspeed_config=None,
        use_cpu=use_cpu,
        join_timeout=join_timeout(args.join_timeout),
        threads=args.threads,
        iface=args.iface,
        hostfile=str(Path(args.hostfile).resolve()) if args.hostfile else None,
    )
    # The same checks as training, for the device the nodes will use; not the data, which may live on the nodes only.
    from finetune.checks import check_recipe, recipe_warnings
    from finetune.runtime import resolve_runtime

    runtime = resolve_runtime(recipe, device="cpu" if use_cpu else "cuda")
    if not use_cpu and runtime.device != "cuda":  # launching GPU nodes from a machine without one (a login node)
        precision = "bf16" if recipe.train.precision == "auto" else recipe.train.precision
        runtime = replace(runtime, device="cuda", precision=precision, problems=())
    runtime = replace(runtime, world_size=plan.world_size)  # the job's processes, not this launching one
    check_recipe(recipe, runtime, source=args.recipe, data=False)
    plan.notes += recipe_warnings(recipe, runtime)
    if recipe.deepspeed:
        from finetune.distributed.zero import resolve_deepspeed_config

        plan.deepspeed_config = str(resolve_deepspeed_config(recipe.deepspeed))
    if plan.world_size == 1 and plan.nnodes == 1:
        plan.notes.append("one process in total: `finetune train RECIPE` does the same without a launcher.")
    return plan


def _uses_cpu(device: str, recipe) -> bool:
    if device == "auto":
        device = recipe.train.device
    if device == "auto":
        import torch

        return not torch.cuda.is_available()
    return device == "cpu"


def _default_nproc(device: str, recipe) -> int:
    """One process per visible GPU; one per node on CPU (pass --nproc-per-node for more)."""
    if _uses_cpu(device, recipe):
        return 1
    import torch

    return max(1, torch.cuda.device_count())


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------

# A node rank or address may be a shell variable in scripts (SLURM's "$SLURM_NODEID"); those stay unquoted-expandable.
_SHELL_VARIABLE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|\$\(\(.*\)\)|\$\([a-z]+\)")


def shell_join(argv: list[str]) -> str:
    """Quote for a POSIX shell, leaving `$VAR` and `$(( ... ))` values expandable (in double quotes)."""
    return " ".join(f'"{a}"' if _SHELL_VARIABLE.fullmatch(a) else shlex.quote(a) for a in argv)


def node_command(plan: LaunchPlan, node_rank: int | str, hostfile: str | None = None, main_address: str | None = None) -> list[str]:
    """The launcher command line for one node. `node_rank` / `main_address` may be shell variables in scripts."""
    address = main_address or plan.main_address
    build = {"accelerate": _accelerate, "torchrun": _torchrun, "deepspeed": _deepspeed}[plan.launcher]
    return build(plan, str(node_rank), address, hostfile or plan.hostfile or HOSTFILE_NAME)


def _accelerate(plan: LaunchPlan, node_rank: str, address: str, hostfile: str) -> list[str]:
    cmd = ["accelerate", "launch"]
    if plan.deepspeed_config:
        # accelerate refuses --use_deepspeed together with --cpu / --multi_gpu; on CPU it still starts
        # --num_processes processes (torchrun) and DeepSpeed uses its CPU accelerator.
        cmd += ["--use_deepspeed", "--deepspeed_config_file", plan.deepspeed_config]
    elif plan.world_size > 1:
        # --multi_gpu is accelerate's multi-process launcher (torchrun) on CPUs too: the trainer runs with
        # use_cpu and picks gloo. `--cpu --num_processes N` would start ONE process.
        cmd += ["--multi_gpu"]
    elif plan.use_cpu:
        cmd += ["--cpu"]
    cmd += ["--num_processes", str(plan.world_size), "--num_machines", str(plan.nnodes)]
    if plan.nnodes > 1:
        cmd += ["--machine_rank", node_rank, "--main_process_ip", address]
        if plan.deepspeed_config:
            # Otherwise accelerate hands a multi-machine DeepSpeed job to pdsh/ssh instead of torchrun.
            cmd += ["--deepspeed_multinode_launcher", "standard"]
    cmd += ["--main_process_port", str(plan.main_port)]
    if plan.world_size > 1:
        cmd += ["--rdzv_conf", f"timeout={_seconds(plan.join_timeout)}"]
    # Precision comes from the recipe (the Trainer's bf16/fp16 override accelerate's setting); stating
    # the defaults silences accelerate's "values were not passed" warning.
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    if "--cpu" in cmd and plan.world_size > 1:  # the one-process trap; kept impossible by the branches above
        raise AssertionError("accelerate --cpu with more than one process starts a single process")
    return cmd + [plan.script, *plan.script_args]


def _torchrun(plan: LaunchPlan, node_rank: str, address: str, hostfile: str) -> list[str]:
    node = plan.nodes[int(node_rank)] if node_rank.isdigit() else plan.nodes[0]
    return [
        "torchrun",
        "--nnodes", str(plan.nnodes),
        "--node-rank", node_rank,
        "--nproc-per-node", str(node.slots),
        "--master-addr", address,
        "--master-port", str(plan.main_port),
        # The static rendezvous is a TCPStore on node 0 that waits for every node's agent; `timeout` bounds it.
        "--rdzv-backend", "static",
        "--rdzv-conf", f"timeout={_seconds(plan.join_timeout)}",
        plan.script, *plan.script_args,
    ]  # fmt: skip


def _deepspeed(plan: LaunchPlan, node_rank: str, address: str, hostfile: str) -> list[str]:
    return [
        "deepspeed",
        "--hostfile", hostfile,
        # Each node is started by hand (or by srun), not over ssh/pdsh; --node_rank says which one this is.
        "--no_ssh", "--node_rank", node_rank,
        "--master_addr", address,
        "--master_port", str(plan.main_port),
        # LOCAL_RANK is in the environment; a --local_rank argument would reach the recipe's overrides.
        "--no_local_rank",
        plan.script, *plan.script_args,
    ]  # fmt: skip


def _seconds(value: float) -> int:
    return max(1, int(round(value)))


def node_environment(plan: LaunchPlan, node_rank: int | None, for_shell: bool) -> tuple[dict[str, str], list[str]]:
    """Variables exported before a node's command, with a line explaining each.

    For scripts that run on other machines (`for_shell`), OMP_NUM_THREADS is a shell expression over
    that machine's `nproc`; run here, it is computed from this machine's cores.
    """
    from finetune.distributed.guards import EXPECTED_WORLD_SIZE_ENV, JOIN_TIMEOUT_ENV, configure_threads_and_interfaces

    slots = plan.nodes[node_rank].slots if node_rank is not None else plan.nodes[0].slots
    env = {EXPECTED_WORLD_SIZE_ENV: str(plan.world_size), JOIN_TIMEOUT_ENV: f"{plan.join_timeout:g}"}
    notes = [f"{EXPECTED_WORLD_SIZE_ENV}={plan.world_size}: the trainer stops if it sees another world size."]
    threads_env, thread_notes = configure_threads_and_interfaces(
        slots, iface=plan.iface, threads=plan.threads, check_iface=not for_shell
    )
    if for_shell and plan.threads is None:
        per_process = "$(nproc)" if slots == 1 else f"$(( $(nproc) / {slots} > 0 ? $(nproc) / {slots} : 1 ))"
        threads_env["OMP_NUM_THREADS"] = per_process
        thread_notes[0] = f"OMP_NUM_THREADS: that machine's cores / {slots} local process(es), at least 1."
    env.update(threads_env)
    notes += thread_notes
    if plan.uses_deepspeed:
        default = str(DEFAULT_EXTENSIONS_DIR)
        env["TORCH_EXTENSIONS_DIR"] = f"${{TORCH_EXTENSIONS_DIR:-{default}}}" if for_shell else os.environ.get("TORCH_EXTENSIONS_DIR", default)
        notes.append("TORCH_EXTENSIONS_DIR: reuse DeepSpeed's compiled ops (scripts/build_deepspeed_ops.sh builds them once).")
    return env, notes


def _export_line(env: dict[str, str]) -> str:
    parts = []
    for key, value in env.items():
        expandable = value.startswith("$")
        parts.append(f'{key}="{value}"' if expandable else f"{key}={shlex.quote(value)}")
    return "export " + " ".join(parts)


def dry_run_text(plan: LaunchPlan) -> str:
    """Every node's commands, to copy to each machine (run them from the same folder, on a shared filesystem)."""
    lines = [f"# finetune launch: {plan.summary()}"]
    lines += [f"# note: {n}" for n in plan.notes]
    hostfile = plan.hostfile or HOSTFILE_NAME
    if plan.launcher == "deepspeed" and plan.hostfile is None:
        lines += ["", f"# every node needs the same hostfile ({hostfile}):", f"cat > {hostfile} <<'EOF'", hostfile_text(plan.nodes).rstrip(), "EOF"]
    env, notes = node_environment(plan, 0, for_shell=True)
    lines += [""] + [f"# {n}" for n in notes]
    for rank, node in enumerate(plan.nodes):
        env, _ = node_environment(plan, rank, for_shell=True)
        lines += ["", f"# node {rank} of {plan.nnodes} ({node.host}, {node.slots} process(es))", _export_line(env)]
        lines.append(shell_join(node_command(plan, rank, hostfile)))
    return "\n".join(lines) + "\n"


def slurm_script(plan: LaunchPlan, job_name: str = "finetune") -> str:
    """An sbatch script: one task per node runs that node's launcher command, node rank from $SLURM_NODEID."""
    env, notes = node_environment(plan, 0, for_shell=True)
    slots = plan.nodes[0].slots
    header = [
        "#!/bin/bash",
        f"# Generated by `finetune launch --slurm`: {replace(plan, main_address='$MAIN_ADDR').summary()}.",
        "# Add your cluster's partition, account and time limit (#SBATCH --partition=... --time=...).",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={plan.nnodes}",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --exclusive",
        f"#SBATCH --output={job_name}-%j.log",
    ]
    if not plan.use_cpu:
        header.append(f"#SBATCH --gpus-per-node={slots}")
    if len({n.slots for n in plan.nodes}) > 1:
        raise FinetuneError("--slurm needs the same number of processes on every node.")
    body = [
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        '# Node 0 of the allocation hosts the rendezvous.',
        'export MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
    ]
    hostfile = plan.hostfile
    if plan.launcher == "deepspeed" and hostfile is None:
        body += [
            f'export FINETUNE_HOSTFILE="{HOSTFILE_NAME}-$SLURM_JOB_ID"',
            f'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/$/ slots={slots}/" > "$FINETUNE_HOSTFILE"',
        ]
        hostfile = "$FINETUNE_HOSTFILE"
    node_script = f"{job_name}-node-$SLURM_JOB_ID.sh"
    command = shell_join(node_command(plan, "$SLURM_NODEID", hostfile=hostfile, main_address="$MAIN_ADDR"))
    body += [
        "# What every node runs; the quoted heredoc keeps $SLURM_NODEID for each node to expand.",
        f'cat > "{node_script}" <<\'NODE\'',
        "#!/bin/bash",
        "set -euo pipefail",
        *[f"# {n}" for n in notes],
        _export_line(env),
        f"exec {command}",
        "NODE",
        f'srun --nodes={plan.nnodes} --ntasks-per-node=1 --kill-on-bad-exit=1 bash "{node_script}"',
    ]
    return "\n".join(header + [""] + body) + "\n"


# --------------------------------------------------------------------------------------------
# Running here
# --------------------------------------------------------------------------------------------


def _local_argv(argv: list[str]) -> list[str]:
    """Resolve the launcher to the executable installed next to this Python (the active environment)."""
    name = argv[0]
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if not found:
        extra = " (pip install 'finetune-kit[deepspeed]')" if name == "deepspeed" else ""
        raise FinetuneError(f"`{name}` is not installed in this environment{extra}; choose another --launcher.")
    return [found, *argv[1:]]


def _start(argv: list[str], env_extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, **env_extra}
    # Its own session, so that stopping a node stops the launcher's worker processes with it.
    return subprocess.Popen(_local_argv(argv), env=env, start_new_session=True)


def _stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def _wait_all(processes: list[subprocess.Popen]) -> int:
    """Wait for every node; when one fails, stop the others (they would wait for it until their timeout)."""
    try:
        while True:
            codes = [p.poll() for p in processes]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                for p in processes:
                    _stop(p)
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    except KeyboardInterrupt:
        for p in processes:
            _stop(p)
        raise


def run_node(plan: LaunchPlan, node_rank: int) -> int:
    """Meet the other nodes, then run this node's command; returns its exit code."""
    from finetune.distributed.guards import wait_for_nodes

    env, notes = node_environment(plan, node_rank, for_shell=False)
    hostfile = plan.hostfile
    workdir = None
    if plan.launcher == "deepspeed" and hostfile is None:
        workdir = tempfile.mkdtemp(prefix="finetune-launch-")
        hostfile = str(Path(workdir) / HOSTFILE_NAME)
        Path(hostfile).write_text(hostfile_text(plan.nodes))
    argv = node_command(plan, node_rank, hostfile)
    print(f"finetune launch: node {node_rank}: {plan.summary()}", flush=True)
    for note in plan.notes + notes:
        print(f"  {note}", flush=True)
    try:
        if plan.nnodes > 1:
            wait_for_nodes(plan.main_address, plan.main_port, node_rank, plan.nnodes, plan.join_timeout)
            print(f"finetune launch: all {plan.nnodes} nodes are up", flush=True)
        print("+ " + shell_join(argv), flush=True)
        return _wait_all([_start(argv, env)])
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def run_local_nodes(plan: LaunchPlan) -> int:
    """Every node of the plan as processes of this machine (to test multi-node commands on one host)."""
    from finetune.distributed.guards import configure_threads_and_interfaces

    # All nodes share this machine's cores.
    threads_env, _ = configure_threads_and_interfaces(plan.world_size, iface=plan.iface, threads=plan.threads)
    workdir = tempfile.mkdtemp(prefix="finetune-launch-")
    hostfile = plan.hostfile
    if plan.launcher == "deepspeed" and hostfile is None:
        hostfile = str(Path(workdir) / HOSTFILE_NAME)
        Path(hostfile).write_text(hostfile_text(plan.nodes))
    print(f"finetune launch: all nodes on this machine: {plan.summary()}", flush=True)
    processes = []
    try:
        for rank in range(plan.nnodes):
            env, _ = node_environment(plan, rank, for_shell=False)
            env.update(threads_env)
            argv = node_command(plan, rank, hostfile)
            print(f"+ [node {rank}] " + shell_join(argv), flush=True)
            processes.append(_start(argv, env))
        return _wait_all(processes)
    finally:
        for p in processes:
            _stop(p)
        shutil.rmtree(workdir, ignore_errors=True)
