"""Every check of a recipe that needs no model, in one place: the schema's own combinations are checked when the
recipe is read (`finetune.recipe`); here come those that depend on the machine (device, precision), installed
packages, DeepSpeed, the data sources and the model's config (read without its weights). `finetune validate`,
`finetune launch` and training run the same checks and report every problem at once."""

from __future__ import annotations

from finetune.errors import FinetuneError, RecipeError
from finetune.recipe import Recipe
from finetune.registry import traits
from finetune.requirements import package_problems
from finetune.runtime import Runtime


def recipe_problems(recipe: Recipe, runtime: Runtime, data: bool = True) -> list[str]:
    """Everything wrong with running `recipe` on `runtime`'s machine, each naming its keys and the fix.

    `data=False` leaves out the data sources and the model folder (`finetune launch` may start nodes whose files are
    not on this machine); the model's config is checked whenever it can be read here.
    """
    problems = list(runtime.problems)
    problems += package_problems(recipe)  # every value naming a package (finetune/requirements.py)
    problems += _quantization_problems(recipe, runtime)
    problems += _kernel_problems(recipe, runtime)
    if recipe.deepspeed:
        problems += _deepspeed_problems(recipe, runtime)
    problems += model_config_problems(recipe)
    problems += _module_name_problems(recipe)
    problems += _export_problems(recipe)
    if data:
        problems += _model_problems(recipe)
        problems += _named_file_problems(recipe)
        problems += _data_source_problems(recipe)
        problems += _document_problems(recipe)
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


def _module_name_problems(recipe: Recipe) -> list[str]:
    """The modules the recipe names (adapter targets, modules to save, skipped modules, an image head), checked
    against the model's own module names, built without weights (finetune/models/targets.py)."""
    from finetune.models.targets import recipe_module_problems

    task = traits(recipe.task)
    return recipe_module_problems(recipe, "images" if task.inputs == "images" else task.model)


def _named_file_problems(recipe: Recipe) -> list[str]:
    """A chat template (a built-in name or a file), a new model's tokenizer folder and metric scripts, resolved now."""
    from finetune.models.checkpoint import tokenizer_problem
    from finetune.models.templates import chat_template_problem

    problems = [p for p in (chat_template_problem(recipe.model.chat_template), tokenizer_problem(recipe.model)) if p]
    if recipe.eval.metrics:
        from finetune.metrics import metric_problems  # numpy: only when there are metrics to check

        problems += metric_problems(recipe.eval.metrics)
    return problems


def _kernel_problems(recipe: Recipe, runtime: Runtime) -> list[str]:
    if recipe.train.kernels != "liger":
        return []
    if traits(recipe.task).model != "causal_lm":
        return [f"train.kernels: liger patches causal LMs (their norms, MLP and loss); {traits(recipe.task).noun} run "
                "trains a classifier. Remove train.kernels."]  # fmt: skip
    if runtime.device != "cuda":
        return [f"train.kernels: liger runs Triton kernels on CUDA GPUs, and this run is on {runtime.device}. Remove "
                "train.kernels (the kit's own loss already projects only the labelled positions) or train on a GPU."]  # fmt: skip
    return []  # the package: finetune/requirements.py


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
    from finetune.distributed.zero import deepspeed_problems, load_deepspeed_config, zero_stage

    try:
        config = load_deepspeed_config(recipe.deepspeed)
    except FinetuneError as exc:
        return [str(exc)]
    problems = deepspeed_problems(recipe, config, has_cuda=runtime.device == "cuda")
    if zero_stage(config) == 3 and runtime.world_size > 1 and recipe.eval.prompts and traits(recipe.task).generates:
        # Measured: a 2-process ZeRO-3 run with eval.prompts trained, then waited forever in the main process's
        # generation, whose forward passes gather weights the other processes never offer.
        problems.append(
            f"eval.prompts: the answers (samples) after training are generated on the main process, which hangs under "
            f"ZeRO-3 with {runtime.world_size} processes (each holds a slice of the weights). Remove eval.prompts and "
            "ask the finished run with `finetune chat`, or use ZeRO-2."
        )
    return problems


def _model_problems(recipe: Recipe) -> list[str]:
    """A local model folder that is not a model (no config.json, no weights, pickled weights only); hub ids are
    checked when loaded."""
    if traits(recipe.task).inputs == "images":  # a timm name, a package's function, or a config + plain state dict
        from finetune.models.vision import vision_problems

        return vision_problems(recipe)
    from finetune.models.checkpoint import model_problem

    if recipe.model.name_or_path is None:  # a new model (model.config): checked with the pretraining problems
        return []
    problem = model_problem(recipe.model)
    problems = [problem] if problem else []
    if recipe.preference.from_run is not None:
        from finetune.models.start_run import start_run_problems

        problems += start_run_problems(recipe, "preference.from_run", recipe.preference.from_run)
    return problems


# Where configs keep the context length and the hidden size (Llama/BERT, GPT-2, others), first found wins.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_HIDDEN_KEYS = ("hidden_size", "d_model", "n_embd", "dim")


