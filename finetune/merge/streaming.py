"""Streaming LoRA merge: read the base checkpoint a slice at a time, add the adapter's update, write the result.

Memory is bounded by one slice of one tensor (`chunk_elements`, 4M values: <0.1 GB of fp32 working tensors)
plus the adapter, whatever the model or shard size: base tensors are read as row slices with plain file reads,
merged in fp32, cast to the output dtype and appended to an output shard whose header was written up front
(every output shape is known before the first byte is written). Everything that can go wrong with the inputs is
found by `plan_streaming_merge`, before anything is written.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.pytorch_utils import Conv1D

from finetune.errors import FinetuneError
from finetune.merge.lora import AdapterWeights, LoraUpdate

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass
class BaseTensor:
    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # where its bytes start in `file`


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
    missing = [name for name in files if not (base_dir / name).is_file()]
    if missing:
        raise FinetuneError(f"base model {base_dir}: its index names {', '.join(missing)}, which is missing.")
    tensors = {}
    for name in files:
        tensors.update(_read_header(base_dir / name))
    return tensors


def _read_header(path: Path) -> dict[str, BaseTensor]:
    """A safetensors file's tensor table, checked against the file's size (the format: an 8-byte little-endian
    header length, a JSON header of {name: {dtype, shape, data_offsets}}, then the data)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(length)) if 8 + length <= size else None
        except ValueError:  # not JSON, not UTF-8
            header = None
    if not isinstance(header, dict):
        raise FinetuneError(f"{path} is not a safetensors file.")
    header.pop("__metadata__", None)
    tensors = {}
    for key, info in header.items():
        dtype = TORCH_DTYPES.get(info["dtype"])
        if dtype is None:
            raise FinetuneError(f"{path}: tensor {key} has dtype {info['dtype']}, which the streaming merge does not read.")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != math.prod(shape) * dtype.itemsize or 8 + length + end > size:
            raise FinetuneError(f"{path}: tensor {key} has inconsistent offsets; the file is damaged.")
        tensors[key] = BaseTensor(path, key, shape, dtype, 8 + length + begin)
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
            continue
        if isinstance(model.get_submodule(update.module), Conv1D):
            update.transposed = True  # GPT-2-style layers store [in, out]
        if update.weight_shape != targets[key]:
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
        if tensor.shape != targets[key] and key not in adapter.replacements:  # (a replacement supersedes it)
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
        stored = source.dtype if source is not None else adapter.replacements[key].dtype
        return OutputTensor(
            key=key,
            shape=targets[key],
            dtype=dtype if stored.is_floating_point else stored,  # integer buffers keep their type
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
    """Reads row slices of base tensors with plain file reads (not a memory map, whose touched pages would count
    towards the process's memory up to a whole shard), keeping one shard file open at a time."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._file = None

    def rows(self, tensor: BaseTensor, start: int, stop: int) -> torch.Tensor:
        if tensor.file != self._path:
            self.close()
            self._file, self._path = open(tensor.file, "rb"), tensor.file
        row_bytes = math.prod(tensor.shape[1:]) * tensor.dtype.itemsize
        data = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        self._file.seek(tensor.offset + start * row_bytes)
        if self._file.readinto(data.numpy()) != data.numel():
            raise FinetuneError(f"{tensor.file} ended inside tensor {tensor.key}; the file is damaged.")
        shape = (stop - start, *tensor.shape[1:]) if tensor.shape else ()
        return data.view(tensor.dtype).reshape(shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._path, self._file = None, None

    def __enter__(self) -> _BaseReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
        measure = tensor.dtype != torch.float32
        merged, size = update.apply(base, start, measure)
        out = merged.to(tensor.dtype)
        if measure:
            # Of the update (merged - W), the part the rounded output lost. The base's own rounding (an fp32 base
            # saved as bf16) is not the update's loss, so it is taken out.
            lost_part = out.float().sub_(merged)
            if base.dtype != tensor.dtype:
                lost_part.sub_(base.to(tensor.dtype).float().sub_(base))
            err += float(torch.linalg.vector_norm(lost_part)) ** 2
            norm += size
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
    plan: StreamingPlan, out_dir: Path, max_shard_bytes: int, chunk_elements: int = 1 << 22
) -> StreamingResult:
    """Write the merged checkpoint (shards and, when sharded, the index) into `out_dir`."""
    shards = _shards(plan.tensors, max_shard_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    lost: dict[str, float] = {}
    with _BaseReader() as reader:
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
