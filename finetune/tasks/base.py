"""What a task supplies to the run: how rows become examples, which model class and head, which trainer, metrics
and extra outputs. `finetune.runner.run` calls these hooks in its one order; a task overrides what differs."""

from __future__ import annotations

from pathlib import Path

from finetune.recipe import DataSource, Recipe
from finetune.runtime import Runtime


class Task:
    """One run of one task. The runner creates it after the checks and calls, in order: `load_base` (the base's path
    and tokenizer), `prepare_data` (before the model is loaded, so a bad row costs seconds), `load_model` (with
    `model_class` / `model_kwargs`), `prepare_model` (before the adapter), `trainer_config` and `build_trainer`,
    `plan_lines`, and after training `metrics_extra` and, on the main process, `save_outputs`."""

    peft_task_type: str | None  # peft's TaskType name for LoraConfig
    needs_tokenizer = True  # False: the base has no tokenizer (`load_base` returns the task's preprocessing instead)

    def __init__(self, recipe: Recipe, runtime: Runtime):
        self.recipe = recipe
        self.runtime = runtime
        self.train_dataset = None
        self.eval_dataset = None
        self.skipped = 0  # unusable rows dropped under data.on_bad_row: skip

    @classmethod
    def read_rows(cls, recipe: Recipe, sources: list[DataSource], tokenizer=None):
        """Read and check every row of `sources` (`finetune validate --data`); returns `finetune.data.rows.Rows`.
        With the base model's `tokenizer`, rows that tokenize to nothing to learn from are counted too."""
        raise NotImplementedError

    @classmethod
    def training_rows_problems(cls, recipe: Recipe, rows) -> list[str]:
        """What the training rows (`read_rows`' result) and the model's config rule out together, read without the
        model (a classifier's label count); `finetune validate --data` reports them, `prepare_data` raises them."""
        return []

    @classmethod
    def data_facts(cls, recipe: Recipe, tokenizer=None):
        """The rows exactly as `prepare_data` will read them (reading, templating, masking, split, truncation), one
        `finetune.data.report.RowFacts` each, and how training batches them: a `finetune.data.report.DataFacts`
        for the data report (`finetune data`, and the verdict in the plan). Reads the tokenizer, never the model."""
        raise NotImplementedError

    def prepare_data(self, tokenizer, model_path: str, main_first) -> None:
        """Set `train_dataset`, `eval_dataset` (None without eval data) and `skipped`. `main_first` is accelerate's
        `main_process_first`, for work the main process should do (and cache) before the others read it."""
        raise NotImplementedError

    def load_base(self):
        """The base model's loadable path and its tokenizer (or what the task preprocesses its inputs with), before
        the data (a GGUF converted once, by the main process first). A task whose model is built rather than loaded
        returns None for the path."""
        from finetune.models.loading import load_base

        return load_base(self.recipe)

    def attach_adapter(self, model, heads: list[str]):
        """The model wrapped with the recipe's adapter, `heads` trained in full (`finetune.models.adapters`)."""
        from finetune.models.adapters import attach_adapter

        return attach_adapter(model, self.recipe, task_type=self.peft_task_type, head_modules=heads)

    def model_class(self):
        """The transformers auto class the base is loaded with."""
        raise NotImplementedError

    def load_model(self, path: str | None):
        """The model to train: the base at `path`, loaded with `model_class` and `model_kwargs` as the recipe says
        (dtype, quantization)."""
        from finetune.models.loading import load_model

        return load_model(self.recipe, self.runtime, path, self.model_class(), **self.model_kwargs())

    def model_kwargs(self) -> dict:
        """Extra `from_pretrained` arguments (a classifier's label count, say)."""
        return {}

    def prepare_model(self, model, tokenizer) -> list[str]:
        """Adjust the loaded model before the adapter wraps it; returns the modules to train in full (a new head)."""
        return []

    def trainer_config(self) -> tuple[type, dict]:
        """The `TrainingArguments` class the trainer takes, and the task's own arguments for it."""
        from transformers import TrainingArguments

        return TrainingArguments, {}

    def build_trainer(self, model, args, tokenizer, callbacks: list):
        raise NotImplementedError

    def plan_rows(self, trainer) -> dict:
        """What the plan says about the rows: `train_rows` (what the trainer iterates) and `rows_before_packing`."""
        return {"train_rows": len(trainer.train_dataset), "rows_before_packing": None}

    def plan_lines(self) -> list[tuple[str, str]]:
        """Extra (key, value) lines printed under the plan."""
        return []

    def metrics_extra(self) -> dict:
        """Task facts recorded in `train_metrics.json`, on every process."""
        return {}

    def save_outputs(self, trainer, out: Path, metrics: dict) -> dict:
        """Main process only, after saving the adapter: the task's own files; returns more for the metrics."""
        return {}
