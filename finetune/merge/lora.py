"""A PEFT LoRA/DoRA adapter as the updates it makes to base weights: `scale * B @ A` per module, plus the
tensors it replaces outright (modules_to_save, saved embeddings). Anything it cannot express exactly (LoHa,
LoRA variants, conv layers) is listed in `unsupported`, and the merge falls back to PEFT for it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.errors import FinetuneError

PEFT_PREFIX = "base_model.model."

# adapter_config.json fields that change what a LoRA layer computes beyond `scale * B @ A` (plus DoRA, handled
# here), or how tied layers share it (`ensure_weight_tying`); an adapter using any of them is merged by PEFT's
# own `merge_and_unload` instead.
_VARIANT_FIELDS = (
    "lora_bias", "layer_replication", "target_parameters", "trainable_token_indices", "alora_invocation_tokens",
    "velora_config", "monteclora_config", "use_bdlora", "arrow_config", "kasa_config", "use_qalora",
    "megatron_config", "ensure_weight_tying",
)  # fmt: skip


@dataclass
class LoraUpdate:
    """The update of one base weight: `scale * B @ A`, transposed for embeddings and Conv1D layers (which store
    weights as [in, out]; the plan sets that from the layer type, as PEFT decides `fan_in_fan_out` per layer), and
    for DoRA rescaled row by row to `magnitude` (PEFT's `DoraLinearVariant.merge_safe`)."""

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
        """Rows `start:stop` of the fp32 update (same operations, in the same order, as PEFT's `get_delta_weight`)."""
        if self.transposed:
            return (self.b @ self.a[:, start:stop]).T.mul_(self.scale)
        return (self.b[start:stop] @ self.a).mul_(self.scale)

    def apply(self, rows: torch.Tensor, start: int, measure: bool = False) -> tuple[torch.Tensor, float]:
        """Merged fp32 rows `start:start+len(rows)` of the weight whose base rows are `rows` (any float dtype, left
        unchanged), and, if `measure`, the squared norm of what the update changed in them."""
        merged = self.delta(start, start + rows.shape[0])
        size = float(torch.linalg.vector_norm(merged)) ** 2 if measure and self.magnitude is None else 0.0
        merged.add_(rows)  # bf16/fp16 rows are promoted exactly to fp32
        if self.magnitude is not None:
            norm = torch.linalg.norm(merged, dim=1)
            merged.mul_((self.magnitude[start : start + rows.shape[0]] / norm).unsqueeze(1))
            if measure:
                size = float(torch.linalg.vector_norm(merged - rows)) ** 2
        return merged, size


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
        elif ".original_module." not in name:  # (the untrained original of a modules_to_save copy: unused)
            # modules_to_save copies, embeddings saved beside an embedding LoRA or after a resize, trained biases.
            # PEFT saves a resized modules_to_save layer twice, as `X.weight` and `X.modules_to_save.weight`.
            adapter.replacements[name.replace(".base_layer.", ".").replace(".modules_to_save.", ".")] = tensor

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
        magnitude = parts.get("lora_magnitude_vector")
        if magnitude is not None and (embedding or config.get("fan_in_fan_out")):
            adapter.unsupported.append(f"module {module} (DoRA on an embedding or Conv1D layer)")
            continue
        adapter.updates[f"{module}.weight"] = LoraUpdate(
            module=module,
            a=a.float(),
            b=b.float(),
            scale=scale,
            transposed=embedding,
            magnitude=None if magnitude is None else magnitude.float(),
        )
    return adapter


