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
from finetune.recipe import DataSource, Recipe
from finetune.tasks.base import Task

log = logging.getLogger("finetune")

# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def head_modules(model) -> list[str]:
    """The task head's top-level modules: every child of the model outside its base model that holds weights.

    `classifier` for BERT/RoBERTa, `score` for Llama-style decoders, `pre_classifier` + `classifier` for DistilBERT.
    They are newly initialised, so they are trained in full and saved with the adapter (`modules_to_save`).
    """
    base = model.base_model_prefix
    return [name for name, child in model.named_children() if name != base and next(child.parameters(), None) is not None]


def match_pad_token(model, tokenizer) -> None:
    """Decoders pool the last non-pad token, found through `config.pad_token_id`; it must be the tokenizer's pad.

    Llama-style checkpoints have no pad token: `load_tokenizer` pads with eos, and the config is told so here.
    """
    if tokenizer.pad_token_id is not None and model.config.pad_token_id != tokenizer.pad_token_id:
        if model.config.pad_token_id is not None:
            log.info("config.pad_token_id %s -> %s (the tokenizer's pad token)", model.config.pad_token_id, tokenizer.pad_token_id)
        model.config.pad_token_id = tokenizer.pad_token_id


def check_max_length(recipe: Recipe, path: str, tokenizer) -> int:
    """`data.max_length`, capped at what the model can read: its position table (512 for BERT-style models) and
    the tokenizer's `model_max_length` (RoBERTa's table has 514 rows for 512 tokens; "unknown" is a huge number)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    limits = [getattr(config.get_text_config(), "max_position_embeddings", None), tokenizer.model_max_length]
    limit = min((n for n in limits if n and n < 1_000_000), default=None)
    if limit and recipe.data.max_length > limit:
        log.warning("data.max_length %d > the %d tokens this model reads: truncating to %d.", recipe.data.max_length, limit, limit)
        return limit
    return recipe.data.max_length


def check_quantized_head(model, heads: list[str]) -> None:
    """A head quantized by bitsandbytes could neither be trained nor saved; say which key keeps it full precision."""
    for name in heads:
        for sub, module in getattr(model, name).named_modules():
            if "4bit" in type(module).__name__ or "8bit" in type(module).__name__:
                raise RecipeError(
                    [f"quantization.skip_modules: the head module '{name}' ({name}.{sub}) was quantized; "
                     f"add '{name}' to quantization.skip_modules."]
                )


# --------------------------------------------------------------------------------------------
# Loss and metrics
# --------------------------------------------------------------------------------------------


def balanced_weights(encoded: list, labels: LabelMap):
    """Loss weights for `class_weights: balanced`.

    Single-label: n_rows / (n_classes * rows_of_class), scikit-learn's "balanced" (1 for every class when balanced).
    Multi-label: BCE `pos_weight` = negatives / positives per label, so each label's positives weigh as much as its
    negatives. A class without training rows gets weight 1 (it never occurs as a target, so the value is unused).
    """
    import torch

    if labels.multi_label:
        hot = torch.tensor(encoded, dtype=torch.float64)
        positives = hot.sum(0)
        negatives = len(encoded) - positives
        return torch.where(positives > 0, negatives / positives.clamp(min=1), torch.ones_like(positives)).float()
    counts = torch.bincount(torch.tensor(encoded), minlength=len(labels.names)).double()
    weights = len(encoded) / (len(labels.names) * counts.clamp(min=1))
    return torch.where(counts > 0, weights, torch.ones_like(weights)).float()


class WeightedLoss:
    """`compute_loss_func` for the Trainer: class-weighted cross-entropy, or BCE with `pos_weight` for multi-label.

    Summed over items and divided by `num_items_in_batch` (the items of the whole accumulated batch, counted by the
    Trainer), so gradient accumulation gives the same update as one big batch; a plain mean when it is not given (eval).
    """

    def __init__(self, weights, multi_label: bool):
        self.weights = weights
        self.multi_label = multi_label

    def __call__(self, outputs, labels, num_items_in_batch=None):
        import torch.nn.functional as F

        logits = outputs["logits"]
        weights = self.weights.to(device=logits.device, dtype=logits.dtype)
        if self.multi_label:
            loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), pos_weight=weights, reduction="sum")
        else:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), weight=weights, reduction="sum")
        return loss / (num_items_in_batch if num_items_in_batch is not None else labels.numel())


def predictions_from_logits(logits, multi_label: bool):
    """Class ids (argmax), or multi-hot rows (sigmoid > 0.5, i.e. logit > 0) for multi-label."""
    import numpy as np

    logits = np.asarray(logits)
    return (logits > 0).astype(int) if multi_label else logits.argmax(-1)


REPORT_KEYS = {
    "accuracy": ["accuracy"],
    "confusion_matrix": [],  # not a number: in eval_metrics.json and confusion_matrix.png, not in the Trainer's logs
    **{name: [f"{name}_{avg}" for avg in ("macro", "micro", "weighted")] for name in ("precision", "recall", "f1")},
}


class ClassificationMetrics:
    """`compute_metrics` for the Trainer, built on the shipped offline metric modules.

    Every evaluation computes the full report (per-class scores, confusion matrix) and keeps the latest in
    `last_report`; the Trainer gets only the numbers `eval.metrics` selects (all of the report's by default), since
    it logs and compares floats. Names that are not shipped are loaded as `evaluate` modules up front, so a bad name
    fails before the model is loaded.
    """

    def __init__(self, labels: LabelMap, names: list[str]):
        from finetune.metrics import SHIPPED, load_metric

        self.labels = labels
        names = names or [n for n in SHIPPED]
        self.keys = [key for n in names if n in REPORT_KEYS for key in REPORT_KEYS[n]]
        config = "multilabel" if labels.multi_label else None
        self.extra = {n: load_metric(n, config) for n in names if n not in SHIPPED}
        self.last_report: dict = {}

    def known_keys(self) -> list[str] | None:
        """Metric names the Trainer will see (None when a custom module's keys are only known after computing it)."""
        return None if self.extra else ["loss", *self.keys]

    def __call__(self, eval_pred) -> dict[str, float]:
        from finetune.metrics import classification_report

        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        predictions = predictions_from_logits(logits, self.labels.multi_label)
        references = (eval_pred.label_ids > 0.5).astype(int) if self.labels.multi_label else eval_pred.label_ids
        report = classification_report(predictions, references, list(self.labels.names), self.labels.multi_label)
        scores = {key: report[key] for key in self.keys}
        for name, module in self.extra.items():
            result = module.compute(predictions=predictions, references=references)
            numbers = {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}
            report.update(numbers)
            scores.update(numbers)
        self.last_report = report
        return scores


def check_best_metric(recipe: Recipe, metrics: ClassificationMetrics) -> None:
    """`train.metric_for_best_model` must be a number the evaluation produces; caught before any model load."""
    name = recipe.train.metric_for_best_model
    known = metrics.known_keys()
    if name is None or known is None:
        return
    if name.removeprefix("eval_") not in known:
        import difflib

        hint = difflib.get_close_matches(name.removeprefix("eval_"), known, n=1)
        raise RecipeError(
            [f"train.metric_for_best_model: {name!r} is not computed for this run; choose one of: {', '.join(known)}."
             + (f" Did you mean '{hint[0]}'?" if hint else "")]
        )


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


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
