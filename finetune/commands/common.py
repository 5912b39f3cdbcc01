"""What every command shares: the recipe arguments, error handling without tracebacks, logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from finetune.errors import FinetuneError
from finetune.notices import quiet_library_notices
from finetune.registry import TASKS, TaskTraits, traits

if TYPE_CHECKING:
    from finetune.recipe import Recipe


def guarded(action: Callable[[], int]) -> int:
    """Run a command; a FinetuneError becomes its message on stderr and a non-zero exit, never a traceback."""
    try:
        return action()
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="Path to a YAML recipe (see recipes/).")
    parser.add_argument(
        "overrides", nargs="*", default=[], metavar="key.path=value",  # a default: not listed as required when absent
        help="Override recipe values, e.g. train.learning_rate=1e-4 (read as YAML, like the recipe: `true` is a "
        "boolean, `'5'` is text). Options and overrides may come in any order.",
    )


def recipe_key_help(key: str, lead: str = "") -> str:
    """Help for a flag that mirrors a recipe key: the key's own description from the schema, so the two never
    drift, and the key the flag overrides."""
    from finetune.recipe import description

    return f"{lead}{description(key)} (Overrides the recipe's `{key}`.)"


def _use(task: TaskTraits) -> tuple[str, str]:
    """What the command that serves a run of `task` does with it, and that command's example option."""
    if task.served_by == "chat":
        return "answers prompts with", '--prompt "..."'
    if task.inputs == "images":
        return "labels images with", "--image FILE"
    return "labels texts with", '--text "..."'


def run_recipe(target: str | Path, command: str) -> Recipe | None:
    """The recipe of a run folder (its saved recipe.yaml) or a recipe file, refused when its task is not served by
    `command` (the registry's `served_by`), with the command that serves it. None when there is no recipe (the
    command says so)."""
    from finetune.recipe import load_recipe

    target = Path(target)
    path = target / "recipe.yaml" if target.is_dir() else target
    if not path.is_file():
        return None
    recipe = load_recipe(path)
    task = traits(recipe.task)
    if task.served_by == command:
        return recipe
    served = next(entry.traits for entry in TASKS.values() if entry.traits.served_by == command)
    does, _ = _use(served)
    where = f"{task.noun} run (task: {recipe.task} in its recipe.yaml)" if target.is_dir() else f"{task.noun} recipe (task: {recipe.task})"
    run_dir = target if target.is_dir() else recipe.output.dir  # chat takes a run folder only
    hint = ""
    if task.served_by:
        other_does, example = _use(task)
        hint = f" `finetune {task.served_by}` {other_does} it: finetune {task.served_by} {run_dir} {example}"
    raise FinetuneError(f"{target} is {where}; `finetune {command}` {does} {served.noun} run.{hint}")


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    quiet_library_notices()  # bitsandbytes' kernels-community notice, DeepSpeed's CPU accelerator (finetune/notices.py)
    # peft and trl read transformers' deprecated `is_gradient_checkpointing`; nothing the user can change.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )
