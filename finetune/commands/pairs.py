"""`finetune pairs`: a preference file from prompts with reference answers: the reference chosen, the model's own
answer rejected; near-ties dropped by chrF; provenance on every row. No hub, no network."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from finetune.errors import FinetuneError

log = logging.getLogger("finetune")

HELP = "Build preference pairs offline: reference answers chosen, a model's own answers rejected."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="A finished run's folder (its model answers; --base for its base) or a recipe "
                                       "(its model.name_or_path answers, as training would load it).")
    parser.add_argument("--data", help="Chat or prompt/completion rows with reference answers (a .jsonl/.json/.csv/"
                                       ".parquet file). Default: the recipe's data.train.")
    parser.add_argument("--out", required=True, help="The preference file to write (.jsonl).")
    parser.add_argument("--base", action="store_true", help="With a run folder: its base model answers, not the run's.")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy answers; above: sampled.")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling's mass, when sampling.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampled answers (row i samples with seed + i).")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="Longest answer, in tokens.")
    parser.add_argument("--tie-chrf", type=float, default=90.0,
                        help="Drop a pair whose answer scores this chrF (0-100) or more against the reference: a "
                             "near-tie teaches nothing. Default 90.")
    parser.add_argument("--limit", type=int, help="Use only the first N rows.")


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.tie_chrf <= 100:
        raise FinetuneError(f"--tie-chrf {args.tie_chrf}: chrF runs from 0 to 100.")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise FinetuneError("--temperature must be 0 or more and --top-p in (0, 1].")
    out = Path(args.out)
    if out.suffix != ".jsonl":
        raise FinetuneError(f"--out {out}: write a .jsonl file (one pair per line).")
    recipe, source = _recipe(args.source)
    from finetune.data.pairs import build_pairs, model_digest, prompt_and_reference
    from finetune.data.sft import load_rows
    from finetune.recipe import DataSource

    sources = [DataSource(path=args.data, limit=args.limit)] if args.data else recipe.data.train
    if not args.data and args.limit:
        sources = [s.model_copy(update={"limit": args.limit}) for s in sources]
    rows = load_rows(sources, recipe.data, chat=True, cache=False)  # checked before the model loads
    prompts, references = zip(*(prompt_and_reference(r, o) for r, o in zip(rows.rows, rows.origins)))

    model, tokenizer, folders, name = _model(recipe, source, args.base)
    from finetune.models.generation import answer_prompts

    decoding = ({"greedy": True} if args.temperature == 0
                else {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed})
    from tqdm.auto import tqdm

    with tqdm(total=len(prompts), desc="answers", unit="prompt") as bar:  # minutes per hundred prompts on a CPU
        answers = answer_prompts(model, tokenizer, list(prompts), args.max_new_tokens, args.temperature, args.top_p,
                                 args.seed, progress=bar)
    provenance = {"model": name, "model_hash": model_digest(*folders), "decoding": decoding,
                  "max_new_tokens": args.max_new_tokens, "tie_chrf": args.tie_chrf}
    pairs = build_pairs(list(prompts), list(references), answers, args.tie_chrf, provenance)
    if not pairs.rows:
        raise FinetuneError(
            f"no pair left: {pairs.ties} answer(s) within chrF {args.tie_chrf} of the reference, {pairs.empty} empty. "
            "The model already answers like the references; sample (--temperature) or use a weaker model."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in pairs.rows))
    print(f"Wrote {len(pairs.rows)} pairs to {out} (of {len(answers)} prompts; dropped {pairs.ties} near-ties with "
          f"chrF >= {args.tie_chrf} and {pairs.empty} empty answers). Answers by {name}, {decoding}.")
    if pairs.unfinished:
        print(f"{pairs.unfinished} answer(s) reached --max-new-tokens {args.max_new_tokens} before ending: kept, with "
              "`finished: false` in their provenance (templated, a cut answer ends with an end-of-turn the model never wrote); raise "
              "--max-new-tokens to let them end.")
    return 0


def _recipe(source: str):
    """The recipe (of the run folder, or the recipe file) and the run folder (None for a recipe file)."""
    from finetune.recipe import load_recipe

    path = Path(source)
    if path.is_dir():
        if not (path / "recipe.yaml").is_file():
            raise FinetuneError(f"{path}: not a run folder (no recipe.yaml). Give a finished run's output.dir or a recipe.")
        return load_recipe(path / "recipe.yaml"), path
    if not path.is_file():
        raise FinetuneError(f"{source}: no such run folder or recipe file.")
    return load_recipe(path), None


def _model(recipe, run_dir: Path | None, base_only: bool):
    """The answering model, its tokenizer, the folders whose weights it is, and its name for the provenance."""
    if run_dir is not None:
        from finetune.commands.chat import load_for_chat
        from finetune.models.loading import resolve_model_path

        model, tokenizer, _ = load_for_chat(str(run_dir), base_only=base_only)
        base = resolve_model_path(recipe.model)
        with_adapter = not base_only and (run_dir / "adapter_config.json").is_file()
        folders = [Path(base), run_dir] if with_adapter else [Path(base)]
        return model, tokenizer, folders, str(run_dir) if not base_only else recipe.model.label
    from transformers import AutoModelForCausalLM

    from finetune.models.loading import load_base, load_model
    from finetune.runtime import resolve_runtime

    if base_only:
        raise FinetuneError("--base is for a run folder; a recipe's model is already its base.")
    path, tokenizer = load_base(recipe)
    model = load_model(recipe, resolve_runtime(recipe), path, AutoModelForCausalLM)
    return model, tokenizer, [Path(path)], recipe.model.label
