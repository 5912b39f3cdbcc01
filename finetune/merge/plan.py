"""Everything `finetune merge` reads and decides before it writes a byte: the adapter, its base, the run's
recipe and labels, the output dtype and architecture, and the merge method. Every user error is raised here.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from finetune.dtypes import torch_dtype
from finetune.errors import FinetuneError
from finetune.registry import traits
from finetune.models.loading import TOKENIZER_FILES

log = logging.getLogger(__name__)

# torch and transformers are imported inside functions: `finetune --help` imports this module.
TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
}
HEAD_KEYS = ("score.weight", "classifier.weight", "classifier.out_proj.weight")


@dataclass
class MergeInputs:
    """What a merge reads: the adapter folder, the base it belongs to, and the run's recipe and labels if any."""

    adapter_dir: Path
    adapter_config: dict
    base_dir: Path
    base_name: str  # how the user knows the base (recipe name or hub id), for the model card
    task_type: str
    recipe_path: Path | None = None
    recipe: object | None = None  # finetune.recipe.Recipe
    labels: dict | None = None

    @property
    def tokenizer_dir(self) -> Path | None:
        """The run's tokenizer (it carries the chat template trained with) when saved, else the base's."""
        return next(
            (d for d in (self.adapter_dir, self.base_dir) if any((d / n).is_file() for n in TOKENIZER_FILES)), None
        )


@dataclass
class MergePlan:
    """The decisions: output dtype, config and architecture, method, and (streaming) every tensor's source."""

    inputs: MergeInputs
    adapter: object  # finetune.merge.lora.AdapterWeights
    dtype: object  # torch.dtype
    config: object  # transformers.PretrainedConfig of the merged model
    model_class: type  # the Auto class that loads it
    architecture: str
    overrides: dict  # config fields set on top of the base's (labels), also applied to the verification reference
    vocab_size: int | None  # set when the run resized the embeddings
    method: str
    method_note: str | None
    streaming: object | None  # finetune.merge.streaming.StreamingPlan


def _local_model(name: str) -> Path:
    """A folder for `name`: a local path, or a hub id from the local cache (network only if HF_HUB_OFFLINE is unset)."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:  # hub errors come in many types; all mean "not available here"
        raise FinetuneError(f"base model {name!r} is neither a local folder nor an available hub model ({exc}).") from None


def _beside(adapter_dir: Path, name: str) -> Path | None:
    # A run folder holds its files beside the adapter; a checkpoint-N folder inside it has them one level up.
    return next((d / name for d in (adapter_dir, adapter_dir.parent) if (d / name).is_file()), None)


def resolve_inputs(adapter: str | Path, base: str | None) -> MergeInputs:
    """Find the adapter files, the run's recipe and labels, and the base: --base, else adapter_config, else recipe."""
    from finetune.models.adapters import read_adapter_config
    from finetune.models.checkpoint import folder_problem, local_name
    from finetune.models.loading import resolve_model_path
    from finetune.recipe import ModelConfig, load_recipe

    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        full = (adapter_dir / "config.json").is_file()
        hint = " It holds a full model (config.json), not an adapter: there is nothing to merge." if full else ""
        raise FinetuneError(f"{adapter_dir}: no adapter_config.json; not a PEFT adapter or finetune run folder.{hint}")
    config = read_adapter_config(adapter_dir)  # damaged files and pickled weights are refused here
    recipe_path = _beside(adapter_dir, "recipe.yaml")
    recipe = load_recipe(recipe_path) if recipe_path else None
    labels_path = _beside(adapter_dir, "labels.json")
    labels = json.loads(labels_path.read_text()) if labels_path else None

    named = config.get("base_model_name_or_path")
    if base:
        base_name, base_dir = base, _local_model(local_name(ModelConfig(name_or_path=base)))
    elif named and Path(named).is_dir():
        base_name, base_dir = (recipe.model.name_or_path if recipe else named), Path(named)
    elif recipe is not None:  # the run's base folder moved or was a converted cache: resolve it again
        base_name, base_dir = recipe.model.name_or_path, _local_model(resolve_model_path(recipe.model))
    elif named:
        base_name, base_dir = named, _local_model(named)
    else:
        raise FinetuneError(f"{adapter_dir}: the adapter names no base model and there is no recipe.yaml; pass --base.")
    problem = folder_problem(base_dir, fix="Pass --base with a safetensors copy of the model.")
    if problem:
        raise FinetuneError(f"base model: {problem}")

    classification = recipe is not None and traits(recipe.task).head
    task_type = config.get("task_type") or ("SEQ_CLS" if classification else "CAUSAL_LM")
    if task_type not in TASK_CLASSES:
        raise FinetuneError(f"adapter task_type {task_type} is not supported; finetune merge handles {', '.join(TASK_CLASSES)}.")
    return MergeInputs(adapter_dir, config, base_dir, base_name, task_type, recipe_path, recipe, labels)


def check_output(out: Path, overwrite: bool, inputs: MergeInputs) -> Path:
    """The absolute output folder; refuses a non-empty one (without overwrite) and one overlapping the inputs."""
    return check_output_folder(out, overwrite, {"adapter": inputs.adapter_dir, "base model": inputs.base_dir})


def check_output_folder(out: Path, overwrite: bool, inputs: dict[str, Path]) -> Path:
    """The absolute output folder; refuses a non-empty one (without overwrite) and one overlapping any of `inputs`
    (what each folder is -> the folder)."""
    out = out.resolve()
    for name, folder in inputs.items():
        folder = folder.resolve()
        if out == folder or out in folder.parents or folder in out.parents:
            raise FinetuneError(f"--out {out} overlaps the {name} folder {folder}; choose a separate folder.")
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FinetuneError(f"--out {out} is not empty; pass --overwrite to replace it.")
    return out


