"""`finetune validate`: everything that can be checked without loading a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from finetune.commands.common import add_recipe_arguments
from finetune.errors import FinetuneError, RecipeError
from finetune.paths import PACKAGE_SCHEME, resolve_package_path
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
    from finetune.registry import load_task

    check_recipe(recipe, resolve_runtime(recipe), source=path)
    if recipe.eval.tasks or recipe.eval.after_training:
        from finetune.evaluation.side_by_side import check_eval_settings

        try:
            check_eval_settings(recipe)  # lm_eval task names, as training checks them
        except FinetuneError as exc:
            message = str(exc)
            raise RecipeError([message if message.startswith("eval.") else f"eval.tasks: {message}"], source=path) from None
    print(f"OK: {path} is a valid {recipe.task} recipe ({recipe.model.label}, adapter {recipe.adapter.type}).")
    if check_rows:
        task = load_task(recipe.task)
        # Rows whose completion data.max_length cuts off are unusable too; an image task, and a new model
        # (model.config), have no tokenizer yet.
        tokenizer = base_tokenizer(recipe) if task.needs_tokenizer and recipe.model.name_or_path is not None else None
        for key, group in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval)):
            if not group:
                continue
            rows = task.read_rows(recipe, group, tokenizer)
            note = f", {rows.skipped} unusable skipped" if rows.skipped else ""
            print(f"  {key}: {len(rows.rows)} usable rows{note}")
            problems = task.training_rows_problems(recipe, rows) if key == "data.train" else []
            if problems:
                raise RecipeError(problems, source=path)
    return 0


def base_tokenizer(recipe: Recipe):
    """The base model's tokenizer, and nothing else of the model: a GGUF's tokenizer comes from its conversion when
    a run has made one, else from the file's metadata (the weights are not converted for a check)."""
    from finetune.models.gguf import converted_folder
    from finetune.models.loading import load_tokenizer

    name = recipe.model.name_or_path
    folder = str(resolve_package_path(name)) if name.startswith(PACKAGE_SCHEME) else name
    if not recipe.model.gguf_file:
        return load_tokenizer(recipe, folder)
    source = Path(folder) / recipe.model.gguf_file
    if source.is_file() and (converted_folder(source) / "config.json").is_file():
        # Converted by an earlier run: the tokenizer training loads, without reading the GGUF's metadata (seconds).
        return load_tokenizer(recipe, str(converted_folder(source)))
    from transformers import AutoTokenizer

    from finetune.models.templates import resolve_chat_template

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=recipe.model.gguf_file)
    except (OSError, ValueError) as exc:
        raise FinetuneError(f"model.gguf_file: cannot read the tokenizer of {Path(folder) / recipe.model.gguf_file}: {exc}") from None
    if recipe.model.chat_template:
        tokenizer.chat_template = resolve_chat_template(recipe.model.chat_template)
    return tokenizer
