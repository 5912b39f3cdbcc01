"""Every check of a recipe that needs no model, in one place: the schema's own combinations are checked when the
recipe is read (`finetune.recipe`); here come those that depend on the machine (device, precision), installed
packages, DeepSpeed and the data sources. `finetune validate`, `finetune launch` and training run the same checks
and report every problem at once."""

from __future__ import annotations

import importlib.util

from finetune.errors import FinetuneError, RecipeError
from finetune.recipe import Recipe
from finetune.runtime import Runtime


def recipe_problems(recipe: Recipe, runtime: Runtime, data: bool = True) -> list[str]:
    """Everything wrong with running `recipe` on `runtime`'s machine, each naming its keys and the fix.

    `data=False` leaves out the data sources and the model folder (`finetune launch` may start nodes whose files are
    not on this machine).
    """
    problems = list(runtime.problems)
    problems += _package_problems(recipe)
    problems += _quantization_problems(recipe, runtime)
    if recipe.deepspeed:
        problems += _deepspeed_problems(recipe, runtime)
    if data:
        problems += _model_problems(recipe)
        problems += _data_source_problems(recipe)
        if recipe.task == "pretrain":
            problems += _pretrain_problems(recipe)
    return problems


def recipe_warnings(recipe: Recipe, runtime: Runtime) -> list[str]:
    """Things that will work but are probably not what was meant (DeepSpeed settings the recipe overrides, say)."""
    if not recipe.deepspeed:
        return []
    from finetune.distributed.zero import deepspeed_warnings, load_deepspeed_config

    try:
        config = load_deepspeed_config(recipe.deepspeed)
    except FinetuneError:  # reported by recipe_problems
        return []
    return deepspeed_warnings(recipe, config, has_cuda=runtime.device == "cuda")


def check_recipe(recipe: Recipe, runtime: Runtime, source: str | None = None, data: bool = True) -> None:
    """Raise every problem of `recipe_problems` at once."""
    problems = recipe_problems(recipe, runtime, data=data)
    if problems:
        raise RecipeError(problems, source=source)


def _package_problems(recipe: Recipe) -> list[str]:
    q = recipe.quantization
    if q.bits is not None or recipe.train.optimizer in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        if importlib.util.find_spec("bitsandbytes") is None:  # whether installed; importing it is slow and noisy
            return [
                "quantization / 8-bit optimizers need bitsandbytes: pip install 'finetune-kit[quant]' "
                "(or remove quantization.bits and use train.optimizer: adamw_torch)."
            ]
    return []


def _quantization_problems(recipe: Recipe, runtime: Runtime) -> list[str]:
    from finetune.models.quantization import compute_dtype_name

    q, problems = recipe.quantization, []
    if q.bits == 4 and runtime.device == "cpu" and compute_dtype_name(recipe, runtime) == "fp16":
        problems.append(
            "quantization.compute_dtype: fp16 on CPU: bitsandbytes' CPU kernels compute in fp32 or bf16, and fp16 "
            "training is GPU-only. Use quantization.compute_dtype: auto (fp32 here) or bf16."
        )
    if q.bits is not None and runtime.precision == "fp16" and runtime.device == "cuda" and q.compute_dtype == "bf16":
        problems.append("train.precision: fp16 with quantization.compute_dtype: bfloat16 mixes two half types; use one.")
    return problems


def _deepspeed_problems(recipe: Recipe, runtime: Runtime) -> list[str]:
    from finetune.distributed.zero import deepspeed_problems, load_deepspeed_config

    try:
        config = load_deepspeed_config(recipe.deepspeed)
    except FinetuneError as exc:
        return [str(exc)]
    return deepspeed_problems(recipe, config, has_cuda=runtime.device == "cuda")


def _model_problems(recipe: Recipe) -> list[str]:
    """A local model folder that is not a model (no config.json, no weights, pickled weights only); hub ids are
    checked when loaded."""
    from finetune.models.checkpoint import model_problem

    if recipe.model.name_or_path is None:  # a new model (model.config): checked with the pretraining problems
        return []
    problem = model_problem(recipe.model)
    return [problem] if problem else []


def _pretrain_problems(recipe: Recipe) -> list[str]:
    """Sources pretraining cannot read (hub datasets, other file types), and what the model's config.json shows:
    heads that do not divide the hidden size, a data.max_length past its position embeddings."""
    from finetune.data.text import corpus_problems
    from finetune.models.architecture import architecture_problems

    return corpus_problems(recipe.data) + architecture_problems(recipe)


def _data_source_problems(recipe: Recipe) -> list[str]:
    """Local files and folders (and `package://` paths) that are not there; hub names are checked when loaded."""
    from finetune.data.rows import is_local, missing_source

    problems = []
    sources = [("data.train", s) for s in recipe.data.train] + [("data.eval", s) for s in recipe.data.eval or []]
    for key, source in sources:
        problem = missing_source(source) if is_local(source) else None
        if problem:
            problems.append(f"{key}: {problem}")
    return problems
