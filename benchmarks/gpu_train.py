"""GPU training at real sizes: the kit against plain TRL and a hand-written PEFT loop, on the same model shape, data,
batch and LoRA settings, one process per variant, interleaved.

    python -m benchmarks.gpu_train                         # every variant, 1 round, on the GPU (see docs/gpu_check.md)
    python -m benchmarks.gpu_train --only kit,trl --rounds 2 --budget 400
    python -m benchmarks.gpu_train --dry-run               # any machine: tiny shapes, 3 steps each, the same code

Setting (issue 26): Llama-3.2-1B's shape (hidden 2048, 16 layers, 32/8 heads, MLP 8192, vocabulary 128,256, tied
embeddings) and Llama-3.1-8B's (hidden 4096, 32 layers, 32/8 heads, MLP 14,336, untied; QLoRA: NF4, double quant,
bf16 compute), random weights built on the device; SmolLM2's tokenizer (ids below 49,152 of the 128,256 rows).
LoRA r16 alpha 32 dropout 0.05 on all linear layers, AdamW lr 2e-4 linear, bf16, `max_length` 2048. Synthetic chat
rows of 400-1,900 words (user turn about a third), 16 rows per micro-batch: at least 16k real tokens per step.
`--warmup` steps (default 5) are run and not timed; the next `--steps` (default 30) are.

Variants (`VARIANTS`): the kit's defaults (padding-free rows, attention per example through PyTorch's varlen flash
kernel, loss on the labelled positions only), the kit with Liger's kernels, `trl sft` with its defaults (padded
batches, activation checkpointing on) and with its own packing (padding-free), and a hand-written transformers + PEFT
loop (dynamic padding, bf16 autocast). Each runs in a process of its own; `trl sft` is TRL's own script
(`trl.scripts.sft`, what `trl sft` launches on one GPU) run in-process so the timer below can be attached.

What is counted, the same way for every variant (`StepTimer`, a callback on the Trainer; the loop times itself):
- real tokens: the tokens of the timed steps that are not padding (prompt and answer);
- step time and tokens/s: from the end of the last warm-up step to the end of the last step, the device
  synchronised at both ends;
- MFU: 4·N FLOPs per real token (N = the matmul weights: layers' linears and the LM head; forward 2N, backward
  through frozen weights 2N; attention's L² terms and LoRA's own weights left out) over the device's bf16 matmul
  rate, measured here (8192² products);
- peak allocated: `torch.cuda.max_memory_allocated()` of the variant's process; for the kit, the plan's estimate
  beside it (`train_metrics.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import BENCH_PREFIX, REPO, finetune_cli, fmt, machine, median, offline_env, print_table, run_measured, write_results  # noqa: E402

GIB = 2**30
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    # --dry-run: the same code on any machine (bitsandbytes' CPU 4-bit kernels need 64 input features)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 tie_word_embeddings=False, rope_theta=10000.0),
}  # fmt: skip
VARIANTS = {
    "kit": ("1b", "the kit's defaults (`finetune train`: padding-free, varlen attention, loss on labelled positions)"),
    "kit-liger": ("1b", "the kit with `train.kernels: liger`"),
    "trl": ("1b", "`trl sft` with its defaults (padded batches, activation checkpointing on)"),
    "trl-packing": ("1b", "`trl sft --packing` (best-fit packing into max_length rows, padding-free; half the rows per "
                          "micro-batch, each a full max_length row: about as many tokens per step)"),
    "loop": ("1b", "a hand-written transformers + PEFT loop (dynamic padding, bf16 autocast)"),
    "kit-8b-qlora": ("8b", "the kit, QLoRA on the 8B shape (NF4, double quant, bf16 compute)"),
}
WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be or have had not but "
    "one all their there been they has who more its also new after first two time would other when into only over "
    "some could state then year most these made years many can him may world such where about city people three "
    "between known during school under war while both later part before family found national united through "
    "since being well including second however life well among team used early began number same area season game"
).split()


# ------------------------------------------------------------------------------------------------------------------
# Inputs: synthetic chat rows, a random model of the shape
# ------------------------------------------------------------------------------------------------------------------


def write_rows(folder: Path, n: int, words: tuple[int, int], seed: int = 0) -> Path:
    """`n` chat rows of `words` words (user turn about a third) in folder/train.jsonl; TRL reads the folder."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for _ in range(n):
        total = rng.randint(*words)
        user = " ".join(rng.choices(WORDS, k=max(1, total // 3)))
        answer = " ".join(rng.choices(WORDS, k=max(1, total - total // 3)))
        lines.append(json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def build_model(shape: str, folder: Path, tokenizer_dir: str | None, device: str) -> None:
    """A random model of `shape` (built on `device`, saved in bf16 there, fp32 on CPU) with the tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finetune.tiny import build_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else build_tokenizer(list(WORDS), 4096)
    dims = dict(SHAPES[shape])
    dims.setdefault("vocab_size", len(tokenizer))
    config = LlamaConfig(**dims, max_position_embeddings=8192, rms_norm_eps=1e-5, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def matmul_parameters(folder: Path) -> int:
    """N of the 4·N FLOPs per token: the weights every token multiplies (layers' linears and the LM head)."""
    c = json.loads((folder / "config.json").read_text())
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * c["vocab_size"]


def device_matmul_tflops(device: str) -> float:
    """The device's bf16 matmul rate (best of 20 8192² products; fp32 2048² on a CPU), in TFLOP/s."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (512, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(25):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------------------------
# In the variant's process
# ------------------------------------------------------------------------------------------------------------------


def attach_step_timer(warmup: int) -> None:
    """Every `Trainer.train` of this process gets a `StepTimer`; its figures are printed as `BENCH {json}` at the end."""
    import torch
    from transformers import Trainer, TrainerCallback

    device = "cuda" if torch.cuda.is_available() else "cpu"

    class StepTimer(TrainerCallback):
        def __init__(self, trainer):
            self.trainer, self.marks = trainer, {}

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, state.max_steps):
                _synchronize(device)
                # TRL's count of real tokens (the kit keeps it too); the Trainer's where TRL's is absent
                tokens = getattr(self.trainer, "_total_train_tokens", None) or state.num_input_tokens_seen
                self.marks[state.global_step] = (time.perf_counter(), tokens)

    original = Trainer.train

    def train(self, *args, **kwargs):
        timer = StepTimer(self)
        self.add_callback(timer)
        result = original(self, *args, **kwargs)
        (t0, n0), (t1, n1) = timer.marks[warmup], timer.marks[self.state.max_steps]
        losses = [h["loss"] for h in self.state.log_history if "loss" in h]
        report = {"steps": self.state.max_steps - warmup, "seconds": t1 - t0, "real_tokens": n1 - n0,
                  "peak_allocated": torch.cuda.max_memory_allocated() if device == "cuda" else None,
                  "last_loss": losses[-1] if losses else None}  # fmt: skip
        print(BENCH_PREFIX + json.dumps(report), flush=True)
        return result

    Trainer.train = train


def hand_written_loop(model_path: str, train_file: str, steps: int, warmup: int, batch: int, max_length: int) -> None:
    """What a user writes with transformers + PEFT alone: chat template, right padding, the model's own loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = [json.loads(line)["messages"] for line in Path(train_file).read_text().splitlines()]
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in rows]
    total = steps + warmup
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, total)
    model.train()
    tokens, loss, start = 0, None, None
    for step in range(total):
        if step == warmup:
            _synchronize(device)
            tokens, start = 0, time.perf_counter()
        chunk = [texts[(step * batch + k) % len(texts)] for k in range(batch)]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True, max_length=max_length, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        tokens += int(enc["attention_mask"].sum())  # counted on the host, before the batch goes to the device
        enc, labels = enc.to(device), labels.to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            out = model(**enc, labels=labels, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    _synchronize(device)
    loss = float(out.loss)
    report = {"steps": steps, "seconds": time.perf_counter() - start, "real_tokens": tokens, "last_loss": loss,
              "peak_allocated": torch.cuda.max_memory_allocated() if device == "cuda" else None}  # fmt: skip
    print(BENCH_PREFIX + json.dumps(report), flush=True)


# ------------------------------------------------------------------------------------------------------------------
# The commands of each variant
# ------------------------------------------------------------------------------------------------------------------


def kit_recipe(folder: Path, model: Path, data: Path, s) -> Path:
    import yaml

    recipe = {
        "model": {"name_or_path": str(model)},
        "adapter": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "data": {"train": str(data / "train.jsonl"), "max_length": s.max_length},
        "train": {
            "max_steps": s.steps + s.warmup, "micro_batch_size": s.batch, "learning_rate": 2e-4, "lr_scheduler": "linear",
            "warmup_ratio": 0.0, "precision": "bf16" if s.device == "cuda" else "fp32", "device": s.device,
            "logging_steps": s.steps + s.warmup, "save_checkpoints": False, "resume": "never",
        },
        "eval": {"prompts": []},
        "output": {"dir": str(folder / "out"), "overwrite": True},
    }  # fmt: skip
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def variant_command(name: str, folder: Path, model: Path, data: Path, s) -> list[str]:
    """The child process of variant `name` (its output folder: `folder`)."""
    me = [sys.executable, "-m", "benchmarks.gpu_train", "--warmup", str(s.warmup)]
    if name.startswith("kit"):
        overrides = {"kit-liger": ["train.kernels=liger"],
                     "kit-8b-qlora": ["quantization.bits=4", "quantization.quant_type=nf4", "quantization.double_quant=true",
                                      f"quantization.compute_dtype={'bf16' if s.device == 'cuda' else 'fp32'}"]}.get(name, [])  # fmt: skip
        return [*me, "--child-kit", "--", "train", str(kit_recipe(folder, model, data, s)), *overrides]
    if name.startswith("trl"):
        precision = ["--dtype", "bfloat16", "--bf16", "true"] if s.device == "cuda" else ["--dtype", "float32", "--bf16", "false", "--use_cpu", "true"]
        cmd = [
            *me, "--child-trl", "--", "--model_name_or_path", str(model), "--dataset_name", str(data),
            "--output_dir", str(folder / "out"), "--use_peft", "--lora_r", "16", "--lora_alpha", "32",
            "--lora_dropout", "0.05", "--lora_target_modules", "all-linear", "--per_device_train_batch_size", str(s.batch),
            "--max_length", str(s.max_length), "--max_steps", str(s.steps + s.warmup), "--learning_rate", "2e-4",
            "--lr_scheduler_type", "linear", "--warmup_steps", "0", "--logging_steps", str(s.steps + s.warmup),
            "--save_strategy", "no", "--report_to", "none", "--seed", "42", "--disable_tqdm", "true", *precision,
        ]  # fmt: skip
        if name == "trl-packing":
            cmd[cmd.index("--per_device_train_batch_size") + 1] = str(max(1, s.batch // 2))
            cmd += ["--packing", "true"]
        return cmd
    if name == "loop":
        return [*me, "--child-loop", str(model), str(data / "train.jsonl"), "--steps", str(s.steps), "--batch", str(s.batch),
                "--max-length", str(s.max_length)]  # fmt: skip
    raise ValueError(name)


def run_variant(name: str, work: Path, models: dict, data: Path, s, env: dict) -> dict:
    folder = Path(tempfile.mkdtemp(dir=work, prefix=f"{name}-"))
    shape = "tiny" if s.dry_run else VARIANTS[name][0]
    cmd = variant_command(name, folder, models[shape], data, s)
    measured = run_measured(cmd, env=env, cwd=REPO)
    if measured.returncode != 0 or not measured.report:
        tail = (measured.stdout + measured.stderr).strip().splitlines()
        refusal = next((line for line in tail if "train.kernels" in line), None)
        return {"status": "refused: " + refusal.strip().removeprefix("- ") if refusal else f"failed (exit {measured.returncode})",
                "log_tail": "\n".join(tail[-30:]), "wall_s": measured.wall_s}  # fmt: skip
    result = {**measured.report, "status": "ok", "wall_s": measured.wall_s}
    metrics = folder / "out" / "train_metrics.json"
    if metrics.exists():
        memory = (json.loads(metrics.read_text()).get("plan") or {}).get("memory") or {}
        result["plan_estimate"] = memory.get("total")
    return result


# ------------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per variant (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="rows per micro-batch")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every variant")
    parser.add_argument("--budget", type=float, help="seconds: start no variant after this")
    parser.add_argument("--tokenizer", help="a tokenizer folder (SmolLM2's: the bundle's models/smollm2)")
    parser.add_argument("--work", type=Path, help="where models and runs go (default: a temporary folder)")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/gpu_train.json)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, 3 steps, on whatever device is here")
    parser.add_argument("--child-kit", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-trl", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-loop", nargs=2, metavar=("MODEL", "TRAIN"), help=argparse.SUPPRESS)
    parser.add_argument("--child-build", nargs=3, metavar=("SHAPE", "FOLDER", "DEVICE"), help=argparse.SUPPRESS)
    parser.add_argument("--child-matmul", metavar="DEVICE", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    rest = rest[1:] if rest[:1] == ["--"] else rest
    if args.child_kit or args.child_trl:
        attach_step_timer(args.warmup)
        if args.child_kit:
            from finetune.cli import main as finetune_main

            return finetune_main(rest) or 0
        import runpy

        sys.argv = ["trl.scripts.sft", *rest]
        runpy.run_module("trl.scripts.sft", run_name="__main__")
        return 0
    if args.child_loop:
        hand_written_loop(*args.child_loop, args.steps, args.warmup, args.batch, args.max_length)
        return 0
    if args.child_build:
        shape, folder, device = args.child_build
        build_model(shape, Path(folder), args.tokenizer, device)
        return 0
    if args.child_matmul:
        print(BENCH_PREFIX + json.dumps({"tflops": device_matmul_tflops(args.child_matmul)}), flush=True)
        return 0
    return run(parser, args)


def run(parser, args) -> int:
    names = [v.strip() for v in args.only.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    started = time.perf_counter()
    env = offline_env(PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    probe = run_measured([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], env=env).check("torch")
    args.device = "cuda" if probe.stdout.strip().endswith("True") else "cpu"
    if args.dry_run:
        args.steps, args.warmup, args.batch, args.max_length = 2, 1, 2, 64
    elif args.device != "cuda":
        parser.error("no CUDA GPU here: use --dry-run for the tiny shapes on this machine")
    info = machine()
    rate = run_measured([sys.executable, "-m", "benchmarks.gpu_train", "--child-matmul", args.device], env=env, cwd=REPO)
    tflops = rate.check("matmul rate").report["tflops"]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-gpu-train-"))
    work.mkdir(parents=True, exist_ok=True)
    data = write_rows(work / "data", 4 * args.batch * (args.steps + args.warmup),
                      (20, 50) if args.dry_run else (400, 1900)).parent  # fmt: skip
    shapes = {"tiny"} if args.dry_run else {VARIANTS[n][0] for n in names}
    models = {}
    for shape in sorted(shapes):
        models[shape] = work / f"model-{shape}"
        if not (models[shape] / "config.json").exists():
            build = [sys.executable, "-m", "benchmarks.gpu_train", "--child-build", shape, str(models[shape]), args.device]
            run_measured(build + (["--tokenizer", args.tokenizer] if args.tokenizer and not args.dry_run else []), env=env, cwd=REPO).check(f"building the {shape} model")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for round_ in range(args.rounds):
        for name in names:
            if args.budget and time.perf_counter() - started > args.budget:
                runs[name].append({"status": "skipped (budget)"})
                continue
            print(f"round {round_ + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
            result = run_variant(name, work, models, data, args, env)
            if result["status"] == "ok":
                shape = "tiny" if args.dry_run else VARIANTS[name][0]
                result["flops_per_token"] = 4 * matmul_parameters(models[shape])
                result["tokens_per_s"] = result["real_tokens"] / result["seconds"]
                result["step_s"] = result["seconds"] / result["steps"]
                result["tokens_per_step"] = result["real_tokens"] / result["steps"]
                result["mfu"] = result["tokens_per_s"] * result["flops_per_token"] / (tflops * 1e12)
            runs[name].append(result)
            print(f"  {name}: {result['status']}" + (f", {result['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in result else ""),
                  file=sys.stderr, flush=True)  # fmt: skip
    table = report(names, runs, args, info, tflops)
    write_results("gpu_train", {
        "machine": info, "device": args.device, "matmul_tflops": tflops, "settings": {k: str(v) for k, v in vars(args).items()},
        "variants": {n: VARIANTS[n][1] for n in names}, "runs": runs, "table": table,
    }, args.out)  # fmt: skip
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(names: list[str], runs: dict, args, info: dict, tflops: float) -> str:
    rows = []
    reference = median([r.get("tokens_per_s") for r in runs.get("trl", [])])
    for name in names:
        ok = [r for r in runs[name] if r.get("status") == "ok"]
        if not ok:
            rows.append([name, VARIANTS[name][0], runs[name][-1].get("status", "-")] + ["-"] * 7)
            continue
        speed = median([r["tokens_per_s"] for r in ok])
        peak = median([r.get("peak_allocated") for r in ok])
        estimate = median([r.get("plan_estimate") for r in ok])
        rows.append([
            name, VARIANTS[name][0], "ok", fmt(speed, 0), fmt(median([r["step_s"] for r in ok]), 3),
            fmt(median([r["tokens_per_step"] for r in ok]), 0), f"{100 * median([r['mfu'] for r in ok]):.1f}%",
            fmt(speed / reference, 2) + "x" if reference else "-",
            fmt(peak / GIB, 2) if peak else "-", fmt(estimate / peak, 2) + "x" if estimate and peak else "-",
        ])  # fmt: skip
    rate = f"bf16 matmul {tflops:.0f} TFLOP/s" if args.device == "cuda" else f"fp32 matmul {tflops * 1e3:.1f} GFLOP/s"
    print(f"\nGPU training, {args.steps} timed steps after {args.warmup}, micro-batch {args.batch} rows, max_length "
          f"{args.max_length}, {args.device} ({rate}); medians of {args.rounds} interleaved round(s)"
          + (" -- DRY RUN: tiny shapes, the figures mean nothing" if args.dry_run else "") + "\n")  # fmt: skip
    return print_table(
        ["variant", "shape", "status", "real tokens/s", "step s", "real tokens/step", "MFU", "vs trl", "peak allocated GiB",
         "plan estimate / peak"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
