"""Sequence classification with encoders (BERT-style) and decoders (Llama-style): LoRA + a trained head, via the Trainer.

The flow mirrors SFT: rows → label map → tokens → model with a new head → adapter (head trained in full) → train →
save adapter + head, tokenizer, `labels.json` → full evaluation report and confusion matrix beside them.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import DataError, RecipeError
from finetune.recipe import ClassificationConfig, DataSource, Recipe

log = logging.getLogger("finetune")

LABELS_FILE = "labels.json"

# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelMap:
    """Class names in id order, fixed by the training data; saved as `labels.json` beside the adapter."""

    names: tuple[str, ...]
    multi_label: bool = False

    @classmethod
    def from_training(cls, labels: list, multi_label: bool) -> LabelMap:
        """Sorted distinct labels: numerically when every label is an integer, else by name (deterministic)."""
        values = {v for row in labels for v in row}
        if values and all(isinstance(v, int) for v in values):
            names = [str(v) for v in sorted(values)]
        else:
            names = sorted({str(v) for v in values})
        return cls(tuple(names), multi_label)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def encode(self, labels: tuple) -> int | list[float]:
        """A class id (single-label), or a multi-hot float row (multi-label, the dtype BCE needs)."""
        ids = self.label2id
        if self.multi_label:
            row = [0.0] * len(self.names)
            for label in labels:
                row[ids[str(label)]] = 1.0
            return row
        return ids[str(labels[0])]

    def config_kwargs(self) -> dict:
        """What `AutoModelForSequenceClassification.from_pretrained` needs to build the head for these labels."""
        return dict(
            num_labels=len(self.names),
            id2label=dict(enumerate(self.names)),
            label2id=self.label2id,
            problem_type="multi_label_classification" if self.multi_label else "single_label_classification",
        )

    def as_json(self) -> dict:
        return {
            "id2label": {str(i): name for i, name in enumerate(self.names)},
            "label2id": self.label2id,
            "multi_label": self.multi_label,
        }

    def save(self, folder: Path) -> Path:
        path = Path(folder) / LABELS_FILE
        path.write_text(json.dumps(self.as_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> LabelMap:
        data = json.loads((Path(folder) / LABELS_FILE).read_text())
        id2label = data["id2label"]
        return cls(tuple(id2label[str(i)] for i in range(len(id2label))), bool(data["multi_label"]))


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


@dataclass
class ClassRows:
    """Checked rows ({text, text_pair, labels, origin}) and what was left out on the way."""

    rows: list[dict]
    skipped: int = 0
    problems: list[str] = field(default_factory=list)


def parse_row(row: dict, config: ClassificationConfig) -> dict:
    """{text, text_pair, labels} of one row; ValueError says what is wrong. `labels` is a tuple (one item unless multi-label)."""
    from finetune.data import _text

    text = _text(row, config.text_column)
    pair = _text(row, config.text_pair_column) if config.text_pair_column else None
    value = row.get(config.label_column)
    if config.multi_label:
        if not isinstance(value, list):
            raise ValueError(f"'{config.label_column}' must be a list of labels (multi_label), got {type(value).__name__}")
        labels = tuple(dict.fromkeys(_label(v, config.label_column) for v in value))
    else:
        labels = (_label(value, config.label_column),)
    return {"text": text, "text_pair": pair, "labels": labels}


def _label(value, column: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"'{column}' must be a string or an integer, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"'{column}' is empty")
    return value


def load_classification_rows(sources: list[DataSource], recipe: Recipe, base_dir: Path | None = None) -> ClassRows:
    """Read and check every row; bad rows raise with their file and row (or are skipped and counted, per `on_bad_row`)."""
    from finetune.data import is_local, local_path, read_source_with_skips

    c, on_bad_row = recipe.classification, recipe.data.on_bad_row
    out = ClassRows(rows=[])
    for source in sources:
        ds, unreadable = read_source_with_skips(source, base_dir, on_bad_row)
        out.skipped += len(unreadable)
        out.problems += unreadable
        needed = [c.text_column, c.label_column] + ([c.text_pair_column] if c.text_pair_column else [])
        missing = [name for name in needed if name not in ds.column_names]
        if missing:
            raise DataError(
                f"{source.path}: no column(s) {missing}; the data has {ds.column_names}. Set classification.text_column/"
                "text_pair_column/label_column, or map yours with `columns:` in the data source."
            )
        by_file = is_local(source) and local_path(source, base_dir).is_dir()  # a folder source: name the file
        for index, row in enumerate(ds):
            origin = row["file"] if by_file else f"{source.path}, row {index + 1}"
            try:
                out.rows.append({**parse_row(row, c), "origin": origin})
            except ValueError as exc:
                problem = f"{origin}: {exc}"
                if on_bad_row == "error":
                    raise DataError(problem + "  (set data.on_bad_row: skip to drop such rows and count them)") from None
                out.skipped += 1
                out.problems.append(problem)
    if out.skipped:
        log.warning("Skipped %d unusable row(s); first: %s", out.skipped, out.problems[0])
    if not out.rows:
        raise DataError(f"no usable rows in {', '.join(s.path for s in sources)}")
    return out


def check_labels(rows: list[dict], labels: LabelMap) -> None:
    """Every label of the evaluation rows must be one the model has a class for."""
    known = labels.label2id
    for row in rows:
        for label in row["labels"]:
            if str(label) not in known:
                raise DataError(
                    f"{row['origin']}: label {str(label)!r} does not occur in the training data "
                    f"(labels: {', '.join(labels.names)}). The model has no class for it: fix the row, or add "
                    "training rows with this label."
                )


@dataclass
class ClassificationData:
    train_rows: list[dict]
    eval_rows: list[dict]
    labels: LabelMap
    skipped: int


def prepare_classification_data(recipe: Recipe) -> ClassificationData:
    """Train/eval rows (seeded split when `data.eval_fraction`) and the label map of the training data.

    The label map is built from all rows of `data.train` *before* the held-out split, so a rare class that lands
    entirely in the held-out part still has a class (and is reported, not a crash).
    """
    from finetune.data import split_rows

    c = recipe.classification
    train = load_classification_rows(recipe.data.train, recipe)
    labels = LabelMap.from_training([r["labels"] for r in train.rows], c.multi_label)
    if not c.multi_label and len(labels.names) < 2:
        raise DataError(f"the training data has {len(labels.names)} label ({', '.join(labels.names)}); a classifier needs at least 2.")
    skipped, train_rows, eval_rows = train.skipped, train.rows, []
    if recipe.data.eval:
        held = load_classification_rows(recipe.data.eval, recipe)
        eval_rows, skipped = held.rows, skipped + held.skipped
    if recipe.data.eval_fraction:
        train_rows, eval_rows = split_rows(train_rows, recipe.data.eval_fraction, recipe.data.seed)
        seen = {str(label) for r in train_rows for label in r["labels"]}
        unseen = [name for name in labels.names if name not in seen]
        if unseen:
            log.warning("Label(s) %s occur only in the held-out rows; the model will not learn them.", unseen)
    check_labels(eval_rows, labels)
    return ClassificationData(train_rows, eval_rows, labels, skipped)


def tokenize_classification(rows: list[dict], tokenizer, labels: LabelMap, max_length: int):
    """A `datasets.Dataset` of token ids (truncated to `max_length`) and `labels`; padding is left to the collator."""
    import datasets

    pairs = [r["text_pair"] for r in rows] if rows and rows[0]["text_pair"] is not None else None
    encoded = tokenizer([r["text"] for r in rows], pairs, truncation=True, max_length=max_length)
    columns = dict(encoded)
    columns["labels"] = [labels.encode(r["labels"]) for r in rows]
    return datasets.Dataset.from_dict(columns)


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


def check_max_length(recipe: Recipe, path: str) -> int:
    """`data.max_length`, capped at the model's position table (BERT-style models have 512 positions)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    if positions and recipe.data.max_length > positions:
        log.warning("data.max_length %d > the model's %d positions: truncating to %d tokens.", recipe.data.max_length, positions, positions)
        return positions
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
# The run
# --------------------------------------------------------------------------------------------


