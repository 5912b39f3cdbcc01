"""`TrainingArguments` (or TRL's `SFTConfig`) from the recipe's train section."""

from __future__ import annotations

import logging
from pathlib import Path

from finetune.recipe import Recipe
from finetune.runtime import Runtime

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
        from finetune.distributed.zero import resolve_deepspeed_config

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
        # The Trainer checks every step's loss for nan/inf on the host (a GPU synchronisation per step) to leave it
        # out of the logged mean; off, a nan loss shows in the log line of its window instead of being averaged away.
        logging_nan_inf_filter=False,
        # Liger's kernels are applied by the Trainer to the model under the adapter (checks.py refuses them off CUDA).
        use_liger_kernel=t.kernels == "liger",
        # Batches from pinned memory are copied to the GPU without the host waiting for the copy.
        accelerator_config={"non_blocking": True} if runtime.device == "cuda" else None,
        disable_tqdm=not runtime.is_main,
    )
    kwargs.update(extra)
    return config_class(**kwargs)
