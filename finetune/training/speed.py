"""Model FLOPs utilisation: the FLOPs a run's trained tokens cost, per second, as a fraction of the matrix-multiply
rate this device reaches in the run's dtype, measured here (no vendor table of peak rates would know a shared CPU)."""

from __future__ import annotations

import time


def matmul_flops_per_second(device: str, dtype_name: str, n: int = 2048, repeats: int = 5) -> float:
    """The best rate of `repeats` n x n matrix products on `device` in `dtype_name`, with the threads the run uses."""
    import torch

    from finetune.dtypes import torch_dtype

    dtype = torch_dtype(dtype_name)
    target = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    generator = torch.Generator(device=target).manual_seed(0)
    a = torch.randn(n, n, device=target, dtype=dtype, generator=generator)
    b = torch.randn(n, n, device=target, dtype=dtype, generator=generator)
    sync = torch.cuda.synchronize if target.type == "cuda" else (lambda: None)
    a @ b  # warm-up: allocations and the kernel's choice are not counted
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def model_flops_utilization(flops_per_token: float, tokens_per_second: float, peak_per_process: float, processes: int) -> float:
    """Achieved model FLOPs per second over the peak of all the processes' devices."""
    return flops_per_token * tokens_per_second / (peak_per_process * processes)
