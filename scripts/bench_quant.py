"""Peak RSS and speed of LoRA vs 8-bit LoRA vs QLoRA (4-bit) SFT, side by side in one run.

    python scripts/bench_quant.py                      # recipes/llama_lora.yaml (SmolLM2-135M), 20 steps each
    python scripts/bench_quant.py --steps 10 --recipe recipes/llama_lora.yaml train.micro_batch_size=2

Each variant trains in its own subprocess (so peak RSS is its own), one after the other, with the same data,
steps and threads; the table prints at the end. The machine may be shared: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

VARIANTS = {
    "LoRA (fp32 base)": [],
    "LoRA on 8-bit base": ["quantization.bits=8", "adapter.type=lora"],
    "QLoRA (4-bit NF4 base)": ["adapter.type=qlora", "quantization.bits=4"],
}

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from finetune.recipe import load_recipe
from finetune.runner import run
recipe = load_recipe(sys.argv[1], sys.argv[2:])
start = time.time()
result = run(recipe)
summary = result.metrics["summary"]
print("BENCH " + json.dumps({{
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "steps_per_second": summary.get("train_steps_per_second"),
    "tokens_per_second": summary.get("tokens_per_second"),
    "train_runtime_s": summary.get("train_runtime"),
    "weight_mb": result.metrics["plan"]["weight_mb"],
    "weight_mb_unquantized": result.metrics["plan"]["weight_mb_unquantized"],
    "last_loss": result.metrics["last_loss"],
}}))
"""


def run_variant(recipe: str, overrides: list[str], out: Path) -> dict:
    args = [
        recipe,
        *overrides,
        f"output.dir={out}",
        "output.overwrite=true",
        "train.save_checkpoints=false",
        "eval.prompts=[]",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO)), *args], capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"variant failed: {overrides}")
    return json.loads(line[len("BENCH "):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "llama_lora.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("overrides", nargs="*", help="extra key.path=value overrides for every variant")
    args = parser.parse_args()
    common = [f"train.max_steps={args.steps}", "data.eval=null", *args.overrides]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in VARIANTS.items():
            print(f"running {name} ...", file=sys.stderr, flush=True)
            rows.append((name, run_variant(args.recipe, [*common, *overrides], Path(tmp) / name.split()[0])))
    base_rss = rows[0][1]["peak_rss_mb"]
    base_speed = rows[0][1]["steps_per_second"]
    print(f"\n{args.steps} optimizer steps each, recipe {Path(args.recipe).name}, overrides {args.overrides or 'none'}\n")
    print("| variant | weights in memory | peak RSS | RSS vs LoRA | steps/s | tokens/s | speed vs LoRA | last loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        print(
            f"| {name} | {r['weight_mb']:.0f} MB | {r['peak_rss_mb']:.0f} MB | {r['peak_rss_mb'] / base_rss:.2f}x "
            f"| {r['steps_per_second']:.3f} | {r['tokens_per_second']:.0f} | {r['steps_per_second'] / base_speed:.2f}x "
            f"| {r['last_loss']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
