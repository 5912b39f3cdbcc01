"""A merged causal LM written as GGUF the way llama.cpp's own converter (convert_hf_to_gguf.py) writes it: its tensor
names, the Q/K row order of its RoPE, a type per tensor, the model's hyperparameters. Tensors are read from the
safetensors shards, converted and written one at a time, so memory holds one tensor, not the model.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError

log = logging.getLogger(__name__)

QUANTS = ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


@dataclass(frozen=True)
class Arch:
    """How llama.cpp names a transformers architecture, and whether its converter permutes Q/K rows."""

    name: str  # general.architecture
    permute_qk: bool  # llama.cpp's RoPE pairs rows (i, i + d/2) of each head; HF Llama stores them interleaved


# transformers class -> GGUF architecture. Mistral is written as "llama", as llama.cpp's converter does.
ARCHITECTURES = {
    "LlamaForCausalLM": Arch("llama", True),
    "MistralForCausalLM": Arch("llama", True),
    "Qwen2ForCausalLM": Arch("qwen2", False),
    "Qwen3ForCausalLM": Arch("qwen3", False),
}
SKIPPED_TENSORS = ("rotary_emb.inv_freq",)


@dataclass
class TensorPlan:
    """One tensor of the file: where it comes from, its GGUF name, type and byte size."""

    source: str  # name in the safetensors checkpoint
    shard: str
    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    nbytes: int
    permute_heads: int | None = None  # heads to permute Q/K rows by (None: written as stored)


def gguf_arch(name: str):
    import gguf

    return {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}[name]


def architecture_of(config: dict, where: str) -> Arch:
    """The GGUF architecture of a config.json, or a FinetuneError naming it and the supported ones."""
    by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    found = (config.get("architectures") or [by_type.get(config.get("model_type"), config.get("model_type", "?"))])[0]
    if found not in ARCHITECTURES:
        raise FinetuneError(
            f"{where}: architecture {found} cannot be exported to GGUF; supported: {', '.join(ARCHITECTURES)}."
        )
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
    if kind not in (None, "default", "linear"):
        raise FinetuneError(
            f"{where}: RoPE scaling {kind!r} is not written by finetune export (it needs llama.cpp's extra rope "
            "tensors); only unscaled and linear RoPE are supported."
        )
    return ARCHITECTURES[found]


def quant_type(quant: str):
    import gguf

    if quant not in QUANTS:
        raise FinetuneError(f"--quant {quant}: not supported; choose one of {', '.join(QUANTS)}.")
    return getattr(gguf.GGMLQuantizationType, quant.upper())


def file_type(quant: str) -> int:
    import gguf

    return {
        "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1, "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
        "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[quant]  # fmt: skip


def shards(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    if (folder / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise FinetuneError(f"{folder}: no model.safetensors; export reads a merged model's safetensors weights.")


def _type_of(name: str, shape: tuple[int, ...], quant: str, tied: bool):
    """The GGUF type of one tensor, following convert_hf_to_gguf: 1-D tensors (norms, biases) in F32; 2-D in the
    requested type, F16 when a row is not a whole number of quantization blocks. At 5 and 4 bits the output matrix
    (output.weight, or token_embd when tied to it) is Q8_0: llama.cpp's quantizer also keeps it at higher precision
    (Q6_K, which gguf cannot quantize in numpy)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight"):
        return Q.F32
    qtype = quant_type(quant)
    if quant.startswith(("q5", "q4")) and (name == "output.weight" or (tied and name == "token_embd.weight")):
        qtype = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return Q.F16
    return qtype


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * shape[-1] // block * size


def plan_tensors(folder: Path, config: dict, arch: Arch, quant: str, permute: bool = True) -> list[TensorPlan]:
    """Every tensor of the file with its GGUF name and type, from the safetensors headers (no weights read).
    `permute=False` skips the Q/K permutation: only for showing that verification catches it."""
    import gguf
    from safetensors import safe_open

    layers = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf_arch(arch.name), layers)
    tied = bool(config.get("tie_word_embeddings", False))
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    plans = []
    for shard in shards(folder):
        with safe_open(folder / shard, framework="pt") as f:
            for source in f.keys():
                if source.endswith(SKIPPED_TENSORS) or (tied and source == "lm_head.weight"):
                    continue  # a tied head is token_embd in llama.cpp
                name = names.get_name(source, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise FinetuneError(f"{folder / shard}: tensor {source} has no GGUF name for {arch.name}.")
                shape = tuple(f.get_slice(source).get_shape())
                qtype = _type_of(name, shape, quant, tied)
                permute_heads = None
                if arch.permute_qk and permute and source.endswith(("q_proj.weight", "k_proj.weight")):
                    permute_heads = heads if source.endswith("q_proj.weight") else kv_heads
                plans.append(TensorPlan(source, shard, name, shape, qtype, _nbytes(shape, qtype), permute_heads))
    return plans


def permute_rows(weights, heads: int):
    """llama.cpp's Q/K row order: within each head, rows (0, 2, 4, ..., 1, 3, 5, ...) of HF's layout."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def add_hyperparameters(writer, config: dict, arch: Arch, quant: str, name: str) -> None:
    """The model's shape and RoPE as llama.cpp's converter records them."""
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    heads = config["num_attention_heads"]
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch.name == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    scaling = config.get("rope_scaling") or rope
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_file_type(file_type(quant))
    writer.add_quantization_version(2)


def tensor_data(f, plan: TensorPlan):
    """One tensor as the bytes (or float array) the file stores."""
    import gguf
    import numpy as np

    data = f.get_tensor(plan.source).float().numpy()
    if plan.permute_heads:
        data = permute_rows(data, plan.permute_heads)
    Q = gguf.GGMLQuantizationType
    if plan.qtype == Q.F32:
        return data.astype(np.float32)
    if plan.qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, plan.qtype)


def write_file(writer, folder: Path, plans: list[TensorPlan]) -> None:
    """Header, metadata and tensor table first, then each tensor read, converted and written in turn."""
    import numpy as np
    from safetensors import safe_open

    import gguf

    Q = gguf.GGMLQuantizationType
    for p in plans:
        if p.qtype in (Q.F32, Q.F16):
            writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32 if p.qtype == Q.F32 else np.float16), p.nbytes)
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(p.shape, p.qtype)
            writer.add_tensor_info(p.name, byte_shape, np.dtype(np.uint8), p.nbytes, raw_dtype=p.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for shard in dict.fromkeys(p.shard for p in plans):
        with safe_open(folder / shard, framework="pt") as f:
            for p in plans:
                if p.shard == shard:
                    writer.write_tensor_data(tensor_data(f, p))
    writer.close()
