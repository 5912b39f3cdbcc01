"""`finetune merge`: fold a LoRA/DoRA adapter into its full-precision base and ship a plain transformers model.

The flow reads top to bottom: find the adapter, its base and its run's recipe → check the output folder → read
the adapter and plan the merge (every mismatch is found here, before anything is written) → write the merged
weights into a temporary sibling folder → add config, tokenizer, recipe → verify the merged logits against
base + adapter → optionally export a bitsandbytes copy → write the model card and `merge_report.json` → rename
the folder into place. A crash or a failed check leaves no output folder behind.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune.dtypes import name_of
from finetune.errors import FinetuneError
from finetune.merge.plan import TASK_CLASSES, MergeInputs, MergePlan, check_output, plan_merge, resolve_inputs
from finetune.training.memory import peak_rss_bytes

log = logging.getLogger(__name__)

ROUNDING_HINT = (
    " Rounding W + delta to {dtype} erases the part of an update that is small next to the weight it is added "
    "to; merge with --dtype fp32 (or fp16, 3 more mantissa bits than bf16), or accept the loss with --tolerance."
)
QUANTIZE_WARNING = (
    "--quantize {bits}: the exported weights are rounded to {bits} bits; expect the logits to move "
    "(see quantization.max_abs_logit_diff_vs_merged in merge_report.json). Keep the full-precision merge for "
    "further training or merging."
)


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


# --------------------------------------------------------------------------------------------
# Merge
# --------------------------------------------------------------------------------------------


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    base: str | None = None,
    dtype=None,
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

    `dtype` is "fp32"/"bf16"/"fp16" or a torch dtype (default: the recipe's merge.dtype, else the base's);
    `verify` and `tolerance` default to the recipe's merge section (on; per-dtype tolerance); `prompts` replace
    the fixed verification prompts (the recipe's eval.prompts are added either way). Raises FinetuneError,
    leaving no `out_dir` behind, when the adapter does not fit the base, a file is missing, `out_dir` is not
    empty (without `overwrite`), or the merged logits differ from base + adapter by more than the tolerance.
    """
    started = time.perf_counter()
    from finetune.merge.images import image_run

    run = image_run(Path(adapter_dir))
    if run is not None:  # an image classifier: its base is rebuilt from the run's recipe
        return _merge_image_run(run, Path(out_dir), base, dtype, verify, tolerance, quantize, method, overwrite, started)
    inputs = resolve_inputs(adapter_dir, base)  # the quick checks first: torch is not imported yet
    out = check_output(Path(out_dir), overwrite, inputs)
    if quantize and importlib.util.find_spec("bitsandbytes") is None:
        raise FinetuneError("--quantize needs bitsandbytes: pip install 'finetune-kit[quant]'.")

    from transformers.utils.hub import convert_file_size_to_int

    from finetune.merge import verify as merge_verify

    try:
        max_shard_bytes = convert_file_size_to_int(max_shard_size)
    except ValueError:
        raise FinetuneError(f"--max-shard-size {max_shard_size!r}: give a size such as 5GB or 500MB.") from None
    recipe = inputs.recipe
    if verify is None:
        verify = recipe.merge.verify if recipe is not None else True
    if tolerance is None and recipe is not None:
        tolerance = recipe.merge.tolerance
    plan = plan_merge(inputs, dtype, method)  # every mismatch is raised here, before anything is written

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        seconds = {}
        t0 = time.perf_counter()
        written = _write_weights(plan, tmp, max_shard_bytes)
        seconds["merge"] = round(time.perf_counter() - t0, 2)
        _write_side_files(inputs, tmp)

        ids, verification, merged_logits = None, None, None
        if verify or quantize:
            prompts = list(prompts or merge_verify.DEFAULT_PROMPTS) + (list(recipe.eval.prompts[:3]) if recipe else [])
            vocab = plan.vocab_size or plan.config.vocab_size
            ids = merge_verify.verification_inputs(tmp if inputs.tokenizer_dir else None, prompts, vocab)
        if verify:
            verification, merged_logits = _verify(plan, tmp, ids, tolerance, out)
            seconds["verify"] = verification.seconds

        quantization = None
        if quantize:
            t0 = time.perf_counter()
            tmp, quantization = _quantize(plan, tmp, out, quantize, ids, merged_logits, max_shard_bytes)
            quantized = _weight_files(tmp)
            written.files, written.total_bytes = quantized.files, quantized.total_bytes
            seconds["quantize"] = round(time.perf_counter() - t0, 2)

        seconds["total"] = round(time.perf_counter() - started, 2)
        report = _report(plan, out, written, verification, quantization, seconds)
        (tmp / "merge_report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(report, inputs))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _merge_image_run(run, out_dir: Path, base, dtype, verify, tolerance, quantize, method, overwrite, started) -> MergeReport:
    """The image branch of `merge_adapter` (finetune/merge/images.py): same folder discipline, same report."""
    from finetune.merge import images

    out = images.check_image_merge(run, out_dir, overwrite, base, quantize, method)
    recipe = run.recipe
    verify = recipe.merge.verify if verify is None else verify
    tolerance = recipe.merge.tolerance if tolerance is None else tolerance
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        result = images.write_image_merge(run, tmp, dtype, verify, tolerance)
        shutil.copy(run.recipe_path, tmp / "recipe.yaml")
        run.labels.save(tmp)
        run.preprocessing.save(tmp)
        seconds = {**result["seconds"], "total": round(time.perf_counter() - started, 2)}
        report = MergeReport(
            out_dir=str(out), adapter=str(run.adapter_dir), base=recipe.model.name_or_path, base_name=recipe.model.name_or_path,
            recipe=str(run.recipe_path), task_type="IMAGE_CLASSIFICATION", architecture=result["architecture"],
            adapter_type="lora", trained_on_quantized_base=None, method="peft", method_note=None, dtype=result["dtype"],
            files=result["files"], total_bytes=result["total_bytes"], merged_modules=result["merged_modules"],
            carried_over=result["carried_over"], dropped_base_tensors=[], untied_weights=[], update_lost_to_rounding=None,
            verification=result["verification"], quantization=None, seconds=seconds, peak_rss_bytes=peak_rss_bytes(),
            versions=_versions(),
        )  # fmt: skip
        (tmp / "merge_report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        (tmp / "README.md").write_text(images.image_model_card(run, out, result))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


@dataclass
class _Written:
    files: list[str]
    total_bytes: int
    merged_modules: int
    lost: dict | None = None


def _weight_files(folder: Path) -> _Written:
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    return _Written(files, sum((folder / f).stat().st_size for f in files), 0)


def _write_weights(plan: MergePlan, tmp: Path, max_shard_bytes: int) -> _Written:
    """Merged weights and config into `tmp`: streamed, or through PEFT's merge_and_unload."""
    from finetune.merge import peft as merge_peft
    from finetune.merge import streaming as merge_streaming

    if plan.streaming is not None:
        result = merge_streaming.write_streaming_merge(plan.streaming, tmp, max_shard_bytes)
        plan.config.save_pretrained(tmp)
        return _Written(result.files, result.total_bytes, result.merged_modules, result.update_lost_to_rounding)
    i = plan.inputs
    merge_peft.peft_merge(
        i.base_dir, i.adapter_dir, plan.model_class, plan.overrides, plan.vocab_size, plan.dtype, tmp, max_shard_bytes
    )
    written = _weight_files(tmp)
    written.merged_modules = len(plan.adapter.updates)
    return written


def _verify(plan: MergePlan, tmp: Path, ids, tolerance: float | None, out: Path):
    """Compare merged and base + adapter logits; raise (so nothing is published) when over tolerance."""
    import torch

    from finetune.merge import verify as merge_verify

    i = plan.inputs
    verification, merged_logits = merge_verify.verify_merge(
        tmp, i.base_dir, i.adapter_dir, plan.model_class, plan.overrides, plan.vocab_size, ids, plan.dtype, tolerance
    )
    log.info("Verification: max |logit diff| %.3g (tolerance %.3g).", verification.max_abs_logit_diff, verification.tolerance)
    if not verification.passed:
        hint = ROUNDING_HINT.format(dtype=name_of(plan.dtype)) if plan.dtype != torch.float32 else ""
        raise FinetuneError(
            f"verification failed: the merged model's logits differ from base + adapter by up to "
            f"{verification.max_abs_logit_diff:.4g}, over the tolerance {verification.tolerance:.4g} "
            f"({verification.tolerance_rule}). Nothing was written to {out}.{hint}"
        )
    return verification, merged_logits


def _quantize(plan: MergePlan, tmp: Path, out: Path, bits: int, ids, merged_logits, max_shard_bytes: int) -> tuple[Path, dict]:
    """Replace the full-precision weights in the result with a bitsandbytes export of them."""
    from finetune.merge import export as merge_export

    log.warning(QUANTIZE_WARNING.format(bits=bits))
    qdir = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.quantized-"))
    try:
        quantization = merge_export.quantize_export(tmp, qdir, bits, plan.model_class, ids, merged_logits, max_shard_bytes)
        for path in tmp.iterdir():  # tokenizer, recipe, labels; the quantized folder has its own config and weights
            if not path.name.startswith("model") and not (qdir / path.name).exists():
                shutil.move(str(path), qdir / path.name)
    except BaseException:
        shutil.rmtree(qdir, ignore_errors=True)
        raise
    shutil.rmtree(tmp)
    quantization["warning"] = QUANTIZE_WARNING.format(bits=bits)
    return qdir, quantization


def _report(plan: MergePlan, out: Path, written: _Written, verification, quantization, seconds: dict) -> MergeReport:
    i, recipe, streaming = plan.inputs, plan.inputs.recipe, plan.streaming
    return MergeReport(
        out_dir=str(out),
        adapter=str(i.adapter_dir),
        base=str(i.base_dir),
        base_name=i.base_name,
        recipe=str(i.recipe_path) if i.recipe_path else None,
        task_type=i.task_type,
        architecture=plan.architecture,
        adapter_type=plan.adapter.kind,
        trained_on_quantized_base=recipe.quantization.bits if recipe is not None else None,
        method=plan.method,
        method_note=plan.method_note,
        dtype=name_of(plan.dtype),
        files=written.files,
        total_bytes=written.total_bytes,
        merged_modules=written.merged_modules,
        carried_over=sorted(plan.adapter.replacements),
        dropped_base_tensors=streaming.dropped_base_keys if streaming else [],
        untied_weights=streaming.untied if streaming else [],
        update_lost_to_rounding=_rounding_summary(written.lost),
        verification=verification.as_dict() if verification else None,
        quantization=quantization,
        seconds=seconds,
        peak_rss_bytes=peak_rss_bytes(),
        versions=_versions(),
    )


def _write_side_files(inputs: MergeInputs, tmp: Path) -> None:
    """Tokenizer (with its chat template) and generation config from the run when it has them, else the base;
    the recipe and labels beside the model."""
    if inputs.tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(inputs.tokenizer_dir).save_pretrained(tmp)
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
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def model_card(report: MergeReport, inputs: MergeInputs) -> str:
    """README.md of the merged folder: what produced it and how far it was checked."""
    c = inputs.adapter_config
    targets = c.get("target_modules")
    if isinstance(targets, list):  # PEFT saves expanded names ("model.layers.0.mlp.up_proj"); show the layer kinds
        targets = ", ".join(sorted({t.rsplit(".", 1)[-1] for t in targets}))
    adapter = f"{report.adapter_type}, r={c.get('r')}, alpha={c.get('lora_alpha')}, targets: {targets}"
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
