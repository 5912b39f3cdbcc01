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
    limit = recipe.data.max_length
    return truncate(train_ds, limit), truncate(eval_ds, limit), skipped


def truncate(dataset, max_length: int):
    """Rows cut to their first `max_length` tokens, as TRL cuts them (`keep_start`). Done here because TRL does not
    cut rows in padding-free mode, and so that both modes train on the same tokens."""
    import pyarrow.compute as pc
    from datasets import Dataset

    if dataset is None:
        return None
    # Arrow, column-wise (a Python loop over 10k rows took 10x longer); the rows selected, not the table under them.
    table = dataset.with_format("arrow")[:]
    longest = pc.max(pc.list_value_length(table.column("input_ids"))).as_py()
    if longest is None or longest <= max_length:  # None: no rows
        return dataset
    for key in ("input_ids", "labels"):
        table = table.set_column(table.schema.get_field_index(key), key, pc.list_slice(table.column(key), 0, max_length))
    return Dataset(table)


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


def sft_trainer_class():
    """TRL's SFTTrainer, with the loss projected through the LM head only where labels are (see training/loss.py),
    and no host read of a device tensor inside a training step except at logging steps (see data/batches.py)."""
    import torch
    from trl import SFTTrainer

    from finetune.data.batches import HOST_ONLY, LABEL_POSITIONS, REAL_TOKENS, WithHostFacts
    from finetune.models.attention import padding_free_inputs
    from finetune.training.loss import IGNORE_INDEX, completion_loss, supports_positions

    class CompletionLossSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.data_collator = WithHostFacts(self.data_collator)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            facts = {key: inputs[key] for key in HOST_ONLY if key in inputs}
            inputs = {key: value for key, value in inputs.items() if key not in HOST_ONLY}
            if not hasattr(self, "_positions"):
                self._positions = supports_positions(self.model)
            plain_nll = (
                not return_outputs and self.args.loss_type == "nll" and self.label_smoother is None
                and self.compute_loss_func is None and not self.aux_loss_enabled and self._positions
            )  # fmt: skip
            if not plain_nll:  # what only TRL's own loss does: logits returned, DFT, label smoothing, MoE, ...
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, logits, targets = completion_loss(
                model, padding_free_inputs(model, inputs), num_items_in_batch, positions=facts.get(LABEL_POSITIONS),
                fused=self.args.use_liger_kernel,
            )
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # As the Trainer and TRL do: num_items_in_batch counts every rank's tokens and DDP averages gradients.
                loss = loss * self.accelerator.num_processes
            self._log_batch(inputs, logits, targets, facts.get(REAL_TOKENS))
            return loss

        def _log_batch(self, inputs, logits, targets, real_tokens: int | None) -> None:
            """TRL's per-batch metrics: token accuracy on the labelled positions, and tokens trained on. (TRL also
            logs the entropy of the predictions; that needs a softmax over the vocabulary per token, left out.)
            The accuracy stays a device tensor until `log` (a logging step) reads it."""
            mode = "train" if self.model.training else "eval"
            gather = self.accelerator.gather_for_metrics
            if logits is not None:  # Liger's fused loss keeps no logits: no accuracy then
                with torch.no_grad():
                    valid = targets.reshape(-1) != IGNORE_INDEX
                    correct = (logits.reshape(-1, logits.size(-1)).argmax(-1) == targets.reshape(-1)) & valid
                    total, right = gather(valid.sum()).sum(), gather(correct.sum()).sum()
                    self._metrics[mode]["mean_token_accuracy"].append(torch.where(total > 0, right / total.clamp(min=1), 0.0))
            if mode == "train":
                tokens = real_tokens
                if tokens is None:  # a batch not built by the kit's collator
                    mask = inputs.get("attention_mask")
                    tokens = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
                if self.accelerator.num_processes > 1 or torch.is_tensor(tokens):
                    tokens = gather(torch.as_tensor(tokens, device=self.args.device)).sum().item()
                self._total_train_tokens += tokens
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

        def _track_num_input_tokens(self, inputs):
            """The Trainer's count of input tokens, from the collator's host count: the Trainer's own moves the
            count to the device and reads it back every micro-batch. (Several processes still add theirs up.)"""
            real = inputs.get(REAL_TOKENS)
            if real is None or self.args.world_size > 1 or self.args.include_num_input_tokens_seen == "no":
                return super()._track_num_input_tokens(inputs)
            self.state.num_input_tokens_seen += real

        def log(self, logs: dict, start_time: float | None = None) -> None:
            # The per-batch metrics kept on the device are read here, at a logging step.
            for metrics in self._metrics.values():
                for key, values in metrics.items():
                    if any(torch.is_tensor(value) for value in values):
                        metrics[key] = [float(value) for value in values]
            super().log(logs, start_time)

    return CompletionLossSFTTrainer


