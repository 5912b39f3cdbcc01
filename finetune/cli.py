"""`finetune` command line: every command is a module of `finetune.commands`, registered here one way.

Each command module has `HELP`, `add_arguments(parser)` and `run(args)`. Heavy libraries (torch, transformers) are
imported inside `run`, so `--help` and `validate` stay fast. A command's options, positionals and `key.path=value`
overrides may come in any order (`finetune launch RECIPE --nproc-per-node 2 train.max_steps=10`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from finetune.commands.common import guarded, setup_logging

COMMANDS = ("train", "validate", "data", "explain", "chat", "predict", "eval", "merge", "export", "launch", "pairs")


def build_parser() -> argparse.ArgumentParser:
    return _build()[0]


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `finetune` parser and each command's own parser."""
    parser = argparse.ArgumentParser(
        prog="finetune",
        description="Parameter-efficient fine-tuning from one YAML recipe (LoRA/QLoRA, bitsandbytes, DeepSpeed).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands = {}
    for name in COMMANDS:
        module = importlib.import_module(f"finetune.commands.{name}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(func=module.run, command=name)
        commands[name] = command
    return parser, commands


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command and its arguments. The command's own parser reads them with `parse_intermixed_args`: a
    subparser reached through `parse_args` would stop taking positionals (the overrides) after the first option."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, commands = _build()
    if argv and argv[0] in commands:
        return commands[argv[0]].parse_intermixed_args(argv[1:])
    return parser.parse_args(argv)  # no command, `--help`, or an unknown command: the top-level parser says so


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    setup_logging()
    return guarded(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