def _config_value(config: dict, keys: tuple[str, ...]) -> tuple[str, int] | None:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config  # multimodal: its LM
    return next(((k, text[k]) for k in keys if isinstance(text.get(k), int) and not isinstance(text[k], bool)), None)


def model_config_problems(recipe: Recipe) -> list[str]:
    """Recipe values the model's config rules out, read without loading weights: a `data.max_length` past the
    model's context, an `adapter.r` above its hidden size. Skipped when the config cannot be read here (a hub id
    that is not in the local cache)."""
    from finetune.models.checkpoint import model_config

    found = model_config(recipe.model)
    if found is None:
        return []
    config, source = found
    problems = []
    hidden = _config_value(config, _HIDDEN_KEYS)
    if hidden and recipe.adapter.type != "none" and recipe.adapter.r > hidden[1]:
        problems.append(
            f"adapter.r: {recipe.adapter.r} is larger than any layer of the model ({hidden[0]} is {hidden[1]} in "
            f"{source}): no layer's update can have a rank above {hidden[1]}, so the rest only costs memory. "
            "Typical ranks are 4 to 64."
        )
    if recipe.export.format:
        from finetune.merge.gguf_writer import architecture_of

        try:
            architecture_of(config, source)
        except FinetuneError as e:
            problems.append(f"export.format: {e}")
    context = _config_value(config, _CONTEXT_KEYS)
    # Only a length the recipe sets: the default (1024) is for the usual 2k+ contexts, and classification caps it at
    # a BERT-style model's 512 positions with a warning (models/text_classifier.py). Pretraining fills every block to
    # max_length, so there the default must fit too.
    explicit = "max_length" in recipe.data.model_fields_set or traits(recipe.task).fills_context
    if context and explicit and recipe.data.max_length > context[1]:
        problems.append(
            f"data.max_length: {recipe.data.max_length} is longer than the model reads ({context[0]} is {context[1]} "
            f"in {source}); use at most {context[1]}."
        )
    # Generation lengths too: a value the recipe sets, or the default when eval.prompts will use it.
    generation = "max_new_tokens" in recipe.eval.model_fields_set or recipe.eval.prompts
    problem = _new_tokens_problem("eval.max_new_tokens", recipe.eval.max_new_tokens, context, source) if generation else None
    return problems + ([problem] if problem else [])


def new_tokens_problem(recipe: Recipe, max_new_tokens: int, key: str) -> str | None:
    """`finetune chat` / `finetune eval`'s `--max-new-tokens` against the model's context, before the model loads."""
    from finetune.models.checkpoint import model_config

    found = model_config(recipe.model)
    context = _config_value(found[0], _CONTEXT_KEYS) if found else None
    return _new_tokens_problem(key, max_new_tokens, context, found[1] if found else "")


def _new_tokens_problem(key: str, new: int, context: tuple[str, int] | None, source: str) -> str | None:
    if not context or new < context[1]:
        return None
    return (
        f"{key}: {new} new tokens do not fit the model's context ({context[0]} is {context[1]} in {source}), which "
        f"holds the prompt and the answer together; use fewer than {context[1]} (answers rarely need more than 512)."
    )


def _export_problems(recipe: Recipe) -> list[str]:
    """The recipe's export writes a causal language model's run; a classifier has nothing llama.cpp runs."""
    task = traits(recipe.task)
    if recipe.export.format and (task.model != "causal_lm" or task.inputs != "tokens"):
        return [f"export.format: {recipe.export.format} files hold causal language models; {task.noun} run is not one. "
                "Remove the export section."]  # fmt: skip
    return []


def head_problems(recipe: Recipe, labels: list[str]) -> list[str]:
    """A base that is already a sequence classifier keeps its head, so the training data must have as many labels
    as the head has outputs (transformers refuses to load it otherwise, after the data is prepared)."""
    from finetune.models.checkpoint import model_config

    found = model_config(recipe.model)
    config = found[0] if found else {}
    is_classifier = any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or ())
    head = config.get("id2label")
    if not is_classifier or not isinstance(head, dict) or len(head) == len(labels):
        return []
    return [
        f"model.name_or_path: {recipe.model.name_or_path} is already a classifier with a {len(head)}-label head "
        f"({', '.join(map(str, list(head.values())[:8]))}{', ...' if len(head) > 8 else ''} in {found[1]}), but the "
        f"training data has {len(labels)} labels ({', '.join(labels[:8])}{', ...' if len(labels) > 8 else ''}). "
        f"Train it on {len(head)} labels, or start from a model without a classification head."
    ]


def _document_problems(recipe: Recipe) -> list[str]:
    """For a task that reads documents: sources it cannot read (hub datasets, other file types). For one that may
    build a model: what its config shows (heads that do not divide the hidden size, a data.max_length past its
    position embeddings)."""
    task, problems = traits(recipe.task), []
    if task.documents:
        from finetune.data.text import corpus_problems

        problems += corpus_problems(recipe.data)
    if task.new_model:
        from finetune.models.architecture import architecture_problems

        problems += architecture_problems(recipe)
    return problems


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
