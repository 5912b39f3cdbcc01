"""Benchmark `finetune merge`'s streaming path against PEFT `merge_and_unload()` + `save_pretrained`.

Writes a synthetic Llama-shaped bf16 model of about `--params` parameters (random weights, several shards,
written shard by shard so this script stays small) and a rank-16 all-linear LoRA adapter, then merges it both
ways, each in its own subprocess, and prints a markdown table of peak RSS (the child's own high-water mark,
VmHWM) and wall time, plus how far the two outputs are apart.

    OMP_NUM_THREADS=2 python scripts/bench_merge.py               # ~1B parameters, ~7 GB of disk in a temp folder
    OMP_NUM_THREADS=2 python scripts/bench_merge.py --params 1e8  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------
# Synthetic inputs
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# One merge per subprocess
# --------------------------------------------------------------------------------------------


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's RSS high-water mark. Not getrusage's ru_maxrss: Linux carries that across fork + exec, so a
    child would report at least its parent's size (here: the parent that wrote the synthetic model)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib * 1024


def run_arm(arm: str, base: Path, adapter: Path, out: Path) -> dict:
    """The child: import, merge, report its own peak RSS and timings as one JSON line."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401 (resolves the lazy import now)

    from finetune.merge import lora, plan, streaming, verify  # noqa: F401 (likewise)
    from finetune.merge.merging import merge_adapter

    after_imports = rss_now()  # both arms import the same, so timings below are merging, not importing
    started = time.perf_counter()
    if arm == "plain":
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out, max_shard_size="5GB")
    else:
        merge_adapter(adapter, out, dtype="bf16", verify=arm == "streaming+verify", max_shard_size="5GB")
    return {
        "arm": arm,
        "seconds": time.perf_counter() - started,
        "rss_after_imports": after_imports,
        "peak_rss": peak_rss(),
    }


def measure(arm: str, base: Path, adapter: Path, out: Path) -> dict:
    started = time.perf_counter()
    command = [sys.executable, __file__, "--arm", arm, "--base", str(base), "--adapter", str(adapter), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        raise SystemExit(f"{arm} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - started
    return result


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


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1e9, help="Approximate model size (default 1e9).")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--shard-size", default="500MB", help="Base checkpoint shard size (default 500MB).")
    parser.add_argument("--verify", action="store_true", help="Also time a streaming merge with verification on.")
    parser.add_argument("--workdir", help="Folder for the synthetic model and outputs (default: a temp folder, removed).")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.arm:
        print(json.dumps(run_arm(args.arm, Path(args.base), Path(args.adapter), Path(args.out))))
        return

    from transformers.utils.hub import convert_file_size_to_int

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-merge-"))
    try:
        shape = llama_shape(args.params)
        t0 = time.perf_counter()
        params = write_base(work / "base", shape, convert_file_size_to_int(args.shard_size))
        adapter_bytes = write_adapter(work / "adapter", work / "base", shape, args.rank)
        shards = len(list((work / "base").glob("*.safetensors")))
        print(
            f"Synthetic Llama: {params / 1e9:.3f}B parameters ({shape['num_hidden_layers']} layers, hidden "
            f"{shape['hidden_size']}), bf16, {shards} shards of ~{args.shard_size}; rank-{args.rank} all-linear "
            f"adapter {adapter_bytes / 2**20:.0f} MiB (fp32). Written in {time.perf_counter() - t0:.0f} s.",
            file=sys.stderr,
        )
        arms = ["streaming", "plain"] + (["streaming+verify"] if args.verify else [])
        results = {arm: measure(arm, work / "base", work / "adapter", work / f"out-{arm}") for arm in arms}
        tensors, same, worst = compare(work / "out-streaming", work / "out-plain")

        threads = os.environ.get("OMP_NUM_THREADS", "unset")
        print(f"\n{params / 1e9:.2f}B-parameter bf16 Llama, rank-{args.rank} all-linear LoRA, OMP_NUM_THREADS={threads}\n")
        print("| path | peak RSS | RSS after imports | merge time | wall time (with imports) |")
        print("| --- | --- | --- | --- | --- |")
        labels = {
            "streaming": "streaming (`finetune merge --no-verify`)",
            "plain": "PEFT `merge_and_unload()` + `save_pretrained`",
            "streaming+verify": "streaming + verification",
        }
        for arm, r in results.items():
            print(f"| {labels[arm]} | {gib(r['peak_rss'])} | {gib(r['rss_after_imports'])} | {r['seconds']:.1f} s | {r['wall']:.1f} s |")
        s, p = results["streaming"], results["plain"]
        print(
            f"\nStreaming / plain: peak RSS {s['peak_rss'] / p['peak_rss']:.2f}x, merge time {s['seconds'] / p['seconds']:.2f}x. "
            f"Outputs: {same}/{tensors} tensors bit-identical, max |difference| {worst:.3g}."
        )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
