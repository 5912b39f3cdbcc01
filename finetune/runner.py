"""The run, in order: recipe → checks that need no model → output folder and data rows → load model → adapter →
trainer → plan → train → save → evaluate.

The order matters: everything that can fail cheaply (recipe, combinations, output folder, data rows) is checked
before the model is loaded, so a typo costs seconds, not a model load."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from finetune.checks import check_recipe, recipe_warnings
from finetune.distributed.guards import check_world_size, join_process_group
from finetune.errors import RunInterrupted
from finetune.evaluation.side_by_side import check_eval_settings
from finetune.merge.gguf_export import export_finished_run
from finetune.models.parameters import count_parameters, dtype_bytes
from finetune.recipe import Recipe
from finetune.runtime import Runtime, apply_threads, resolve_runtime
from finetune.registry import load_task
from finetune.training.arguments import training_arguments
from finetune.training.callbacks import run_callbacks
from finetune.training.checkpoints import ResumePoint, claim_output_dir
from finetune.training.interrupts import GracefulStop
from finetune.training.outputs import final_evaluation, save_run_files
from finetune.training.memory import estimate_run_memory, micro_batch_tokens
from finetune.training.plan import make_plan
from finetune.training.progress import show_progress_lines

log = logging.getLogger("finetune")


@dataclass
class Start:
    """Where the run writes and starts: its folder (locked by the main process) and the checkpoint it resumes."""

    runtime: Runtime
    out: Path
    point: ResumePoint
    lock: object  # finetune.training.lock.RunLock on the main process, else None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def prepare_run(recipe: Recipe) -> Start:
    """Decide device/precision/threads, check everything that needs no model, set seeds, join the other processes,
    then lock `output.dir` and decide (on the main process, for all) whether the run starts fresh or resumes."""
    from transformers import set_seed

    runtime = resolve_runtime(recipe)
    apply_threads(runtime)
    check_recipe(recipe, runtime)
    check_eval_settings(recipe)  # eval.after_training must not fail after hours of training
    if runtime.is_main:
        for warning in recipe_warnings(recipe, runtime):
            log.warning("%s", warning)
    set_seed(recipe.train.seed)
    # A missing rank fails after FINETUNE_JOIN_TIMEOUT instead of DeepSpeed's 30-minute default; a world smaller
    # than `finetune launch` asked for (accelerate's one-process traps) fails instead of training alone.
    join_process_group()
    check_world_size()
    point, lock = claim_output_dir(recipe, runtime)
    for skipped in point.skipped if runtime.is_main else ():
        log.warning("Not resuming from %s", skipped)
    return Start(runtime, Path(recipe.output.dir), point, lock)


def check_trainer_world(trainer) -> None:
    """The world the Trainer really got must be the one asked for."""
    check_world_size(actual=trainer.args.world_size)


def finish_distributed() -> None:
    """Tear the process group down so processes exit cleanly (gloo can abort at interpreter exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@dataclass
class RunResult:
    """What a finished run produced: the metrics written to train_metrics.json and the trained model in memory."""

    metrics: dict
    model: object
    tokenizer: object
    output_dir: Path
    trainer: object  # the Trainer that ran (its datasets and collator), for inspection


def run(recipe: Recipe, callbacks=()) -> RunResult:
    """Run the recipe's task; `callbacks` (transformers `TrainerCallback`s) are added to the Trainer's.

    Resumes from the latest complete checkpoint in `output.dir` unless `train.resume` says otherwise; raises
    `RunInterrupted` after Ctrl-C or SIGTERM, once the checkpoint to resume from is saved."""
    start = prepare_run(recipe)
    try:
        return _train(recipe, start, callbacks)
    finally:
        start.release()


def data_record(recipe: Recipe, task, tokenizer) -> dict | None:
    """The data report's verdict and figures (leakage, duplicates, truncation) for the plan and train_metrics.json;
    None for a task without the `data_facts` hook."""
    from finetune.data.report import run_record

    try:
        return run_record(recipe, lambda: task.data_facts(recipe, tokenizer), tokenizer)
    except NotImplementedError:
        return None


def _train(recipe: Recipe, start: Start, callbacks) -> RunResult:
    from accelerate import PartialState

    runtime, out = start.runtime, start.out
    task = load_task(recipe.task)(recipe, runtime)
    path, tokenizer = task.load_base()
    # Data before the model: a bad row or an unknown metric costs seconds, not a model load. The main process
    # tokenizes first and caches; the others then read its cache instead of racing it.
    task.prepare_data(tokenizer, path, PartialState().main_process_first)
    data = data_record(recipe, task, tokenizer) if runtime.is_main else None

    model = task.load_model(path)
    heads = task.prepare_model(model, tokenizer)  # on the bare model: PEFT's wrapper hides its head
    model = task.attach_adapter(model, heads)

    has_eval = task.eval_dataset is not None
    config_class, task_arguments = task.trainer_config()
    args = training_arguments(recipe, runtime, out, has_eval=has_eval, config_class=config_class, **task_arguments)
    stop = GracefulStop()
    trainer = task.build_trainer(model, args, tokenizer, run_callbacks(recipe, [*callbacks, stop]))
    show_progress_lines(trainer)  # one line per log instead of the Trainer's dictionaries
    check_trainer_world(trainer)

    # The plan comes after the trainer is built: packing happens in its dataset preparation and changes the steps.
    counts = count_parameters(trainer.model, dtype_bytes(runtime.precision))
    eval_rows = len(task.eval_dataset) if has_eval else 0
    tokens = micro_batch_tokens(trainer.train_dataset, recipe.train.micro_batch_size, recipe.data.max_length,
                                padding_free=bool(getattr(trainer.args, "padding_free", False)))
    memory = estimate_run_memory(recipe, runtime, trainer.model, counts, tokens=tokens)
    plan = make_plan(recipe, runtime, counts, eval_rows=eval_rows, skipped=task.skipped, model_name=recipe.model.label,
                     memory=memory, **task.plan_rows(trainer))
    if runtime.is_main:
        print(plan.render(), flush=True)
        verdict = [("data report", data["verdict"])] if data else []
        for key, value in [*task.plan_lines(), *verdict, ("start", f"{start.point.describe()} of {plan.steps} steps")]:
            print(f"  {key.ljust(15)}  {value}", flush=True)

    checkpoint = str(start.point.checkpoint) if start.point.checkpoint else None
    with stop.installed():  # Ctrl-C / SIGTERM: finish the step, save a checkpoint, stop
        trainer.train(resume_from_checkpoint=checkpoint)
    if stop.stopped_at is not None and stop.stopped_at < trainer.state.max_steps:
        raise RunInterrupted(
            f"stopped by {stop.requested} at step {stop.stopped_at} of {plan.steps}; checkpoint saved in "
            f"{out / f'checkpoint-{stop.stopped_at}'}. Run the same command again to resume from it."
        )
    trainer.save_model(str(out))  # PEFT adapter folder (gathered from all ranks under ZeRO-3), head, tokenizer
    extra = {"skipped_rows": task.skipped, **task.metrics_extra(), **({"data_report": data} if data else {})}
    if has_eval:
        extra["eval"] = final_evaluation(trainer, recipe)
    if trainer.is_world_process_zero():
        extra.update(task.save_outputs(trainer, out, extra))
    trainer.accelerator.wait_for_everyone()
    metrics = save_run_files(trainer, recipe, out, plan, extra)
    if recipe.export.format and runtime.is_main:  # after the run files: the export reads the saved run folder
        export_finished_run(recipe, out)
    return RunResult(metrics, trainer.model, tokenizer, out, trainer)
