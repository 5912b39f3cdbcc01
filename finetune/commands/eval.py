"""`finetune eval RUN_DIR`: base, fine-tuned and merged model side by side on held-out data and lm_eval tasks."""

from __future__ import annotations

import argparse

from finetune.commands.common import recipe_key_help

HELP = "Compare base, fine-tuned and merged model on held-out data and lm_eval tasks, offline."


def _names(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="A run's output.dir, or a folder written by `finetune merge`.")
    parser.add_argument("--variants", type=_names, metavar="NAME,...", help=recipe_key_help("eval.variants"))
    parser.add_argument("--merged", metavar="DIR", help="The run's merged model (from `finetune merge`) as the `merged` variant.")
    parser.add_argument(
        "--data", metavar="FILE", help="Held-out rows to score (the run's data format). Default: the recipe's data.eval, "
        "else the rows data.eval_fraction held out."
    )
    parser.add_argument("--tasks", type=_names, metavar="NAME,...", help=recipe_key_help("eval.tasks") + " `--tasks none` runs none.")
    parser.add_argument("--limit", type=int, metavar="N", help=recipe_key_help("eval.limit"))
    parser.add_argument("--batch-size", type=int, metavar="N", help=recipe_key_help("eval.batch_size"))
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help=recipe_key_help("eval.max_new_tokens"))
    parser.add_argument("--out", metavar="DIR", help="Report folder (default RUN_DIR/eval); an earlier report there is replaced.")


def run(args: argparse.Namespace) -> int:
    from finetune.errors import FinetuneError
    from finetune.evaluation.side_by_side import EvalOptions, evaluate_run

    for flag in ("limit", "batch_size", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise FinetuneError(f"--{flag.replace('_', '-')} must be at least 1, got {value}.")
    tasks = [] if args.tasks in (["none"],) else args.tasks
    options = EvalOptions(
        variants=args.variants, data=args.data, tasks=tasks, limit=args.limit, out=args.out, merged=args.merged,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
    )
    evaluation, out = evaluate_run(args.run_dir, options)
    print((out / "report.md").read_text())
    print(f"Report: {out}/report.md (every number in report.json, every answer in predictions.jsonl)")
    return 0