def config_overrides(inputs: MergeInputs, adapter) -> dict:
    """Config fields the merged model needs beyond the base's: a classifier's labels (and the pad token a decoder
    classifier finds the last token by)."""
    if inputs.task_type != "SEQ_CLS":
        return {}
    if inputs.labels:
        id2label = {int(k): v for k, v in inputs.labels["id2label"].items()}
        multi = bool(inputs.labels.get("multi_label"))
    else:
        heads = [t for k, t in adapter.replacements.items() if k in HEAD_KEYS]
        if not heads:
            raise FinetuneError("cannot tell the number of labels: no labels.json and no score/classifier head in the adapter.")
        id2label, multi = {i: f"LABEL_{i}" for i in range(heads[0].shape[0])}, False
    overrides = {
        "num_labels": len(id2label),
        "id2label": id2label,
        "label2id": {v: k for k, v in id2label.items()},
        "problem_type": "multi_label_classification" if multi else "single_label_classification",
    }
    if inputs.tokenizer_dir is not None:
        from transformers import AutoTokenizer

        pad = AutoTokenizer.from_pretrained(inputs.tokenizer_dir).pad_token_id
        if pad is not None:
            overrides["pad_token_id"] = pad
    return overrides


def has_safetensors(base_dir: Path) -> bool:
    return any((base_dir / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json"))


def output_dtype(requested, inputs: MergeInputs, config):
    """--dtype, else the recipe's merge.dtype, else the dtype most of the base checkpoint's bytes are stored in."""
    import torch

    from finetune.merge.streaming import base_checkpoint

    recipe = inputs.recipe
    if requested is None and recipe is not None and recipe.merge.dtype:
        requested = recipe.merge.dtype
    if isinstance(requested, str):
        try:
            return torch_dtype(requested)
        except ValueError as e:
            raise FinetuneError(str(e)) from None
    if requested is not None:
        return requested
    if not has_safetensors(inputs.base_dir):
        declared = getattr(config, "dtype", None)
        return declared if isinstance(declared, torch.dtype) else torch.float32
    sizes: dict = {}
    for t in base_checkpoint(inputs.base_dir).values():
        if t.dtype.is_floating_point:
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.dtype.itemsize * math.prod(t.shape)
    return max(sizes, key=sizes.get) if sizes else torch.float32


def choose_method(requested: str | None, adapter, base_dir: Path, model_type: str) -> tuple[str, str | None]:
    """Streaming unless asked otherwise or unable to reproduce the adapter exactly (then PEFT, with a note)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    if requested == "peft":
        return "peft", None
    reasons = list(adapter.unsupported)
    if get_checkpoint_conversion_mapping(model_type):
        reasons.append(f"transformers converts the {model_type} checkpoint layout when loading it")
    if not has_safetensors(base_dir):
        reasons.append("the base has no safetensors weights")
    if not reasons:
        return "streaming", None
    if requested == "streaming":
        raise FinetuneError(f"--method streaming cannot merge this exactly: {'; '.join(reasons)}. Use --method peft.")
    return "peft", (
        f"the streaming merge cannot reproduce this exactly ({'; '.join(reasons)}); merged with PEFT "
        "merge_and_unload instead, which holds the whole model in memory"
    )


def plan_merge(inputs: MergeInputs, dtype=None, method: str | None = None) -> MergePlan:
    """Read the adapter, settle the output config and method, and match every tensor (streaming) — or raise."""
    import transformers
    from transformers import AutoConfig

    from finetune.merge import lora as merge_lora
    from finetune.merge import streaming

    config = AutoConfig.from_pretrained(inputs.base_dir)
    quantized = getattr(config, "quantization_config", None)
    if quantized:
        kind = quantized.get("quant_method", "?") if isinstance(quantized, dict) else type(quantized).__name__
        raise FinetuneError(
            f"base model {inputs.base_dir} is a quantized checkpoint ({kind}); merging into rounded weights would "
            "bake the rounding in. Pass --base with the full-precision model."
        )
    dtype = output_dtype(dtype, inputs, config)
    adapter = merge_lora.read_adapter(inputs.adapter_dir)
    overrides = config_overrides(inputs, adapter)
    for key, value in overrides.items():
        setattr(config, key, value)
    model_class = getattr(transformers, TASK_CLASSES[inputs.task_type])
    chosen, note = choose_method(method, adapter, inputs.base_dir, config.model_type)
    if note:
        log.warning("Note: %s.", note)

    meta = streaming.meta_model(model_class, config)
    embedding = meta.get_input_embeddings()
    embedding_key = next(f"{n}.weight" for n, m in meta.named_modules() if m is embedding)
    saved = adapter.replacements.get(embedding_key)
    vocab_size = None
    if saved is not None and saved.shape[0] != embedding.weight.shape[0]:
        vocab_size = config.vocab_size = saved.shape[0]  # the run added tokens and saved its embeddings
        meta = streaming.meta_model(model_class, config)
    plan = None
    if chosen == "streaming":
        plan = streaming.plan_streaming_merge(streaming.base_checkpoint(inputs.base_dir), adapter, meta, dtype)
        if plan.untied:
            config.tie_word_embeddings = False
    config.architectures = [type(meta).__name__]
    config.dtype = dtype
    return MergePlan(
        inputs=inputs,
        adapter=adapter,
        dtype=dtype,
        config=config,
        model_class=model_class,
        architecture=type(meta).__name__,
        overrides=overrides,
        vocab_size=vocab_size,
        method=chosen,
        method_note=note,
        streaming=plan,
    )
