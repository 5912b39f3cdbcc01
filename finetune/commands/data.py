"""`finetune data RECIPE`: the data as training will read it, reported before any training is paid for."""

from __future__ import annotations

import argparse
from pathlib import Path

from finetune.commands.common import add_recipe_arguments

HELP = ("Report on the data as training will read it (lengths, truncation, duplicates, train/eval leakage, labels, "
        "trained tokens) without loading the model.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--out", help="Folder for data_report.md/.json/.html and the histograms (default: beside "
                        "output.dir, named after it with '-data').")
    parser.add_argument("--samples", type=int, default=3, help="Rows of each split rendered with their trained "
                        "tokens marked (default 3).")


def run(args: argparse.Namespace) -> int:
    from finetune.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    out = Path(args.out) if args.out else default_folder(recipe.output.dir)
    return data_command(recipe, args.recipe, out, samples=args.samples)


def default_folder(output_dir: str) -> Path:
    """`outputs/llama_lora` -> `outputs/llama_lora-data`: beside the run, not in it (a run folder is for the run)."""
    path = Path(output_dir)
    return path.with_name(f"{path.name}-data")


def data_command(recipe, path: str, out: Path, samples: int = 3) -> int:
    from finetune.checks import check_recipe
    from finetune.data.report import collect, render_text, save_record
    from finetune.errors import FinetuneError
    from finetune.runtime import resolve_runtime
    from finetune.registry import load_task

    runtime = resolve_runtime(recipe)
    check_recipe(recipe, runtime, source=path)  # every recipe problem at once, before a row is read
    if samples < 0:
        raise FinetuneError("--samples: give 0 or more rows to render.")
    import datasets

    datasets.disable_progress_bars()  # "Generating train split" per file: noise between the report's lines
    task = load_task(recipe.task)
    tokenizer = report_tokenizer(recipe, task, runtime)
    try:
        facts = task.data_facts(recipe, tokenizer)
    except NotImplementedError:
        raise FinetuneError(f"task {recipe.task} has no data report yet (its Task.data_facts hook).") from None
    report = collect(facts, samples=samples)
    written = report.write(out, f"{path} ({recipe.task})")
    save_record(recipe, tokenizer, report)  # the next `finetune train` of the same data prints it without reading again
    print(render_text(report.summary))
    print(f"\nWrote {', '.join(p.name for p in written)} in {out}")
    return 0


def report_tokenizer(recipe, task, runtime):
    """The tokenizer training will use, and nothing else of the model: the base's (a GGUF's from its metadata unless
    a run converted it), or for a new model its own (`model.tokenizer`, or the BPE trained on the corpus, cached)."""
    from finetune.commands.validate import base_tokenizer

    if not task.needs_tokenizer:
        return None
    if recipe.model.name_or_path is None:
        return task(recipe, runtime).load_base()[1]
    return base_tokenizer(recipe)
