"""`finetune explain [KEY]`: the recipe reference, generated from the schema."""

from __future__ import annotations

import argparse

HELP = "Document the recipe schema, a section or a key (e.g. train.learning_rate)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key", nargs="?", help="A section or dotted key; omit for the whole reference.")


def run(args: argparse.Namespace) -> int:
    from finetune.recipe import explain

    print(explain(args.key), end="")
    return 0
