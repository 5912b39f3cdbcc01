"""Watching a run's logged numbers: a non-finite loss stops it, a preference run whose chosen answers keep losing
probability is warned about."""

from __future__ import annotations

import logging
import math

from transformers import TrainerCallback

from finetune.errors import FinetuneError

log = logging.getLogger("finetune")


class PreferenceWatch(TrainerCallback):
    """Stops a run whose loss is NaN or infinite, naming the step and the likely causes; warns once when the chosen
    answers' log-probability falls at each of three evaluations in a row (the margin won by pushing both answers
    down)."""

    def __init__(self):
        self.chosen: list[float] = []
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if isinstance(loss, (int, float)) and not math.isfinite(loss):
            raise FinetuneError(
                f"the loss is {loss} at step {state.global_step}: fp16 overflow (use train.precision bf16 or fp32), "
                "a learning rate too high for this beta (lower train.learning_rate), or an answer whose "
                "log-probability is -inf. Checkpoints saved before this step are kept."
            )

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get("eval_logps/chosen")
        if not isinstance(value, (int, float)):
            return
        self.chosen.append(float(value))
        last = self.chosen[-3:]
        if not self.warned and len(last) == 3 and last[0] > last[1] > last[2]:
            self.warned = True
            if state.is_world_process_zero:
                log.warning(
                    "logps/chosen has fallen at each of the last three evaluations (%s): the chosen answers become "
                    "less likely too, and the margin grows by pushing both answers down. Lower train.learning_rate, "
                    "raise preference.beta, or use preference.loss: orpo (it keeps an SFT term on the chosen answers).",
                    " -> ".join(f"{v:.2f}" for v in last),
                )
