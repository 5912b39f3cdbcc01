"""The plan's memory estimate: what one training process holds at its peak, from the loaded model and the recipe.

Weights are measured (as loaded, quantized where quantized). Gradients and optimizer states follow from the trainable
parameters, the optimizer and the ZeRO stage. Activations are counted per token and layer for a transformer block
whose attention never materializes the sequence-by-sequence scores (SDPA's fused kernels), for the largest
micro-batch the training data can make (its longest rows; `micro_batch_size` x `max_length` without token counts). CUDA's own context
(~0.5 GiB) and the allocator's fragmentation are outside it, as they are outside `torch.cuda.max_memory_allocated`,
which is what a run records beside it (`peak_memory` in `train_metrics.json`).
"""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass

from finetune.recipe import Recipe
from finetune.registry import traits

GIB = 2**30

# Bytes of optimizer state per trainable parameter, beside the parameter itself. AdamW keeps two moments in the
# parameter's dtype (counted from its bytes below); bitsandbytes' 8-bit AdamW keeps them in one byte each (plus a
# scale per 2,048 values, which rounds away); SGD without momentum keeps nothing; Adafactor keeps factored moments
# whose size is rows + columns, counted here as 1/64 of AdamW's (a 4096x4096 matrix keeps 2 x 8k of 16M).
_STATE_BYTES_PER_PARAM = {"adamw_8bit": 2.0, "paged_adamw_8bit": 2.0, "sgd": 0.0}
_STATE_PARAM_MULTIPLE = {"adamw_torch": 2.0, "paged_adamw_32bit": 2.0, "adafactor": 2.0 / 64}


@dataclass
class MemoryEstimate:
    weights: int  # bytes, as loaded (this process's share under ZeRO-3)
    gradients: int
    optimizer: int
    activations: int | None  # None: the model's config does not say enough (see `note`)
    tokens: int  # tokens per micro-batch the activations are counted for
    note: str = ""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + (self.activations or 0)

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}

    def render(self) -> str:
        parts = [f"weights {_size(self.weights)}", f"gradients {_size(self.gradients)}", f"optimizer {_size(self.optimizer)}"]
        if self.activations is not None:
            parts.append(f"activations {_size(self.activations)} (largest micro-batch: {self.tokens:,} tokens)")
        text = f"~{_size(self.total)} per process at most: " + " + ".join(parts)
        return text + (f"; {self.note}" if self.note else "")


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def micro_batch_tokens(dataset, micro_batch_size: int, max_length: int, padding_free: bool) -> int:
    """The most tokens one micro-batch of `dataset` can hold: the `micro_batch_size` longest rows back to back
    (padding-free), or as many copies of the longest row (padded to the longest in the batch); at most
    `micro_batch_size` x `max_length`, which is also the answer for a dataset without `input_ids`."""
    ceiling = micro_batch_size * max_length
    try:
        import pyarrow.compute as pc

        column = dataset.with_format("arrow")[:]["input_ids"]
        lengths = sorted(pc.list_value_length(column).to_pylist(), reverse=True)[:micro_batch_size]
    except (KeyError, TypeError, AttributeError, ValueError):
        return ceiling
    if not lengths:
        return ceiling
    longest = [min(n, max_length) for n in lengths]
    return min(ceiling, sum(longest) if padding_free else micro_batch_size * longest[0])


def estimate_run_memory(recipe: Recipe, runtime, model, counts, tokens: int | None = None) -> MemoryEstimate:
    """The estimate for a loaded model (`counts` from `count_parameters`) under the recipe's ZeRO stage, for
    micro-batches of at most `tokens` tokens (default: `micro_batch_size` x `max_length`)."""
    stage, offloaded = 0, False
    if recipe.deepspeed:
        from finetune.distributed.zero import load_deepspeed_config, offloads, zero_stage

        config = load_deepspeed_config(recipe.deepspeed)
        stage = max(0, zero_stage(config))
        offloaded = "offload_optimizer" in offloads(config)
    value_bytes = 2 if runtime.precision in ("bf16", "fp16") else 4
    return estimate_memory(
        recipe, getattr(model, "config", None), counts.weight_bytes, counts.trainable, counts.trainable_bytes, value_bytes,
        world_size=runtime.world_size, zero_stage=stage, optimizer_offloaded=offloaded, tokens=tokens,
    )


