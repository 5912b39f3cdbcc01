"""Trainer callbacks every run gets: early stopping, the quantized-weights guard, the ZeRO partition report."""

from __future__ import annotations

import os
import time

from transformers import TrainerCallback

from finetune.errors import FinetuneError
from finetune.recipe import Recipe


def run_callbacks(recipe: Recipe, extra=()) -> list:
    """The callbacks of a run: `extra` (the caller's), early stopping, the quantized-weights guard, diagnostics."""
    from transformers import EarlyStoppingCallback

    from finetune.distributed.zero import PARTITION_REPORT_ENV

    found = [*extra, TrainingClock()]
    if recipe.is_quantized:
        found.append(quantized_weights_guard())
    if recipe.train.early_stopping_patience:
        found.append(EarlyStoppingCallback(early_stopping_patience=recipe.train.early_stopping_patience))
    if os.environ.get(PARTITION_REPORT_ENV):
        found.append(partition_reporter(os.environ[PARTITION_REPORT_ENV]))
    return found


def training_clock(trainer):
    """The run's `TrainingClock` (every run has one; see `run_callbacks`)."""
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TrainingClock))


class TrainingClock(TrainerCallback):
    """Seconds spent training (batches, forward, backward, optimizer) and the tokens trained in them, leaving out
    evaluation and checkpoint saving; a resumed run counts its own steps only.

    The Trainer's `train_runtime` includes every evaluation, so its tokens/s fell as eval data grew. Each step is
    timed from the end of the previous step's logging, evaluation or saving to its own end. On a GPU the host runs
    ahead of the device, so the clock waits for the device only at the end of a step that logs, evaluates, saves or
    stops (a host synchronisation at every step would stall the queue): the time between two such steps is exact.
    """

    def __init__(self):
        self.seconds = 0.0
        self.tokens = 0
        self._mark: float | None = None
        self._tokens_at_start: int | None = None

    def _now(self, *args, **kwargs):
        self._mark = time.perf_counter()

    on_train_begin = on_log = on_evaluate = on_save = _now

    def on_step_begin(self, args, state, control, **kwargs):
        if self._tokens_at_start is None:  # the Trainer restores a resumed run's count after on_train_begin
            self._tokens_at_start = state.num_input_tokens_seen or 0

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_evaluate or control.should_save or control.should_training_stop:
            wait_for_device()
        now = time.perf_counter()
        self.seconds += now - (self._mark or now)
        self._mark = now
        self.tokens = (state.num_input_tokens_seen or 0) - (self._tokens_at_start or 0)


def wait_for_device() -> None:
    """Wait for the queued work of the accelerator this process uses (CUDA, XPU, ...); nothing on a CPU."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available() and accelerator.current_accelerator().type != "cpu":
        accelerator.synchronize()


def quantized_weights_guard():
    """Stop the run if a 4-bit layer was repacked for inference: training on it would use wrong gradients.

    `attach_adapter` keeps bitsandbytes from repacking; this checks that it held, when training starts and after
    every evaluation (the eval-mode, no-grad forward passes that trigger the repacking).
    """
    from transformers import TrainerCallback

    from finetune.models.quantization import repacked_4bit_layers

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

    from finetune.distributed.zero import write_partition_report

    class PartitionReport(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            write_partition_report(model, folder, args.process_index, args.world_size)

    return PartitionReport()
