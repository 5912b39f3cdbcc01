"""`finetune train RECIPE [key.path=value ...]`; also `finetune/run.py` under any launcher."""

from __future__ import annotations

import argparse
import logging
import os
import time

from finetune.commands.common import add_recipe_arguments, guarded, setup_logging

log = logging.getLogger("finetune")

HELP = "Fine-tune from a recipe (same as `python finetune/run.py RECIPE`)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Fine-tune a model from a YAML recipe."
    add_recipe_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from finetune.recipe import load_recipe
    from finetune.runner import finish_distributed
    from finetune.runner import run as run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    started = time.time()
    try:
        metrics = run_recipe(recipe).metrics
    finally:
        finish_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("Done in %.0f s. Outputs in %s", time.time() - started, recipe.output.dir)
        last = metrics.get("last_loss")
        if last is not None:
            log.info("loss %.4f -> %.4f", metrics.get("first_loss"), last)
        peak, estimate = metrics.get("peak_memory") or {}, (metrics.get("plan") or {}).get("memory") or {}
        if "cuda_max_allocated_bytes" in peak:
            log.info(
                "peak GPU memory %.2f GiB allocated (plan estimated %.2f GiB)",
                peak["cuda_max_allocated_bytes"] / 2**30, estimate.get("total", 0) / 2**30,
            )
        if recipe.eval.after_training:
            # After the process group is gone: the other ranks have exited, none waits on this at a barrier.
            from finetune.evaluation.side_by_side import evaluate_run

            _, out = evaluate_run(recipe.output.dir)
            print((out / "report.md").read_text(), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `finetune/run.py`: RECIPE [key.path=value ...]."""
    parser = argparse.ArgumentParser(prog="finetune train")
    add_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    setup_logging()
    return guarded(lambda: run(args))
