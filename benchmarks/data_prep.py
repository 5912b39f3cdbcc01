"""Data preparation: rows/s reading, checking, templating, tokenizing and masking a 10k-row chat file, and the time
of a second run that hits the cache. Target: a cached second data preparation under 10% of the first.

    .venv/bin/python -m benchmarks.data_prep [--rounds 2] [--rows 10000] [--out results.json]

Each measurement is a child process running what a training run does before the model loads:
`finetune.models.loading.load_base` (the SmolLM2 tokenizer of recipes/llama_lora.yaml) and
`finetune.tasks.sft.prepare_sft_data`. A round is a cold run on an empty FINETUNE_CACHE, then a warm run on the
same cache; rounds are interleaved so the warm/cold ratio holds on a shared machine. The ratio is of the data
preparation alone: loading the tokenizer costs the same either way and is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    BENCH_PREFIX, REPO, chatterbot_conversations, fmt, machine, median, offline_env, print_table, run_measured, write_results,
)

RECIPE = REPO / "recipes" / "llama_lora.yaml"


def corpus_dialogs() -> list[list[str]]:
    """chatterbot-corpus' English dialogs of two or more non-empty lines, cut to whole user/assistant exchanges."""
    return [lines[: len(lines) // 2 * 2] for lines in chatterbot_conversations() if len(lines) >= 2 and all(lines)]


def write_chat_file(path: Path, rows: int, seed: int = 0) -> None:
    """`rows` distinct `messages` rows: one to three corpus dialogs chained, numbered, some with a system turn. The
    numbering makes every row distinct, so no cache below the kit's can answer for a repeated row."""
    dialogs, rng = corpus_dialogs(), random.Random(seed)
    with path.open("w") as out:
        for index in range(rows):
            lines = [line for _ in range(rng.randint(1, 3)) for line in rng.choice(dialogs)]
            lines[0] = f"({index}) {lines[0]}"
            messages = [{"role": ("user", "assistant")[i % 2], "content": line} for i, line in enumerate(lines)]
            if rng.random() < 0.25:
                messages.insert(0, {"role": "system", "content": "You are a friendly assistant."})
            out.write(json.dumps({"messages": messages}) + "\n")


def child(data: Path) -> None:
    """One data preparation, as a training run does it; prints what took how long on a `BENCH` line."""
    start = time.perf_counter()
    from finetune.models.loading import load_base
    from finetune.recipe import load_recipe
    from finetune.tasks.sft import prepare_sft_data

    recipe = load_recipe(RECIPE, [f"data.train={data}", "data.eval=null"])
    imported = time.perf_counter()
    _, tokenizer = load_base(recipe)
    loaded = time.perf_counter()
    import datasets  # noqa: F401  timed apart: a training run imports it for TRL whether the data is cached or not

    libraries = time.perf_counter()
    train, _, skipped = prepare_sft_data(recipe, tokenizer)
    done = time.perf_counter()
    report = {"import_s": imported - start, "tokenizer_s": loaded - imported, "datasets_import_s": libraries - loaded,
              "prepare_s": done - libraries, "rows": len(train), "skipped": skipped}
    print(BENCH_PREFIX + json.dumps(report), flush=True)


def link_converted_models(cache: Path) -> None:
    """The fresh cache borrows the converted GGUF: converting the model is not data preparation."""
    from finetune.paths import cache_dir

    (cache / "gguf").symlink_to(cache_dir() / "gguf", target_is_directory=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/data_prep.json)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return 0

    info = machine()
    print(f"Data preparation of {args.rows:,} chat rows, {args.rounds} round(s); {info['cpu']}, {info['cores']} cores, "
          f"load average {info['load_average_at_start']:.2f}\n", flush=True)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        data = Path(tmp) / "chats.jsonl"
        write_chat_file(data, args.rows)
        for round_ in range(1, args.rounds + 1):
            cache = Path(tmp) / f"cache-{round_}"
            cache.mkdir()
            link_converted_models(cache)
            for variant in ("cold", "warm"):
                cmd = [sys.executable, "-m", "benchmarks.data_prep", "--child", str(data)]
                m = run_measured(cmd, env=offline_env(FINETUNE_CACHE=cache), cwd=REPO).check(f"{variant} run")
                runs.append({"round": round_, "variant": variant, "wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb,
                             **m.report})
                print(f"  round {round_} {variant}: prepare {m.report['prepare_s']:.2f} s, wall {m.wall_s:.1f} s")
    # A fast warm run that prepared other data would be a broken cache, not a result.
    if len({(r["rows"], r["skipped"]) for r in runs}) != 1:
        raise SystemExit(f"cold and warm runs disagree on the rows kept/skipped: {runs}")

    def med(variant: str, key: str):
        return median([r[key] for r in runs if r["variant"] == variant])

    cold, warm = med("cold", "prepare_s"), med("warm", "prepare_s")
    imports = med("cold", "datasets_import_s"), med("warm", "datasets_import_s")
    summary = {"rows_per_s_cold": args.rows / cold, "prepare_cold_s": cold, "prepare_warm_s": warm,
               "warm_over_cold": warm / cold, "warm_over_cold_with_import": (warm + imports[1]) / (cold + imports[0]),
               "target": "< 0.10"}
    print()
    print_table(
        ["run", "data prep s", "rows/s", "tokenizer load s", "`import datasets` s", "process wall s", "peak RSS MB"],
        [[v, fmt(med(v, "prepare_s"), 2), fmt(args.rows / med(v, "prepare_s"), 0), fmt(med(v, "tokenizer_s"), 2),
          fmt(med(v, "datasets_import_s"), 2), fmt(med(v, "wall_s")), fmt(med(v, "peak_rss_mb"), 0)]
         for v in ("cold", "warm")],
    )
    print(f"\nwarm/cold data preparation: {summary['warm_over_cold']:.3f} (target < 0.10); "
          f"{summary['warm_over_cold_with_import']:.3f} counting `import datasets`. Medians of {args.rounds} round(s); "
          f"{runs[0]['rows']} rows kept, {runs[0]['skipped']} skipped.")
    payload = {"machine": info, "rows": args.rows, "rounds": args.rounds, "summary": summary, "runs": runs}
    write_results("data_prep", payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
