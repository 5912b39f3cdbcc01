"""`finetune validate`: everything that can be checked without loading a model."""

from __future__ import annotations

from finetune.errors import RecipeError
from finetune.recipe import Recipe


def validate_command(recipe: Recipe, path: str, check_rows: bool = False) -> int:
    from finetune.data import is_local, load_rows, missing_source
    from finetune.runtime import resolve_runtime
    from finetune.train import runtime_problems

    problems = runtime_problems(recipe, resolve_runtime(recipe))
    sources = [("data.train", s) for s in recipe.data.train] + [("data.eval", s) for s in recipe.data.eval or []]
    for key, source in sources:
        problem = missing_source(source) if is_local(source) else None  # files, folders and package:// paths
        if problem:
            problems.append(f"{key}: {problem}")
    if problems:
        raise RecipeError(problems, source=path)
    print(f"OK: {path} is a valid {recipe.task} recipe ({recipe.model.name_or_path}, adapter {recipe.adapter.type}).")
    if check_rows:
        for key, group in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval)):
            if not group:
                continue
            if recipe.task == "sft":
                rows = load_rows(group, recipe.data, chat=True)
            else:
                from finetune.class_data import load_classification_rows

                rows = load_classification_rows(group, recipe)
            note = f", {rows.skipped} unusable skipped" if rows.skipped else ""
            print(f"  {key}: {len(rows.rows)} usable rows{note}")
    return 0
