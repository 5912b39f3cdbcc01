"""The runner: recipe → validate → check output folder and data → load model → attach adapter → plan → train → save → evaluate.

The order matters: everything that can fail cheaply (recipe, combinations, output folder, data rows) is checked
before the model is loaded, so a typo costs seconds, not a model load.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.recipe import Recipe, save_recipe
from finetune.runtime import Runtime, apply_threads, resolve_runtime

log = logging.getLogger("finetune")

# Recipe optimizer name → transformers `optim`, and what it becomes on CPU (bitsandbytes pages through CUDA
# unified memory; there is nothing to page on a CPU, so the unpaged optimizer does the same maths).
OPTIMIZERS = {
    "adamw_torch": ("adamw_torch", "adamw_torch"),
    "adamw_8bit": ("adamw_bnb_8bit", "adamw_bnb_8bit"),
    "paged_adamw_8bit": ("paged_adamw_8bit", "adamw_bnb_8bit"),
    "paged_adamw_32bit": ("paged_adamw_32bit", "adamw_torch"),
    "adafactor": ("adafactor", "adafactor"),
    "sgd": ("sgd", "sgd"),
}


def runtime_problems(recipe: Recipe, runtime: Runtime) -> list[str]:
    """Combinations that depend on the machine (device, installed packages), checked before loading anything."""
    problems = []
    q = recipe.quantization
    if q.bits is not None or recipe.train.optimizer in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        if importlib.util.find_spec("bitsandbytes") is None:  # whether installed; importing it is slow and noisy
            problems.append(
                "quantization / 8-bit optimizers need bitsandbytes: pip install 'finetune-kit[quant]' "
                "(or remove quantization.bits and use train.optimizer: adamw_torch)."
            )
    if q.bits == 4 and runtime.device == "cpu":
        from finetune.adapters import compute_dtype_name

        if compute_dtype_name(recipe, runtime) == "float16":
            problems.append(
                "quantization.compute_dtype: float16 on CPU: bitsandbytes' CPU kernels compute in float32 or "
                "bfloat16, and fp16 training is GPU-only. Use quantization.compute_dtype: auto (float32 here) or bfloat16."
            )
    if q.bits is not None and recipe.train.precision == "fp16" and runtime.device == "cuda":
        if recipe.quantization.compute_dtype == "bfloat16":
            problems.append("train.precision: fp16 with quantization.compute_dtype: bfloat16 mixes two half types; use one.")
    if recipe.deepspeed:
        problems += _deepspeed_problems(recipe, runtime)
    return problems


def _deepspeed_problems(recipe: Recipe, runtime: Runtime) -> list[str]:
    from finetune.zero import deepspeed_problems, deepspeed_warnings, load_deepspeed_config

    config = load_deepspeed_config(recipe.deepspeed)
    has_cuda = runtime.device == "cuda"
    if runtime.is_main:
        for warning in deepspeed_warnings(recipe, config, has_cuda=has_cuda):
            log.warning("%s", warning)
    return deepspeed_problems(recipe, config, has_cuda=has_cuda)


def check_output_dir(recipe: Recipe) -> Path:
    out = Path(recipe.output.dir)
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"output.dir: {out} exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not recipe.output.overwrite:
        raise FinetuneError(
            f"output.dir: {out} is not empty. Choose another folder, or set output.overwrite=true to write into it."
        )
    return out


def prepare_run(recipe: Recipe) -> tuple[Runtime, Path]:
    """Decide device/precision/threads, set seeds and check everything that needs no model."""
    from transformers import set_seed

    runtime = resolve_runtime(recipe)
    apply_threads(runtime)
    problems = runtime_problems(recipe, runtime)
    if problems:
        from finetune.errors import RecipeError

        raise RecipeError(problems)
    out = check_output_dir(recipe)
    set_seed(recipe.train.seed)
    # A missing rank fails after FINETUNE_JOIN_TIMEOUT instead of DeepSpeed's 30-minute default; a world smaller
    # than `finetune launch` asked for (accelerate's one-process traps) fails instead of training alone.
    from finetune.distributed import check_world_size, join_process_group

    join_process_group()
    check_world_size()
    return runtime, out


def training_arguments(recipe: Recipe, runtime: Runtime, out: Path, has_eval: bool, config_class, **extra):
    """`TrainingArguments` (or TRL's `SFTConfig`) from the recipe's train section."""
    t = recipe.train
    optim_gpu, optim_cpu = OPTIMIZERS[t.optimizer]
    optim = optim_gpu if runtime.device == "cuda" else optim_cpu
    if optim != optim_gpu and runtime.is_main:
        log.warning("train.optimizer: %s pages through CUDA memory; on CPU using %s (same update, unpaged).", t.optimizer, optim)
    eval_strategy = ("steps" if t.eval_steps else "epoch") if has_eval else "no"
    save_strategy = ("steps" if t.save_steps else "epoch") if t.save_checkpoints else "no"
    save_steps = t.save_steps
    if t.load_best_model_at_end:  # the Trainer requires saving exactly when evaluating
        save_strategy, save_steps = eval_strategy, t.eval_steps
    deepspeed = None
    if recipe.deepspeed:
        from finetune.zero import resolve_deepspeed_config

        deepspeed = str(resolve_deepspeed_config(recipe.deepspeed))
    metric = t.metric_for_best_model
    kwargs = dict(
        output_dir=str(out),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps in transformers 5
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optim,
        # Checkpointing is switched on on the model itself before the adapter is attached (see attach_adapter);
        # TRL's configs default it to on, which would slow every CPU run by ~20% unasked.
        activation_checkpointing=False,
        bf16=runtime.precision == "bf16",
        fp16=runtime.precision == "fp16",
        use_cpu=runtime.device == "cpu",
        seed=t.seed,
        data_seed=recipe.data.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps,
        eval_on_start=has_eval,  # the loss before training, on the curve and in the metrics
        save_strategy=save_strategy,
        save_steps=save_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=t.load_best_model_at_end,
        metric_for_best_model=metric,
        greater_is_better=None if metric is None else not metric.endswith("loss"),
        report_to=[r for r in t.report_to if r != "none"] or "none",
        deepspeed=deepspeed,
        dataloader_pin_memory=runtime.device == "cuda",
        ddp_find_unused_parameters=False if runtime.world_size > 1 else None,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=not runtime.is_main,
    )
    kwargs.update(extra)
    return config_class(**kwargs)


def callbacks(recipe: Recipe, extra=()) -> list:
    from transformers import EarlyStoppingCallback

    from finetune.zero import PARTITION_REPORT_ENV

    found = list(extra)
    if recipe.is_quantized:
        found.append(quantized_weights_guard())
    if recipe.train.early_stopping_patience:
        found.append(EarlyStoppingCallback(early_stopping_patience=recipe.train.early_stopping_patience))
    if os.environ.get(PARTITION_REPORT_ENV):
        found.append(partition_reporter(os.environ[PARTITION_REPORT_ENV]))
    return found


def quantized_weights_guard():
    """Stop the run if a 4-bit layer was repacked for inference: training on it would use wrong gradients.

    `attach_adapter` keeps bitsandbytes from repacking; this checks that it held, when training starts and after
    every evaluation (the eval-mode, no-grad forward passes that trigger the repacking).
    """
    from transformers import TrainerCallback

    from finetune.adapters import repacked_4bit_layers

    def check(model) -> None:
        layers = repacked_4bit_layers(model)
        if layers:
            import bitsandbytes

            raise FinetuneError(
                f"bitsandbytes {bitsandbytes.__version__} repacked {len(layers)} 4-bit layer(s) ({layers[0]}, ...) into "
                "its CPU inference layout, which has no gradients; training on would use wrong gradients, so the run "
                "stops. The kit keeps bitsandbytes 0.50 from repacking while training; this version repacks another "
                "way. Use bitsandbytes 0.50 (pip install 'bitsandbytes>=0.50,<0.51'), or train without evaluation data."
            )

    class QuantizedWeightsGuard(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            check(model)

        def on_evaluate(self, args, state, control, model=None, **kwargs):
            check(model)

    return QuantizedWeightsGuard()


def partition_reporter(folder: str):
    """FINETUNE_REPORT_PARTITION=FOLDER: each rank writes what it holds of every weight when training ends.

    A diagnostic for ZeRO-3 (is the model really split across the processes?); tests/test_zero.py reads it.
    Written after the last step, before saving: the weights ZeRO-3 keeps whole once used are then whole.
    """
    from transformers import TrainerCallback

    from finetune.zero import write_partition_report

    class PartitionReport(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            write_partition_report(model, folder, args.process_index, args.world_size)

    return PartitionReport()


def check_trainer_world(trainer) -> None:
    """The world the Trainer really got must be the one asked for."""
    from finetune.distributed import check_world_size

    check_world_size(actual=trainer.args.world_size)


def finish_distributed() -> None:
    """Tear the process group down so processes exit cleanly (gloo can abort at interpreter exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def final_evaluation(trainer, recipe: Recipe) -> dict:
    """Eval metrics of the saved model; reuses the Trainer's last evaluation when it ran at the final step."""
    history = trainer.state.log_history
    last = next((h for h in reversed(history) if "eval_loss" in h), None)
    if last is not None and last.get("step") == trainer.state.global_step and not recipe.train.load_best_model_at_end:
        return {k: v for k, v in last.items() if k.startswith("eval_")}
    return trainer.evaluate()


def save_run_files(trainer, recipe: Recipe, out: Path, plan, extra: dict | None = None) -> dict:
    """Resolved recipe, metrics JSON and loss curve beside the adapter (main process only)."""
    from finetune.outputs import plot_loss_curve, write_json

    history = trainer.state.log_history
    train_logs = [h for h in history if "train_runtime" in h]
    summary = dict(train_logs[-1]) if train_logs else {}
    seen = trainer.state.num_input_tokens_seen or 0
    if summary.get("train_runtime"):
        summary["tokens_per_second"] = round(seen / summary["train_runtime"], 2)
    losses = [h["loss"] for h in history if "loss" in h]
    metrics = {
        "plan": plan.as_dict(),
        "summary": summary,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "num_input_tokens_seen": seen,
        "log_history": history,
        **(extra or {}),
    }
    if trainer.is_world_process_zero():
        save_recipe(recipe, out)
        write_json(out / "train_metrics.json", metrics)
        plot_loss_curve(history, out / "loss_curve.png", title=f"{recipe.task}: {recipe.model.name_or_path}")
    return metrics


@dataclass
class RunResult:
    """What a finished run produced: the metrics written to train_metrics.json and the trained model in memory."""

    metrics: dict
    model: object
    tokenizer: object
    output_dir: Path
    trainer: object = None  # the Trainer that ran (its datasets and collator), for inspection


def run(recipe: Recipe, callbacks=()) -> RunResult:
    """Run the recipe's task; `callbacks` (transformers `TrainerCallback`s) are added to the Trainer's."""
    if recipe.task == "classification":
        from finetune.classify import run_classification

        return run_classification(recipe, callbacks)
    from finetune.sft import run_sft

    return run_sft(recipe, callbacks)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `finetune/run.py` and `finetune train`: RECIPE [key.path=value ...]."""
    import argparse

    from finetune.cli import add_train_arguments, guarded

    parser = argparse.ArgumentParser(prog="finetune train", description="Fine-tune a model from a YAML recipe.")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    return guarded(lambda: train_command(args))


def train_command(args) -> int:
    from finetune.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    setup_logging()
    started = time.time()
    try:
        metrics = run(recipe).metrics
    finally:
        finish_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("Done in %.0f s. Outputs in %s", time.time() - started, recipe.output.dir)
        last = metrics.get("last_loss")
        if last is not None:
            log.info("loss %.4f -> %.4f", metrics.get("first_loss"), last)
    return 0


class _DropMessages(logging.Filter):
    """Drops import-time notices that say nothing actionable on a CPU run."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    # bitsandbytes looks for an optional hub kernel package at import, even for unquantized runs; DeepSpeed
    # announces the CPU accelerator in every process. Both are noise to a user who did not ask for either.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessages("kernels-community"))
    logging.getLogger("DeepSpeed").addFilter(_DropMessages("Setting accelerator to CPU"))
    # peft and trl read transformers' deprecated `is_gradient_checkpointing`; nothing the user can change.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )
