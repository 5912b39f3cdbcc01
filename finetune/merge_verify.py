"""Loading a base with its adapter through PEFT: the reference a merge is checked against, the fallback merge,
and the optional bitsandbytes export of a merged model.

Models are loaded one at a time and freed before the next, so checking a merge needs memory for one model in
fp32 (4 bytes per parameter), not two.
"""

from __future__ import annotations

import gc
import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from finetune.errors import FinetuneError

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


@contextmanager
def quiet_transformers():
    """Silence load reports and progress bars while the merge loads models it checks itself."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_base_with_adapter(
    base_dir: Path, adapter_dir: Path, model_class, overrides: dict, vocab_size: int | None,
    round_to: torch.dtype = torch.float32,
):  # fmt: skip
    """Base in fp32 with the adapter attached (unmerged), as PEFT runs it. `overrides` set config fields such as
    the classification labels; `vocab_size` resizes the embeddings first when the run resized them; `round_to`
    rounds the base weights to that dtype (kept in fp32 storage), as the merged checkpoint rounds them."""
    from peft import PeftModel

    with quiet_transformers():
        model = model_class.from_pretrained(base_dir, dtype=torch.float32, **overrides)
        if vocab_size is not None and vocab_size != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(vocab_size)
        if round_to != torch.float32:
            for param in model.parameters():  # one tensor at a time: no second copy of the model
                param.data = param.data.to(round_to).float()
        try:
            model = PeftModel.from_pretrained(model, adapter_dir)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise FinetuneError(f"PEFT cannot load adapter {adapter_dir} onto base {base_dir}: {exc}") from None
    return model.eval()


def peft_merge(
    base_dir: Path, adapter_dir: Path, model_class, overrides: dict, vocab_size: int | None,
    dtype: torch.dtype, out_dir: Path, max_shard_size: int,
) -> None:  # fmt: skip
    """Merge with PEFT's `merge_and_unload` into the fp32 base, then cast and save (needs the whole model in RAM)."""
    model = load_base_with_adapter(base_dir, adapter_dir, model_class, overrides, vocab_size)
    with quiet_transformers():
        merged = model.merge_and_unload(safe_merge=True).to(dtype)
        merged.config.dtype = dtype
        merged.save_pretrained(out_dir, max_shard_size=max_shard_size)
    del model, merged  # one model in memory at a time: free before the caller loads the next
    gc.collect()


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
    name = str(dtype).removeprefix("torch.")
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
        model = model_class.from_pretrained(merged_dir, quantization_config=config, device_map=device)
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
