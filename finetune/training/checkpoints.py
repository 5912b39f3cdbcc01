"""Resuming a run: which checkpoint in `output.dir` is complete, whether the recipe still fits it, and what the
folder holds (nothing, a run to resume, a finished run, or someone else's files).

The Trainer writes `checkpoint-N/` in place: weights, optimizer, scheduler, RNG states (one per process), and last
`trainer_state.json`. A process killed half-way leaves a folder without that last file, or with a truncated one, or
without some rank's RNG state: such a folder is never resumed from.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.recipe import Recipe, load_recipe, recipe_to_dict

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
RUN_FILE = "run.json"  # written when a run starts: the world size its checkpoints were written with
FINISHED_FILE = "train_metrics.json"  # written when a run ends
# Kit files a started run leaves before its first checkpoint; a folder holding only these is not someone else's.
RUN_FILES = {"recipe.yaml", RUN_FILE, ".finetune.lock", "runs"}
WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
# Recipe keys that may change between a run and its resumption: they change what is logged, kept or evaluated
# after training, not the numbers the training computes.
MAY_CHANGE = (
    "output.overwrite", "train.resume", "train.logging_steps", "train.report_to", "train.num_threads",
    "train.save_total_limit", "train.save_steps", "train.save_checkpoints", "train.device", "eval.", "merge.",
    "pretrain.sample_temperature", "pretrain.sample_top_k",
)


@dataclass
class ResumePoint:
    """Where the run starts: `checkpoint` None is a fresh start; `skipped` names incomplete checkpoints passed over."""

    checkpoint: Path | None = None
    step: int = 0
    skipped: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.checkpoint is None:
            return "fresh (step 0)"
        return f"resumes from {self.checkpoint.name} (step {self.step})"


def checkpoint_problem(folder: Path, world_size: int) -> str | None:
    """Why `folder` cannot be resumed from, or None when it is complete."""
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        return "no trainer_state.json (written last: the save did not finish)"
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "trainer_state.json is truncated (the save did not finish)"
    step = int(CHECKPOINT.match(folder.name).group(1))
    if state.get("global_step") != step:
        return f"trainer_state.json says step {state.get('global_step')}, the folder name says {step}"
    if not any((folder / name).is_file() for name in WEIGHTS) and not _deepspeed_state(folder):
        return "no weights"
    if not (folder / "optimizer.pt").is_file() and not _deepspeed_state(folder):
        return "no optimizer state"
    rng = ["rng_state.pth"] if world_size == 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]
    missing = [name for name in rng if not (folder / name).is_file()]
    if missing:
        return f"no RNG state for {len(missing)} of {world_size} process(es) ({missing[0]})"
    return None


def _deepspeed_state(folder: Path) -> bool:
    latest = folder / "latest"
    return latest.is_file() and (folder / latest.read_text().strip()).is_dir()


def find_checkpoint(out: Path, world_size: int) -> ResumePoint:
    """The complete checkpoint with the highest step in `out`; incomplete ones are listed in `skipped`."""
    found = sorted(
        ((int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))), reverse=True
    ) if out.is_dir() else []
    point = ResumePoint()
    for step, folder in found:
        problem = checkpoint_problem(folder, world_size)
        if problem is None:
            point.checkpoint, point.step = folder, step
            return point
        point.skipped.append(f"{folder.name}: {problem}")
    return point


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        flat = {}
        for key, inner in value.items():
            flat.update(_flat(inner, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def recipe_changes(saved: Recipe, recipe: Recipe) -> list[str]:
    """`key (old -> new)` for each key that differs and would make resuming train something else."""
    old, new = _flat(recipe_to_dict(saved)), _flat(recipe_to_dict(recipe))
    changes = []
    for key in sorted(set(old) | set(new)):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE):
            continue
        if old.get(key) != new.get(key):
            changes.append(f"{key} ({old.get(key)!r} -> {new.get(key)!r})")
    return changes


def plan_start(recipe: Recipe, out: Path, world_size: int) -> ResumePoint:
    """Decide how the run starts in `out`, or raise FinetuneError saying why it cannot.

    `train.resume: auto` resumes the latest complete checkpoint when the recipe still fits it; `never` starts
    over (a non-empty folder needs `output.overwrite`); a path resumes that checkpoint. A finished run is never
    resumed or overwritten unless `output.overwrite` is set.
    """
    resume = recipe.train.resume
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"output.dir: {out} exists and is not a folder.")
    contents = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if recipe.output.overwrite:
        if resume not in ("auto", "never"):
            raise FinetuneError("train.resume names a checkpoint but output.overwrite is true (start over): choose one.")
        return ResumePoint()
    if (out / FINISHED_FILE).is_file():
        raise FinetuneError(
            f"output.dir: {out} holds a finished run ({FINISHED_FILE}). Choose another folder, or set "
            "output.overwrite=true to start over in it."
        )
    if resume == "never":
        if contents:
            raise FinetuneError(
                f"output.dir: {out} is not empty and train.resume is never. Choose another folder, or set "
                "output.overwrite=true to write into it."
            )
        return ResumePoint()
    if resume == "auto":
        point = find_checkpoint(out, world_size)
        if point.checkpoint is None:
            foreign = contents - RUN_FILES - {s.split(":")[0] for s in point.skipped}
            if foreign:
                raise FinetuneError(
                    f"output.dir: {out} is not empty and holds no checkpoint of a run to resume ({', '.join(sorted(foreign)[:3])}"
                    f"{', ...' if len(foreign) > 3 else ''}). Choose another folder, or set output.overwrite=true to write into it."
                )
            return point
    else:
        folder = Path(resume)
        if not folder.is_dir() or not CHECKPOINT.match(folder.name):
            raise FinetuneError(f"train.resume: {resume} is not a checkpoint-N folder.")
        problem = checkpoint_problem(folder, world_size)
        if problem:
            raise FinetuneError(f"train.resume: {resume} cannot be resumed from: {problem}.")
        point = ResumePoint(folder, int(CHECKPOINT.match(folder.name).group(1)))
    _check_fits(recipe, out, point, world_size)
    return point


def _check_fits(recipe: Recipe, out: Path, point: ResumePoint, world_size: int) -> None:
    """The recipe and the world size the checkpoint was written with must still hold."""
    saved_file = out / "recipe.yaml"
    if not saved_file.is_file():
        raise FinetuneError(
            f"cannot resume {point.checkpoint}: {saved_file} (the recipe it was trained with) is missing, so a change "
            "of model, data or batch cannot be ruled out. Restore it, or set output.overwrite=true to start over."
        )
    changes = recipe_changes(load_recipe(saved_file), recipe)
    run_file = out / RUN_FILE
    saved_world = json.loads(run_file.read_text()).get("world_size") if run_file.is_file() else None
    if saved_world is not None and saved_world != world_size:
        changes.append(f"processes ({saved_world} -> {world_size}: the effective batch and data order change)")
    if changes:
        raise FinetuneError(
            f"cannot resume {point.checkpoint}: the recipe changed since it was saved, and resuming would not continue "
            f"the same training: {'; '.join(changes)}. Run with the saved recipe ({saved_file}), or set "
            "output.overwrite=true to start over, or choose another output.dir."
        )


def claim_output_dir(recipe: Recipe, runtime) -> tuple[ResumePoint, object]:
    """Lock `output.dir` and decide how the run starts, on the main process; every rank gets the same decision.

    Returns the start and the lock (None on the other ranks). A fresh start records the recipe and the world size
    beside the checkpoints to come, so a later resumption can check them.
    """
    from finetune.recipe import save_recipe
    from finetune.training.lock import RunLock

    out = Path(recipe.output.dir)
    lock, decision = None, None
    if runtime.is_main:
        try:
            lock = RunLock(out).acquire()
            point = plan_start(recipe, out, runtime.world_size)
            if point.checkpoint is None:
                save_recipe(recipe, out)
                (out / RUN_FILE).write_text(json.dumps({"world_size": runtime.world_size}) + "\n")
            decision = {"checkpoint": str(point.checkpoint) if point.checkpoint else None, "step": point.step,
                        "skipped": point.skipped}
        except FinetuneError as exc:
            if lock is not None:
                lock.release()
            decision = {"error": str(exc)}
    decision = _from_main(decision)
    if "error" in decision:
        raise FinetuneError(decision["error"])
    point = ResumePoint(Path(decision["checkpoint"]) if decision["checkpoint"] else None, decision["step"], decision["skipped"])
    if point.checkpoint is not None and not point.checkpoint.is_dir():
        raise FinetuneError(f"rank {runtime.rank}: the main process resumes from {point.checkpoint}, which this "
                            "machine cannot see: output.dir must be on storage every node shares to resume.")
    return point, lock


def _from_main(decision):
    """`decision` as the main process made it, on every rank."""
    import os

    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return decision
    if dist.get_backend() == "nccl":  # objects travel through this rank's GPU; the Trainer has not chosen it yet
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    box = [decision]
    dist.broadcast_object_list(box, src=0)
    return box[0]
