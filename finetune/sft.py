"""Supervised fine-tuning of causal LMs through TRL's SFTTrainer."""

from __future__ import annotations

import logging
from pathlib import Path

from finetune.errors import DataError
from finetune.recipe import Recipe

log = logging.getLogger("finetune")


def prepare_sft_data(recipe: Recipe, tokenizer, main_first=None):
    """Tokenized train/eval datasets with loss masks, and the count of skipped rows."""
    from finetune.data import load_rows, split_rows, tokenize_rows
    from finetune.models import cache_dir

    chat = bool(tokenizer.chat_template)
    train = load_rows(recipe.data.train, recipe.data, chat=chat)
    skipped = train.skipped
    eval_rows: list[dict] = []
    if recipe.data.eval:
        held = load_rows(recipe.data.eval, recipe.data, chat=chat)
        eval_rows, skipped = held.rows, skipped + held.skipped
    train_rows = train.rows
    if recipe.data.eval_fraction:
        train_rows, eval_rows = split_rows(train_rows, recipe.data.eval_fraction, recipe.data.seed)
    if any("messages" in r for r in train_rows) and not chat:
        raise DataError(
            "the data holds chat `messages` but the tokenizer has no chat template: set model.chat_template "
            "(e.g. chatml, or a path to a .jinja file)."
        )
    cache = cache_dir() / "tokenized"
    kwargs = dict(tokenizer=tokenizer, train_on_inputs=recipe.data.train_on_inputs, cache=cache, on_main_first=main_first)
    train_ds = tokenize_rows(train_rows, **kwargs)
    eval_ds = tokenize_rows(eval_rows, **kwargs) if eval_rows else None
    return train_ds, eval_ds, skipped


def keep_trainable_fp32(model) -> None:
    """Undo TRL's cast of QLoRA adapter weights to bf16 when the run is fp32.

    SFTTrainer casts every trainable parameter of a quantized model to bf16 (the QLoRA paper's GPU setting),
    whatever the precision asked for. In an fp32 run that makes the adapter maths bf16 (slower on CPUs without
    AMX) and lets AdamW drop updates smaller than bf16's resolution. The optimizer is built in `train()`,
    so casting back here, between the trainer's construction and training, is safe.
    """
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def run_sft(recipe: Recipe, extra_callbacks=()):
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from finetune.adapters import attach_adapter, count_parameters, dtype_bytes, load_base, load_model
    from finetune.data import check_stop_token
    from finetune.generate import generate_answers
    from finetune.plan import make_plan
    from finetune.train import (
        RunResult,
        callbacks,
        check_trainer_world,
        final_evaluation,
        prepare_run,
        save_run_files,
        training_arguments,
    )

    runtime, out = prepare_run(recipe)
    path, tokenizer = load_base(recipe)
    # Rank 0 tokenizes first; the other ranks then read its cache instead of racing it.
    train_ds, eval_ds, skipped = prepare_sft_data(recipe, tokenizer, main_first=PartialState().main_process_first)

    model = load_model(recipe, runtime, path, AutoModelForCausalLM)
    eos_ids, note = check_stop_token(tokenizer, model.generation_config)
    if note and runtime.is_main:
        log.warning("End of turn: %s", note)
    model.generation_config.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model = attach_adapter(model, recipe, task_type="CAUSAL_LM")

    args = training_arguments(
        recipe,
        runtime,
        out,
        has_eval=eval_ds is not None,
        config_class=SFTConfig,
        max_length=recipe.data.max_length,
        packing=recipe.data.packing,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=callbacks(recipe, extra_callbacks),
    )
    check_trainer_world(trainer)
    if recipe.is_quantized and runtime.precision == "fp32":
        keep_trainable_fp32(trainer.model)
    # The plan comes after the trainer is built: packing happens in its dataset preparation and changes the steps.
    counts = count_parameters(trainer.model, dtype_bytes(runtime.dtype_name))
    plan = make_plan(
        recipe, runtime, counts, len(trainer.train_dataset), len(eval_ds) if eval_ds else 0, skipped,
        recipe.model.name_or_path, rows_before_packing=len(train_ds) if recipe.data.packing else None,
    )
    if runtime.is_main:
        print(plan.render(), flush=True)
    trainer.train()
    trainer.save_model(str(out))  # PEFT adapter folder (gathered from all ranks under ZeRO-3) + tokenizer
    extra = {"skipped_rows": skipped}
    if eval_ds is not None:
        extra["eval"] = final_evaluation(trainer, recipe)
    if trainer.is_world_process_zero():
        trainer.model.generation_config.save_pretrained(str(out))
        if recipe.eval.prompts:
            extra["samples"] = generate_answers(
                trainer.model, tokenizer, recipe.eval.prompts, recipe.eval.max_new_tokens, system_prompt=recipe.data.system_prompt
            )
            from finetune.outputs import write_json

            write_json(Path(out) / "samples.json", {"samples": extra["samples"]})
            for sample in extra["samples"]:
                print(f"\nQ: {sample['prompt']}\nA: {sample['answer']}", flush=True)
    trainer.accelerator.wait_for_everyone()
    metrics = save_run_files(trainer, recipe, out, plan, extra)
    return RunResult(metrics, trainer.model, tokenizer, out, trainer)
