"""What every command shares: the recipe arguments, error handling without tracebacks, logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Callable

from finetune.errors import FinetuneError


def guarded(action: Callable[[], int]) -> int:
    """Run a command; a FinetuneError becomes its message on stderr and a non-zero exit, never a traceback."""
    try:
        return action()
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="Path to a YAML recipe (see recipes/).")
    parser.add_argument(
        "overrides", nargs="*", default=[], metavar="key.path=value",  # a default: not listed as required when absent
        help="Override recipe values, e.g. train.learning_rate=1e-4 (read as YAML, like the recipe: `true` is a "
        "boolean, `'5'` is text). Options and overrides may come in any order.",
    )


def recipe_key_help(key: str, lead: str = "") -> str:
    """Help for a flag that mirrors a recipe key: the key's own description from the schema, so the two never
    drift, and the key the flag overrides."""
    from finetune.recipe import description

    return f"{lead}{description(key)} (Overrides the recipe's `{key}`.)"


class _DropMessages(logging.Filter):
    """Drops import-time notices that say nothing actionable on a CPU run."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    # bitsandbytes looks for an optional hub kernel package at import, even for unquantized runs; DeepSpeed
    # announces the CPU accelerator in every process. Both are noise to a user who did not ask for either.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessages("kernels-community"))
    logging.getLogger("DeepSpeed").addFilter(_DropMessages("Setting accelerator to CPU"))
    # peft and trl read transformers' deprecated `is_gradient_checkpointing`; nothing the user can change.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )
