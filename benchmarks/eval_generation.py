"""Tokens/s of `finetune eval`'s held-out generation (greedy, batched), per variant and eval.batch_size.

    .venv/bin/python -m benchmarks.eval_generation                          # outputs/llama_lora, 16 rows, 2 rounds
    .venv/bin/python -m benchmarks.eval_generation --limit 8 --rounds 1     # quick

Each round runs, one after the other: a child that loads the run once (as `finetune eval` does) and times the
kit's own `finetune.evaluation.language.generate` for every variant x batch size; then `finetune eval RUN
--tasks none --variants adapter --batch-size B` end to end for each batch size (report into a temporary folder).
Generated tokens are counted from the output ids, per row up to and including its first end-of-turn token (what
a row pads with after it finished is not counted); prompt tokens are the rows' unpadded prompt ids. Both rates are
over the whole `generate` call. "Positions run per token" (positions the model's forward passes ran, over prompt +
new tokens) is ~1 with a working KV cache and little padding; "steps after all rows ended" is 0 when generation
stops at the last end-of-turn token. On a busy machine pass --threads 1: 2 threads on 2 shared cores ran 10x slower.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import BENCH_PREFIX, REPO, finetune_cli, fmt, machine, median, offline_env, print_table, run_measured, write_results


class CountingModel:
    """The model, keeping what each `generate` call was given and returned, and how many positions each forward
    pass ran (a forward pre-hook): so tokens are counted exactly, and a missing KV cache or padding would show."""

    def __init__(self, model):
        self._model, self.calls, self.positions = model, [], 0
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.hook = inner.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.positions += ids.numel()

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, **kwargs):
        output = self._model.generate(**kwargs)
        self.calls.append((kwargs["attention_mask"].cpu(), output.cpu()))
        return output


def count_tokens(calls: list, eos_ids: set[int]) -> dict:
    """Prompt tokens without padding; new tokens per row up to and including its first end-of-turn token; decoding
    steps taken after every row of a batch had ended (generation that should have stopped)."""
    prompt = generated = after_all_ended = 0
    for mask, output in calls:
        width = mask.shape[1]
        prompt += int(mask.sum())
        lengths = []
        for row in output[:, width:].tolist():
            ends = [i for i, token in enumerate(row) if token in eos_ids]
            lengths.append(ends[0] + 1 if ends else len(row))
        generated += sum(lengths)
        after_all_ended += output.shape[1] - width - max(lengths)
    return {"prompt_tokens": prompt, "generated_tokens": generated, "steps_after_all_ended": after_all_ended}


def child(run_dir: str, variants: list[str], batch_sizes: list[int], limit: int | None, max_new_tokens: int | None) -> dict:
    """Load the run as `finetune eval` does, then time `generate` for each variant and batch size."""
    from finetune.evaluation.language import generate, prompted_rows
    from finetune.evaluation.side_by_side import held_out_rows
    from finetune.evaluation.source import resolve_source
    from finetune.evaluation.variants import load_variants
    from finetune.models.loading import load_tokenizer, resolve_model_path
    from finetune.runtime import apply_threads, resolve_runtime

    source = resolve_source(run_dir)
    recipe = source.recipe
    runtime = resolve_runtime(recipe)
    apply_threads(runtime)
    tokenizer = load_tokenizer(recipe, str(source.tokenizer_dir or resolve_model_path(recipe.model)))
    rows, _ = held_out_rows(source, None, tokenizer, limit)
    prompts = prompted_rows(rows, tokenizer)
    max_new_tokens = max_new_tokens or recipe.eval.max_new_tokens
    loaded = load_variants(source, variants, runtime, tokenizer)
    results = {"threads": runtime.num_threads, "rows": len(prompts), "max_new_tokens": max_new_tokens, "runs": {}}
    for variant in variants:
        started = time.perf_counter()
        with loaded.use(variant) as model:
            results.setdefault("enter_s", {})[variant] = time.perf_counter() - started  # the in-memory merge
            eos = model.generation_config.eos_token_id
            eos_ids = set(eos if isinstance(eos, list) else [eos])
            started = time.perf_counter()
            generate(model, tokenizer, prompts[:1], 2, 1)  # warm-up: first-call allocations are not generation
            results.setdefault("warm_up_s", {})[variant] = time.perf_counter() - started
            for batch_size in batch_sizes:
                counting = CountingModel(model)
                started = time.perf_counter()
                answers = generate(counting, tokenizer, prompts, max_new_tokens, batch_size)
                seconds = time.perf_counter() - started
                counting.hook.remove()
                results["runs"][f"{variant}/{batch_size}"] = {
                    "seconds": seconds, "answers": answers, "positions_run": counting.positions,
                    **count_tokens(counting.calls, eos_ids),
                }
    return results


def cli_eval(run_dir: str, batch_size: int, limit: int | None, out: Path, env: dict) -> dict:
    command = [*finetune_cli(), "eval", run_dir, "--tasks", "none", "--variants", "adapter", "--batch-size", str(batch_size), "--out", str(out)]
    if limit:
        command += ["--limit", str(limit)]
    measured = run_measured(command, env=env, cwd=REPO).check(f"finetune eval --batch-size {batch_size}")
    seconds = json.loads((out / "report.json").read_text())["seconds"]
    return {"wall_s": measured.wall_s, "peak_rss_mb": measured.peak_rss_mb, "checks_s": seconds["checks"], "load_s": seconds["load"],
            **{f"{part}_s": value for part, value in seconds["adapter"].items()}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="outputs/llama_lora", help="A finished SFT run (default outputs/llama_lora).")
    parser.add_argument("--variants", default="adapter,merged", help="Comma-separated variants to time (default adapter,merged).")
    parser.add_argument("--batch-sizes", default="1,8", help="Comma-separated eval.batch_size values (default 1,8).")
    parser.add_argument("--limit", type=int, help="Held-out rows (default: all).")
    parser.add_argument("--max-new-tokens", type=int, help="Default: the run's eval.max_new_tokens.")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every child (default: the kit's choice, all cores).")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-cli", action="store_true", help="Skip the end-to-end `finetune eval` runs.")
    parser.add_argument("--out", type=Path, help="JSON figures (default benchmarks/results/eval_generation.json).")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    variants, batch_sizes = args.variants.split(","), [int(b) for b in args.batch_sizes.split(",")]

    if args.child:
        print(BENCH_PREFIX + json.dumps(child(args.child, variants, batch_sizes, args.limit, args.max_new_tokens)))
        return

    info = machine()
    env = offline_env(**({"OMP_NUM_THREADS": args.threads} if args.threads else {}))
    command = [sys.executable, "-m", "benchmarks.eval_generation", "--child", args.run, "--variants", args.variants,
               "--batch-sizes", args.batch_sizes] + (["--limit", str(args.limit)] if args.limit else []) + (
               ["--max-new-tokens", str(args.max_new_tokens)] if args.max_new_tokens else [])  # fmt: skip
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        for n in range(args.rounds):
            print(f"round {n + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
            measured = run_measured(command, env=env, cwd=REPO).check("generation child")
            cli = {} if args.no_cli else {b: cli_eval(args.run, b, args.limit, Path(tmp) / f"eval-{n}-{b}", env) for b in batch_sizes}
            rounds.append({"child": measured.report, "child_wall_s": measured.wall_s, "cli": cli})

    first = rounds[0]["child"]
    print(f"\n{info['cpu']}, {info['cores']} cores, load average {fmt(info['load_average_at_start'], 2)} at start; "
          f"{args.run}, {first['rows']} held-out rows, max_new_tokens {first['max_new_tokens']}, {first['threads']} threads, "
          f"median of {args.rounds} round(s)\n")  # fmt: skip
    rows, summary = [], {}
    for key, run in first["runs"].items():
        variant, batch = key.split("/")
        seconds = median([r["child"]["runs"][key]["seconds"] for r in rounds])
        same = sum(a == b for a, b in zip(run["answers"], first["runs"][f"{variant}/{batch_sizes[0]}"]["answers"]))
        summary[key] = {**{k: v for k, v in run.items() if k != "answers"}, "seconds": seconds,
                        "generated_tokens_per_s": run["generated_tokens"] / seconds, "prompt_tokens_per_s": run["prompt_tokens"] / seconds}  # fmt: skip
        per_token = run["positions_run"] / (run["prompt_tokens"] + run["generated_tokens"])
        rows.append([variant, batch, fmt(seconds), run["generated_tokens"], fmt(summary[key]["generated_tokens_per_s"]),
                     fmt(summary[key]["prompt_tokens_per_s"]), fmt(per_token, 2), run["steps_after_all_ended"],
                     f"{same}/{len(run['answers'])}"])  # fmt: skip
    print_table(["variant", "batch", "generate s", "new tokens", "new tokens/s", "prompt tokens/s", "positions run per token",
                 "steps after all rows ended", f"answers = batch {batch_sizes[0]}"], rows)  # fmt: skip
    if not args.no_cli:
        print(f"\n`finetune eval {args.run} --tasks none --variants adapter --batch-size B` end to end:\n")
        parts = ["wall_s", "checks_s", "load_s", "held_out_loss_s", "generation_s", "peak_rss_mb"]
        print_table(["batch", "wall s", "checks s", "load s", "held-out loss s", "generation s", "peak RSS MB"], [
            [b, *(fmt(median([r["cli"][b].get(part) for r in rounds]), 0 if part == "peak_rss_mb" else 1) for part in parts)]
            for b in batch_sizes
        ])  # fmt: skip
    info["load_average_at_end"] = os.getloadavg()[0]
    write_results("eval_generation", {"machine": info, "args": vars(args), "summary": summary, "rounds": rounds}, args.out)


if __name__ == "__main__":
    main()
