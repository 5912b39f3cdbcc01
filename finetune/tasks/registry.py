"""The tasks a recipe's `task:` can name, and the class that implements each.

Adding a task is one module in `finetune/tasks/` (a `Task` subclass) and one line here. The classes are named, not
imported, so the recipe schema can list the tasks (and `finetune validate` stay fast) without importing any of them.
"""

from __future__ import annotations

import importlib

# name -> ("module:Class", what it trains, for the recipe reference)
TASKS = {
    "sft": ("finetune.tasks.sft:SFTTask", "supervised fine-tuning of a causal LM"),
    "classification": ("finetune.tasks.classification:ClassificationTask", "sequence classification"),
    "image_classification": ("finetune.tasks.image_classification:ImageClassificationTask", "image classification (transfer learning)"),
    "preference": ("finetune.tasks.preference:PreferenceTask", "preference tuning of a causal LM (DPO, IPO, SimPO, ORPO, KTO), from a base or an SFT run"),
    "pretrain": ("finetune.tasks.pretrain:PretrainTask", "pretraining a causal LM on raw text, from scratch or continued"),
}


def load_task(name: str):
    """The `Task` subclass registered as `name`."""
    module, _, cls = TASKS[name][0].partition(":")
    return getattr(importlib.import_module(module), cls)
