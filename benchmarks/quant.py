"""Peak RSS and speed of LoRA vs 8-bit LoRA vs QLoRA (4-bit) SFT, side by side in one invocation.

    .venv/bin/python -m benchmarks.quant                                  # recipes/llama_lora.yaml (SmolLM2-135M), 20 steps
    .venv/bin/python -m benchmarks.quant --steps 15 train.num_threads=1   # the figures in docs/quantization_benchmark.txt
    .venv/bin/python -m benchmarks.quant --steps 2 --rounds 1             # quick

Each variant trains in its own child process (so peak RSS is its own) with the same data, steps and threads; the
variants alternate round by round and the table gives medians. The machine may be shared: compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.common import BENCH_PREFIX, REPO, fmt, machine, median, offline_env, print_table, run_measured, write_results

VARIANTS = {
    "LoRA (fp32 base)": [],
    "LoRA on 8-bit base": ["quantization.bits=8", "adapter.type=lora"],
    "QLoRA (4-bit NF4 base)": ["adapter.type=qlora", "quantization.bits=4"],
}


def train(recipe_path: str, overrides: list[str]) -> dict:
    """The child: one training run through the kit's runner; what it measured."""
    from finetune.recipe import load_recipe
    from finetune.runner import run

    result = run(load_recipe(recipe_path, overrides))
    summary, plan = result.metrics["summary"], result.metrics["plan"]
    return {
        "steps_per_second": summary.get("train_steps_per_second"),
        "tokens_per_second": summary.get("tokens_per_second"),
        "train_runtime_s": summary.get("train_runtime"),
        "weight_mb": plan["weight_mb"],
        "weight_mb_unquantized": plan["weight_mb_unquantized"],
        "last_loss": result.metrics["last_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "llama_lora.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, help="JSON figures (default benchmarks/results/quant.json).")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra key.path=value overrides for every variant")
    args = parser.parse_args()

    if args.child:
        print(BENCH_PREFIX + json.dumps(train(args.recipe, args.overrides)))
        return

    info = machine()
    common = [f"train.max_steps={args.steps}", "data.eval=null", "train.save_checkpoints=false", "eval.prompts=[]",
              "output.overwrite=true", *args.overrides]  # fmt: skip
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        for n in range(args.rounds):
            for name, overrides in VARIANTS.items():
                print(f"round {n + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                out = f"output.dir={Path(tmp) / name.split()[0]}"
                command = [sys.executable, "-m", "benchmarks.quant", "--child", "--recipe", args.recipe, "--", *common, *overrides, out]
                m = run_measured(command, env=offline_env(), cwd=REPO).check(name)
                runs.append({"round": n + 1, "variant": name, "wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb, **m.report})

    keys = ("weight_mb", "peak_rss_mb", "steps_per_second", "tokens_per_second", "last_loss", "wall_s")
    figures = {name: {k: median([r[k] for r in runs if r["variant"] == name]) for k in keys} for name in VARIANTS}
    lora = figures["LoRA (fp32 base)"]
    print(f"\n{info['cpu']}, {info['cores']} cores, load average {fmt(info['load_average_at_start'], 2)} at start; "
          f"{args.steps} optimizer steps each, recipe {Path(args.recipe).name}, overrides {args.overrides or 'none'}, "
          f"median of {args.rounds} round(s)\n")  # fmt: skip
    print_table(["variant", "weights in memory", "peak RSS", "RSS vs LoRA", "steps/s", "tokens/s", "speed vs LoRA", "last loss"], [
        [name, f"{f['weight_mb']:.0f} MB", f"{f['peak_rss_mb']:.0f} MB", f"{f['peak_rss_mb'] / lora['peak_rss_mb']:.2f}x",
         fmt(f["steps_per_second"], 3), fmt(f["tokens_per_second"], 0), f"{f['steps_per_second'] / lora['steps_per_second']:.2f}x",
         fmt(f["last_loss"], 3)]
        for name, f in figures.items()
    ])  # fmt: skip
    info["load_average_at_end"] = os.getloadavg()[0]
    write_results("quant", {"machine": info, "args": vars(args), "figures": figures, "runs": runs}, args.out)


if __name__ == "__main__":
    main()
