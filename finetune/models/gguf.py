"""GGUF checkpoints: dequantized once into a safetensors folder, cached and reused."""

from __future__ import annotations

import hashlib
import logging
import shutil
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


def gguf_metadata(source: Path) -> dict:
    """The scalar and string metadata of a GGUF file (`general.architecture`, `llama.context_length`...), read from
    its header by `gguf`'s reader (the tensors stay memory-mapped, unread; arrays such as the tokenizer's are left
    out). Raises ValueError for a file that is not GGUF version 2 or 3."""
    from gguf import GGUFReader, GGUFValueType

    try:
        reader = GGUFReader(source)
    except (ValueError, IndexError, KeyError, OverflowError) as err:  # bad magic or version, a header that ends early
        raise ValueError(f"{source}: not a GGUF file of version 2 or 3, or its header is damaged ({err})") from err
    metadata = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or len(field.types) != 1 or field.types[0] == GGUFValueType.ARRAY:
            continue  # the reader's own header fields (version, counts), and arrays
        value = field.parts[field.data[0]]
        metadata[name] = bytes(value).decode("utf-8", "replace") if field.types[0] == GGUFValueType.STRING else value.item()
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
