"""Classification data: rows with a text (and a text pair) and labels, the label map, and tokens.

Rows come from any data source the kit reads (files, a folder of class folders, the hub); the label map is fixed by
the training data and saved as `labels.json`, so a run's class ids mean the same thing everywhere it is loaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from finetune.errors import DataError
from finetune.recipe import ClassificationConfig, DataSource, Recipe

if TYPE_CHECKING:
    from finetune.data.rows import Rows

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


def parse_row(row: dict, config: ClassificationConfig) -> dict:
    """{text, text_pair, labels} of one row; ValueError says what is wrong. `labels` is a tuple (one item unless multi-label)."""
    from finetune.data.sft import _text

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


def load_classification_rows(sources: list[DataSource], recipe: Recipe, base_dir: Path | None = None) -> Rows:
    """Read and check every row; bad rows raise with their file and row (or are skipped and counted, per `on_bad_row`)."""
    from finetune.data.rows import Rows, is_local, local_path, read_source_with_skips

    c, on_bad_row = recipe.classification, recipe.data.on_bad_row
    out = Rows(rows=[])
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
            out.add(origin, lambda row=row, origin=origin: {**parse_row(row, c), "origin": origin}, on_bad_row)
    return out.checked(sources)


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
    """Train/eval rows (seeded split when `data.eval_fraction`) and the label map of the training data."""
    return split_labelled(recipe, lambda sources: load_classification_rows(sources, recipe), recipe.classification.multi_label)


def split_labelled(recipe: Recipe, read: Callable[[list[DataSource]], Rows], multi_label: bool) -> ClassificationData:
    """The train/eval rows of a classifier (text or image) read by `read`, and the label map of the training data.

    The label map is built from all rows of `data.train` *before* the held-out split, so a rare class that lands
    entirely in the held-out part still has a class (and is reported, not a crash). Every evaluation label must be one
    of the training data's.
    """
    from finetune.data.rows import split_rows

    train = read(recipe.data.train)
    labels = LabelMap.from_training([r["labels"] for r in train.rows], multi_label)
    needed = 1 if multi_label else 2  # a multi-label classifier makes one yes/no decision per label
    if len(labels.names) < needed:
        found = f" ({', '.join(labels.names)})" if labels.names else ""
        raise DataError(f"the training data has {len(labels.names)} distinct label(s){found}; this classifier needs at least {needed}.")
    skipped, train_rows, eval_rows = train.skipped, train.rows, []
    if recipe.data.eval:
        held = read(recipe.data.eval)
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
# The data report (`finetune data`)
# --------------------------------------------------------------------------------------------


def report_rows(recipe: Recipe, read: Callable[[list[DataSource]], Rows], multi_label: bool):
    """The rows `split_labelled` gives, each with its split ("train" or "eval"), what reading skipped, and the notes
    of what its checks would stop on (the report shows them rather than stopping): for the data report."""
    from finetune.data.report import Tally
    from finetune.data.rows import held_out_order

    data = recipe.data
    train = read(data.train)
    tally = Tally(train.skipped, list(train.problems))
    rows = [(row, "train") for row in train.rows]
    if data.eval:
        held = read(data.eval)
        tally.skipped += held.skipped
        tally.problems += held.problems
        rows += [(row, "eval") for row in held.rows]
    if data.eval_fraction:
        out = set(held_out_order(len(train.rows), data.eval_fraction, data.seed))
        rows = [(row, "eval" if index in out else split) for index, (row, split) in enumerate(rows)]
    notes = []
    labels = LabelMap.from_training([r["labels"] for r in train.rows], multi_label)
    needed = 1 if multi_label else 2
    if len(labels.names) < needed:
        notes.append(f"the training data has {len(labels.names)} distinct label(s); this classifier needs at least "
                     f"{needed}: training stops")
    return rows, tally, notes


def report_facts(recipe: Recipe, tokenizer):
    """The rows as `prepare_classification_data` and `tokenize_classification` read them (same rows, split and
    truncation), for the data report."""
    from finetune.data.report import DataFacts, RowFacts

    c, data = recipe.classification, recipe.data
    rows, tally, notes = report_rows(recipe, lambda sources: load_classification_rows(sources, recipe), c.multi_label)
    # What the tokenizer reads at most (`models.text_classifier.check_max_length` also caps it by the model's
    # position table, read from its config: not read here).
    reads = tokenizer.model_max_length if tokenizer.model_max_length and tokenizer.model_max_length < 1_000_000 else None
    limit = min(data.max_length, reads) if reads else data.max_length

    def facts():
        for row, split in rows:
            ids = tokenizer(row["text"], row["text_pair"], verbose=False)["input_ids"]
            kept = min(len(ids), limit)
            text = row["text"] if row["text_pair"] is None else f"{row['text']}\n{row['text_pair']}"
            yield RowFacts(split=split, origin=row["origin"], text=text, tokens=len(ids), trained=len(ids), kept=kept,
                           trained_kept=kept, labels=tuple(str(v) for v in row["labels"]), ids=ids)

    return DataFacts(rows=facts(), batching="padded", max_length=limit, micro_batch_size=recipe.train.micro_batch_size,
                     tally=tally, decode=tokenizer.decode, trains_on="labels", notes=notes)
