"""The tasks a recipe's `task:` can name: the class that implements each, and its traits.

Adding a task is one module in `finetune/tasks/` (a `Task` subclass) and one entry here. Code below the tasks asks a
task what it is (`traits(recipe.task).head`, `.inputs`, ...), never what it is called: `tests/test_task_names.py`
fails on a comparison of a task's name outside `finetune/tasks/`. The classes are named, not imported, so the recipe
schema can list the tasks (and `finetune validate` stay fast) without importing any of them; only the runner and the
commands (layers 5 and up) call `load_task`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TaskTraits:
    """What a task is, as the layers below the tasks need to know it."""

    summary: str  # what it trains, for the recipe reference
    inputs: Literal["tokens", "images"] = "tokens"  # what a row becomes; images have no tokenizer nor sequence length
    model: Literal["causal_lm", "classifier"] = "causal_lm"  # a model that writes text, or one that labels with a head
    served_by: Literal["chat", "predict"] | None = None  # the command that uses a finished run
    noun: str = "a"  # how messages name a run of it: "an SFT run"
    # how `finetune eval` scores it (None: not compared); `pairs`: as a language model, and its held-out pairs
    eval_scoring: Literal["language_model", "classifier", "pairs"] | None = None
    packing: bool = False  # `data.packing` applies (rows packed into max_length sequences)
    generates: bool = False  # `eval.prompts` generates after training (answers or samples), on the main process
    quantizable: bool = True  # the base can be loaded 4/8-bit (bitsandbytes)
    documents: bool = False  # reads raw text documents (files, folders) cut into blocks, not rows
    new_model: bool = False  # `model.config` may build a new, untrained model
    fills_context: bool = False  # every sequence is exactly `data.max_length` tokens, so even the default must fit

    @property
    def head(self) -> bool:
        """The model ends in a classification head (trained in full beside the adapter, saved with it)."""
        return self.model == "classifier"


@dataclass(frozen=True)
class TaskEntry:
    cls: str  # "module:Class"
    traits: TaskTraits


TASKS: dict[str, TaskEntry] = {
    "sft": TaskEntry("finetune.tasks.sft:SFTTask", TaskTraits(
        "supervised fine-tuning of a causal LM", noun="an SFT", served_by="chat", eval_scoring="language_model",
        packing=True, generates=True)),
    "classification": TaskEntry("finetune.tasks.classification:ClassificationTask", TaskTraits(
        "sequence classification", model="classifier", noun="a classification", served_by="predict",
        eval_scoring="classifier")),
    "image_classification": TaskEntry("finetune.tasks.image_classification:ImageClassificationTask", TaskTraits(
        "image classification (transfer learning)", inputs="images", model="classifier", noun="an image-classification",
        served_by="predict", quantizable=False)),
    "preference": TaskEntry("finetune.tasks.preference:PreferenceTask", TaskTraits(
        "preference tuning of a causal LM (DPO, IPO, SimPO, ORPO, KTO), from the base or a finished SFT run",
        noun="a preference", served_by="chat", eval_scoring="pairs", generates=True)),
    "pretrain": TaskEntry("finetune.tasks.pretrain:PretrainTask", TaskTraits(
        "pretraining a causal LM on raw text, from scratch or continued", noun="a pretraining", generates=True,
        documents=True, new_model=True, fills_context=True)),
}


def traits(name: str) -> TaskTraits:
    """The traits of the task registered as `name`."""
    return TASKS[name].traits


def load_task(name: str):
    """The `Task` subclass registered as `name`."""
    module, _, cls = TASKS[name].cls.partition(":")
    return getattr(importlib.import_module(module), cls)
