"""`finetune merge`: fold a LoRA/DoRA adapter into its full-precision base and ship a plain transformers model.

The flow reads top to bottom: find the adapter, its base and its run's recipe → check the output folder → read
the adapter and plan the merge (every mismatch is found here, before anything is written) → write the merged
weights into a temporary sibling folder → add config, tokenizer, recipe → verify the merged logits against
base + adapter → optionally export a bitsandbytes copy → write the model card and `merge_report.json` → rename
the folder into place. A crash or a failed check leaves no output folder behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from finetune.errors import FinetuneError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RECIPE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TASK_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")
QUANTIZE_WARNING = (
    "--quantize {bits}: the exported weights are rounded to {bits} bits; expect the logits to move "
    "(see quantization.max_abs_logit_diff_vs_merged in merge_report.json). Keep the full-precision merge for "
    "further training or merging."
)


@dataclass
class MergeInputs:
    """What a merge reads: the adapter folder, the base it belongs to, and the run's recipe and labels if any."""

    adapter_dir: Path
    adapter_config: dict
    base_dir: Path
    base_name: str  # how the user knows the base (recipe name or hub id), for the model card
    task_type: str
    recipe_path: Path | None = None
    recipe: object | None = None  # finetune.recipe.Recipe
    labels: dict | None = None


@dataclass
class MergeReport:
    """Everything `merge_report.json` records about a merge."""

    out_dir: str
    adapter: str
    base: str
    base_name: str
    recipe: str | None
    task_type: str
    architecture: str
    adapter_type: str
    trained_on_quantized_base: int | None
    method: str
    method_note: str | None
    dtype: str
    files: list[str]
    total_bytes: int
    merged_modules: int
    carried_over: list[str]  # adapter tensors that replace or add base tensors (modules_to_save, heads)
    dropped_base_tensors: list[str]
    untied_weights: list[str]
    update_lost_to_rounding: dict | None
    verification: dict | None
    quantization: dict | None
    seconds: dict = field(default_factory=dict)
    peak_rss_bytes: int = 0
    versions: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="ADAPTER_OR_RUN_DIR", help="A PEFT adapter folder or a finetune run folder.")
    parser.add_argument("--out", required=True, help="Folder for the merged model (created; must be empty).")
    parser.add_argument(
        "--base", help="Base model folder or hub id. Default: the adapter's base_model_name_or_path, else the recipe's model."
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="Dtype of the merged weights. Default: merge.dtype, else the base's dtype."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --out folder.")
    parser.add_argument("--no-verify", action="store_true", help="Skip comparing merged and adapter logits.")
    parser.add_argument(
        "--tolerance", type=float, help="Max absolute logit difference accepted. Default: relative to the logit scale, per dtype."
    )
    parser.add_argument(
        "--quantize", type=int, choices=(4, 8), help="Also export a bitsandbytes 4- or 8-bit copy (rounds the weights)."
    )
    parser.add_argument(
        "--method",
        choices=("streaming", "peft"),
        help="streaming: shard by shard in bounded memory (default; adapters it cannot merge exactly fall back to "
        "peft); peft: merge_and_unload on the whole model in memory.",
    )
    parser.add_argument("--max-shard-size", default="5GB", help="Largest output shard, e.g. 5GB or 500MB (default 5GB).")


def run(args: argparse.Namespace) -> int:
    report = merge_adapter(
        args.adapter,
        args.out,
        base=args.base,
        dtype=args.dtype,
        verify=False if args.no_verify else None,
        tolerance=args.tolerance,
        quantize=args.quantize,
        method=args.method,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
    )
    print(f"Merged {report.adapter} into {report.base_name} -> {report.out_dir}")
    print(f"  method {report.method}, {report.dtype}, {report.merged_modules} module(s), {len(report.files)} shard(s)")
    if report.method_note:
        print(f"  note: {report.method_note}")
    if report.verification:
        v = report.verification
        print(f"  verified: max |logit diff| {v['max_abs_logit_diff']:.3g} <= tolerance {v['tolerance']:.3g} ({v['tokens']} tokens)")
    else:
        print("  not verified (--no-verify)")
    if report.quantization:
        print(f"  exported {report.quantization['bits']}-bit bitsandbytes weights")
    return 0


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _local_model(name: str) -> Path:
    """A folder for `name`: a local path, or a hub id from the local cache (network only if HF_HUB_OFFLINE is unset)."""
    if Path(name).is_dir():
        return Path(name)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as exc:  # hub errors are many types; all mean "not available here"
        raise FinetuneError(f"base model {name!r} is neither a local folder nor an available hub model ({exc}).") from None


def resolve_inputs(adapter: str | Path, base: str | None) -> MergeInputs:
    """Find the adapter files, the run's recipe and labels, and the base: --base, else adapter_config, else recipe."""
    from finetune.models import resolve_model_path
    from finetune.recipe import ModelConfig, load_recipe

    adapter_dir = Path(adapter)
    if not (adapter_dir / "adapter_config.json").is_file():
        hint = " It holds a full model (config.json), not an adapter: there is nothing to merge." if (adapter_dir / "config.json").is_file() else ""
        raise FinetuneError(f"{adapter_dir}: no adapter_config.json; not a PEFT adapter or finetune run folder.{hint}")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        hint = " (only a pickle adapter_model.bin; re-save it with safetensors)" if (adapter_dir / "adapter_model.bin").is_file() else ""
        raise FinetuneError(f"{adapter_dir}: no adapter_model.safetensors{hint}.")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())

    # A run folder holds recipe.yaml beside the adapter; a checkpoint-N folder inside it has it one level up.
    recipe_path = next((p / "recipe.yaml" for p in (adapter_dir, adapter_dir.parent) if (p / "recipe.yaml").is_file()), None)
    recipe = load_recipe(recipe_path) if recipe_path else None
    labels_path = next((p / "labels.json" for p in (adapter_dir, adapter_dir.parent) if (p / "labels.json").is_file()), None)
    labels = json.loads(labels_path.read_text()) if labels_path else None

    named = config.get("base_model_name_or_path")
    if base:
        base_name, base_dir = base, _local_model(resolve_model_path(ModelConfig(name_or_path=base)))
    elif named and Path(named).is_dir():
        base_name, base_dir = (recipe.model.name_or_path if recipe else named), Path(named)
    elif recipe is not None:
        base_name, base_dir = recipe.model.name_or_path, _local_model(resolve_model_path(recipe.model))
    elif named:
        base_name, base_dir = named, _local_model(named)
    else:
        raise FinetuneError(f"{adapter_dir}: the adapter names no base model and there is no recipe.yaml; pass --base.")
    if not (base_dir / "config.json").is_file():
        raise FinetuneError(f"base model {base_dir}: no config.json.")

    task_type = config.get("task_type") or ("SEQ_CLS" if recipe is not None and recipe.task == "classification" else "CAUSAL_LM")
    if task_type not in TASK_CLASSES:
        raise FinetuneError(f"adapter task_type {task_type} is not supported; finetune merge handles {', '.join(TASK_CLASSES)}.")
    return MergeInputs(adapter_dir, config, base_dir, base_name, task_type, recipe_path, recipe, labels)


