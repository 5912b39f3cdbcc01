"""What `finetune eval` leaves behind, in `RUN_DIR/eval` (or `--out`): `report.json` (every number), `report.md`
(the table a person reads), `metrics.png` (grouped bars) and `predictions.jsonl` (every answer, to read)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

from finetune.errors import FinetuneError

SHOWN_GENERATIONS = 4  # side-by-side answers in report.md
COLUMN_TITLES = {"base": "base", "start": "SFT start (reference)", "adapter": "fine-tuned", "merged": "merged"}


def output_folder(source, out: str | None) -> Path:
    """`--out`, else `eval/` in the run (or merged) folder. Checked now; written only when all is measured."""
    folder = Path(out) if out else source.home / "eval"
    if folder.exists() and not folder.is_dir():
        raise FinetuneError(f"--out {folder}: exists and is not a folder.")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / "report.json").is_file():
        raise FinetuneError(f"--out {folder}: not empty and not an earlier report; give an empty or new folder.")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FinetuneError(f"--out {folder}: cannot create its parent folder ({exc.strerror}).") from None
    return folder


def write_report(evaluation, out: Path) -> None:
    """Write every file into a sibling temporary folder, then swap it in: an interrupted or failed evaluation
    leaves the earlier report (or nothing), never half of one."""
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        payload = report_dict(evaluation)
        (tmp / "report.json").write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
        (tmp / "report.md").write_text(report_markdown(evaluation, payload))
        with (tmp / "predictions.jsonl").open("w") as fh:
            for row in evaluation.predictions:
                fh.write(json.dumps(row, ensure_ascii=False, default=_jsonable) + "\n")
        plot_metrics(evaluation, tmp / "metrics.png")
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def deltas(evaluation) -> dict[str, dict[str, float]]:
    """Each variant's metrics minus the base's."""
    base = evaluation.metrics.get("base")
    if not base:
        return {}
    return {
        name: {k: v - base[k] for k, v in metrics.items() if k in base and _finite(v) and _finite(base[k])}
        for name, metrics in evaluation.metrics.items() if name != "base"
    }


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def report_dict(evaluation) -> dict:
    import platform

    source = evaluation.source
    recipe_file = (source.run_dir or source.merged_dir) / "recipe.yaml"
    return {
        "run_dir": str(source.run_dir) if source.run_dir else None,
        "merged_dir": str(source.merged_dir) if source.merged_dir else None,
        "task": source.task,
        "base_model": source.recipe.model.name_or_path,
        "recipe_sha256": hashlib.sha256(recipe_file.read_bytes()).hexdigest(),
        "seed": source.recipe.train.seed,
        "data": evaluation.data_name,
        "variants": evaluation.variants,
        "metrics": evaluation.metrics,
        "stderr": evaluation.stderr,
        "deltas_vs_base": deltas(evaluation),
        "lower_is_better": sorted(evaluation.lower_is_better),
        "comparisons": evaluation.comparisons,
        "lm_eval": evaluation.tasks,
        "warnings": evaluation.warnings,
        "notes": evaluation.notes,
        "facts": evaluation.facts,
        "seconds": evaluation.seconds,
        "versions": {"python": platform.python_version(), **_versions()},
    }


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("finetune-kit", "torch", "transformers", "peft", "lm_eval", "sacrebleu", "rouge_score"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _number(value) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"


def _delta(metric: str, value, lower_is_better: set[str], noise: float | None = None) -> str:
    """`+0.02 ✓` (better), `-0.2 ✗` (worse), or `±` when within two standard errors of no change."""
    if not _finite(value):
        return "—"
    if noise is not None and abs(value) <= 2 * noise:
        return f"{value:+.4g} (within 2 s.e.)"
    better = (value < 0) if metric in lower_is_better else (value > 0)
    mark = "" if value == 0 else (" ✓" if better else " ✗")
    return f"{value:+.4g}{mark}"


def _with_stderr(value, stderr) -> str:
    return _number(value) + (f" ± {stderr:.2g}" if _finite(stderr) and stderr > 0 else "")


def report_markdown(evaluation, payload: dict) -> str:
    source, names = evaluation.source, evaluation.variants
    lines = [f"# Evaluation: {source.home}", ""]
    lines += [
        f"- task: {source.task}; base model: `{source.recipe.model.name_or_path}`",
        f"- held-out data: {evaluation.facts.get('rows', 0)} rows of {evaluation.data_name}",
        f"- variants: {', '.join(names)}" + (f" (merged: {evaluation.facts['merged_from']})" if "merged_from" in evaluation.facts else ""),
        f"- time: {evaluation.seconds.get('total', 0):.0f} s in all (load {evaluation.seconds.get('load', 0):.0f} s)",
        "",
    ]
    for warning in evaluation.warnings:
        lines += [f"> **Warning:** {warning}", ""]
    columns = [COLUMN_TITLES[n] for n in names]
    has_delta = "base" in names and len(names) > 1
    header = ["metric", *columns] + (["Δ fine-tuned − base"] if has_delta and "adapter" in names else [])
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    metric_names = list(dict.fromkeys(k for n in names for k in evaluation.metrics.get(n, {})))
    delta = payload["deltas_vs_base"].get("adapter", {})
    for metric in metric_names:
        shown = metric + (" (lower is better)" if metric in evaluation.lower_is_better else "")
        errors = {n: evaluation.stderr.get(n, {}).get(metric) for n in names}
        cells = [_with_stderr(evaluation.metrics.get(n, {}).get(metric), errors[n]) for n in names]
        if len(header) > len(cells) + 1:
            known = [errors.get(n) for n in ("base", "adapter") if _finite(errors.get(n))]
            noise = math.hypot(*known) if len(known) == 2 else None
            cells.append(_delta(metric, delta.get(metric), evaluation.lower_is_better, noise))
        lines.append(f"| {shown} | " + " | ".join(cells) + " |")
    lines.append("")
    comparisons = evaluation.comparisons
    if "adapter_vs_merged_max_abs_logit_diff" in comparisons:
        lines.append(
            f"Largest |logit difference| adapter vs merged: {comparisons['adapter_vs_merged_max_abs_logit_diff']:.3g} "
            f"(logits up to {comparisons['adapter_max_abs_logit']:.3g}, over {comparisons['compared']})."
        )
    if "adapter_vs_base_max_abs_logit_diff" in comparisons:
        lines.append(f"Largest |logit difference| adapter vs base: {comparisons['adapter_vs_base_max_abs_logit_diff']:.3g}.")
    if evaluation.stderr:
        lines.append("± is the standard error over an lm_eval task's documents; a change within two of them is noise.")
    lines.append("")
    if evaluation.notes:
        lines += [f"- {note}" for note in evaluation.notes] + [""]
    lines += ["Time per part (s): " + "; ".join(
        f"{n}: " + ", ".join(f"{part} {s:.1f}" for part, s in evaluation.seconds.get(n, {}).items()) for n in names
    ), ""]
    generated = [p for p in evaluation.predictions if "reference" in p][:SHOWN_GENERATIONS]
    if generated:
        lines += ["## Side by side", ""]
        for p in generated:
            lines += [f"**Q:** {_one_line(p['prompt'])}", "", f"- reference: {_one_line(p['reference'])}"]
            lines += [f"- {COLUMN_TITLES[n]}: {_one_line(p[n]['answer'])}" for n in names if n in p]
            lines.append("")
    lines.append("Every answer: `predictions.jsonl`. Every number: `report.json`.")
    return "\n".join(lines) + "\n"


def _one_line(text: str, width: int = 200) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_metrics(evaluation, path: Path) -> Path | None:
    """One small bar group per metric (their scales differ: a loss, a perplexity, scores out of 100)."""
    names = evaluation.variants
    metric_names = [m for m in dict.fromkeys(k for n in names for k in evaluation.metrics.get(n, {}))
                    if any(_finite(evaluation.metrics.get(n, {}).get(m)) for n in names)]
    if not metric_names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(metric_names))
    rows = math.ceil(len(metric_names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), dpi=100, squeeze=False)
    colors = {"base": "#9e9e9e", "start": "#2ca02c", "adapter": "#1f77b4", "merged": "#ff7f0e"}
    for ax, metric in zip(axes.flat, metric_names):
        values = [evaluation.metrics.get(n, {}).get(metric) for n in names]
        heights = [v if _finite(v) else 0 for v in values]
        ax.bar([COLUMN_TITLES[n] for n in names], heights, color=[colors[n] for n in names])
        ax.set_title(metric + (" ↓" if metric in evaluation.lower_is_better else ""), fontsize=9)
        ax.tick_params(labelsize=8)
        for x, v in enumerate(values):
            ax.annotate(_number(v), (x, heights[x]), ha="center", va="bottom", fontsize=7)
    for ax in list(axes.flat)[len(metric_names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
