"""Streaming LoRA merge: read the base checkpoint a slice at a time, add the adapter's update, write the result.

Peak memory is one slice of one tensor (`chunk_elements`, 16M values by default) plus the adapter, whatever the
model size: base tensors are read as row slices from the safetensors shards, merged in fp32, cast to the output
dtype and appended to an output shard whose header was written up front (every output shape is known before
the first byte is written). Everything that can go wrong with the inputs is found by `plan_streaming_merge`,
before anything is written.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from finetune.errors import FinetuneError

PEFT_PREFIX = "base_model.model."

# adapter_config.json fields that change what a LoRA layer computes beyond `scale * B @ A` (plus DoRA, handled
# here); an adapter using any of them is merged by PEFT's own `merge_and_unload` instead.
_VARIANT_FIELDS = (
    "lora_bias", "layer_replication", "target_parameters", "trainable_token_indices", "alora_invocation_tokens",
    "velora_config", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config", "use_qalora",
    "megatron_config",
)  # fmt: skip

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


@dataclass
class LoraUpdate:
    """The update of one base weight: `scale * B @ A`, transposed for embeddings and Conv1D (`fan_in_fan_out`),
    and for DoRA rescaled row by row to `magnitude` (PEFT's `DoraLinearVariant.merge_safe`)."""

    module: str
    a: torch.Tensor  # [r, in] (embedding: [r, num_embeddings])
    b: torch.Tensor  # [out, r] (embedding: [dim, r])
    scale: float
    transposed: bool = False
    magnitude: torch.Tensor | None = None  # DoRA: one value per output row

    @property
    def weight_shape(self) -> tuple[int, int]:
        rows, cols = self.b.shape[0], self.a.shape[1]
        return (cols, rows) if self.transposed else (rows, cols)

    def delta(self, start: int, stop: int) -> torch.Tensor:
        """Rows `start:stop` of the fp32 update (same operation order as PEFT's `get_delta_weight`)."""
        if self.transposed:
            return (self.b @ self.a[:, start:stop]).T * self.scale
        return (self.b[start:stop] @ self.a) * self.scale

    def apply(self, rows: torch.Tensor, start: int) -> torch.Tensor:
        """Merged fp32 rows `start:start+len(rows)` of the weight whose base rows are `rows`."""
        merged = rows.float() + self.delta(start, start + rows.shape[0])
        if self.magnitude is not None:
            norm = torch.linalg.norm(merged, dim=1)
            merged = (self.magnitude[start : start + rows.shape[0]] / norm).unsqueeze(1) * merged
        return merged


@dataclass
class AdapterWeights:
    """An adapter's tensors, sorted by what the merge does with them (names are the model's parameter names)."""

    config: dict
    updates: dict[str, LoraUpdate] = field(default_factory=dict)  # "model.layers.0.self_attn.q_proj.weight" -> update
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save, saved embeddings, biases
    unsupported: list[str] = field(default_factory=list)  # why the streaming merge cannot reproduce it exactly

    @property
    def kind(self) -> str:
        peft_type = str(self.config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            return peft_type.lower()
        return "dora" if self.config.get("use_dora") else ("rslora" if self.config.get("use_rslora") else "lora")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's `get_pattern_key` rule: a pattern applies when it matches the end of the module name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def read_adapter(adapter_dir: Path) -> AdapterWeights:
    """Read adapter_config.json and adapter_model.safetensors; note anything the streaming merge cannot do."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    adapter = AdapterWeights(config=config)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        adapter.unsupported.append(f"peft_type {config.get('peft_type')} (only LoRA and DoRA are merged by streaming)")
        return adapter
    adapter.unsupported += [f"adapter_config.{name} is set" for name in _VARIANT_FIELDS if config.get(name)]

    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        match = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|"
                             r"lora_magnitude_vector(?:\.weight)?)", name)  # fmt: skip
        if match:
            factors.setdefault(match[1], {})[match[2].split(".")[0]] = tensor
        elif "lora_" in name or "trainable_tokens" in name:
            adapter.unsupported.append(f"adapter tensor {key}")
        else:  # modules_to_save copies, full embeddings saved beside an embedding LoRA, trained biases
            adapter.replacements[name.replace(".base_layer.", ".")] = tensor

    for module, parts in factors.items():
        embedding = "lora_embedding_A" in parts
        a = parts.get("lora_embedding_A" if embedding else "lora_A")
        b = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None or a.dim() != 2:
            adapter.unsupported.append(f"module {module} ({'conv ' if a is not None and a.dim() > 2 else ''}LoRA layer)")
            continue
        r = _pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
        if r != a.shape[0]:
            raise FinetuneError(
                f"adapter_config.json gives module {module} rank {r}, but its lora_A weight has rank {a.shape[0]}: "
                "the adapter folder is inconsistent."
            )
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        transposed = embedding or bool(config.get("fan_in_fan_out"))
        magnitude = parts.get("lora_magnitude_vector")
        if magnitude is not None and transposed:
            adapter.unsupported.append(f"module {module} (DoRA on an embedding or Conv1D layer)")
            continue
        adapter.updates[f"{module}.weight"] = LoraUpdate(
            module=module,
            a=a.float(),
            b=b.float(),
            scale=scale,
            transposed=transposed,
            magnitude=None if magnitude is None else magnitude.float(),
        )
    return adapter


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass
class BaseTensor:
    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class OutputTensor:
    """One tensor of the merged checkpoint and where its values come from."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: BaseTensor | None  # None: the adapter supplies the whole tensor
    update: LoraUpdate | None = None
    replacement: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class StreamingPlan:
    tensors: list[OutputTensor]
    dropped_base_keys: list[str]  # base tensors the output architecture has no place for (e.g. lm_head under a classifier)
    untied: list[str]  # tied weights written separately because the adapter changed one side


def base_checkpoint(base_dir: Path) -> dict[str, BaseTensor]:
    """Names, shapes and dtypes of the base's safetensors tensors (headers only; no tensor is read)."""
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (base_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        found = ", ".join(sorted(p.name for p in base_dir.glob("*.bin"))) or "none"
        raise FinetuneError(
            f"base model {base_dir} has no safetensors weights (model.safetensors or its index; pickle files: {found}). "
            "The streaming merge reads safetensors only; use --method peft."
        )
    tensors = {}
    for name in files:
        with safe_open(base_dir / name, framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                tensors[key] = BaseTensor(base_dir / name, key, tuple(piece.get_shape()), TORCH_DTYPES[piece.get_dtype()])
    return tensors


def meta_model(model_class, config):
    """The output model built on the meta device: its parameter names and shapes, without allocating weights."""
    with torch.device("meta"):
        return model_class.from_config(config)


def plan_streaming_merge(
    base: dict[str, BaseTensor], adapter: AdapterWeights, model, dtype: torch.dtype
) -> StreamingPlan:
    """Match every base and adapter tensor to a weight of `model` (a meta model of the output architecture).

    Raises FinetuneError naming each adapter module that matches no base weight and each shape that differs:
    such an adapter was trained on a different base.
    """
    targets = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = model.base_model_prefix

    def target_of(base_key: str) -> str | None:
        for candidate in (base_key, f"{prefix}.{base_key}", base_key.removeprefix(f"{prefix}.")):
            if candidate in targets:
                return candidate
        return None

    sources: dict[str, BaseTensor] = {}
    dropped = []
    for key, tensor in base.items():
        target = target_of(key)
        if target is None:
            dropped.append(key)
        else:
            sources[target] = tensor

    problems = []
    for key, update in adapter.updates.items():
        if key not in targets:
            problems.append(f"adapter module {update.module} matches no weight of the base model")
        elif update.weight_shape != targets[key]:
            problems.append(
                f"{update.module}: the adapter's update has shape {list(update.weight_shape)} "
                f"but the base weight {key} has shape {list(targets[key])}"
            )
    for key, tensor in adapter.replacements.items():
        if key not in targets:
            problems.append(f"adapter tensor {key} (modules_to_save) matches no weight of the base model")
        elif tuple(tensor.shape) != targets[key]:
            problems.append(
                f"adapter tensor {key} has shape {list(tensor.shape)} but the model expects {list(targets[key])}"
            )
    for key, tensor in sources.items():
        if tensor.shape != targets[key]:
            problems.append(
                f"base checkpoint tensor {tensor.key} has shape {list(tensor.shape)} but its config.json "
                f"gives {key} shape {list(targets[key])}"
            )
    if problems:
        raise FinetuneError(
            "the adapter does not fit this base model (adapter trained on a different base?):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )

    # Tied weights (tie_word_embeddings) are written once, as save_pretrained does, unless the adapter changed one
    # side: then PEFT's model computes with two different matrices, and so must the merged one.
    changed = set(adapter.updates) | set(adapter.replacements)
    skip, untied = set(), []
    for tied, source in model.get_expanded_tied_weights_keys(all_submodels=True).items():
        if tied in changed or source in changed:
            untied.append(tied)
            sources.setdefault(tied, sources.get(source))
            sources.setdefault(source, sources.get(tied))
        else:
            skip.add(tied if source in sources or source in adapter.replacements else source)

    # Buffers and keys the class declares optional are initialized by from_pretrained itself when absent.
    ignorable = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]
    buffers = {name for name, _ in model.named_buffers()}
    missing = [
        k
        for k in targets
        if k not in skip and sources.get(k) is None and k not in adapter.replacements
        and k not in buffers and not any(p.search(k) for p in ignorable)
    ]  # fmt: skip
    if missing:
        raise FinetuneError(
            f"the base checkpoint has no tensor for {len(missing)} weight(s) of {type(model).__name__}, e.g. "
            f"{', '.join(missing[:5])}. Its layout may need a conversion the streaming merge cannot do: use --method peft."
        )

    def output(key: str, source: BaseTensor | None) -> OutputTensor:
        floating = (source.dtype if source is not None else adapter.replacements[key].dtype).is_floating_point
        return OutputTensor(
            key=key,
            shape=targets[key],
            dtype=dtype if floating else (source.dtype if source is not None else adapter.replacements[key].dtype),
            source=source,
            update=adapter.updates.get(key),
            replacement=adapter.replacements.get(key),
        )

    # Base order first (each base shard is opened once), then what only the adapter has (e.g. a classifier head).
    order = sorted((k for k, s in sources.items() if s is not None and k not in skip), key=lambda k: (sources[k].file, k))
    tensors = [output(k, sources[k]) for k in order]
    tensors += [output(k, None) for k in adapter.replacements if sources.get(k) is None and k not in skip]
    return StreamingPlan(tensors=tensors, dropped_base_keys=sorted(dropped), untied=sorted(untied))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@dataclass
class StreamingResult:
    files: list[str]
    total_bytes: int
    merged_modules: int
    # Share of each update's norm lost when the merged weight is rounded to the output dtype (bf16/fp16 round
    # W + delta to W's precision, so a delta much smaller than W partly disappears).
    update_lost_to_rounding: dict[str, float] = field(default_factory=dict)


class _BaseReader:
    """Reads row slices of base tensors, keeping only the current shard open (and mapped)."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._file: Path | None = None
        self._handle = None

    def rows(self, tensor: BaseTensor, start: int, stop: int) -> torch.Tensor:
        if tensor.file != self._file:
            self.close()
            self._handle = self._stack.enter_context(safe_open(tensor.file, framework="pt"))
            self._file = tensor.file
        if not tensor.shape:
            return self._handle.get_tensor(tensor.key)
        return self._handle.get_slice(tensor.key)[start:stop]

    def close(self) -> None:
        self._stack.close()
        self._stack, self._file, self._handle = ExitStack(), None, None


def _chunks(tensor: OutputTensor, reader: _BaseReader, chunk_elements: int, lost: dict) -> Iterator[torch.Tensor]:
    """The merged tensor in output dtype, row slice by row slice."""
    rows = tensor.shape[0] if tensor.shape else 1
    per_row = max(1, math.prod(tensor.shape[1:]))
    step = max(1, chunk_elements // per_row)
    update = tensor.update
    err = norm = 0.0
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        if tensor.replacement is not None:
            base = tensor.replacement[start:stop] if tensor.shape else tensor.replacement
        else:
            base = reader.rows(tensor.source, start, stop)
        if update is None:
            yield base.to(tensor.dtype)
            continue
        merged = update.apply(base, start)
        out = merged.to(tensor.dtype)
        if tensor.dtype != torch.float32:
            delta = merged - base.float()
            err += float((out.float() - base.to(tensor.dtype).float() - delta).pow(2).sum())
            norm += float(delta.pow(2).sum())
        yield out
    if update is not None and norm > 0:
        lost[update.module] = math.sqrt(err / norm)


def _shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Greedy split in writing order; a tensor bigger than the limit gets a shard of its own (as in transformers)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _header(tensors: list[OutputTensor]) -> bytes:
    entries, offset = {}, 0
    for t in tensors:
        entries[t.key] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    entries["__metadata__"] = {"format": "pt"}  # transformers refuses safetensors files without it
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment with spaces
    return len(raw).to_bytes(8, "little") + raw


def write_streaming_merge(
    plan: StreamingPlan, out_dir: Path, max_shard_bytes: int, chunk_elements: int = 1 << 24
) -> StreamingResult:
    """Write the merged checkpoint (shards and, when sharded, the index) into `out_dir`."""
    shards = _shards(plan.tensors, max_shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    reader = _BaseReader()
    lost: dict[str, float] = {}
    try:
        for name, tensors in zip(names, shards):
            with open(out_dir / name, "wb") as f:
                f.write(_header(tensors))
                for tensor in tensors:
                    written = 0
                    for chunk in _chunks(tensor, reader, chunk_elements, lost):
                        data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
                        f.write(data)
                        written += data.nbytes
                    if written != tensor.nbytes:  # a chunking bug would corrupt every later offset
                        raise RuntimeError(f"wrote {written} bytes for {tensor.key}, expected {tensor.nbytes}")
    finally:
        reader.close()
    total = sum(t.nbytes for t in plan.tensors)
    if n > 1:
        index = {
            "metadata": {"total_size": total, "total_parameters": sum(math.prod(t.shape) for t in plan.tensors)},
            "weight_map": {t.key: name for name, tensors in zip(names, shards) for t in tensors},
        }
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return StreamingResult(
        files=names,
        total_bytes=total,
        merged_modules=sum(t.update is not None for t in plan.tensors),
        update_lost_to_rounding=lost,
    )
