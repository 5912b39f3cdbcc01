"""Sequence classification with encoders (BERT-style) and decoders (Llama-style): LoRA + a trained head, via the Trainer.

Rows → label map → tokens (finetune/data/classification.py) → model with a new head → adapter (head trained in
full) → train → save adapter + head, tokenizer, `labels.json` → full evaluation report and confusion matrix beside
them. `finetune predict` (finetune/commands/predict.py) loads what a run saved.
"""

from __future__ import annotations

import logging
from pathlib import Path

from finetune.checks import head_problems
from finetune.data.classification import LabelMap, prepare_classification_data, tokenize_classification
from finetune.errors import RecipeError
from finetune.metrics.classification import ClassificationMetrics, check_best_metric
from finetune.models.text_classifier import check_max_length, check_quantized_head, head_modules, match_pad_token
from finetune.recipe import DataSource, Recipe
from finetune.tasks.base import Task
from finetune.training.class_weights import WeightedLoss, balanced_weights

log = logging.getLogger("finetune")


class ClassificationTask(Task):
    """Sequence classification: LoRA on the body (encoder or decoder) and a new head trained in full, by the Trainer."""

    peft_task_type = "SEQ_CLS"

    @classmethod
    def read_rows(cls, recipe: Recipe, sources: list[DataSource], tokenizer=None):
        from finetune.data.classification import load_classification_rows

        return load_classification_rows(sources, recipe)

    @classmethod
    def training_rows_problems(cls, recipe: Recipe, rows) -> list[str]:
        labels = LabelMap.from_training([r["labels"] for r in rows.rows], recipe.classification.multi_label)
        return head_problems(recipe, list(labels.names))

    @classmethod
    def data_facts(cls, recipe: Recipe, tokenizer=None):
        from finetune.data.classification import report_facts

        return report_facts(recipe, tokenizer)

    def prepare_data(self, tokenizer, model_path: str, main_first) -> None:
        # Everything that reads data or names a metric comes before the model load: a bad row costs seconds.
        recipe = self.recipe
        self.data = prepare_classification_data(recipe)
        problems = head_problems(recipe, list(self.data.labels.names))
        if problems:
            raise RecipeError(problems)
        self.metrics = ClassificationMetrics(self.data.labels, recipe.eval.metrics)
        check_best_metric(recipe, self.metrics)
        max_length = check_max_length(recipe, model_path, tokenizer)
        labels = self.data.labels
        self.train_dataset = tokenize_classification(self.data.train_rows, tokenizer, labels, max_length)
        if self.data.eval_rows:
            self.eval_dataset = tokenize_classification(self.data.eval_rows, tokenizer, labels, max_length)
        self.skipped = self.data.skipped

    def model_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_kwargs(self) -> dict:
        return self.data.labels.config_kwargs()

    def prepare_model(self, model, tokenizer) -> list[str]:
        match_pad_token(model, tokenizer)
        self.heads = head_modules(model)  # found on the model before PEFT wraps it
        check_quantized_head(model, self.heads)
        return self.heads

    def build_trainer(self, model, args, tokenizer, callbacks: list):
        from transformers import Trainer

        labels = self.data.labels
        loss_func = None
        if self.recipe.classification.class_weights == "balanced":
            weights = balanced_weights(self.train_dataset["labels"], labels)
            log.info("Class weights (balanced): %s", dict(zip(labels.names, [round(w, 4) for w in weights.tolist()])))
            loss_func = WeightedLoss(weights, labels.multi_label)
        return Trainer(
            model=model,
            args=args,
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            processing_class=tokenizer,  # also makes the default collator pad each batch dynamically
            compute_metrics=self.metrics if self.eval_dataset is not None else None,
            compute_loss_func=loss_func,
            callbacks=callbacks,
        )

    def plan_lines(self) -> list[tuple[str, str]]:
        labels = self.data.labels
        return [("labels", f"{len(labels.names)}: {', '.join(labels.names)}" + (" (multi-label)" if labels.multi_label else ""))]

    def metrics_extra(self) -> dict:
        return {"labels": list(self.data.labels.names), "heads": self.heads}

    def save_outputs(self, trainer, out: Path, metrics: dict) -> dict:
        """`labels.json`, and the full evaluation report with its confusion matrix.

        The report is the saved model's: the last evaluation when it ran at the final step (then `last_report` is
        its report), else a fresh one (of the best checkpoint reloaded by load_best_model_at_end, say).
        """
        self.data.labels.save(out)
        if self.eval_dataset is not None:
            write_eval_report(out, {"loss": metrics["eval"].get("eval_loss"), **self.metrics.last_report}, self.data.labels)
        return {}


def write_eval_report(out: Path, report: dict, labels: LabelMap) -> None:
    """`eval_metrics.json` (the full report) and, single-label, `confusion_matrix.png` beside it."""
    from finetune.metrics import plot_confusion_matrix
    from finetune.training.outputs import write_json

    write_json(out / "eval_metrics.json", report)
    if not labels.multi_label:  # multi-label has one 2x2 matrix per label, kept in the JSON
        plot_confusion_matrix(report["confusion_matrix"], list(labels.names), out / "confusion_matrix.png")
    summary = f"accuracy {report['accuracy']:.4f}"
    if "f1_macro" in report:
        summary += f", macro F1 {report['f1_macro']:.4f}"
    log.info("Eval (%d rows): %s", report["num_examples"], summary)
