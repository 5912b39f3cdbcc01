"""Start-up: wall time of `finetune --help`, `finetune train --help` and `finetune validate`, each a fresh process.
Target: `finetune --help` under 1 s.

    .venv/bin/python -m benchmarks.startup [--rounds 5] [--data] [--modules] [--out results.json]

Commands run interleaved (round 1: every command, round 2: every command ...), and the table gives each one's median
and range. `python -c pass` is the floor no command can go under. `--data` adds `finetune validate --data`, which
loads the base tokenizer and reads every row of the recipe's data (seconds, not a start-up figure).

`--modules` adds the module-name check (finetune/models/targets.py) on SmolLM2 (the demo GGUF, not converted) and on
a Llama-3.2-1B-shaped folder written here (its config.json, and a model.safetensors holding the header only): named
targets confirmed from the safetensors header, the model built on the meta device with an empty module cache
(`cold`: a wrong name, so the build and the message run), and the same with the cache filled (`cached`).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import (
    REPO, finetune_cli, fmt, machine, median, offline_env, print_table, run_measured, write_results,
)

RECIPE = "recipes/llama_lora.yaml"
# Llama-3.2-1B's config.json (the architecture only: 16 layers, hidden 2048, 128k vocabulary).
LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "rope_theta": 500000.0, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "bos_token_id": 128000, "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}  # fmt: skip
COLD = "cold"  # commands whose module cache is emptied before each run


def write_llama_1b(folder: Path) -> Path:
    """A folder with Llama-3.2-1B's config.json and a model.safetensors that is its header alone (the tensors' names
    and shapes; no data: nothing here reads it), and a recipe on it."""
    import struct

    c = LLAMA_1B
    hidden, inter, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": [c["vocab_size"], hidden], "model.norm.weight": [hidden]}
    for i in range(c["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        shapes.update({layer + "self_attn.q_proj.weight": [hidden, hidden], layer + "self_attn.k_proj.weight": [kv, hidden],
                       layer + "self_attn.v_proj.weight": [kv, hidden], layer + "self_attn.o_proj.weight": [hidden, hidden],
                       layer + "mlp.gate_proj.weight": [inter, hidden], layer + "mlp.up_proj.weight": [inter, hidden],
                       layer + "mlp.down_proj.weight": [hidden, inter], layer + "input_layernorm.weight": [hidden],
                       layer + "post_attention_layernorm.weight": [hidden]})  # fmt: skip
    header, offset = {}, 0
    for name, shape in sorted(shapes.items()):
        size = 2 * math.prod(shape)  # bf16
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(c))
    data = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(data)) + data)
    recipe = folder.parent / "llama_1b.yaml"
    recipe.write_text(f"model: {{name_or_path: {folder}}}\ndata: {{train: {REPO / 'recipes/data/kit_train.jsonl'}}}\n"
                      f"output: {{dir: {folder.parent / 'out'}}}\n")  # fmt: skip
    return recipe


def commands(with_data: bool, modules_dir: Path | None = None) -> dict[str, list[str]]:
    cli = finetune_cli()
    out = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "finetune --help": [*cli, "--help"],
        "finetune train --help": [*cli, "train", "--help"],
        f"finetune validate {RECIPE}": [*cli, "validate", RECIPE],
    }
    if with_data:
        out[f"finetune validate --data {RECIPE}"] = [*cli, "validate", "--data", RECIPE]
    if modules_dir is not None:
        llama_1b = str(write_llama_1b(modules_dir / "llama-3.2-1b-shape"))
        named, wrong = "adapter.target_modules=[q_proj,v_proj]", "adapter.target_modules=[q_proj,foo_proj]"
        for label, recipe in (("SmolLM2 GGUF", RECIPE), ("Llama-3.2-1B shape", llama_1b)):
            if label != "SmolLM2 GGUF":  # the GGUF has no safetensors header to read until a run converts it
                out[f"validate {named}, {label}: from the header"] = [*cli, "validate", recipe, named]
            out[f"validate {wrong}, {label}: built, {COLD}"] = [*cli, "validate", recipe, wrong]
            out[f"validate {wrong}, {label}: cached"] = [*cli, "validate", recipe, wrong]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data", action="store_true", help="also time `finetune validate --data`")
    parser.add_argument("--modules", action="store_true", help="also time the module-name check (cold, cached, header)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/startup.json)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="finetune-startup-"))

    info = machine()
    print(f"Start-up, {args.rounds} round(s); {info['cpu']}, {info['cores']} cores, "
          f"load average {info['load_average_at_start']:.2f}\n", flush=True)
    todo = commands(args.data, work if args.modules else None)
    cache = work / "cache"  # the module cache of these runs (emptied before each `cold` command)
    runs: list[dict] = []
    for round_ in range(1, args.rounds + 1):
        for name, cmd in todo.items():
            if COLD in name or "from the header" in name:  # the header path is the one taken before any build
                shutil.rmtree(cache / "modules", ignore_errors=True)
            m = run_measured(cmd, env=offline_env(FINETUNE_CACHE=cache), cwd=REPO, timeout=300)
            if "foo_proj" in name:  # refused on purpose: the message is part of what is timed
                assert m.returncode == 2 and "'foo_proj' matches no module" in m.stderr, m.stderr[-2000:]
            else:
                m.check(name)
            runs.append({"round": round_, "command": name, "wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb})
    shutil.rmtree(work, ignore_errors=True)

    rows, summary = [], {}
    for name in todo:
        walls = [r["wall_s"] for r in runs if r["command"] == name]
        rss = median([r["peak_rss_mb"] for r in runs if r["command"] == name])
        summary[name] = {"median_s": median(walls), "min_s": min(walls), "max_s": max(walls), "peak_rss_mb": rss}
        rows.append([f"`{name}`", fmt(median(walls), 2), f"{min(walls):.2f}-{max(walls):.2f}", fmt(rss, 0)])
    print_table(["command", "median s", "range s", "peak RSS MB"], rows)
    help_s = summary["finetune --help"]["median_s"]
    print(f"\n`finetune --help`: {help_s:.2f} s (target < 1 s): {'met' if help_s < 1 else 'NOT met'}")
    write_results("startup", {"machine": info, "rounds": args.rounds, "summary": summary, "runs": runs}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
