"""The optional bitsandbytes export of a merged model (`finetune merge --quantize 4|8`)."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch

from finetune.models.loading import load_checkpoint, quiet_transformers
from finetune.merge.verify import load_merged, logits_of

log = logging.getLogger(__name__)


def quantize_export(
    merged_dir: Path, out_dir: Path, bits: int, model_class, inputs: list[torch.Tensor],
    merged_logits: list[torch.Tensor] | None, max_shard_size: int | str = "5GB",
) -> dict:  # fmt: skip
    """Save a bitsandbytes 4-bit (nf4, double quant) or 8-bit copy of the merged model and check it reloads.

    The head and output embeddings stay in full precision (transformers' default). Reports how far the
    reloaded quantized model's logits are from the full-precision merge: that is rounding, not a merge error.
    """
    from transformers import BitsAndBytesConfig

    if bits == 4:
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32 if not torch.cuda.is_available() else torch.bfloat16,
        )  # fmt: skip
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with quiet_transformers():
        model = load_checkpoint(model_class, merged_dir, None, quantization_config=config, device_map=device)
        # Save before any forward pass: on CPUs with AVX512-bf16, bitsandbytes repacks 4-bit weights on the first
        # forward and the repacked state does not round-trip through save_pretrained exactly.
        model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    del model
    gc.collect()
    reloaded = load_merged(out_dir, model_class, device_map=device)
    with quiet_transformers():
        logits = logits_of(reloaded, [ids.to(device) for ids in inputs])
    del reloaded
    gc.collect()
    report = {"bits": bits, "quant_type": "nf4" if bits == 4 else "int8", "device": device}
    if merged_logits is not None:
        report["max_abs_logit_diff_vs_merged"] = max(
            float((a.cpu() - b).abs().max()) for a, b in zip(logits, merged_logits)
        )
    return report
