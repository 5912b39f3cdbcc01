"""Peak RSS and time of `finetune merge`'s streaming path against PEFT `merge_and_unload()` + `save_pretrained`.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.merge --verify                       # ~1B parameters, ~7 GB of disk
    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.merge --params 1e8 --rounds 1        # quick

A child writes a synthetic Llama-shaped bf16 model of about `--params` parameters (random weights, several shards,
one shard in memory at a time) and a rank-16 all-linear LoRA adapter; then, per round, each path merges it in a
child of its own, and the two outputs are compared tensor by tensor. Peak RSS is the child's (wait4), which Linux
floors at the parent's own peak when the child starts: so the parent never holds a model, and the synthetic model
is written by a child too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import BENCH_PREFIX, REPO, fmt, machine, median, offline_env, print_table, run_measured, write_results

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PATHS = {
    "streaming": "streaming (`finetune merge --no-verify`)",
    "plain": "PEFT `merge_and_unload()` + `save_pretrained`",
    "streaming+verify": "streaming + verification",
}


def llama_shape(params: float) -> dict:
    """A Llama config (hidden, layers, vocab) of about `params` parameters, like published models of that size."""
    hidden, vocab = (2048, 32000) if params >= 5e8 else (1024, 32000) if params >= 1e8 else (512, 8000)
    heads = hidden // 64
    kv_heads = max(1, heads // 4)
    inter = int(hidden * 2.75) // 256 * 256
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * 64 + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden - hidden) / per_layer))
    return dict(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=False, max_position_embeddings=2048,
    )  # fmt: skip


def weight_shapes(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * 64
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(shape["num_hidden_layers"]):
        p = f"model.layers.{n}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_base(folder: Path, shape: dict, shard_bytes: int) -> int:
    """Random bf16 weights, one shard in memory at a time; returns the parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    LlamaConfig(**shape, dtype="bfloat16").save_pretrained(folder)
    torch.manual_seed(0)
    shards, current, size, total = [], {}, 0, 0
    weights = weight_shapes(shape)
    for name, dims in weights:
        tensor = torch.ones(dims) if len(dims) == 1 else torch.randn(dims).mul_(0.02)
        current[name] = tensor.to(torch.bfloat16)
        size += current[name].nbytes
        total += current[name].numel()
        if size >= shard_bytes or name == weights[-1][0]:
            shards.append(list(current))
            save_file(current, folder / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
            current, size = {}, 0
    names = [f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors" for n in range(len(shards))]
    for n, name in enumerate(names):
        (folder / f"part-{n + 1}.safetensors").rename(folder / name)
    index = {"metadata": {"total_size": total * 2}, "weight_map": {k: names[n] for n, keys in enumerate(shards) for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def write_adapter(folder: Path, base: Path, shape: dict, rank: int) -> int:
    """A rank-`rank` LoRA on every linear layer (random A and B, fp32 as PEFT saves them); returns its size."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LINEARS), task_type="CAUSAL_LM")
    config.base_model_name_or_path = str(base)
    config.save_pretrained(folder)
    tensors = {}
    for name, dims in weight_shapes(shape):
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in LINEARS:
            out_features, in_features = dims
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_features) * 0.01
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_features, rank) * 0.01
    save_file(tensors, folder / "adapter_model.safetensors")
    return sum(t.nbytes for t in tensors.values())


def write_inputs(work: Path, params: float, rank: int, shard_size: str) -> dict:
    from transformers.utils.hub import convert_file_size_to_int

    shape = llama_shape(params)
    total = write_base(work / "base", shape, convert_file_size_to_int(shard_size))
    adapter_bytes = write_adapter(work / "adapter", work / "base", shape, rank)
    shards = len(list((work / "base").glob("*.safetensors")))
    return {"params": total, "shape": shape, "shards": shards, "adapter_bytes": adapter_bytes}


def merge(path: str, work: Path) -> dict:
    """One merge; the time excludes the imports, which are the same for every path."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401 (resolves the lazy import now)

    from finetune.merge import lora, plan, streaming, verify  # noqa: F401 (likewise)
    from finetune.merge.merging import merge_adapter

    with open("/proc/self/statm") as f:
        after_imports = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    out = work / f"out-{path}"
    started = time.perf_counter()
    if path == "plain":
        model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, work / "adapter").merge_and_unload()
        model.save_pretrained(out, max_shard_size="5GB")
    else:
        merge_adapter(work / "adapter", out, dtype="bf16", verify=path == "streaming+verify", max_shard_size="5GB")
    return {"merge_s": time.perf_counter() - started, "rss_after_imports_mb": after_imports}


def compare(a: Path, b: Path) -> tuple[int, int, float]:
    """(tensors, bit-identical tensors, max |difference|) between two merged folders, one tensor at a time."""
    from safetensors import safe_open

    def locate(folder: Path) -> dict[str, Path]:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(folder / "model.safetensors", framework="pt") as f:
            return {k: folder / "model.safetensors" for k in f.keys()}

    left, right = locate(a), locate(b)
    assert sorted(left) == sorted(right), "the two merges wrote different tensor names"
    same, worst = 0, 0.0
    for key in left:
        with safe_open(left[key], framework="pt") as f, safe_open(right[key], framework="pt") as g:
            x, y = f.get_tensor(key), g.get_tensor(key)
        same += int(x.dtype == y.dtype and bool((x == y).all()))
        worst = max(worst, float((x.float() - y.float()).abs().max()))
    return len(left), same, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1e9, help="Approximate model size (default 1e9).")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--shard-size", default="500MB", help="Base checkpoint shard size (default 500MB).")
    parser.add_argument("--verify", action="store_true", help="Also time a streaming merge with verification on.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="Folder for the synthetic model and outputs (default: a temp folder, removed).")
    parser.add_argument("--out", type=Path, help="JSON figures (default benchmarks/results/merge.json).")
    parser.add_argument("--child", nargs=2, metavar=("WHAT", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        what, work = args.child[0], Path(args.child[1])
        result = write_inputs(work, args.params, args.rank, args.shard_size) if what == "write" else merge(what, work)
        print(BENCH_PREFIX + json.dumps(result))
        return

    info = machine()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    child = [sys.executable, "-m", "benchmarks.merge", "--params", str(args.params), "--rank", str(args.rank),
             "--shard-size", args.shard_size, "--child"]  # fmt: skip
    try:
        written = run_measured([*child, "write", str(work)], env=offline_env(), cwd=REPO).check("writing the synthetic model")
        inputs = written.report
        print(f"Synthetic Llama: {inputs['params'] / 1e9:.3f}B parameters ({inputs['shape']['num_hidden_layers']} layers, "
              f"hidden {inputs['shape']['hidden_size']}), bf16, {inputs['shards']} shards of ~{args.shard_size}; rank-{args.rank} "
              f"all-linear adapter {inputs['adapter_bytes'] / 2**20:.0f} MiB (fp32). Written in {written.wall_s:.0f} s.", file=sys.stderr)  # fmt: skip
        paths = ["streaming", "plain"] + (["streaming+verify"] if args.verify else [])
        rounds = []
        for n in range(args.rounds):
            print(f"round {n + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
            for path in paths:
                shutil.rmtree(work / f"out-{path}", ignore_errors=True)
                m = run_measured([*child, path, str(work)], env=offline_env(), cwd=REPO).check(path)
                rounds.append({"round": n + 1, "path": path, "wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb, **m.report})
        tensors, same, worst = compare(work / "out-streaming", work / "out-plain")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    figures = {p: {k: median([r[k] for r in rounds if r["path"] == p]) for k in ("peak_rss_mb", "rss_after_imports_mb", "merge_s", "wall_s")}
               for p in paths}  # fmt: skip
    print(f"\n{info['cpu']}, {info['cores']} cores, load average {fmt(info['load_average_at_start'], 2)} at start, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {inputs['params'] / 1e9:.2f}B-parameter bf16 Llama, "
          f"rank-{args.rank} all-linear LoRA; median of {args.rounds} round(s)\n")  # fmt: skip
    print_table(["path", "peak RSS", "RSS after imports", "merge time", "wall time (with imports)"], [
        [PATHS[p], f"{f['peak_rss_mb'] / 1024:.2f} GiB", f"{f['rss_after_imports_mb'] / 1024:.2f} GiB", f"{f['merge_s']:.1f} s", f"{f['wall_s']:.1f} s"]
        for p, f in figures.items()
    ])  # fmt: skip
    s, p = figures["streaming"], figures["plain"]
    print(f"\nStreaming / plain: peak RSS {s['peak_rss_mb'] / p['peak_rss_mb']:.2f}x, merge time {s['merge_s'] / p['merge_s']:.2f}x. "
          f"Outputs: {same}/{tensors} tensors bit-identical, max |difference| {worst:.3g}.")  # fmt: skip
    info["load_average_at_end"] = os.getloadavg()[0]
    outputs = {"tensors": tensors, "bit_identical": same, "max_abs_difference": worst}
    write_results("merge", {"machine": info, "args": vars(args), "inputs": inputs, "figures": figures, "outputs": outputs, "rounds": rounds}, args.out)


if __name__ == "__main__":
    main()
