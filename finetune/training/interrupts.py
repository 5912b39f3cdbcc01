"""Ctrl-C and SIGTERM (what SLURM and Kubernetes send before killing a job): finish the current optimizer step,
save a checkpoint to resume from, and exit non-zero. A second Ctrl-C exits at once.

Every process of a run must stop at the same step, or the collective save would hang: with several processes the
flag is agreed on (a max all-reduce) at each step end, so a signal that reached one rank stops them all together.
"""

from __future__ import annotations

import logging
import signal
import threading
from contextlib import contextmanager

from transformers import TrainerCallback

log = logging.getLogger("finetune")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop(TrainerCallback):
    """Installed for the duration of `trainer.train()`; `stopped_at` is the step it stopped at, or None."""

    def __init__(self):
        self.requested: str | None = None
        self.stopped_at: int | None = None
        self._previous: dict = {}

    @contextmanager
    def installed(self):
        """The handlers, for the duration of the block (only the main thread may set signal handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            self.uninstall()

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:  # the second one: stop now
            self.uninstall()
            raise KeyboardInterrupt
        self.requested = name
        signal.signal(signal.SIGINT, self._handle)  # a second Ctrl-C comes back here and exits at once
        log.warning("%s: stopping after this step and saving a checkpoint to resume from (again to exit at once).", name)

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def _agreed(self) -> bool:
        import torch
        import torch.distributed as dist

        wanted = self.requested is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1.0 if wanted else 0.0])
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            wanted = bool(flag.item())
        return wanted
