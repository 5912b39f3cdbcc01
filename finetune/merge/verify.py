"""Checking a merge: the merged model's logits against the base with its adapter, on fixed prompts."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from finetune.dtypes import name_of
from finetune.errors import FinetuneError
from finetune.merge.peft import load_base_with_adapter
from finetune.models.loading import quiet_transformers

log = logging.getLogger(__name__)


# How close the merged model must be to base + adapter. The reference runs in fp32 through PEFT on the base weights
# rounded to the output dtype (exactly the values the merged checkpoint stores for every weight the adapter does
# not touch); the merged model is loaded from disk and also run in fp32. What remains is (a) fp32 reassociation,
# W'x vs Wx + B(Ax), ~1e-6 of the logit scale, and (b) rounding each merged W + delta to the output dtype, which
# loses part of a delta that is small next to W (bf16 keeps 8 mantissa bits, fp16 11).
# Default tolerance: RELATIVE_TOLERANCE[dtype] x max(1, max |reference logit|); for bf16/fp16 also at most
# ADAPTER_EFFECT_SHARE x the adapter's own effect (max |reference - base| logits), so a merge whose update was
# lost to rounding (or never applied) fails instead of hiding inside the rounding allowance. On SmolLM2-135M
# (logit scale ~39) with a rank-16 all-linear update of 1% of each weight's norm the differences are 1.3e-4 (fp32),
# 0.057 (fp16) and 0.53 (bf16): 30x, 7x and 3.7x below the relative limits (bf16: 2x below its binding limit,
# half the adapter effect of 2.3). With 0.1% updates bf16 loses most of the update (diff 0.28 for an adapter
# effect of 0.30) and the second rule fails it, as it should; fp16 passes. tests/test_merge.py::
# test_tolerances_on_a_real_model (slow) reproduces these numbers.
RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


ADAPTER_EFFECT_SHARE = 0.5


DEFAULT_PROMPTS = (
    "The capital of France is",
    "Write one sentence about the sea and the mountains.",
    "Question: what is two plus three? Answer:",
)


MAX_TOKENS = 128


@dataclass
class Verification:
    """Merged logits vs base + adapter logits on the same inputs."""

    prompts: int
    tokens: int
    max_abs_logit_diff: float
    max_abs_logit: float
    adapter_effect: float  # max |logit change| the adapter causes on the base
    tolerance: float
    tolerance_rule: str
    passed: bool
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def verification_inputs(tokenizer_dir: Path | None, prompts: list[str], vocab_size: int) -> list[torch.Tensor]:
    """Token ids of the prompts (plus one chat-formatted prompt when the tokenizer has a template)."""
    if tokenizer_dir is None:  # no tokenizer anywhere: fixed id sequences still exercise every layer
        return [(torch.arange(1, 17) + i).remainder(vocab_size).unsqueeze(0) for i in range(3)]
    from transformers import AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = list(prompts)
    if getattr(tokenizer, "chat_template", None):
        texts.append(tokenizer.apply_chat_template([{"role": "user", "content": prompts[0]}], tokenize=False,
                                                   add_generation_prompt=True))  # fmt: skip
    inputs = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=MAX_TOKENS)["input_ids"]
        if ids.shape[1]:
            inputs.append(ids)
    return inputs


@torch.no_grad()
def logits_of(model, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=ids).logits.float() for ids in inputs]


def load_merged(out_dir: Path, model_class, **kwargs):
    """Load the merged folder with plain transformers; any missing, unexpected or resized weight is an error."""
    with quiet_transformers():
        model, info = model_class.from_pretrained(out_dir, output_loading_info=True, **kwargs)
    problems = {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs" and v}
    if problems:
        raise FinetuneError(f"the merged checkpoint does not load cleanly with transformers: {problems}")
    return model.eval()


def default_tolerance(dtype: torch.dtype, max_abs_logit: float, adapter_effect: float) -> tuple[float, str]:
    rel = RELATIVE_TOLERANCE[dtype]
    name = name_of(dtype)
    tolerance, rule = rel * max(1.0, max_abs_logit), f"{rel:g} x max(1, max |reference logit|) for {name}"
    if dtype != torch.float32 and adapter_effect > 0 and ADAPTER_EFFECT_SHARE * adapter_effect < tolerance:
        tolerance = ADAPTER_EFFECT_SHARE * adapter_effect
        rule = f"{ADAPTER_EFFECT_SHARE:g} x the adapter's effect on the logits (smaller than {rel:g} x logit scale) for {name}"
    return tolerance, rule


def verify_merge(
    out_dir: Path, base_dir: Path, adapter_dir: Path, model_class, overrides: dict, vocab_size: int | None,
    inputs: list[torch.Tensor], dtype: torch.dtype, tolerance: float | None,
) -> tuple[Verification, list[torch.Tensor]]:  # fmt: skip
    """Compare the merged model (from disk, run in fp32) with base + adapter through PEFT (fp32)."""
    started = time.perf_counter()
    reference_model = load_base_with_adapter(base_dir, adapter_dir, model_class, overrides, vocab_size, round_to=dtype)
    reference = logits_of(reference_model, inputs)
    with reference_model.disable_adapter():
        base = logits_of(reference_model, inputs)
    del reference_model  # one model in memory at a time
    gc.collect()
    merged_model = load_merged(out_dir, model_class, dtype=torch.float32)
    merged = logits_of(merged_model, inputs)
    del merged_model
    gc.collect()

    diff = max(float((a - b).abs().max()) for a, b in zip(reference, merged))
    effect = max(float((a - b).abs().max()) for a, b in zip(reference, base))
    scale = max(float(r.abs().max()) for r in reference)
    if tolerance is None:
        tolerance, rule = default_tolerance(dtype, scale, effect)
    else:
        rule = "given (--tolerance / merge.tolerance)"
    result = Verification(
        prompts=len(inputs),
        tokens=sum(ids.shape[1] for ids in inputs),
        max_abs_logit_diff=diff,
        max_abs_logit=scale,
        adapter_effect=effect,
        tolerance=tolerance,
        tolerance_rule=rule,
        passed=diff <= tolerance,
        seconds=round(time.perf_counter() - started, 2),
    )
    return result, merged