class SFTTask(Task):
    """Causal LM on chats, prompt/completion pairs or texts, loss on the completions; trained by TRL's SFTTrainer."""

    peft_task_type = "CAUSAL_LM"
    padding_free = False  # decided in prepare_model, once the model's attention is known
    batching_note = ""

    @classmethod
    def read_rows(cls, recipe: Recipe, sources: list[DataSource], tokenizer=None):
        from finetune.data.sft import keep_learnable, load_rows

        rows = load_rows(sources, recipe.data, chat=True if tokenizer is None else bool(tokenizer.chat_template))
        return rows if tokenizer is None else keep_learnable(rows, tokenizer, recipe.data)[0]

    @classmethod
    def data_facts(cls, recipe: Recipe, tokenizer=None):
        from finetune.data.sft import report_facts

        data = recipe.data
        # Padding-free falls back to padded batches for a model whose attention cannot keep examples apart (known
        # once the model is loaded): the report takes the recipe's word.
        batching = "packed" if data.packing else "padding_free" if data.padding_free else "padded"
        return report_facts(data, tokenizer, batching, recipe.train.micro_batch_size)

    def prepare_data(self, tokenizer, model_path: str, main_first) -> None:
        # Rank 0 tokenizes first; the other ranks then read its cache instead of racing it.
        self.train_dataset, self.eval_dataset, self.skipped = prepare_sft_data(self.recipe, tokenizer, main_first)

    def model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def prepare_model(self, model, tokenizer) -> list[str]:
        """Generation must stop on the chat template's end-of-turn token, or the fine-tuned model rambles on.
        Padding-free batches need attention that keeps the examples of a row apart at the cost of each."""
        from finetune.data.sft import set_stop_tokens
        from finetune.dtypes import torch_dtype
        from finetune.models.attention import PACKED, PACKED_SDPA, PACKED_VARLEN, use_packed_attention, varlen_usable

        self.padding_free = self.recipe.data.padding_free and not self.recipe.data.packing
        if self.padding_free:
            # The model is still on the host here (the Trainer moves it): decide from where and how it will train.
            dtype = torch_dtype(self.runtime.precision)
            use_packed_attention(model, self.runtime.device, dtype)
            attention = model.config._attn_implementation
            if attention not in (*PACKED, "eager") and "flash" not in attention:
                self.padding_free = False
                self.batching_note = (
                    f"padded (data.padding_free needs attention that keeps packed examples apart; this model runs "
                    f"{attention!r} and cannot switch to SDPA per example)"
                )
            else:
                how = ""
                if attention == PACKED_SDPA:
                    how = f", SDPA per example; the varlen flash kernel is not used: {varlen_usable(self.runtime.device, dtype)}"
                elif attention == PACKED_VARLEN:
                    how = ", torch.nn.attention.varlen, one flash kernel call per layer"
                self.batching_note = f"padding-free (examples back to back, attention per example: {attention}{how})"
        else:
            self.batching_note = "packed into max_length rows (data.packing)" if self.recipe.data.packing else "padded"

        note = set_stop_tokens(model.generation_config, tokenizer)
        if note and self.runtime.is_main:
            log.warning("End of turn: %s", note)
        return []

    def trainer_config(self) -> tuple[type, dict]:
        from trl import SFTConfig

        data = self.recipe.data
        arguments = {"max_length": data.max_length, "packing": data.packing, "dataset_num_proc": None}
        if self.padding_free:
            # Rows are cut to max_length in prepare_sft_data (TRL refuses a max_length it would not enforce). A
            # padding-free batch has no padding, so every token counts (the non-padding count compares ids with the
            # pad id, which may be eos and so also a real token).
            arguments.update(max_length=None, padding_free=True, include_num_input_tokens_seen="all")
        return SFTConfig, arguments

    def plan_lines(self) -> list[tuple[str, str]]:
        return [("batches", self.batching_note)]

    def build_trainer(self, model, args, tokenizer, callbacks: list):
        trainer = sft_trainer_class()(
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
