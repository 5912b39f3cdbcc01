"""Supervised fine-tuning of causal LMs through TRL's SFTTrainer."""

from __future__ import annotations

import logging
from pathlib import Path

from finetune.recipe import DataSource, Recipe
from finetune.tasks.base import Task

log = logging.getLogger("finetune")


def prepare_sft_data(recipe: Recipe, tokenizer, main_first=None):
    """Tokenized train/eval datasets with loss masks, and the count of skipped rows (bad, or with no completion
    token within data.max_length)."""
    from finetune.data.sft import keep_learnable, load_rows
    from finetune.paths import cache_dir

    chat = bool(tokenizer.chat_template)
    train = load_rows(recipe.data.train, recipe.data, chat=chat)
    held = load_rows(recipe.data.eval, recipe.data, chat=chat) if recipe.data.eval else None
    if recipe.data.eval_fraction:
        train, held = train.split(recipe.data.eval_fraction, recipe.data.seed)
    kwargs = dict(cache=cache_dir() / "tokenized", on_main_first=main_first)
    train, train_ds = keep_learnable(train, tokenizer, recipe.data, **kwargs)
    skipped, eval_ds = train.skipped, None
    if held is not None:
        held, eval_ds = keep_learnable(held, tokenizer, recipe.data, **kwargs)
        skipped += held.skipped
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


class SFTTask(Task):
    """Causal LM on chats, prompt/completion pairs or texts, loss on the completions; trained by TRL's SFTTrainer."""

    peft_task_type = "CAUSAL_LM"

    @classmethod
    def read_rows(cls, recipe: Recipe, sources: list[DataSource], tokenizer=None):
        from finetune.data.sft import keep_learnable, load_rows

        rows = load_rows(sources, recipe.data, chat=True if tokenizer is None else bool(tokenizer.chat_template))
        return rows if tokenizer is None else keep_learnable(rows, tokenizer, recipe.data)[0]

    def prepare_data(self, tokenizer, model_path: str, main_first) -> None:
        # Rank 0 tokenizes first; the other ranks then read its cache instead of racing it.
        self.train_dataset, self.eval_dataset, self.skipped = prepare_sft_data(self.recipe, tokenizer, main_first)

    def model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def prepare_model(self, model, tokenizer) -> list[str]:
        """Generation must stop on the chat template's end-of-turn token, or the fine-tuned model rambles on."""
        from finetune.data.sft import check_stop_token

        eos_ids, note = check_stop_token(tokenizer, model.generation_config)
        if note and self.runtime.is_main:
            log.warning("End of turn: %s", note)
        model.generation_config.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        return []

    def trainer_config(self) -> tuple[type, dict]:
        from trl import SFTConfig

        data = self.recipe.data
        return SFTConfig, {"max_length": data.max_length, "packing": data.packing, "dataset_num_proc": None}

    def build_trainer(self, model, args, tokenizer, callbacks: list):
        from trl import SFTTrainer

        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
        if self.recipe.is_quantized and self.runtime.precision == "fp32":
            keep_trainable_fp32(trainer.model)
        return trainer

    def plan_rows(self, trainer) -> dict:
        # Packing happens in the trainer's dataset preparation: it iterates sequences, not rows.
        packed = self.recipe.data.packing
        return {"train_rows": len(trainer.train_dataset), "rows_before_packing": len(self.train_dataset) if packed else None}

    def save_outputs(self, trainer, out: Path, metrics: dict) -> dict:
        """The generation config (stop tokens), and the answers to `eval.prompts` in `samples.json`."""
        from finetune.models.generation import generate_answers
        from finetune.training.outputs import write_json

        trainer.model.generation_config.save_pretrained(str(out))
        recipe = self.recipe
        if not recipe.eval.prompts:
            return {}
        samples = generate_answers(
            trainer.model, trainer.processing_class, recipe.eval.prompts, recipe.eval.max_new_tokens,
            system_prompt=recipe.data.system_prompt,
        )
        write_json(Path(out) / "samples.json", {"samples": samples})
        for sample in samples:
            print(f"\nQ: {sample['prompt']}\nA: {sample['answer']}", flush=True)
        return {"samples": samples}
