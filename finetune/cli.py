"""`finetune` command line: every command is a module of `finetune.commands`, registered here one way.

Each command module has `HELP`, `add_arguments(parser)` and `run(args)`. Heavy libraries (torch, transformers) are
imported inside `run`, so `--help` and `validate` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from finetune.commands.common import guarded, setup_logging

COMMANDS = ("train", "validate", "explain", "chat", "predict", "eval", "merge", "launch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune",
        description="Parameter-efficient fine-tuning from one YAML recipe (LoRA/QLoRA, bitsandbytes, DeepSpeed).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"finetune.commands.{name}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    return guarded(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
