"""No host synchronisation inside a training step, except at logging steps.

On a GPU every read of a device tensor on the host (`.item()`, `.tolist()`, `.cpu()`, a Python `if` on a tensor, an
operation whose output size depends on the data such as `nonzero`) waits for all the queued work, so the host stops
running ahead of the GPU. Counted here on CPU, where the same operations dispatch the same way: one non-logging step
of a tiny padding-free LoRA run through the kit's own trainer, with a `TorchDispatchMode` catching the operations
that read values (`aten._local_scalar_dense`, what `.item()` and `bool(tensor)` become) or size outputs by the data,
and `Tensor.tolist` / `.item` / `.cpu` / `.numpy` counted where they are called.

Two kinds of host reads are host-side by design and not counted: the collator's work on the batch before it goes to
the device (inside `torch.utils.data`), and the optimizer's step counters (PyTorch keeps them on the host unless the
optimizer is `capturable`).
"""

from __future__ import annotations

import traceback
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.recipe import validate_recipe
from support import sft_recipe, uneven_chat_rows

aten = torch.ops.aten
# Operations that read a tensor's value on the host, or whose output size depends on the data (a GPU must finish
# before the size is known).
VALUE_READS = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.equal.default,
    aten._unique2.default, aten.unique_consecutive.default, aten.is_nonzero.default,
    aten.repeat_interleave.Tensor,  # without output_size it reads the repeats' sum
}  # fmt: skip
HOST_SIDE = ("torch/utils/data/",)  # the DataLoader and its collator: host tensors before they reach the device


def _where() -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if "test_host_syncs.py" not in f.filename]
    return " <- ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in frames[-4:][::-1])


def _host_side(stack) -> bool:
    return any(marker in f.filename for f in stack for marker in HOST_SIDE)


class SyncCounter(TorchDispatchMode):
    """Every value read of a device-side tensor while active: (operation, where it was called)."""

    def __init__(self, optimizer_steps: set[int]):
        super().__init__()
        self.found: list[tuple[str, str]] = []
        self.optimizer_steps = optimizer_steps

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._reads(func, args, kwargs) and not _host_side(traceback.extract_stack()):
            self.found.append((str(func), _where()))
        return func(*args, **kwargs)

    def _reads(self, func, args, kwargs) -> bool:
        if func is aten._local_scalar_dense.default and args[0].data_ptr() in self.optimizer_steps:
            return False  # the optimizer's step counter: a host tensor on GPUs too
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None:
            return False
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            return any(i is not None and i.dtype == torch.bool for i in args[1])  # boolean indexing: a nonzero
        return func in VALUE_READS


@pytest.fixture
def host_reads(monkeypatch):
    """Host reads counted by Tensor method, however the tensor was made (`.cpu()` of a CPU tensor dispatches nothing)."""
    found: list[tuple[str, str]] = []
    active = {"on": False, "steps": set()}
    for name in ("tolist", "item", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            counts = active["on"] and self.data_ptr() not in active["steps"]
            if counts and not _host_side(traceback.extract_stack()):
                found.append((f"Tensor.{_name}", _where()))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return found, active


def test_no_host_sync_in_a_non_logging_step(tiny_llama_dir, tmp_path, monkeypatch, host_reads):
    """Step 2 of 3 (step 1 logs, as `logging_first_step`; step 3 ends training and logs) reads nothing on the host:
    from the end of step 1's logging to the end of step 2, batch fetch, forward, backward, optimizer and callbacks."""
    from transformers import Trainer, TrainerCallback

    from finetune.runner import run

    found, active = host_reads
    window = {"counter": None, "logged": []}
    original = Trainer._maybe_log_save_evaluate

    def timed(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        step = self.state.global_step
        if step == 1 and window["counter"] is None:
            steps = {s["step"].data_ptr() for s in self.optimizer.state.values() if torch.is_tensor(s.get("step"))}
            window["counter"] = SyncCounter(steps)
            window["counter"].__enter__()
            active.update(on=True, steps=steps)
        elif step == 2 and active["on"]:
            active["on"] = False
            window["counter"].__exit__(None, None, None)
        return result

    class Logged(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            window["logged"].append(state.global_step)

    monkeypatch.setattr(Trainer, "_maybe_log_save_evaluate", timed)
    data = uneven_chat_rows(tmp_path / "uneven.jsonl")
    recipe = validate_recipe(sft_recipe(
        tiny_llama_dir, tmp_path,
        data={"train": str(data), "max_length": 48, "padding_free": True},
        train={"epochs": 1, "max_steps": 3, "micro_batch_size": 6, "logging_steps": 10},
    ))  # fmt: skip
    result = run(recipe, callbacks=[Logged()])

    counter = window["counter"]
    assert counter is not None and not active["on"], "the measured window never opened and closed"
    assert 2 not in window["logged"] and 1 in window["logged"]  # step 2 really is a non-logging step
    # The per-batch metrics kept on the device are numbers again in the log (step 1's), the token counts agree.
    logged = [h for h in result.metrics["log_history"] if "loss" in h]
    assert [h["step"] for h in logged] == [1]
    assert isinstance(logged[0]["mean_token_accuracy"], float) and 0 <= logged[0]["mean_token_accuracy"] <= 1
    seen = result.metrics["num_input_tokens_seen"]
    assert 0 < logged[0]["num_tokens"] < seen == result.metrics["summary"]["training_tokens"]
    reads = Counter(counter.found + found)
    assert not reads, f"{sum(reads.values())} host reads in a non-logging step:\n" + "\n".join(
        f"{n} x {op} at {where}" for (op, where), n in reads.most_common()
    )


def test_the_counter_sees_a_sync():
    """The counter is not blind: `.item()` of a computed tensor and a boolean index are caught."""
    x = torch.arange(6.0)
    with SyncCounter(set()) as counter:
        _ = (x * 2).sum().item()
        _ = x[x > 2]
        if (x > 1).any():
            pass
    ops = [op for op, _ in counter.found]
    assert ops.count("aten._local_scalar_dense.default") == 2 and "aten.index.Tensor" in ops