def check_output(out: Path, overwrite: bool, inputs: MergeInputs) -> Path:
    out = out.resolve()
    for name, folder in (("adapter", inputs.adapter_dir), ("base model", inputs.base_dir)):
        folder = folder.resolve()
        if out == folder or out in folder.parents or folder in out.parents:
            raise FinetuneError(f"--out {out} overlaps the {name} folder {folder}; choose a separate folder.")
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FinetuneError(f"--out {out} is not empty; pass --overwrite to replace it.")
    return out


def _model_class(task_type: str):
    import transformers

    return getattr(transformers, TASK_CLASSES[task_type])


def config_overrides(inputs: MergeInputs, adapter, tokenizer_dir: Path | None) -> dict:
    """Config fields the output needs beyond the base's: the classification labels (and a pad token to find the
    last token by, for decoder classifiers)."""
    if inputs.task_type != "SEQ_CLS":
        return {}
    if inputs.labels:
        id2label = {int(k): v for k, v in inputs.labels["id2label"].items()}
        multi = bool(inputs.labels.get("multi_label"))
    else:
        heads = [t for k, t in adapter.replacements.items() if k in ("score.weight", "classifier.weight", "classifier.out_proj.weight")]
        if not heads:
            raise FinetuneError("cannot tell the number of labels: no labels.json and no score/classifier head in the adapter.")
        id2label, multi = {i: f"LABEL_{i}" for i in range(heads[0].shape[0])}, False
    overrides = {
        "num_labels": len(id2label),
        "id2label": id2label,
        "label2id": {v: k for k, v in id2label.items()},
        "problem_type": "multi_label_classification" if multi else "single_label_classification",
    }
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        pad = AutoTokenizer.from_pretrained(tokenizer_dir).pad_token_id
        if pad is not None:
            overrides["pad_token_id"] = pad
    return overrides


