"""Start-up: wall time of `finetune --help`, `finetune train --help` and `finetune validate`, each a fresh process.
Target: `finetune --help` under 1 s.

    .venv/bin/python -m benchmarks.startup [--rounds 5] [--data] [--out results.json]

Commands run interleaved (round 1: every command, round 2: every command ...), and the table gives each one's median
and range. `python -c pass` is the floor no command can go under. `--data` adds `finetune validate --data`, which
loads the base tokenizer and reads every row of the recipe's data (seconds, not a start-up figure).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.common import (
    REPO, finetune_cli, fmt, machine, median, offline_env, print_table, run_measured, write_results,
)

RECIPE = "recipes/llama_lora.yaml"


def commands(with_data: bool) -> dict[str, list[str]]:
    cli = finetune_cli()
    out = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "finetune --help": [*cli, "--help"],
        "finetune train --help": [*cli, "train", "--help"],
        f"finetune validate {RECIPE}": [*cli, "validate", RECIPE],
    }
    if with_data:
        out[f"finetune validate --data {RECIPE}"] = [*cli, "validate", "--data", RECIPE]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data", action="store_true", help="also time `finetune validate --data`")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/startup.json)")
    args = parser.parse_args(argv)

    info = machine()
    print(f"Start-up, {args.rounds} round(s); {info['cpu']}, {info['cores']} cores, "
          f"load average {info['load_average_at_start']:.2f}\n", flush=True)
    todo = commands(args.data)
    runs: list[dict] = []
    for round_ in range(1, args.rounds + 1):
        for name, cmd in todo.items():
            m = run_measured(cmd, env=offline_env(), cwd=REPO, timeout=300).check(name)
            runs.append({"round": round_, "command": name, "wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb})

    rows, summary = [], {}
    for name in todo:
        walls = [r["wall_s"] for r in runs if r["command"] == name]
        rss = median([r["peak_rss_mb"] for r in runs if r["command"] == name])
        summary[name] = {"median_s": median(walls), "min_s": min(walls), "max_s": max(walls), "peak_rss_mb": rss}
        rows.append([f"`{name}`", fmt(median(walls), 2), f"{min(walls):.2f}-{max(walls):.2f}", fmt(rss, 0)])
    print_table(["command", "median s", "range s", "peak RSS MB"], rows)
    help_s = summary["finetune --help"]["median_s"]
    print(f"\n`finetune --help`: {help_s:.2f} s (target < 1 s): {'met' if help_s < 1 else 'NOT met'}")
    write_results("startup", {"machine": info, "rounds": args.rounds, "summary": summary, "runs": runs}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
