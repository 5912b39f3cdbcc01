"""`finetune predict`: label texts with a finished classification run (base model + adapter + head)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from finetune.commands.common import run_recipe
from finetune.errors import FinetuneError
from finetune.evaluation.classifier import load_classifier, predict_logits, run_folder, top_labels
from finetune.registry import traits


def read_texts(args, recipe) -> tuple[list[str], list[str] | None]:
    """Texts from --text, and from --file: one per line, or a .jsonl file with the run's text (and pair) column.
    An empty (or whitespace-only) text has no label to give: it is an error naming it, or its line."""
    from finetune.data.rows import jsonl_rows

    c = recipe.classification
    if c.text_pair_column and (args.text or not (args.file or "").endswith(".jsonl")):
        raise FinetuneError(
            f"this run classifies text pairs ({c.text_column}, {c.text_pair_column}): give them in a .jsonl --file"
        )
    texts = list(args.text or [])
    for number, text in enumerate(texts, 1):
        if not text.strip():
            raise FinetuneError(f"--text {_nth(number, len(texts))}is empty{_blank(text)}: there is nothing to classify in it.")
    pairs: list[str] | None = None
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise FinetuneError(f"--file: {path} not found")
        if path.suffix == ".jsonl":
            columns = [c.text_column] + ([c.text_pair_column] if c.text_pair_column else [])
            rows = []
            for number, row in jsonl_rows(path):
                missing = [name for name in columns if not isinstance(row.get(name), str)]
                if missing:
                    raise FinetuneError(f"{path}, line {number}: no text in {missing} (the run's classification columns)")
                empty = [name for name in columns if not row[name].strip()]
                if empty:
                    raise FinetuneError(f"{path}, line {number}: {empty[0]!r} is empty{_blank(row[empty[0]])}: there is nothing to classify in it.")
                rows.append(row)
            texts += [row[c.text_column] for row in rows]
            pairs = [row[c.text_pair_column] for row in rows] if c.text_pair_column else None
        else:
            lines = path.read_text().splitlines()
            while lines and not lines[-1].strip():  # blank lines after the last text end the file, they are no text
                lines.pop()
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    raise FinetuneError(f"{path}, line {number} is empty{_blank(line)}: one text per line, and this line has none.")
            texts += lines
    if not texts:
        raise FinetuneError("nothing to classify: give --text (repeatable) or --file")
    return texts, pairs


def _nth(number: int, count: int) -> str:
    return "" if count == 1 else f"number {number} "


def _blank(text: str) -> str:
    return " (only whitespace)" if text else ""


HELP = "Label texts (or images) with a finished classification run (top labels with probabilities)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Label texts with a finished classification run, or images with an image-classification run: the top labels "
        "and their probabilities."
    )
    parser.add_argument("run", metavar="RECIPE_OR_RUN_DIR", help="A classification run's output.dir, or the recipe that trained it.")
    parser.add_argument("--text", action="append", help="A text to classify; repeat for several.")
    parser.add_argument("--file", help="Texts to classify: one per line, or a .jsonl file with the run's text column.")
    parser.add_argument("--image", action="append", help="An image file (or a folder of them) to classify; repeat for several.")
    parser.add_argument("--top-k", type=int, default=3, help="Labels to show per text, most probable first (default 3).")
    parser.add_argument("--json", action="store_true", help="Print a JSON list of {text, predicted, scores} instead of a table.")


def run(args) -> int:
    if args.top_k < 1:
        raise FinetuneError("--top-k must be at least 1")
    recipe = run_recipe(args.run, "predict")  # an SFT run has no labels to give
    folder = run_folder(args.run)  # says what a folder lacks (labels.json, recipe.yaml)
    if traits(recipe.task).inputs == "images":
        return predict_images(args)
    if args.image:
        raise FinetuneError("--image is for image-classification runs; this run classifies texts: give --text or --file")
    texts, pairs = read_texts(args, recipe)  # before the model loads: a bad input costs no load
    classifier = load_classifier(folder)
    results = top_labels(classifier, predict_logits(classifier, texts, pairs), min(args.top_k, len(classifier.labels.names)))
    if args.json:
        print(json.dumps([{"text": text, **result} for text, result in zip(texts, results)], indent=2))
        return 0
    width = max(len(name) for name in classifier.labels.names)
    for text, result in zip(texts, results):
        shown = " ".join(text.split())
        print(shown if len(shown) <= 80 else shown[:77] + "...")
        for score in result["scores"]:
            mark = "*" if score["label"] in result["predicted"] else " "
            print(f"  {mark} {score['label'].ljust(width)}  {score['score']:.4f}")
    return 0


def predict_images(args) -> int:
    """`--image` files through an image-classification run."""
    from finetune.evaluation.image_classifier import image_files, load_image_classifier, predict_image_logits

    if args.text or args.file:
        raise FinetuneError("this run classifies images: give --image FILE_OR_FOLDER (repeatable), not --text/--file")
    if not args.image:
        raise FinetuneError("nothing to classify: give --image (a file or a folder; repeatable)")
    files = image_files(args.image)  # checked before the model loads
    classifier = load_image_classifier(args.run)
    logits = predict_image_logits(classifier, files)
    results = top_labels(classifier, logits, min(args.top_k, len(classifier.labels.names)))
    if args.json:
        print(json.dumps([{"image": str(file), **result} for file, result in zip(files, results)], indent=2))
        return 0
    width = max(len(name) for name in classifier.labels.names)
    for file, result in zip(files, results):
        print(file)
        for score in result["scores"]:
            mark = "*" if score["label"] in result["predicted"] else " "
            print(f"  {mark} {score['label'].ljust(width)}  {score['score']:.4f}")
    return 0