def _has_safetensors(base_dir: Path) -> bool:
    return any((base_dir / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json"))


def _base_dtype(base_dir: Path, config) -> torch.dtype:
    """The dtype most of the base checkpoint's floating-point bytes are stored in (else its config's)."""
    from finetune.merge_streaming import base_checkpoint

    if not _has_safetensors(base_dir):
        declared = getattr(config, "dtype", None)
        return declared if isinstance(declared, torch.dtype) else torch.float32
    sizes: dict[torch.dtype, int] = {}
    for t in base_checkpoint(base_dir).values():
        if t.dtype.is_floating_point:
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.dtype.itemsize * int(torch.Size(t.shape).numel())
    return max(sizes, key=sizes.get) if sizes else torch.float32


def choose_method(requested: str | None, adapter, base_dir: Path, model_type: str) -> tuple[str, str | None]:
    """Streaming unless asked otherwise or unable to reproduce the adapter exactly (then PEFT, with a note)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    if requested == "peft":
        return "peft", None
    reasons = list(adapter.unsupported)
    if get_checkpoint_conversion_mapping(model_type):
        reasons.append(f"transformers converts the {model_type} checkpoint layout when loading it")
    if not _has_safetensors(base_dir):
        reasons.append("the base has no safetensors weights")
    if not reasons:
        return "streaming", None
    if requested == "streaming":
        raise FinetuneError(f"--method streaming cannot merge this exactly: {'; '.join(reasons)}. Use --method peft.")
    return "peft", (
        f"the streaming merge cannot reproduce this exactly ({'; '.join(reasons)}); merged with PEFT "
        "merge_and_unload instead, which holds the whole model in memory"
    )


# --------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    base: str | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    verify: bool | None = None,
    tolerance: float | None = None,
    quantize: int | None = None,
    method: str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    prompts: list[str] | None = None,
) -> MergeReport:
    """Merge an adapter (or a run folder's adapter) into its full-precision base and write a plain model to `out_dir`.

    Raises FinetuneError, leaving no `out_dir` behind, when the adapter does not fit the base, a file is
    missing, `out_dir` is not empty (without `overwrite`), or the merged logits differ from base + adapter by
    more than the tolerance.
    """
    from transformers import AutoConfig
    from transformers.utils.hub import convert_file_size_to_int

    from finetune import merge_streaming as streaming
    from finetune import merge_verify

    started = time.perf_counter()
    inputs = resolve_inputs(adapter_dir, base)
    out = check_output(Path(out_dir), overwrite, inputs)
    recipe = inputs.recipe
    if verify is None:
        verify = recipe.merge.verify if recipe is not None else True
    if tolerance is None and recipe is not None:
        tolerance = recipe.merge.tolerance
    max_shard_bytes = convert_file_size_to_int(max_shard_size)
    config = AutoConfig.from_pretrained(inputs.base_dir)
    if isinstance(dtype, str):
        if dtype not in DTYPES and dtype not in RECIPE_DTYPES:
            raise FinetuneError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
        dtype = DTYPES.get(dtype) or RECIPE_DTYPES[dtype]
    if dtype is None:
        dtype = RECIPE_DTYPES[recipe.merge.dtype] if recipe is not None and recipe.merge.dtype else _base_dtype(inputs.base_dir, config)
    if getattr(config, "quantization_config", None):
        raise FinetuneError(
            f"base model {inputs.base_dir} is a quantized checkpoint ({config.quantization_config.get('quant_method', '?')}); "
            "merging into rounded weights would bake the rounding in. Pass --base with the full-precision model."
        )
    adapter = streaming.read_adapter(inputs.adapter_dir)
    tokenizer_dir = next((d for d in (inputs.adapter_dir, inputs.base_dir) if any((d / n).is_file() for n in TOKENIZER_FILES)), None)
    overrides = config_overrides(inputs, adapter, tokenizer_dir)
    for key, value in overrides.items():
        setattr(config, key, value)
    model_class = _model_class(inputs.task_type)
    chosen, note = choose_method(method, adapter, inputs.base_dir, config.model_type)
    if note:
        log.warning("Note: %s.", note)

    # Plan before writing: every name or shape mismatch is reported here.
    vocab_size, plan, architecture = None, None, None
    if chosen == "streaming":
        meta = streaming.meta_model(model_class, config)
        embedding_key = next(f"{n}.weight" for n, m in meta.named_modules() if m is meta.get_input_embeddings())
        resized = adapter.replacements.get(embedding_key)
        if resized is not None and resized.shape[0] != meta.get_input_embeddings().weight.shape[0]:
            vocab_size = config.vocab_size = resized.shape[0]  # the run added tokens and saved the embeddings
            meta = streaming.meta_model(model_class, config)
        plan = streaming.plan_streaming_merge(streaming.base_checkpoint(inputs.base_dir), adapter, meta, dtype)
        architecture = type(meta).__name__
        del meta

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    seconds = {}
    try:
        t0 = time.perf_counter()
        if plan is not None:
            result = streaming.write_streaming_merge(plan, tmp, max_shard_bytes)
            files, total, merged_modules, lost = result.files, result.total_bytes, result.merged_modules, result.update_lost_to_rounding
            if plan.untied:
                config.tie_word_embeddings = False
            config.architectures = [architecture]
            config.dtype = dtype
            config.save_pretrained(tmp)
        else:
            merge_verify.peft_merge(inputs.base_dir, inputs.adapter_dir, model_class, overrides, vocab_size, dtype, tmp, max_shard_bytes)
            files = sorted(p.name for p in tmp.glob("*.safetensors"))
            total = sum((tmp / f).stat().st_size for f in files)
            merged_modules, lost = len(adapter.updates), None
            architecture = json.loads((tmp / "config.json").read_text())["architectures"][0]
        seconds["merge"] = round(time.perf_counter() - t0, 2)
        _write_side_files(inputs, tmp, tokenizer_dir)

        verification, merged_logits = None, None
        inputs_ids = None
        if verify or quantize:
            prompts = list(prompts or merge_verify.DEFAULT_PROMPTS) + (list(recipe.eval.prompts[:3]) if recipe is not None else [])
            inputs_ids = merge_verify.verification_inputs(tmp if tokenizer_dir else None, prompts, vocab_size or config.vocab_size)
        if verify:
            verification, merged_logits = merge_verify.verify_merge(
                tmp, inputs.base_dir, inputs.adapter_dir, model_class, overrides, vocab_size, inputs_ids, dtype, tolerance
            )
            seconds["verify"] = verification.seconds
            log.info("Verification: max |logit diff| %.3g (tolerance %.3g).", verification.max_abs_logit_diff, verification.tolerance)
            if not verification.passed:
                raise FinetuneError(
                    f"verification failed: the merged model's logits differ from base + adapter by up to "
                    f"{verification.max_abs_logit_diff:.4g}, over the tolerance {verification.tolerance:.4g} "
                    f"({verification.tolerance_rule}). Nothing was written to {out}."
                )

        quantization = None
        if quantize:
            log.warning(QUANTIZE_WARNING.format(bits=quantize))
            t0 = time.perf_counter()
            qdir = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.quantized-"))
            try:
                quantization = merge_verify.quantize_export(tmp, qdir, quantize, model_class, inputs_ids, merged_logits)
                for path in tmp.iterdir():  # everything but the full-precision weights moves to the quantized folder
                    if not path.name.startswith("model") and not (qdir / path.name).exists():
                        shutil.move(str(path), qdir / path.name)
            except BaseException:
                shutil.rmtree(qdir, ignore_errors=True)
                raise
            shutil.rmtree(tmp)
            tmp = qdir
            files = sorted(p.name for p in tmp.glob("*.safetensors"))
            total = sum((tmp / f).stat().st_size for f in files)
            quantization["warning"] = QUANTIZE_WARNING.format(bits=quantize)
            seconds["quantize"] = round(time.perf_counter() - t0, 2)

        seconds["total"] = round(time.perf_counter() - started, 2)
        report = MergeReport(
            out_dir=str(out),
            adapter=str(inputs.adapter_dir),
            base=str(inputs.base_dir),
            base_name=inputs.base_name,
            recipe=str(inputs.recipe_path) if inputs.recipe_path else None,
            task_type=inputs.task_type,
            architecture=architecture,
            adapter_type=adapter.kind,
            trained_on_quantized_base=recipe.quantization.bits if recipe is not None else None,
            method=chosen,
            method_note=note,
            dtype=str(dtype).removeprefix("torch."),
            files=files,
            total_bytes=total,
            merged_modules=merged_modules,
            carried_over=sorted(adapter.replacements),
            dropped_base_tensors=plan.dropped_base_keys if plan else [],
            untied_weights=plan.untied if plan else [],
            update_lost_to_rounding=_rounding_summary(lost),
            verification=verification.as_dict() if verification else None,
            quantization=quantization,
            seconds=seconds,
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            versions=_versions(),
        )
        (tmp / "merge_report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(report, inputs))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _write_side_files(inputs: MergeInputs, tmp: Path, tokenizer_dir: Path | None) -> None:
    """Tokenizer (with its chat template) and generation config from the run when it has them, else the base;
    the recipe and labels beside the model."""
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
    else:
        log.warning("No tokenizer in %s or %s: the merged folder has none.", inputs.adapter_dir, inputs.base_dir)
    if inputs.task_type == "CAUSAL_LM" and not (tmp / "generation_config.json").exists():
        for folder in (inputs.adapter_dir, inputs.base_dir):
            if (folder / "generation_config.json").is_file():
                shutil.copy(folder / "generation_config.json", tmp / "generation_config.json")
                break
    if inputs.recipe_path:
        shutil.copy(inputs.recipe_path, tmp / "recipe.yaml")
    if inputs.labels is not None:
        (tmp / "labels.json").write_text(json.dumps(inputs.labels, indent=2) + "\n")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an existing `out` (allowed by --overwrite) is replaced."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        out.rename(old / out.name)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _rounding_summary(lost: dict[str, float] | None) -> dict | None:
    if not lost:
        return None
    worst = max(lost, key=lost.get)
    return {"max": round(lost[worst], 4), "module": worst, "mean": round(sum(lost.values()) / len(lost), 4)}


def _versions() -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def model_card(report: MergeReport, inputs: MergeInputs) -> str:
    """README.md of the merged folder: what produced it and how far it was checked."""
    c = inputs.adapter_config
    adapter = f"{report.adapter_type}, r={c.get('r')}, alpha={c.get('lora_alpha')}, targets {c.get('target_modules')}"
    rows = [
        ("base model", f"`{report.base_name}`"),
        ("adapter", f"`{report.adapter}` ({adapter})"),
        ("recipe", "`recipe.yaml` (beside this file)" if report.recipe else "none (plain adapter folder)"),
        ("task", report.task_type + (f" — labels: {', '.join(inputs.labels['id2label'].values())}" if inputs.labels else "")),
        ("merge", f"{report.method}, into the full-precision base, saved as {report.dtype}"),
    ]
    if report.trained_on_quantized_base:
        rows.append(("training base", f"{report.trained_on_quantized_base}-bit quantized (QLoRA); the adapter was merged into the full-precision weights"))
    v = report.verification
    rows.append(("verification", f"max |logit diff| {v['max_abs_logit_diff']:.3g} ≤ {v['tolerance']:.3g} over {v['tokens']} tokens" if v else "skipped"))
    if report.quantization:
        rows.append(("quantization", f"bitsandbytes {report.quantization['bits']}-bit export (weights rounded after merging)"))
    auto = TASK_CLASSES[report.task_type]
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (
        f"---\nbase_model: {report.base_name}\nlibrary_name: transformers\ntags: [finetune-kit, merged, {report.adapter_type}]\n---\n\n"
        f"# {Path(report.out_dir).name}\n\n"
        f"`{report.base_name}` with a {report.adapter_type} adapter merged into its weights by `finetune merge`. "
        "It loads with plain transformers; PEFT is not needed.\n\n"
        f"| | |\n| --- | --- |\n{body}\n\n"
        "## Use\n\n```python\n"
        f"from transformers import {auto}, AutoTokenizer\n\n"
        f'model = {auto}.from_pretrained("{report.out_dir}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{report.out_dir}")\n```\n\n'
        "`merge_report.json` holds the full record (files, timings, verification numbers).\n"
    )
