"""`finetune` command line: train, validate, explain, chat, predict, merge, launch.

Heavy libraries (torch, transformers) are imported inside commands, so `--help` and `validate` stay fast.
"""

from __future__ import annotations

import argparse
import sys
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


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="Path to a YAML recipe (see recipes/).")
    parser.add_argument(
        "overrides", nargs="*", metavar="key.path=value", help="Override recipe values, e.g. train.learning_rate=1e-4."
    )


def _train(args) -> int:
    from finetune.train import train_command

    return train_command(args)


def _validate(args) -> int:
    from finetune.recipe import load_recipe
    from finetune.validate import validate_command

    recipe = load_recipe(args.recipe, args.overrides)
    return validate_command(recipe, args.recipe, check_rows=args.data)


def _explain(args) -> int:
    from finetune.recipe import explain

    print(explain(args.key), end="")
    return 0


def _chat(args) -> int:
    from finetune.generate import generate_answers, load_for_chat

    model, tokenizer, recipe = load_for_chat(args.run_dir, base_only=args.base)
    prompts = args.prompt or recipe.eval.prompts
    if not prompts:
        raise FinetuneError("give at least one --prompt (the run's recipe has no eval.prompts).")
    for sample in generate_answers(model, tokenizer, prompts, args.max_new_tokens, system_prompt=recipe.data.system_prompt):
        print(f"Q: {sample['prompt']}\nA: {sample['answer']}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune",
        description="Parameter-efficient fine-tuning from one YAML recipe (LoRA/QLoRA, bitsandbytes, DeepSpeed).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="Fine-tune from a recipe (same as `python finetune/run.py RECIPE`).")
    add_train_arguments(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("validate", help="Check a recipe (and its data files) without loading a model.")
    add_train_arguments(p)
    p.add_argument("--data", action="store_true", help="Also read every data row and report unusable ones.")
    p.set_defaults(func=_validate)

    p = sub.add_parser("explain", help="Document the recipe schema, a section or a key (e.g. train.learning_rate).")
    p.add_argument("key", nargs="?", help="A section or dotted key; omit for the whole reference.")
    p.set_defaults(func=_explain)

    p = sub.add_parser("chat", help="Answer prompts with a finished SFT run's adapter (or its base, with --base).")
    p.add_argument("run_dir", help="The run's output.dir.")
    p.add_argument("--prompt", action="append", help="A user message; repeat for several. Default: the recipe's eval.prompts.")
    p.add_argument("--base", action="store_true", help="Use the base model without the adapter (the 'before').")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=_chat)

    for name, module, help_text in COMMAND_MODULES:
        p = sub.add_parser(name, help=help_text)
        mod = __import__(module, fromlist=["add_arguments"])
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


# Commands whose arguments live with their implementation (each module has add_arguments(parser) and run(args)).
COMMAND_MODULES: list[tuple[str, str, str]] = [
    ("predict", "finetune.predict", "Label texts with a finished classification run (top labels with probabilities)."),
    ("merge", "finetune.merge", "Merge an adapter into its full-precision base, verify it, and save a plain model."),
    ("launch", "finetune.launch", "Run a recipe on several processes or machines (accelerate, torchrun, deepspeed; SLURM)."),
]


def main(argv: list[str] | None = None) -> int:
    from finetune.train import setup_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    return guarded(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
