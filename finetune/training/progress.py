"""What training prints while it runs: one line per logging step and one per evaluation, above the progress bar,
instead of the Trainer's dictionaries of strings. Every logged number stays in `trainer.state.log_history`
(`train_metrics.json`) and reaches the trackers (TensorBoard) as before; only the printing changes.

    step  10/112 | loss 2.4170 | lr 1.94e-03 | 612 tokens/s | 0:41 elapsed, 7:02 left
    eval at step 56/112 | loss 1.2340 | accuracy 0.9120 | f1_macro 0.9050 | 3.1 s
"""

from __future__ import annotations

import time

from transformers.trainer_callback import PrinterCallback, ProgressCallback

from finetune.training.callbacks import TrainingClock, training_clock

# Logged with every evaluation but not a result: how long it took is shown once, the rest is left to the JSON.
_EVAL_BOOKKEEPING = ("_runtime", "_samples_per_second", "_steps_per_second", "_num_tokens")


# A preference run's training figures (TRL's names), shown on its step lines: is the chosen answer preferred, by how
# much, and is it itself becoming less likely?
PREFERENCE_FIGURES = (("rewards/accuracies", "pair acc"), ("rewards/margins", "margin"), ("logps/chosen", "logps/chosen"))


def show_progress_lines(trainer) -> None:
    """Replace the Trainer's printer of log dictionaries (its progress bar, or on other processes the plain printer)
    by `ProgressLines`, through the Trainer's own callback handler."""
    for callback in list(trainer.callback_handler.callbacks):
        if isinstance(callback, (ProgressCallback, PrinterCallback)):
            trainer.remove_callback(callback)
    trainer.add_callback(ProgressLines(training_clock(trainer)))


class ProgressLines(ProgressCallback):
    """transformers' progress bar, writing `step_line` / `eval_line` above it at each log (main process only)."""

    def __init__(self, clock: TrainingClock):
        super().__init__()
        self.clock = clock
        self._started: float | None = None
        self._first_step = 0
        self._window = (0, 0.0)  # the clock's tokens and seconds at the previous training log

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._started = time.perf_counter()
        self._first_step = state.global_step  # a resumed run times its own steps only
        self._window = (self.clock.tokens, self.clock.seconds)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        step, total = state.global_step, state.max_steps
        if any(key.startswith("eval_") for key in logs):
            line = eval_line(step, total, logs)
        elif "loss" in logs:
            line = step_line(step, total, logs, self._tokens_per_second(), *self._times(step, total))
        elif "train_runtime" in logs:
            line = f"trained to step {step}/{total} in {clock_time(logs['train_runtime'])}"
            if isinstance(logs.get("train_loss"), float):
                line += f", mean loss {logs['train_loss']:.4f}"
        else:
            return
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            print(line, flush=True)

    def _tokens_per_second(self) -> float | None:
        tokens, seconds = self.clock.tokens - self._window[0], self.clock.seconds - self._window[1]
        self._window = (self.clock.tokens, self.clock.seconds)
        return tokens / seconds if tokens > 0 and seconds > 0 else None

    def _times(self, step: int, total: int) -> tuple[float | None, float | None]:
        if self._started is None:
            return None, None
        elapsed, done = time.perf_counter() - self._started, step - self._first_step
        return elapsed, (elapsed / done * max(total - step, 0) if done > 0 else None)


def step_line(step: int, total: int, logs: dict, tokens_per_second: float | None, elapsed: float | None,
              remaining: float | None) -> str:  # fmt: skip
    """`step  10/112 | loss 2.4170 | lr 1.94e-03 | 612 tokens/s | 0:41 elapsed, 7:02 left`; absent figures are left out."""
    parts = [f"step {step:>{len(str(total))}}/{total}", f"loss {_number(logs['loss'])}"]
    if isinstance(logs.get("learning_rate"), (int, float)):
        parts.append(f"lr {logs['learning_rate']:.2e}")
    for key, name in PREFERENCE_FIGURES:
        if isinstance(logs.get(key), (int, float)):
            parts.append(f"{name} {_number(logs[key])}")
    if tokens_per_second is not None:
        parts.append(f"{tokens_per_second:.0f} tokens/s")
    if elapsed is not None:
        parts.append(f"{clock_time(elapsed)} elapsed" + (f", {clock_time(remaining)} left" if remaining is not None else ""))
    return " | ".join(parts)


def eval_line(step: int, total: int, logs: dict) -> str:
    """`eval at step 56/112 | loss 1.2340 | accuracy 0.9120 | 3.1 s`: the loss, then every metric in logged order."""
    metrics = {key.removeprefix("eval_"): value for key, value in logs.items()
               if key.startswith("eval_") and not key.endswith(_EVAL_BOOKKEEPING) and isinstance(value, (int, float))}  # fmt: skip
    parts = [f"eval at step {step}/{total}"]
    if "loss" in metrics:
        parts.append(f"loss {_number(metrics.pop('loss'))}")
    parts += [f"{name} {_number(value)}" for name, value in metrics.items()]
    if isinstance(logs.get("eval_runtime"), (int, float)):
        parts.append(f"{logs['eval_runtime']:.1f} s")
    return " | ".join(parts)


def clock_time(seconds: float) -> str:
    """`0:41`, `7:02`, `1:05:09`."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
