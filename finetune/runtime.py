"""Device, precision and CPU threads: decided once, explicitly, and printed in the plan."""

from __future__ import annotations

import glob
import logging
import os
import sys
from dataclasses import dataclass

from finetune.dtypes import torch_dtype
from finetune.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    device: str  # "cpu" or "cuda"
    precision: str  # "fp32" | "bf16" | "fp16"
    num_threads: int
    world_size: int
    local_world_size: int
    rank: int
    threads_note: str = ""
    precision_note: str = ""
    problems: tuple[str, ...] = ()  # device/precision choices this machine cannot run; see finetune.checks

    @property
    def torch_dtype(self):
        return torch_dtype(self.precision)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def available_cores() -> int:
    """Cores this process may run on (cgroup/affinity aware), not the host's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cuda_available() -> bool:
    """`torch.cuda.is_available()`, answered without importing torch (2 s of `finetune validate`) on a Linux machine
    with no GPU device files: torch reaches a GPU only through those of NVIDIA's driver, ROCm's or WSL's."""
    if sys.platform == "linux" and not any(glob.glob(pattern) for pattern in ("/dev/nvidia*", "/dev/kfd", "/dev/dxg")):
        return False
    import torch

    return torch.cuda.is_available()


def resolve_runtime(recipe: Recipe, device: str | None = None) -> Runtime:
    """Device, precision and threads for `recipe` here (`device` overrides `train.device`, as `finetune launch
    --device` does). What cannot run here is collected in `problems`, not raised, so all are reported at once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    rank = int(os.environ.get("RANK", "0"))
    train = recipe.train

    problems = []
    wanted = device or train.device
    has_cuda = cuda_available()
    if wanted == "cuda" and not has_cuda:
        problems.append("train.device: cuda, but no CUDA GPU is visible. Use train.device: auto or cpu.")
    device = "cuda" if (wanted == "auto" and has_cuda) or (wanted == "cuda" and has_cuda) else "cpu"

    precision, precision_note = train.precision, ""
    if precision == "auto":
        if device == "cuda":
            precision = "bf16" if _bf16_gpu() else "fp16"
        else:
            # bf16 autocast on CPUs is emulated unless the matmul kernels use AMX; measured 2x slower than fp32
            # on AVX-512 machines here, so fp32 is the default and bf16 stays an explicit choice.
            precision = "fp32"
            precision_note = "CPU: fp32 (bf16 is slower on CPUs without AMX; set train.precision: bf16 to force it)"
    if device == "cpu" and precision == "fp16":
        problems.append("train.precision: fp16 needs a GPU (fp16 mixed precision is not supported on CPU); use fp32 or bf16.")
    if device == "cuda" and precision == "bf16" and not _bf16_gpu():
        problems.append("train.precision: bf16, but this GPU does not support bf16; use fp16 or auto.")

    threads, note = _threads(train.num_threads, local_world)
    if device == "cpu" and not train.num_threads:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if load > available_cores():
            # Measured here: with the cores busy, 2 threads ran 5-7x slower than 1 (threads wait on each other).
            note += f"; machine busy (load {load:.1f} on {available_cores()} cores): fewer threads may be faster"
    return Runtime(device, precision, threads, world, local_world, rank, note, precision_note, tuple(problems))


def _bf16_gpu() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


def _threads(requested: int | None, local_world: int) -> tuple[int, str]:
    """Threads per process. accelerate sets OMP_NUM_THREADS=1 on CPU when nobody asked, halving speed on 2 cores."""
    fair = max(1, available_cores() // max(1, local_world))
    if requested:
        return requested, "train.num_threads"
    env = os.environ.get("OMP_NUM_THREADS")
    launched_by_accelerate = any(k.startswith("ACCELERATE_") for k in os.environ)
    # `finetune launch` sets OMP_NUM_THREADS itself (it knows how many nodes share a machine); trust it.
    chosen_by_finetune_launch = "FINETUNE_EXPECTED_WORLD_SIZE" in os.environ
    if env and env.isdigit() and int(env) > 0:
        if launched_by_accelerate and not chosen_by_finetune_launch and int(env) == 1 and fair > 1:
            return fair, f"accelerate set OMP_NUM_THREADS=1; using {fair} (pin with train.num_threads)"
        return int(env), "OMP_NUM_THREADS"
    return fair, f"{available_cores()} cores / {local_world} local process(es)"


def apply_threads(runtime: Runtime) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(runtime.num_threads)
    torch.set_num_threads(runtime.num_threads)
