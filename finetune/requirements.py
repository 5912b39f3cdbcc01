"""The packages a recipe's options need, checked before anything heavy runs: each missing one is one message naming
the key, the package and the `pip install` that brings it (or the choice that works without it).

Only whether a package is installed is asked (`importlib.util.find_spec`): importing bitsandbytes or DeepSpeed takes
seconds and prints notices, and the check must stay fast.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

from finetune.recipe import Recipe

BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


@dataclass(frozen=True)
class Requirement:
    key: str  # the recipe key, as messages name it
    modules: tuple[str, ...]  # importable modules, any of which will do
    install: str  # the pip command that brings one
    instead: str  # what works without it
    needed: Callable[[Recipe], str | None]  # the value that needs it, or None

    def problem(self, recipe: Recipe) -> str | None:
        value = self.needed(recipe)
        if value is None or any(importlib.util.find_spec(m) is not None for m in self.modules):
            return None
        return f"{self.key}: {value} needs {self.modules[0]}, which is not installed here: {self.install} ({self.instead})."


def _tracker(name: str) -> Callable[[Recipe], str | None]:
    return lambda recipe: name if name in recipe.train.report_to else None


REQUIREMENTS = (
    Requirement("quantization.bits", ("bitsandbytes",), "pip install 'finetune-kit[quant]'",
                "or load the model unquantized: no quantization.bits, adapter.type lora instead of qlora",
                lambda r: str(r.quantization.bits) if r.quantization.bits is not None else None),
    Requirement("train.optimizer", ("bitsandbytes",), "pip install 'finetune-kit[quant]'", "or use adamw_torch",
                lambda r: r.train.optimizer if r.train.optimizer in BNB_OPTIMIZERS else None),
    Requirement("train.report_to", ("mlflow",), "pip install mlflow", "or remove mlflow from train.report_to",
                _tracker("mlflow")),
    Requirement("train.report_to", ("wandb",), "pip install wandb", "or remove wandb from train.report_to",
                _tracker("wandb")),
    Requirement("train.report_to", ("tensorboard", "tensorboardX"), "pip install tensorboard",
                "or remove tensorboard from train.report_to", _tracker("tensorboard")),
    Requirement("deepspeed", ("deepspeed",), "pip install 'finetune-kit[deepspeed]'", "or remove deepspeed",
                lambda r: r.deepspeed),
    Requirement("model.attn_implementation", ("flash_attn",), "pip install flash-attn --no-build-isolation (CUDA only)",
                "or use sdpa", lambda r: r.model.attn_implementation if r.model.attn_implementation == "flash_attention_2" else None),
    Requirement("train.kernels", ("liger_kernel",), "pip install 'finetune-kit[kernels]' (CUDA only)",
                "or remove train.kernels", lambda r: r.train.kernels if r.train.device != "cpu" else None),
    Requirement("eval.tasks", ("lm_eval",), "pip install 'finetune-kit[eval]'", "or eval.tasks: []",
                lambda r: ", ".join(r.eval.tasks) if r.eval.tasks else None),
    Requirement("eval.metrics", ("evaluate",), "pip install evaluate", "or remove eval.metrics",
                lambda r: ", ".join(r.eval.metrics) if r.eval.metrics else None),
)  # fmt: skip


def package_problems(recipe: Recipe) -> list[str]:
    """One message per recipe value whose package is not installed."""
    return [p for p in (req.problem(recipe) for req in REQUIREMENTS) if p]
