"""`finetune launch RECIPE ...`: one recipe on several processes or machines (accelerate, torchrun, deepspeed; SLURM)."""

from __future__ import annotations

import argparse
from pathlib import Path

from finetune.commands.common import recipe_key_help
from finetune.launcher import DEFAULT_PORT, LAUNCHERS, build_plan, check_hosts, dry_run_text, run_local_nodes, run_node, slurm_script
from finetune.errors import FinetuneError

HELP = "Run a recipe on several processes or machines (accelerate, torchrun, deepspeed; SLURM)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="Path to a YAML recipe.")
    parser.add_argument(
        "overrides", nargs="*", default=[], metavar="key.path=value",
        help="Recipe overrides, as for `finetune train`; before, between or after the options.",
    )
    parser.add_argument("--launcher", choices=LAUNCHERS, default="accelerate", help="Process launcher (default: accelerate).")
    where = parser.add_argument_group("nodes")
    where.add_argument("--hostfile", help="DeepSpeed-style hostfile, `HOST slots=N` per line; the first host is node 0.")
    where.add_argument("--nnodes", type=int, help="Number of machines (instead of --hostfile; default 1).")
    where.add_argument("--main-address", help="Address of node 0 as the other nodes reach it (default: the hostfile's first host).")
    where.add_argument("--main-port", type=int, default=DEFAULT_PORT, help=f"Rendezvous port on node 0 (default {DEFAULT_PORT}).")
    where.add_argument("--nproc-per-node", type=int, help="Processes per machine (default: visible GPUs, or 1 on CPU).")
    where.add_argument("--node-rank", type=int, help="Which node this machine is (0 .. N-1): run its command here.")
    what = parser.add_argument_group("what to do")
    what.add_argument("--dry-run", action="store_true", help="Print every node's commands and exit.")
    what.add_argument("--slurm", metavar="FILE", help="Write an sbatch script for the job to FILE (`-` prints it).")
    what.add_argument("--local-nodes", action="store_true", help="Run every node on this machine (tests the multi-node setup).")
    what.add_argument("--check-hosts", action="store_true", help="First check that every host answers on its SSH port (TCP 22, 3 s).")
    tune = parser.add_argument_group("environment")
    tune.add_argument("--iface", help="Network interface for gloo/NCCL traffic (sets GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME).")
    tune.add_argument("--threads", type=int, help="OMP_NUM_THREADS per process (default: cores / local processes).")
    tune.add_argument(
        "--join-timeout", type=float, help="Seconds to wait for every node before failing (default: $FINETUNE_JOIN_TIMEOUT or 300)."
    )
    tune.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help=recipe_key_help("train.device", lead="Device of the nodes. ")
    )
    tune.add_argument("--script", help=argparse.SUPPRESS)  # another training script with the same plumbing (tests use it)


def run(args: argparse.Namespace) -> int:
    plan = build_plan(args)
    if args.check_hosts:
        problems = check_hosts([n.host for n in plan.nodes] if args.hostfile else [plan.main_address])
        if problems:
            raise FinetuneError("host check failed:\n" + "\n".join(f"  - {p}" for p in problems))
    if args.slurm:
        text = slurm_script(plan)
        if args.slurm == "-":
            print(text, end="")
        else:
            Path(args.slurm).write_text(text)
            print(f"wrote {args.slurm}: submit it with `sbatch {args.slurm}`")
        return 0
    if args.dry_run:
        print(dry_run_text(plan), end="")
        return 0
    if args.local_nodes:
        return run_local_nodes(plan)
    if args.node_rank is None:
        if plan.nnodes > 1:
            raise FinetuneError(
                f"which node is this machine? Pass --node-rank K (0 .. {plan.nnodes - 1}) on each machine, "
                "--dry-run to print every node's command, or --local-nodes to run them all here."
            )
        args.node_rank = 0
    return run_node(plan, args.node_rank)
