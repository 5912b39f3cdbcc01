"""GGUF checkpoints: dequantized once into a safetensors folder, cached and reused."""

from __future__ import annotations

import hashlib
import logging
import shutil
import struct
import tempfile
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.paths import cache_dir

log = logging.getLogger(__name__)


def converted_folder(source: Path) -> Path:
    """Where the conversion of the GGUF file `source` is cached (it holds config.json once complete)."""
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{source.stem}-{key}"


def convert_gguf(folder: Path, gguf_file: str) -> Path:
    """Dequantize a GGUF checkpoint into a safetensors folder once; later calls return the cached folder.

    Conversion takes about a minute for a 135M model on two cores, so it is keyed by the file's
    name, size and mtime and written to a temporary folder that is renamed at the end: a crash
    never leaves a half-written cache, and concurrent ranks wait on a file lock instead of
    converting twice.
    """
    from filelock import FileLock

    source = folder / gguf_file
    if not source.is_file():
        found = sorted(p.name for p in folder.glob("*.gguf")) if folder.is_dir() else []
        hint = f" GGUF files there: {', '.join(found)}." if found else ""
        raise FinetuneError(f"model.gguf_file: {source} not found.{hint}")
    target = converted_folder(source)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        log.info("Converting %s to safetensors once (cached in %s)...", source.name, target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=False)
            # transformers 5 keeps GGUF weights in their quantized blocks (not trainable, not serializable)
            # unless asked to unpack them; then the quantizer is dropped so the model saves as plain weights.
            model = AutoModelForCausalLM.from_pretrained(
                folder,
                gguf_file=gguf_file,
                dtype=torch.float32,
                quantization_config=GgufConfig(gguf_file=gguf_file, dequantize=True),
                trust_remote_code=False,  # GGUF architectures are built into transformers
            )
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer.remove_quantization_config(model)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# GGUF metadata value types (the GGUF spec): fixed-size scalars by their struct format; 8 is a string, 9 an array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def gguf_metadata(source: Path) -> dict:
    """The scalar and string metadata of a GGUF file (`general.architecture`, `llama.context_length`...), read from
    its header with `struct` alone: no tensors, no arrays (the tokenizer's are skipped), no numpy. Raises ValueError
    for a file that is not GGUF version 2 or 3."""
    with open(source, "rb") as fh:

        def read(fmt: str):
            size = struct.calcsize("<" + fmt)
            data = fh.read(size)
            if len(data) != size:
                raise ValueError(f"{source}: the GGUF header ends early")
            return struct.unpack("<" + fmt, data)[0]

        def string() -> str:
            return fh.read(read("Q")).decode("utf-8", "replace")

        def skip(kind: int) -> None:
            if kind == _STRING:
                fh.seek(read("Q"), 1)
            elif kind == _ARRAY:
                item, count = read("I"), read("Q")
                if item in _SCALARS:
                    fh.seek(count * struct.calcsize("<" + _SCALARS[item]), 1)
                else:
                    for _ in range(count):
                        skip(item)
            elif kind in _SCALARS:
                fh.seek(struct.calcsize("<" + _SCALARS[kind]), 1)
            else:
                raise ValueError(f"{source}: unknown GGUF value type {kind}")

        if fh.read(4) != b"GGUF" or read("I") not in (2, 3):
            raise ValueError(f"{source}: not a GGUF file of version 2 or 3")
        read("Q")  # tensor count
        metadata = {}
        for _ in range(read("Q")):
            key, kind = string(), read("I")
            if kind == _STRING:
                metadata[key] = string()
            elif kind in _SCALARS:
                metadata[key] = read(_SCALARS[kind])
            else:
                skip(kind)
    return metadata


def gguf_config(source: Path) -> dict:
    """What a GGUF's metadata says of the config.json transformers would build from it: the architecture, context
    length, hidden size and layers (the keys the checks read)."""
    metadata = gguf_metadata(source)
    arch = metadata.get("general.architecture")
    config = {"model_type": arch}
    for ours, theirs in (("max_position_embeddings", "context_length"), ("hidden_size", "embedding_length"),
                         ("num_hidden_layers", "block_count")):  # fmt: skip
        if isinstance(metadata.get(f"{arch}.{theirs}"), int):
            config[ours] = metadata[f"{arch}.{theirs}"]
    return config
