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

    source: str  # name in the safetensors checkpoint ("" for a tensor computed from the config)
    shard: str
    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    nbytes: int
    permute_heads: int | None = None  # heads to permute Q/K rows by (None: written as stored)
    values: object = None  # a computed tensor's data (numpy), e.g. llama3's rope_freqs


def rope_settings(config: dict) -> dict:
    """The config.json's RoPE in one dict with `rope_type` and `rope_theta`: transformers 5 writes `rope_parameters`
    (theta inside), older configs `rope_scaling` beside a top-level `rope_theta`."""
    rope = {}
    for key in ("rope_parameters", "rope_scaling"):
        value = config.get(key)
        if isinstance(value, dict):
            rope.update(value.get("full_attention", value))
    if rope.get("rope_theta") is None and config.get("rope_theta") is not None:
        rope["rope_theta"] = config["rope_theta"]
    rope["rope_type"] = rope.get("rope_type", rope.get("type")) or "default"
    return rope


def llama3_rope_factors(config: dict):
    """Llama 3.1's RoPE as llama.cpp stores it: one F32 factor per rotary frequency (head_dim / 2), by which llama.cpp
    divides that frequency. Computed as its converter (convert_hf_to_gguf.py, LlamaModel) computes them: high
    frequencies kept, low ones divided by `factor`, those between smoothly interpolated."""
    import numpy as np

    rope = rope_settings(config)
    base = float(rope.get("rope_theta", 10000.0))
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = rope.get("original_max_position_embeddings", config.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


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
    kind = rope_settings(config)["rope_type"]
    if kind not in ("default", "linear", "llama3") or (kind == "llama3" and ARCHITECTURES[found].name != "llama"):
        raise FinetuneError(
            f"{where}: RoPE scaling {kind!r} is not written by finetune export for {found}; supported: unscaled and "
            "linear RoPE, and llama3 (Llama 3.1/3.2) for the Llama family."
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
    if rope_settings(config)["rope_type"] == "llama3":  # llama.cpp's converter yields it before the model's tensors
        factors = llama3_rope_factors(config)
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        f32 = gguf.GGMLQuantizationType.F32
        plans.append(TensorPlan("", "", name, factors.shape, f32, factors.nbytes, values=factors))
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
    rope = rope_settings(config)
    theta = rope.get("rope_theta")
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
    if rope["rope_type"] == "linear":  # llama3 is the rope_freqs tensor, no scaling keys (as llama.cpp writes it)
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
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
    for p in plans:  # computed tensors come first in the plan
        if p.values is not None:
            writer.write_tensor_data(p.values)
    for shard in dict.fromkeys(p.shard for p in plans if p.values is None):
        with safe_open(folder / shard, framework="pt") as f:
            for p in plans:
                if p.shard == shard and p.values is None:
                    writer.write_tensor_data(tensor_data(f, p))
    writer.close()