def run_classification(recipe: Recipe):
    from accelerate import PartialState
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    from finetune.adapters import attach_adapter, count_parameters, dtype_bytes, load_model, load_tokenizer
    from finetune.models import resolve_model_path
    from finetune.plan import make_plan
    from finetune.train import RunResult, callbacks, prepare_run, training_arguments

    runtime, out = prepare_run(recipe)
    state = PartialState()
    with state.main_process_first():
        path = resolve_model_path(recipe.model)
    tokenizer = load_tokenizer(recipe, path)
    # Everything that reads data or names a metric comes before the model load: a bad row costs seconds.
    data = prepare_classification_data(recipe)
    metrics = ClassificationMetrics(data.labels, recipe.eval.metrics)
    check_best_metric(recipe, metrics)
    max_length = check_max_length(recipe, path)
    train_ds = tokenize_classification(data.train_rows, tokenizer, data.labels, max_length)
    eval_ds = tokenize_classification(data.eval_rows, tokenizer, data.labels, max_length) if data.eval_rows else None

    model = load_model(recipe, runtime, path, AutoModelForSequenceClassification, **data.labels.config_kwargs())
    match_pad_token(model, tokenizer)
    heads = head_modules(model)  # found on the model before PEFT wraps it
    check_quantized_head(model, heads)
    model = attach_adapter(model, recipe, task_type="SEQ_CLS", head_modules=heads)

    loss_func = None
    if recipe.classification.class_weights == "balanced":
        weights = balanced_weights(train_ds["labels"], data.labels)
        log.info("Class weights (balanced): %s", dict(zip(data.labels.names, [round(w, 4) for w in weights.tolist()])))
        loss_func = WeightedLoss(weights, data.labels.multi_label)
    args = training_arguments(recipe, runtime, out, has_eval=eval_ds is not None, config_class=TrainingArguments)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,  # also makes the default collator pad each batch dynamically
        compute_metrics=metrics if eval_ds is not None else None,
        compute_loss_func=loss_func,
        callbacks=callbacks(recipe),
    )
    counts = count_parameters(trainer.model, dtype_bytes(runtime.dtype_name))
    plan = make_plan(recipe, runtime, counts, len(train_ds), len(eval_ds) if eval_ds else 0, data.skipped, recipe.model.name_or_path)
    if runtime.is_main:
        print(plan.render(), flush=True)
        print(f"  {'labels'.ljust(15)}  {len(data.labels.names)}: {', '.join(data.labels.names)}"
              + (" (multi-label)" if data.labels.multi_label else ""), flush=True)
    trainer.train()
    trainer.save_model(str(out))  # PEFT folder: adapter + head (modules_to_save), and the tokenizer
    extra: dict = {"skipped_rows": data.skipped, "labels": list(data.labels.names), "heads": heads}
    if eval_ds is not None:
        # With load_best_model_at_end this evaluates the best checkpoint, which is also the one just saved.
        extra["eval"] = trainer.evaluate()
    if trainer.is_world_process_zero():
        data.labels.save(out)
        if eval_ds is not None:
            write_eval_report(out, {"loss": extra["eval"].get("eval_loss"), **metrics.last_report}, data.labels)
    with contextlib.suppress(Exception):
        trainer.accelerator.wait_for_everyone()
    from finetune.train import save_run_files

    result = save_run_files(trainer, recipe, out, plan, extra)
    return RunResult(result, trainer.model, tokenizer, out)


def write_eval_report(out: Path, report: dict, labels: LabelMap) -> None:
    """`eval_metrics.json` (the full report) and, single-label, `confusion_matrix.png` beside it."""
    from finetune.metrics import plot_confusion_matrix
    from finetune.outputs import write_json

    write_json(out / "eval_metrics.json", report)
    if not labels.multi_label:  # multi-label has one 2x2 matrix per label, kept in the JSON
        plot_confusion_matrix(report["confusion_matrix"], list(labels.names), out / "confusion_matrix.png")
    summary = f"accuracy {report['accuracy']:.4f}"
    if "f1_macro" in report:
        summary += f", macro F1 {report['f1_macro']:.4f}"
    log.info("Eval (%d rows): %s", report["num_examples"], summary)
