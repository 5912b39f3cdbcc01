"""What `finetune eval` was pointed at: a run folder, a merged model folder, or both; what can be compared."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.models.loading import TOKENIZER_FILES
from finetune.recipe import Recipe, load_recipe
from finetune.registry import TASKS, traits

VARIANTS = ("base", "adapter", "merged")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass
class EvalSource:
    """A run's recipe and folders: the adapter run (None when only a merged folder exists) and the merged model."""

    recipe: Recipe
    run_dir: Path | None
    merged_dir: Path | None
    has_adapter: bool  # the run folder holds a PEFT adapter (else it holds a full fine-tuned model)

    @property
    def task(self) -> str:
        return self.recipe.task

    @property
    def scoring(self) -> str | None:
        """How `finetune eval` scores the run's task (its registry trait): "language_model", "classifier" or None."""
        return traits(self.recipe.task).eval_scoring

    @property
    def home(self) -> Path:
        """Where the report goes by default: the run folder, else the merged folder."""
        return self.run_dir or self.merged_dir

    @property
    def tokenizer_dir(self) -> Path | None:
        """The run's tokenizer (it carries the chat template trained with), else the merged folder's."""
        return next((d for d in (self.run_dir, self.merged_dir) if d and _has_any(d, TOKENIZER_FILES)), None)


def _has_any(folder: Path, names) -> bool:
    return any((folder / n).is_file() for n in names)


def is_run(folder: Path) -> bool:
    return (folder / "recipe.yaml").is_file() and (
        (folder / "adapter_config.json").is_file() or _has_any(folder, WEIGHT_FILES)
    ) and not (folder / "merge_report.json").is_file()


def is_merged(folder: Path) -> bool:
    return (folder / "merge_report.json").is_file() and _has_any(folder, WEIGHT_FILES)


def resolve_source(target: str | Path, merged: str | Path | None = None) -> EvalSource:
    """The run and merged folders from `target` (either kind) and `merged` (a merged folder, optional).

    A merged folder names the adapter it came from in `merge_report.json`; when that folder still exists, the
    adapter and base are compared too.
    """
    target = Path(target)
    if not target.is_dir():
        raise FinetuneError(f"{target}: no such folder. Give a run's output.dir or a folder written by `finetune merge`.")
    run_dir = merged_dir = None
    if is_merged(target):
        merged_dir = target
        adapter = Path(json.loads((target / "merge_report.json").read_text()).get("adapter") or "")
        run_dir = adapter if adapter.is_dir() and is_run(adapter) else None
    elif is_run(target):
        run_dir = target
    else:
        raise FinetuneError(
            f"{target}: not a finished run (no recipe.yaml with an adapter or model weights) nor a merged model "
            "(no merge_report.json). Give a run's output.dir or a folder written by `finetune merge`."
        )
    if merged is not None:
        merged = Path(merged)
        if not is_merged(merged):
            raise FinetuneError(f"--merged {merged}: not a folder written by `finetune merge` (no merge_report.json and weights).")
        merged_dir = merged
    recipe_home = run_dir or merged_dir
    if not (recipe_home / "recipe.yaml").is_file():
        raise FinetuneError(f"{recipe_home}: no recipe.yaml, so the base model and the data format are unknown.")
    recipe = load_recipe(recipe_home / "recipe.yaml")
    if traits(recipe.task).eval_scoring is None:
        compared = " and ".join(name for name, entry in TASKS.items() if entry.traits.eval_scoring)
        raise FinetuneError(f"{recipe_home}: `finetune eval` compares {compared} runs; this is a {recipe.task} run.")
    has_adapter = run_dir is not None and (run_dir / "adapter_config.json").is_file()
    return EvalSource(recipe, run_dir, merged_dir, has_adapter)


def available_variants(source: EvalSource) -> dict[str, str | None]:
    """Each variant and why it cannot be built here (None when it can)."""
    why: dict[str, str | None] = {"base": None, "adapter": None, "merged": None}
    if source.run_dir is None:
        why["adapter"] = "the merged folder's adapter run was not found (merge_report.json's `adapter`)"
    elif not source.has_adapter:
        why["merged"] = "a full fine-tune has no adapter to merge: its `adapter` column is the fine-tuned model"
    if source.merged_dir is None and source.has_adapter and source.recipe.is_quantized:
        why["merged"] = (
            f"the run trained on a {source.recipe.quantization.bits}-bit base, and merging into quantized weights in "
            "memory would not be the model you ship: run `finetune merge RUN_DIR --out DIR` and pass `--merged DIR`"
        )
    return why
