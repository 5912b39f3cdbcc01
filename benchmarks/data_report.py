"""`finetune data` at scale: wall time and peak RSS of the data report on a generated chat file of a million rows.
Target: minutes, and a peak RSS under 2 GiB (the report keeps numpy columns per row, never the rows).

    nice .venv/bin/python -m benchmarks.data_report [--rows 1000000] [--eval-fraction 0.02] [--out results.json]
    nice .venv/bin/python -m benchmarks.data_report --search-only      # the duplicate search alone, synthetic rows

The file is `benchmarks.data_prep.write_chat_file`'s: chatterbot-corpus dialogs, one to three chained per row,
numbered so no two rows are the same text. Many rows share a dialog, so near duplicates abound: the worst case for
the duplicate search, whose candidate groups are large. One child process runs `finetune data` with the SmolLM2
tokenizer of recipes/llama_lora.yaml (its GGUF conversion borrowed from the kit's cache when there is one), on an
empty FINETUNE_CACHE and datasets cache; its wall time and peak RSS come from `wait4`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, finetune_cli, fmt, machine, offline_env, print_table, run_measured, write_results
from benchmarks.data_prep import link_converted_models, write_chat_file

RECIPE = REPO / "recipes" / "llama_lora.yaml"


def search_only(rows: int) -> None:
    """The duplicate search alone on `rows` synthetic signatures: copies of 300 signatures, each slot redrawn with
    probability 0.1 (similarity ~0.8 within a group: huge candidate groups), 2% held out; prints its time."""
    import time

    import numpy as np

    from finetune.data.duplicates import PERMUTATIONS, find_duplicates

    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**16, size=(300, PERMUTATIONS), dtype=np.uint16)
    signatures = base[rng.integers(0, 300, rows)]
    for start in range(0, rows, 65536):
        part = signatures[start : start + 65536]
        redraw = rng.random(part.shape) < 0.1
        part[redraw] = rng.integers(0, 2**16, size=int(redraw.sum()), dtype=np.uint16)
    keys = rng.integers(1, 2**63, size=rows, dtype=np.uint64)
    is_train = rng.random(rows) > 0.02
    start = time.perf_counter()
    found = find_duplicates(keys, signatures, is_train)
    print(f"duplicate search: {rows:,} rows in {time.perf_counter() - start:.1f} s, {len(found):,} paired")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--search-only", action="store_true", help="time the duplicate search alone, on synthetic signatures")
    parser.add_argument("--eval-fraction", type=float, default=0.02)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/data_report.json)")
    args = parser.parse_args(argv)
    if args.search_only:
        search_only(args.rows)
        return 0

    info = machine()
    print(f"`finetune data` on {args.rows:,} chat rows; {info['cpu']}, {info['cores']} cores, load average "
          f"{info['load_average_at_start']:.2f}\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        tmp = Path(tmp)
        data = tmp / "chats.jsonl"
        write_chat_file(data, args.rows)
        size_mb = data.stat().st_size / 2**20
        cache = tmp / "cache"
        cache.mkdir()
        link_converted_models(cache)
        out = tmp / "report"
        cmd = [*finetune_cli(), "data", str(RECIPE), f"data.train={data}", "data.eval=null",
               f"data.eval_fraction={args.eval_fraction}", "--out", str(out)]
        env = offline_env(FINETUNE_CACHE=cache, HF_DATASETS_CACHE=tmp / "datasets", OMP_NUM_THREADS=1)
        m = run_measured(cmd, env=env, cwd=REPO).check("finetune data")
        summary = json.loads((out / "data_report.json").read_text())
    print(m.stdout.split("\n\n")[0][:2000])
    result = {"rows": args.rows, "file_mb": round(size_mb, 1), "wall_s": round(m.wall_s, 1),
              "rows_per_s": round(args.rows / m.wall_s), "peak_rss_mb": round(m.peak_rss_mb),
              "verdict": summary["verdict"], "duplicates": summary["duplicates"]["rows"],
              "leaked": summary["leakage"]["rows"], "eval_rows": summary["leakage"]["eval_rows"]}
    print()
    print_table(["rows", "file MB", "wall min", "rows/s", "peak RSS GiB", "duplicate rows", "leaked held-out rows"],
                [[f"{args.rows:,}", fmt(size_mb), fmt(m.wall_s / 60, 1), f"{result['rows_per_s']:,}",
                  fmt(m.peak_rss_mb / 1024, 2), f"{result['duplicates']:,}", f"{result['leaked']:,} of {result['eval_rows']:,}"]])
    write_results("data_report", {"machine": info, **result}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