def estimate_memory(
    recipe: Recipe, model_config, weight_bytes: int, trainable_params: int, trainable_bytes: int, activation_bytes: int,
    world_size: int = 1, zero_stage: int = 0, optimizer_offloaded: bool = False, tokens: int | None = None,
) -> MemoryEstimate:
    """Peak training memory of one process.

    `activation_bytes` is the size of one activation value (2 under bf16/fp16 autocast, 4 in fp32); `zero_stage`
    divides the optimizer states (stage >= 1), gradients (>= 2) and weights (3) among `world_size` processes.
    """
    t = recipe.train
    optimizer = trainable_bytes * _STATE_PARAM_MULTIPLE.get(t.optimizer, 0.0) + trainable_params * _STATE_BYTES_PER_PARAM.get(t.optimizer, 0.0)
    gradients = float(trainable_bytes)
    weights = float(weight_bytes)
    shards = max(1, world_size)
    if zero_stage >= 1:
        optimizer = 0.0 if optimizer_offloaded else optimizer / shards
    if zero_stage >= 2:
        gradients /= shards
    if zero_stage >= 3:
        weights /= shards

    tokens = tokens or t.micro_batch_size * recipe.data.max_length
    activations, note = _activations(recipe, model_config, tokens, activation_bytes)
    return MemoryEstimate(int(weights), int(gradients), int(optimizer), activations, tokens, note)


def _activations(recipe: Recipe, config, tokens: int, value_bytes: int) -> tuple[int | None, str]:
    """Saved-for-backward activations of one micro-batch, for a decoder or encoder of standard blocks."""
    if traits(recipe.task).inputs == "images":  # patches or feature maps, not tokens: no per-token count applies
        return None, "activations not estimated for image models"
    config = getattr(config, "text_config", None) or config
    hidden = getattr(config, "hidden_size", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not hidden or not layers:
        return None, "activations not estimated (the model's config has no hidden_size / num_hidden_layers)"
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", None) or 1
    kv = (getattr(config, "num_key_value_heads", None) or heads) * hidden // heads
    # Per token and layer, the tensors autograd keeps: the norms' inputs and outputs (4 x hidden), q, k, v before
    # and after rotary embedding, the attention output and o_proj's input (4 x hidden + 4 x kv), the residual
    # (hidden), and the MLP's gate, up, activation and product (4 x intermediate; a GELU MLP keeps 2 of them, so
    # this is its ceiling too).
    per_layer = 9 * hidden + 4 * kv + 4 * intermediate
    a = recipe.adapter
    if a.type != "none" and a.dropout > 0:
        # LoRA dropout keeps a dropped copy of each adapted layer's input and its mask (one byte per value):
        # q, k, v, o, gate and up read hidden-sized inputs, down an intermediate-sized one.
        per_layer += (6 * hidden + intermediate) * (1 + 1 / value_bytes)
    if recipe.train.gradient_checkpointing:
        # Only each layer's input is kept; one layer's activations are rebuilt at a time in backward.
        kept = (layers * hidden + per_layer) * tokens * value_bytes
    else:
        kept = layers * per_layer * tokens * value_bytes
    # The language-model head: fp32 logits at the labelled positions (at most every token), their softmax for the
    # loss and its gradient, 12 bytes per vocabulary entry. A classifier's head is a few values per example.
    vocab = getattr(config, "vocab_size", 0) if not traits(recipe.task).head else 0
    head = tokens * vocab * 12
    return int(kept + head), ""


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark: VmHWM, since Linux carries ru_maxrss over from the parent at fork."""
    try:
        with open("/proc/self/status") as f:
            return 1024 * next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(device: str) -> dict:
    """What this process held at its peak: CUDA's allocated and reserved bytes on a GPU (the figures the plan's
    estimate is for), and the RSS high-water mark everywhere."""
    peak = {"rss_bytes": peak_rss_bytes()}
    if device == "cuda":
        import torch

        peak["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        peak["cuda_max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    return peak
