"""What a run leaves next to its adapter: metrics JSON, loss curve, samples."""

from __future__ import annotations

import json
import math
from pathlib import Path

from finetune.recipe import Recipe, save_recipe
from finetune.training.callbacks import training_clock
from finetune.training.memory import peak_memory


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def plot_loss_curve(log_history: list[dict], path: Path, title: str = "") -> Path | None:
    """Training (and eval) loss against optimizer step, as a PNG; None when nothing was logged."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and _finite(h["loss"])]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and _finite(h["eval_loss"])]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", marker="." if len(train) < 30 else None)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def final_evaluation(trainer, recipe: Recipe) -> dict:
    """Eval metrics of the saved model; reuses the Trainer's last evaluation when it ran at the final step."""
    history = trainer.state.log_history
    last = next((h for h in reversed(history) if "eval_loss" in h), None)
    if last is not None and last.get("step") == trainer.state.global_step and not recipe.train.load_best_model_at_end:
        return {k: v for k, v in last.items() if k.startswith("eval_")}
    return trainer.evaluate()


def save_run_files(trainer, recipe: Recipe, out: Path, plan, extra: dict | None = None) -> dict:
    """Resolved recipe, metrics JSON and loss curve beside the adapter (main process only)."""

    history = trainer.state.log_history
    train_logs = [h for h in history if "train_runtime" in h]
    summary = dict(train_logs[-1]) if train_logs else {}
    seen = trainer.state.num_input_tokens_seen or 0
    clock = training_clock(trainer)
    if clock.seconds:
        # Training only: the Trainer's train_runtime also counts evaluations and checkpoint saving.
        summary["training_seconds"] = round(clock.seconds, 3)
        summary["training_tokens"] = clock.tokens
        summary["tokens_per_second"] = round(clock.tokens / clock.seconds, 2)
    losses = [h["loss"] for h in history if "loss" in h]
    metrics = {
        "plan": plan.as_dict(),
        "summary": summary,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "num_input_tokens_seen": seen,
        # This process's peak (the main one's, in a multi-process run), beside the plan's estimate.
        "peak_memory": peak_memory(trainer.args.device.type),
        "log_history": history,
        **(extra or {}),
    }
    if trainer.is_world_process_zero():
        save_recipe(recipe, out)
        write_json(out / "train_metrics.json", metrics)
        plot_loss_curve(history, out / "loss_curve.png", title=f"{recipe.task}: {recipe.model.label}")
    return metrics
