"""What every benchmark shares: an offline environment, child processes measured one by one (wall time and their
own peak RSS), the machine's fp32 matmul rate, and the output (a markdown table on stdout, the figures as JSON).

Benchmarks run their variants interleaved (round 1: A, B, C; round 2: A, B, C ...) in one invocation, so a ratio
between two variants holds on a shared, noisy machine even when the absolute figures drift.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune.notices import quiet_library_notices

# Every benchmark script and child process imports this module first: libraries' import-time notices (bitsandbytes'
# kernels-community line) are dropped as in the `finetune` commands. It imports `logging` only, so a measuring
# parent stays small.
quiet_library_notices()

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
BENCH_PREFIX = "BENCH "  # a child prints `BENCH {json}` on a line of its own with what it measured


def offline_env(**extra: str) -> dict:
    """This environment, offline (no hub), with `extra` variables set."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class Measured:
    """One child process: exit status, wall time, its peak RSS (its own and its waited-for children's), output."""

    returncode: int
    wall_s: float
    peak_rss_mb: float
    stdout: str
    stderr: str
    report: dict = field(default_factory=dict)  # the child's `BENCH {json}` line, if it printed one

    def check(self, what: str) -> Measured:
        if self.returncode != 0:
            sys.stderr.write(self.stdout[-3000:] + self.stderr[-6000:])
            raise SystemExit(f"{what} failed (exit {self.returncode})")
        return self


def run_measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None, timeout: float | None = None) -> Measured:
    """Run `cmd` and measure it. Peak RSS comes from `wait4`'s rusage of this one child, which Linux reports as the
    largest of the child and the descendants it waited for (so a launcher's training process counts). It counts
    this process's RSS at the fork too (exec keeps the high-water mark): measure from a parent that has not imported
    torch, or every child reads at least as large as it."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd, text=True)
        deadline = None if timeout is None else start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    report = next((json.loads(line[len(BENCH_PREFIX):]) for line in reversed(stdout.splitlines()) if line.startswith(BENCH_PREFIX)), {})
    return Measured(proc.returncode, wall, usage.ru_maxrss / 1024, stdout, stderr, report)


def matmul_gflops(threads: int, n: int = 2048, repeats: int = 7) -> float:
    """This machine's fp32 matrix-multiply rate on `threads` threads (best of `repeats` n×n products), in GFLOP/s;
    the peak that MFU is a fraction of. Run in a child so its threads do not change the caller's."""
    code = (
        "import time, torch\n"
        f"torch.set_num_threads({threads}); torch.manual_seed(0)\n"
        f"a, b = torch.randn({n}, {n}), torch.randn({n}, {n}); a @ b\n"
        "best = float('inf')\n"
        f"for _ in range({repeats}):\n"
        "    t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)\n"
        f"print({2 * n**3} / best / 1e9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=offline_env(OMP_NUM_THREADS=threads), check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """What the figures were measured on. Torch's version comes from its metadata, not an import: the measuring
    process must stay small, since a child's peak RSS (from `wait4`) starts at its parent's (exec keeps the mark)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = None
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu or platform.processor(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch_version,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_table(headers: list[str], rows: list[list]) -> str:
    """A markdown table of `rows` (already formatted cells), printed and returned."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_results(name: str, payload: dict, path: Path | None = None) -> Path:
    """The figures as JSON: `path`, else `benchmarks/results/<name>.json` (git-ignored)."""
    path = path or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nfigures: {path}", flush=True)
    return path


def chatterbot_conversations() -> list[list[str]]:
    """chatterbot-corpus' English conversations, each as its lines (stripped strings), in file order; the package
    is located without importing it, as scripts/build_demo_data.py does."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("chatterbot-corpus is not installed: pip install --no-deps chatterbot-corpus")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "english"
    return [
        [str(u).strip() for u in dialog if isinstance(u, (str, int, float))]
        for path in sorted(folder.glob("*.yml"))
        for dialog in yaml.safe_load(path.read_text()).get("conversations") or []
    ]


def finetune_cli() -> list[str]:
    """The `finetune` command of this checkout's environment."""
    exe = Path(sys.executable).parent / "finetune"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "finetune.cli"]
