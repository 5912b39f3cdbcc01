"""`finetune chat`: answer prompts with a finished SFT run's adapter (or its base model, with --base)."""

from __future__ import annotations

import argparse

from finetune.commands.common import recipe_key_help, run_recipe
from finetune.errors import FinetuneError
from finetune.registry import traits

HELP = "Answer prompts with a finished SFT run's adapter (or its base, with --base)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="The run's output.dir.")
    parser.add_argument("--prompt", action="append", help="A user message; repeat for several. Default: the recipe's eval.prompts.")
    parser.add_argument("--base", action="store_true", help="Use the base model without the adapter (the 'before').")
    parser.add_argument("--max-new-tokens", type=int, help=recipe_key_help("eval.max_new_tokens"))


def run(args: argparse.Namespace) -> int:
    from finetune.models.generation import generate_answers

    model, tokenizer, recipe = load_for_chat(args.run_dir, base_only=args.base, max_new_tokens=args.max_new_tokens)
    prompts = args.prompt or recipe.eval.prompts
    if not prompts:
        raise FinetuneError("give at least one --prompt (the run's recipe has no eval.prompts).")
    for sample in generate_answers(model, tokenizer, prompts, args.max_new_tokens or recipe.eval.max_new_tokens, system_prompt=recipe.data.system_prompt):
        print(f"Q: {sample['prompt']}\nA: {sample['answer']}\n")
    return 0


def load_for_chat(run_dir: str, base_only: bool = False, max_new_tokens: int | None = None):
    """The model of a finished SFT run (its base with the adapter, or the fully fine-tuned model; the base alone with
    `base_only`) and its tokenizer. `max_new_tokens` (`--max-new-tokens`) is checked against the model's context
    before it loads."""
    from pathlib import Path

    run = Path(run_dir)
    if not (run / "recipe.yaml").is_file():
        raise FinetuneError(f"{run}: not a run folder (no recipe.yaml). Give the output.dir of a finished run.")
    from finetune.recipe import load_recipe

    task = traits(load_recipe(run / "recipe.yaml").task)
    if task.model == "causal_lm" and task.served_by != "chat":
        raise FinetuneError(
            f"{run}: {task.noun} run; its model continues text instead of answering (its samples are in "
            f"{run / 'samples.json'}). Fine-tune it with an sft recipe whose model.name_or_path is {run} "
            "(recipes/pretrain_tiny_sft.yaml does), then chat with that run."
        )
    recipe = run_recipe(run, "chat")  # a classifier's encoder loaded as a causal LM would answer with random words
    if max_new_tokens is not None:
        from finetune.checks import new_tokens_problem

        problem = new_tokens_problem(recipe, max_new_tokens, "--max-new-tokens")
        if problem:
            raise FinetuneError(problem)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from finetune.models.adapters import load_adapter
    from finetune.models.loading import load_checkpoint, resolve_model_path

    trust = recipe.model.trust_remote_code
    # A full fine-tune's trained model is the run folder itself; an adapter run's is its base plus the adapter.
    trained_in_full = not (run / "adapter_config.json").is_file() and any(
        (run / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")
    )
    base = str(run) if trained_in_full and not base_only else resolve_model_path(recipe.model)
    tokenizer = AutoTokenizer.from_pretrained(run if (run / "tokenizer_config.json").is_file() else base, trust_remote_code=trust)
    model = load_checkpoint(AutoModelForCausalLM, base, "model.name_or_path", trust_remote_code=trust, dtype=torch.float32)
    if (run / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(run)
    if not base_only and (run / "adapter_config.json").is_file():
        model = load_adapter(model, run)
    return model, tokenizer, recipe
