"""The plan printed before training: what will run, on what, for how long, in how much memory."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from finetune.models.parameters import ParamCounts
from finetune.recipe import Recipe
from finetune.registry import traits
from finetune.runtime import Runtime
from finetune.training.memory import MemoryEstimate


@dataclass
class Plan:
    model: str
    task: str
    adapter: str
    quantization: str
    trainable_params: int
    total_params: int
    weight_mb: float
    weight_mb_unquantized: float
    train_rows: int
    eval_rows: int
    skipped_rows: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    processes: int
    effective_batch_size: int
    steps: int
    epochs: float
    max_length: int
    precision: str
    device: str
    threads: int
    threads_note: str
    deepspeed: str | None
    rows_before_packing: int | None = None
    remote_code: bool = False  # model.trust_remote_code: the checkpoint's own code runs
    memory: MemoryEstimate | None = None

    def as_dict(self) -> dict:
        return {**asdict(self), "memory": self.memory.as_dict() if self.memory else None}

    def render(self) -> str:
        pct = 100.0 * self.trainable_params / max(1, self.total_params)
        weights = f"{self.weight_mb:,.1f} MB"
        if self.quantization != "none":
            weights += f" quantized ({self.weight_mb_unquantized:,.1f} MB unquantized, {self.weight_mb_unquantized / max(self.weight_mb, 1e-9):.1f}x)"
        rows = f"{self.train_rows:,} train / {self.eval_rows:,} eval"
        if self.rows_before_packing is not None:
            rows = f"{self.rows_before_packing:,} train rows packed into {self.train_rows:,} sequences / {self.eval_rows:,} eval"
        if self.skipped_rows:
            rows += f" ({self.skipped_rows:,} unusable rows skipped)"
        lines = [
            ("model", self.model),
            ("task", self.task),
            ("adapter", self.adapter),
            ("quantization", self.quantization),
            ("parameters", f"{self.trainable_params:,} trainable of {self.total_params:,} ({pct:.2f}%)"),
            ("weights", weights),
            ("data", rows),
            (
                "batch",
                f"{self.micro_batch_size} micro x {self.gradient_accumulation_steps} accumulation x "
                f"{self.processes} process(es) = {self.effective_batch_size} per step",
            ),
            ("steps", f"{self.steps:,} ({self.epochs:g} epoch(s))"),
            *([] if traits(self.task).inputs == "images" else [("sequence length", f"{self.max_length}")]),
            ("precision", self.precision),
            ("device", self.device),
            ("threads", f"{self.threads} per process ({self.threads_note})"),
            ("deepspeed", self.deepspeed or "off"),
        ]
        if self.memory is not None:
            lines.append(("memory", self.memory.render()))
        if self.remote_code:
            lines.append(("remote code", "ON (model.trust_remote_code) — runs code shipped with the checkpoint"))
        width = max(len(k) for k, _ in lines)
        return "\n".join(["Plan:"] + [f"  {k.ljust(width)}  {v}" for k, v in lines])


def optimizer_steps(recipe: Recipe, train_rows: int, processes: int) -> tuple[int, float]:
    """Optimizer steps and epochs the Trainer will run (it drops no partial batch)."""
    t = recipe.train
    steps_per_epoch = max(1, math.ceil(train_rows / (t.micro_batch_size * processes)) // t.gradient_accumulation_steps)
    if t.max_steps:
        return t.max_steps, t.max_steps / steps_per_epoch
    return max(1, math.ceil(steps_per_epoch * t.epochs)), t.epochs


def make_plan(
    recipe: Recipe, runtime: Runtime, counts: ParamCounts, train_rows: int, eval_rows: int, skipped: int, model_name: str,
    rows_before_packing: int | None = None, memory: MemoryEstimate | None = None,
) -> Plan:
    """What the run will do; `train_rows` are what the trainer iterates (packed sequences when packing)."""
    t = recipe.train
    steps, epochs = optimizer_steps(recipe, train_rows, runtime.world_size)
    q = recipe.quantization
    quant = "none" if q.bits is None else (f"4-bit {q.quant_type}" + (" + double quant" if q.double_quant else "") if q.bits == 4 else "8-bit (LLM.int8)")
    a = recipe.adapter
    adapter = "full fine-tune" if a.type == "none" else "none: the head alone is trained" if a.type == "head" else (
        f"{a.type} r={a.r} alpha={a.alpha:g} dropout={a.dropout:g} targets={','.join(a.target_modules)}"
        + (" rsLoRA" if a.use_rslora else "")
        + (" DoRA" if a.use_dora else "")
    )
    precision = runtime.precision + (f" — {runtime.precision_note}" if runtime.precision_note else "")
    return Plan(
        model=model_name,
        task=recipe.task,
        adapter=adapter,
        quantization=quant,
        trainable_params=counts.trainable,
        total_params=counts.total,
        weight_mb=counts.weight_bytes / 2**20,
        weight_mb_unquantized=counts.weight_bytes_unquantized / 2**20,
        train_rows=train_rows,
        eval_rows=eval_rows,
        skipped_rows=skipped,
        micro_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        processes=runtime.world_size,
        effective_batch_size=t.micro_batch_size * t.gradient_accumulation_steps * runtime.world_size,
        steps=steps,
        epochs=round(epochs, 3),
        max_length=recipe.data.max_length,
        precision=precision,
        device=runtime.device,
        threads=runtime.num_threads,
        threads_note=runtime.threads_note,
        deepspeed=recipe.deepspeed,
        rows_before_packing=rows_before_packing,
        remote_code=recipe.model.trust_remote_code,
        memory=memory,
    )
