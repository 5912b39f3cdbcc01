"""Multi-process and multi-node plumbing that fails loudly: world-size checks, bounded joins, threads, interfaces.

Three ways a distributed run goes wrong without saying so, and the guard for each:

- A launcher quietly starts fewer processes than asked (`accelerate launch --cpu --num_processes 2` starts
  one): `check_world_size` compares the world this process sees with what `finetune launch` asked for.
- A node never shows up and everyone waits forever: the first process of torchrun/accelerate blocks in the
  static rendezvous (a c10d TCPStore waiting for every node's agent, 600 s by default), and without an agent
  (the `deepspeed` launcher) rank 0 blocks in `init_process_group` (30 minutes by default). `wait_for_nodes`
  (run by `finetune launch` before the launcher) and `join_process_group` (run by the trainer) bound both
  waits by FINETUNE_JOIN_TIMEOUT and say which node is missing and what to check.
- Every local process uses every core, or gloo binds to an interface the other nodes cannot reach:
  `configure_threads_and_interfaces` sets OMP_NUM_THREADS and GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

from finetune.errors import FinetuneError

EXPECTED_WORLD_SIZE_ENV = "FINETUNE_EXPECTED_WORLD_SIZE"
JOIN_TIMEOUT_ENV = "FINETUNE_JOIN_TIMEOUT"
DEFAULT_JOIN_TIMEOUT = 300.0
# Timeout of collectives once everyone has joined; the same default as TrainingArguments.ddp_timeout, so a
# rank saving a large checkpoint while the others wait in a barrier is not mistaken for a dead node.
DEFAULT_COLLECTIVE_TIMEOUT = 1800.0
_POLL_SECONDS = 0.2

KNOWN_TRAPS = (
    "`accelerate launch --cpu --num_processes N` starts ONE process (accelerate's --cpu path has no "
    "multi-process launcher); on CPU use `accelerate launch --multi_gpu --num_processes N` (torchrun; the "
    "trainer then uses gloo) or `--use_deepspeed`, as `finetune launch` generates",
    "`accelerate launch --num_processes N` without --multi_gpu on a machine with fewer than 2 GPUs also starts one process",
    "multi-machine `accelerate launch --use_deepspeed` without `--deepspeed_multinode_launcher standard` hands "
    "the job to DeepSpeed's pdsh/ssh launcher instead of joining the machines with torchrun",
    "`deepspeed --hostfile` started by hand on each node needs `--no_ssh --node_rank K` (and the same hostfile everywhere)",
    "`python finetune/run.py` runs a single process: use a launcher for more",
)


# --------------------------------------------------------------------------------------------
# World size
# --------------------------------------------------------------------------------------------


def world_size() -> int:
    """Processes in this job: torch.distributed's world once initialized, else the launcher's WORLD_SIZE (1 if unset)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def expected_world_size() -> int | None:
    """The world size `finetune launch` asked for (FINETUNE_EXPECTED_WORLD_SIZE), or None when not launched by it."""
    raw = os.environ.get(EXPECTED_WORLD_SIZE_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise FinetuneError(f"{EXPECTED_WORLD_SIZE_ENV}={raw!r}: expected a positive integer (the number of processes of the job).")
    return int(raw)


def check_world_size(expected: int | None = None, actual: int | None = None) -> int:
    """Fail unless this process sees the world the launch asked for; returns the world size.

    `expected` defaults to FINETUNE_EXPECTED_WORLD_SIZE (nothing to check when neither is given); `actual`
    defaults to `world_size()`. Call it again with the Trainer's `args.world_size` to also catch a script
    that ignores the launcher's environment.
    """
    if expected is None:
        expected = expected_world_size()
    if actual is None:
        actual = world_size()
    if expected is None or expected == actual:
        return actual
    fewer = actual < expected
    effect = (
        "each process would train alone on all the data, and the run would look fine"
        if fewer
        else "more processes than planned joined (another job on the same port?)"
    )
    traps = "\n".join(f"  - {t}" for t in KNOWN_TRAPS) if fewer else ""
    raise FinetuneError(
        f"this process sees a world of {actual} process(es), but the launch asked for {expected} "
        f"({EXPECTED_WORLD_SIZE_ENV}); {effect}.\n"
        + (f"Known causes:\n{traps}\n" if traps else "")
        + "Print the commands with `finetune launch RECIPE --dry-run ...` and run those."
    )


# --------------------------------------------------------------------------------------------
# Bounded joins
# --------------------------------------------------------------------------------------------


def join_timeout(value: float | str | None = None) -> float:
    """Seconds to wait for every node/process to join: `value`, else FINETUNE_JOIN_TIMEOUT, else 300."""
    raw = value if value is not None else os.environ.get(JOIN_TIMEOUT_ENV)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return DEFAULT_JOIN_TIMEOUT
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        seconds = -1.0
    if seconds <= 0:
        raise FinetuneError(f"{JOIN_TIMEOUT_ENV} / --join-timeout: expected a positive number of seconds, got {raw!r}.")
    return seconds


def _what_to_check(address: str, port: int | str, timeout: float) -> str:
    return (
        f"Check that the command for every node was started (`finetune launch ... --node-rank K` on each host), "
        f"that {address}:{port} is node 0's address as the other nodes see it and that the port is open between "
        f"the hosts (firewall), and on hosts with several network interfaces pass --iface (sets GLOO_SOCKET_IFNAME/"
        f"NCCL_SOCKET_IFNAME). Waited {timeout:g} s; change it with --join-timeout or {JOIN_TIMEOUT_ENV}."
    )


def _store(address: str, port: int, is_server: bool, timeout: float):
    from torch.distributed import TCPStore

    # No wait_for_workers: the server counts arrivals itself so that it can name the nodes that are missing.
    return TCPStore(address, port, is_master=is_server, timeout=timedelta(seconds=timeout), wait_for_workers=False)


def wait_for_nodes(address: str, port: int, node_rank: int, nnodes: int, timeout: float | None = None) -> None:
    """Before any launcher starts: meet the other nodes on node 0's address and port, or fail naming the missing ones.

    Node 0 serves a small TCPStore on the job's main port; the others connect and check in. The store is
    closed again before the real launcher binds the same port (the launcher's clients retry until it does).
    """
    if nnodes <= 1:
        return
    timeout = join_timeout(timeout)
    deadline = time.monotonic() + timeout
    prefix = "finetune/preflight"
    is_server = node_rank == 0
    if not is_server:
        error = _wait_for_port(address, port, deadline)
        if error:
            raise FinetuneError(
                f"node {node_rank} of {nnodes}: node 0 at {address}:{port} did not answer within {timeout:g} s "
                f"({error}). " + _what_to_check(address, port, timeout)
            )
    try:
        store = _store(address, port, is_server, max(1.0, deadline - time.monotonic()))
    except Exception as exc:  # DistNetworkError / RuntimeError from c10d, with the socket error in the text
        if is_server:
            raise FinetuneError(
                f"node 0 cannot listen on port {port}: {_first_line(exc)}. Another job may hold it: choose --main-port."
            ) from None
        raise FinetuneError(f"node {node_rank} of {nnodes}: cannot talk to node 0 at {address}:{port} ({_first_line(exc)}).") from None
    try:
        store.set(f"{prefix}/node{node_rank}", socket.gethostname())
        if is_server:
            keys = [f"{prefix}/node{k}" for k in range(nnodes)]
            missing = _wait_for_keys(store, keys, deadline)
            if missing:
                ranks = [int(k.rsplit("node", 1)[1]) for k in missing]
                store.set(f"{prefix}/abort", ",".join(map(str, ranks)))
                joined = nnodes - len(ranks)
                if joined > 1:
                    time.sleep(1.0)  # let the nodes that did join read "abort" before the store closes
                raise FinetuneError(
                    f"node{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {nnodes} did not join within "
                    f"{timeout:g} s ({joined}/{nnodes} nodes joined). " + _what_to_check(address, port, timeout)
                )
            store.set(f"{prefix}/go", "1")
            # Keep serving until every node has read "go": closing first would break their last read.
            _wait_for_keys(store, [f"{prefix}/ack{k}" for k in range(1, nnodes)], time.monotonic() + min(timeout, 30.0))
        else:
            found = _wait_for_any(store, [f"{prefix}/go", f"{prefix}/abort"], deadline)
            if found == f"{prefix}/abort":
                missing = store.get(f"{prefix}/abort").decode()
                raise FinetuneError(f"node {node_rank} of {nnodes}: node 0 gave up waiting for node(s) {missing}. " + _what_to_check(address, port, timeout))
            if found is None:
                raise FinetuneError(f"node {node_rank} of {nnodes}: node 0 did not confirm within {timeout:g} s. " + _what_to_check(address, port, timeout))
            store.set(f"{prefix}/ack{node_rank}", "1")
    except FinetuneError:
        raise
    except Exception as exc:  # the server went away under us (node 0 failed or was stopped)
        raise FinetuneError(f"node {node_rank} of {nnodes}: lost the connection to node 0 at {address}:{port} ({_first_line(exc)}).") from None
    finally:
        del store


def _wait_for_port(address: str, port: int, deadline: float) -> str | None:
    """Poll until `address:port` accepts a TCP connection; None when it does, else the last socket error.

    c10d's own client retries with a growing delay and may overrun its timeout by twice the value (and logs
    a C++ stack trace per attempt), so the wait for a server that is not up yet is done here.
    """
    error = "no attempt made"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return error
        try:
            with socket.create_connection((address, int(port)), timeout=min(2.0, remaining)):
                return None
        except OSError as exc:
            error = exc.strerror or str(exc) or type(exc).__name__
        time.sleep(min(_POLL_SECONDS * 2.5, max(0.0, deadline - time.monotonic())))


def _wait_for_keys(store, keys: list[str], deadline: float) -> list[str]:
    """Poll until every key exists or the deadline passes; returns the keys still missing."""
    while True:
        missing = [k for k in keys if not store.check([k])]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(_POLL_SECONDS)


def _wait_for_any(store, keys: list[str], deadline: float) -> str | None:
    while time.monotonic() < deadline:
        for key in keys:
            if store.check([key]):
                return key
        time.sleep(_POLL_SECONDS)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_one_process_per_gpu(processes: int, gpus: int) -> None:
    """NCCL takes one process per GPU: more local processes than GPUs fail inside NCCL ("Duplicate GPU detected")
    or CUDA ("invalid device ordinal") only once every rank has started; say so before anything starts."""
    if gpus >= 1 and processes > gpus:
        raise FinetuneError(
            f"{processes} processes per node on CUDA, but this machine has {gpus} GPU{'s' if gpus > 1 else ''}: NCCL runs "
            f"one process per GPU (two on one GPU fail with 'Duplicate GPU detected'). Use --nproc-per-node {gpus} or "
            "fewer, or --device cpu for more processes than GPUs."
        )


def join_process_group(
    backend: str | None = None, timeout: float | None = None, collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT
) -> bool:
    """Initialize torch.distributed for a launched job, failing within `timeout` if a rank never arrives.

    Returns False for a single process (nothing to join) and True once the process group exists. Call it
    before the Trainer: accelerate and DeepSpeed reuse an initialized process group. `timeout` (default
    FINETUNE_JOIN_TIMEOUT) bounds only the join; collectives keep `collective_timeout`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise FinetuneError(
            f"WORLD_SIZE={world} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
            "start the job with a launcher (see `finetune launch --help`)."
        )
    rank = int(os.environ["RANK"])
    address, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    timeout = join_timeout(timeout)
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        check_one_process_per_gpu(int(os.environ.get("LOCAL_WORLD_SIZE", world) or world), torch.cuda.device_count())
    deadline = time.monotonic() + timeout
    where = f"rank {rank} of {world}"
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if agent_store or rank != 0:
        error = _wait_for_port(address, int(port), deadline)
        if error:
            raise FinetuneError(f"{where}: the store at {address}:{port} did not answer ({error}). " + _what_to_check(address, port, timeout))
    try:
        # env:// either connects to the launcher's agent store (torchrun, accelerate) or, without an agent
        # (the deepspeed launcher), makes rank 0 serve the store and wait for every rank's connection.
        store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timedelta(seconds=max(1.0, deadline - time.monotonic()))))
    except Exception as exc:
        raise FinetuneError(f"{where}: not every process joined ({_first_line(exc)}). " + _what_to_check(address, port, timeout)) from None
    try:
        store.set(f"finetune/joined/{rank}", socket.gethostname())
        absent = _wait_for_keys(store, [f"finetune/joined/{r}" for r in range(world)], deadline)
    except Exception as exc:
        raise FinetuneError(f"{where}: lost the connection to rank 0 at {address}:{port} while waiting for the others ({_first_line(exc)}).") from None
    if absent:
        ranks = [k.rsplit("/", 1)[1] for k in absent]
        raise FinetuneError(
            f"{where}: rank{'s' if len(ranks) > 1 else ''} {', '.join(ranks)} did not join within {timeout:g} s. "
            + _what_to_check(address, port, timeout)
        )
    store.set_timeout(timedelta(seconds=collective_timeout))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=collective_timeout))
    return True


# --------------------------------------------------------------------------------------------
# Threads and network interfaces
# --------------------------------------------------------------------------------------------


def network_interfaces() -> list[str]:
    """Names of this machine's network interfaces (Linux)."""
    net = Path("/sys/class/net")
    return sorted(p.name for p in net.iterdir()) if net.is_dir() else []


def configure_threads_and_interfaces(
    local_processes: int,
    iface: str | None = None,
    threads: int | None = None,
    cores: int | None = None,
    check_iface: bool = True,
) -> tuple[dict[str, str], list[str]]:
    """Environment for the processes of one node, and a line explaining each value.

    OMP_NUM_THREADS is `threads`, else this machine's usable cores divided among its local processes (at
    least 1): without it every process starts a thread per core and they slow each other down. `iface`
    becomes GLOO_SOCKET_IFNAME (CPU, gloo) and NCCL_SOCKET_IFNAME (GPU, NCCL): both libraries otherwise
    pick the interface of the hostname, which on multi-homed hosts may not reach the other nodes.
    `check_iface` verifies the interface exists here (off when writing commands for other machines).
    """
    from finetune.runtime import available_cores

    if local_processes < 1:
        raise FinetuneError(f"--nproc-per-node must be at least 1, got {local_processes}.")
    env: dict[str, str] = {}
    notes: list[str] = []
    if threads is not None:
        if threads < 1:
            raise FinetuneError(f"--threads must be at least 1, got {threads}.")
        env["OMP_NUM_THREADS"] = str(threads)
        notes.append(f"OMP_NUM_THREADS={threads}: as asked (--threads).")
    else:
        cores = cores or available_cores()
        per_process = max(1, cores // local_processes)
        env["OMP_NUM_THREADS"] = str(per_process)
        notes.append(
            f"OMP_NUM_THREADS={per_process}: {cores} usable core(s) / {local_processes} local process(es), "
            "so the processes do not fight over cores."
        )
    if iface:
        if check_iface:
            found = network_interfaces()
            if found and iface not in found:
                raise FinetuneError(f"--iface {iface}: no such network interface here; this machine has {', '.join(found)}.")
        env["GLOO_SOCKET_IFNAME"] = iface
        env["NCCL_SOCKET_IFNAME"] = iface
        notes.append(
            f"GLOO_SOCKET_IFNAME={iface}, NCCL_SOCKET_IFNAME={iface}: gloo (CPU) and NCCL (GPU) talk over {iface} "
            "instead of the interface their hostname resolves to."
        )
    return env, notes
