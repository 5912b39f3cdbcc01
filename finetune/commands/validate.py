"""`finetune validate`: everything that can be checked without loading a model."""

from __future__ import annotations

import argparse

from finetune.commands.common import add_recipe_arguments
from finetune.recipe import Recipe

HELP = "Check a recipe (and its data files) without loading a model."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser)
    parser.add_argument("--data", action="store_true", help="Also read every data row and report unusable ones.")


def run(args: argparse.Namespace) -> int:
    from finetune.recipe import load_recipe

    return validate_command(load_recipe(args.recipe, args.overrides), args.recipe, check_rows=args.data)


def validate_command(recipe: Recipe, path: str, check_rows: bool = False) -> int:
    from finetune.checks import check_recipe
    from finetune.runtime import resolve_runtime
    from finetune.tasks.registry import load_task

    check_recipe(recipe, resolve_runtime(recipe), source=path)
    print(f"OK: {path} is a valid {recipe.task} recipe ({recipe.model.name_or_path}, adapter {recipe.adapter.type}).")
    if check_rows:
        task = load_task(recipe.task)
        for key, group in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval)):
            if not group:
                continue
            rows = task.read_rows(recipe, group)
            note = f", {rows.skipped} unusable skipped" if rows.skipped else ""
            print(f"  {key}: {len(rows.rows)} usable rows{note}")
    return 0
