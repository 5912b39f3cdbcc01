"""What transfer learning buys: `recipes/image_transfer.yaml` (ImageNet EfficientNet-Lite0, LoRA + new head) against
the same architecture from random initialisation, same data, same steps, each run by `finetune train` in a child.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.image_transfer                 # the four variants below
    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.image_transfer --variants pretrained_lora random_full

Variants (overrides on the shipped recipe):
  pretrained_lora   the recipe as shipped: ImageNet weights, LoRA on the 1x1 convolutions, head in full
  pretrained_head   ImageNet weights, the head alone on features the frozen backbone computes once (no augmentation)
  random_full       no checkpoint (random weights), every weight trained (adapter: none): the best a model from
                    scratch can do in the same steps
  random_lora       no checkpoint, LoRA as shipped: the recipe's own mode without the pretrained weights
Prints a markdown table (held-out accuracy and macro F1 on the recipe's 500 held-out digits, the training loss at the
first and last logged step, training seconds,
images/s, wall time) with the machine and its load average, and writes JSON to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from benchmarks.common import REPO, finetune_cli, fmt, machine, offline_env, print_table, run_measured, write_results

VARIANTS = {
    "pretrained_lora": ("ImageNet weights, LoRA + head (the recipe)", []),
    "pretrained_head": ("ImageNet weights, head only (cached features)", ["adapter=head", "image.augment=false"]),
    "random_full": ("random init, full fine-tune", ["image.checkpoint=null", "adapter=none"]),
    "random_lora": ("random init, LoRA + head", ["image.checkpoint=null"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, help="train.max_steps for every variant (default: the recipe's)")
    args = parser.parse_args()
    info = machine()
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="image-transfer-") as tmp:
        for name in args.variants:
            what, overrides = VARIANTS[name]
            out = Path(tmp) / name
            extra = [f"output.dir={out}"] + ([f"train.max_steps={args.steps}", f"train.eval_steps={args.steps}"] if args.steps else [])
            load = os.getloadavg()[0]
            run = run_measured([*finetune_cli(), "train", str(REPO / "recipes" / "image_transfer.yaml"), *overrides, *extra],
                               env=offline_env(), cwd=REPO).check(name)  # fmt: skip
            metrics = json.loads((out / "train_metrics.json").read_text())
            report = json.loads((out / "eval_metrics.json").read_text())
            summary = metrics.get("summary", {})
            results[name] = {
                "what": what, "overrides": overrides + extra[1:], "accuracy": report["accuracy"], "f1_macro": report["f1_macro"],
                "eval_rows": report["num_examples"], "training_seconds": summary.get("training_seconds"),
                "images_per_second": metrics.get("images_per_second"), "wall_seconds": round(run.wall_s, 1),
                "peak_rss_mb": round(run.peak_rss_mb), "load_average_before": load,
                "trainable_params": metrics["plan"]["trainable_params"], "steps": metrics["plan"]["steps"],
                "train_loss_first": metrics["first_loss"], "train_loss_last": metrics["last_loss"],
            }  # fmt: skip
            r = results[name]
            loss = f"{r['train_loss_first']:.2f} → {r['train_loss_last']:.2f}"
            rows.append([what, fmt(r["accuracy"], 4), fmt(r["f1_macro"], 4), loss, f"{r['trainable_params']:,}", r["steps"],
                         fmt(r["training_seconds"]), fmt(r["images_per_second"]), fmt(r["wall_seconds"]), fmt(load, 2)])  # fmt: skip
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores; load average at start {info['load_average_at_start']:.2f}\n")
    print_table(["variant", "accuracy", "macro F1", "train loss", "trainable", "steps", "training s", "images/s", "wall s", "load before"], rows)
    write_results("image_transfer", {"machine": info, "results": results})


if __name__ == "__main__":
    main()
