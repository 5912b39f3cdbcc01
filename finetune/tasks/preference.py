"""Preference tuning of a causal LM after SFT: DPO and IPO (TRL's DPOTrainer), SimPO (CPOTrainer), ORPO
(ORPOTrainer), KTO (KTOTrainer), on rows templated and tokenized by the kit (`finetune.data.preference`).

The reference is exact and costs one adapter, never a second model: TRL's DPO and KTO trainers, given a PEFT model,
keep a frozen copy of its adapter as `ref` and score the reference through it. A new LoRA starts at zero, so that
copy is the base; a run started from an SFT run (`preference.from_run`) loads the SFT adapter trainable, so the
copy is exactly the SFT model. SimPO and ORPO need no reference.
"""

from __future__ import annotations

import logging
from pathlib import Path

from finetune.errors import DataError
from finetune.recipe import DataSource, Recipe
from finetune.tasks.base import Task

log = logging.getLogger("finetune")

# preference.loss -> (what it is, whether it scores against a reference)
LOSSES = {
    "dpo": ("DPO (sigmoid)", True),
    "ipo": ("IPO", True),
    "simpo": ("SimPO (reference-free)", False),
    "orpo": ("ORPO (reference-free, SFT term on chosen)", False),
    "kto": ("KTO (unpaired)", True),
}


def as_unpaired(tokens: list[dict]) -> list[dict]:
    """Tokenized pairs as KTO's unpaired rows: the chosen answer desirable, the rejected one undesirable."""
    out = []
    for row in tokens:
        if "completion_ids" in row:
            out.append(row)
            continue
        out.append({"prompt_ids": row["prompt_ids"], "completion_ids": row["chosen_ids"], "label": True})
        out.append({"prompt_ids": row["prompt_ids"], "completion_ids": row["rejected_ids"], "label": False})
    return out


def shape_problem(recipe: Recipe, rows: list[dict]) -> str | None:
    from finetune.data.preference import rows_shape

    if rows_shape(rows) == "unpaired" and recipe.preference.loss != "kto":
        return (f"preference.loss: {recipe.preference.loss} needs pairs (prompt, chosen, rejected); the data holds "
                "unpaired rows (prompt, completion, label): use preference.loss: kto, or pair the answers.")
    return None


def read_preference_rows(recipe: Recipe, sources: list[DataSource], tokenizer=None):
    """Checked rows (and, with a tokenizer, only those that fit data.max_length) and their tokens (or None)."""
    from finetune.data.preference import load_preference_rows, tokenize_preference_rows

    rows = load_preference_rows(sources, recipe.data)
    problem = shape_problem(recipe, rows.rows)
    if problem:
        raise DataError(problem)
    if tokenizer is None:
        return rows, None
    return tokenize_preference_rows(rows, tokenizer, recipe.data)


def report_facts(recipe: Recipe, tokenizer):
    """The pairs as `prepare_data` reads them, one `RowFacts` each (KTO: each unpaired row it trains on), for the
    data report: the same reading, templating, held-out split and max_length rule (a longer row is a bad row, never
    cut). A pair's text is its prompt and both answers; its trained tokens both answers; it renders as the chosen
    sequence."""
    from finetune.data.report import DataFacts, RowFacts, Tally

    data = recipe.data
    train, train_tokens = read_preference_rows(recipe, data.train, tokenizer)
    groups = [("train", train, train_tokens)]
    skipped, problems = train.skipped, list(train.problems)
    if data.eval:
        held, held_tokens = read_preference_rows(recipe, data.eval, tokenizer)
        groups.append(("eval", held, held_tokens))
        skipped, problems = skipped + held.skipped, problems + held.problems
    items = [(split, row, tokens, origin) for split, rows, tokens_list in groups
             for row, tokens, origin in zip(rows.rows, tokens_list, rows.origins)]
    if data.eval_fraction and not data.eval:
        from finetune.data.rows import held_out_order

        held_rows = set(held_out_order(len(items), data.eval_fraction, data.seed))
        items = [("eval" if i in held_rows else split, *rest) for i, (split, *rest) in enumerate(items)]

    kto = recipe.preference.loss == "kto"

    def rows():
        for split, row, tokens, origin in items:
            if kto and "chosen_ids" in tokens:  # KTO trains a pair as two unpaired rows, as `as_unpaired` makes them
                for unpaired, answer in zip(as_unpaired([tokens]), ("chosen", "rejected")):
                    yield facts(split, {"prompt": row["prompt"], "completion": row[answer]}, unpaired, origin)
            else:
                yield facts(split, row, tokens, origin)

    def facts(split: str, row: dict, tokens: dict, origin: str) -> RowFacts:
        answers = [tokens[k] for k in ("chosen_ids", "rejected_ids", "completion_ids") if k in tokens]
        prompt, trained = tokens["prompt_ids"], sum(len(a) for a in answers)
        answer_text = "\n".join(row[k] for k in ("chosen", "rejected", "completion") if k in row)
        return RowFacts(split=split, origin=origin, text=f"{_words(row['prompt'])}\n{answer_text}",
                        tokens=len(prompt) + trained, trained=trained, kept=len(prompt) + trained,
                        trained_kept=trained, ids=prompt + answers[0],
                        trained_mask=[False] * len(prompt) + [True] * len(answers[0]))

    # Pairs: a batch holds each pair's chosen and rejected sequences, padded together; KTO's rows are padded rows.
    return DataFacts(rows=rows(), batching="padded" if kto else "pairs", max_length=data.max_length,
                     micro_batch_size=recipe.train.micro_batch_size, tally=Tally(skipped, problems),
                     decode=tokenizer.decode, drop_stops_training=data.on_bad_row == "error")


def _words(prompt) -> str:
    """A prompt's words for duplicates: its text, or its messages less the system prompt (which every row may share)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt if m["role"] != "system")


class PreferenceTask(Task):
    """Pairs (or KTO's unpaired rows) scored by a preference loss through TRL's trainers; a LoRA on the base, or the
    SFT run's LoRA continued."""

    peft_task_type = "CAUSAL_LM"

    @classmethod
    def data_facts(cls, recipe: Recipe, tokenizer=None):
        return report_facts(recipe, tokenizer)

    @classmethod
    def read_rows(cls, recipe: Recipe, sources: list[DataSource], tokenizer=None):
        return read_preference_rows(recipe, sources, tokenizer)[0]

    def prepare_data(self, tokenizer, model_path: str, main_first) -> None:
        from datasets import Dataset

        recipe = self.recipe
        train, train_tokens = read_preference_rows(recipe, recipe.data.train, tokenizer)
        held_tokens = None
        if recipe.data.eval:
            held, held_tokens = read_preference_rows(recipe, recipe.data.eval, tokenizer)
            self.skipped += held.skipped
        elif recipe.data.eval_fraction:
            from finetune.data.rows import split_rows

            # Pairs are split before KTO reads them as two rows each: both answers of a pair stay on one side.
            kept, held = split_rows(list(zip(train_tokens, train.origins)), recipe.data.eval_fraction, recipe.data.seed)
            train_tokens, held_tokens = [t for t, _ in kept], [t for t, _ in held]
        self.skipped += train.skipped
        if recipe.preference.loss == "kto":
            train_tokens = as_unpaired(train_tokens)
            held_tokens = as_unpaired(held_tokens) if held_tokens else held_tokens
        self.train_dataset = Dataset.from_list(train_tokens)
        self.eval_dataset = Dataset.from_list(held_tokens) if held_tokens else None

    def model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def prepare_model(self, model, tokenizer) -> list[str]:
        """Generation stops on the chat template's end-of-turn token, as after SFT."""
        from finetune.data.sft import set_stop_tokens

        note = set_stop_tokens(model.generation_config, tokenizer)
        if note and self.runtime.is_main:
            log.warning("End of turn: %s", note)
        return []

    def attach_adapter(self, model, heads: list[str]):
        """A new LoRA on the base, or the SFT run's LoRA loaded trainable (`preference.from_run`)."""
        if self.recipe.preference.from_run is None:
            return super().attach_adapter(model, heads)
        from finetune.models.start_run import attach_run_adapter

        return attach_run_adapter(model, self.recipe.preference.from_run, self.recipe)

    def trainer_config(self) -> tuple[type, dict]:
        p, data = self.recipe.preference, self.recipe.data
        # Rows longer than max_length were refused in prepare_data: nothing is left for TRL to cut.
        common = {"max_length": None, "beta": p.beta, "dataset_num_proc": None}
        if p.loss in ("dpo", "ipo"):
            from trl import DPOConfig

            return DPOConfig, {**common, "loss_type": ["sigmoid" if p.loss == "dpo" else "ipo"],
                               "label_smoothing": p.label_smoothing if p.loss == "dpo" else 0.0,
                               "precompute_ref_log_probs": False}
        if p.loss == "kto":
            from trl import KTOConfig

            return KTOConfig, common
        if p.loss == "simpo":
            from trl.experimental.cpo import CPOConfig

            # cpo_alpha 0: SimPO alone, without CPO's behaviour-cloning term.
            return CPOConfig, {**common, "max_length": data.max_length, "loss_type": "simpo", "cpo_alpha": 0.0,
                               "simpo_gamma": p.simpo_gamma, "label_smoothing": p.label_smoothing}
        from trl.experimental.orpo import ORPOConfig

        return ORPOConfig, {**common, "max_length": data.max_length}

    def build_trainer(self, model, args, tokenizer, callbacks: list):
        from finetune.training.watch import PreferenceWatch

        trainer = preference_trainer_class(self.recipe.preference.loss)(
            model=model,
            args=args,
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            processing_class=tokenizer,
            callbacks=[*callbacks, PreferenceWatch()],
        )
        if self.recipe.is_quantized and self.runtime.precision == "fp32":
            from finetune.tasks.sft import keep_trainable_fp32

            keep_trainable_fp32(trainer.model)
            restore_from_reference(trainer.model)
        return trainer

    def plan_lines(self) -> list[tuple[str, str]]:
        p = self.recipe.preference
        what, scored = LOSSES[p.loss]
        lines = [("loss", f"{what}, beta {p.beta}")]
        if not scored:
            lines.append(("reference", "none (the loss needs no reference model)"))
        elif p.from_run:
            from finetune.models.start_run import start_run_adapter

            lora = start_run_adapter(p.from_run)
            lines.append(("reference", f"the SFT run {p.from_run} (a frozen copy of its LoRA r={lora['r']}: one "
                                       "adapter's memory, no second model); the policy starts from it"))
        else:
            lines.append(("reference", f"the base {self.recipe.model.label} (a frozen copy of the new LoRA, which starts at "
                                       "zero: one adapter's memory, no second model)"))
        return lines

    def metrics_extra(self) -> dict:
        p = self.recipe.preference
        return {"preference": {"loss": p.loss, "beta": p.beta, "from_run": p.from_run}}

    def save_outputs(self, trainer, out: Path, metrics: dict) -> dict:
        """The generation config (stop tokens), and the answers to `eval.prompts` in `samples.json`."""
        import shutil

        from finetune.tasks.sft import SFTTask

        ref = Path(out) / "ref"  # PEFT saves every adapter; the frozen reference copy is the starting adapter
        if ref.is_dir() and (ref / "adapter_config.json").is_file():
            shutil.rmtree(ref)
        return SFTTask.save_outputs(self, trainer, out, metrics)


def restore_from_reference(model) -> None:
    """The policy adapter set back to the frozen reference copy's values. TRL copies the adapter to `ref`, then casts
    a quantized model's trainable weights to bf16; cast back to fp32, the policy would start a bf16 rounding away from
    its reference (rewards of 1e-4 at step 0 instead of 0)."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            twin = name.replace(".default.", ".ref.")
            if ".default." in name and twin in params:
                param.copy_(params[twin])


def preference_trainer_class(loss: str):
    """TRL's trainer for `loss`, taking the kit's tokens as they are (TRL would template and tokenize again)."""
    if loss in ("dpo", "ipo"):
        from trl import DPOTrainer

        class KitDPOTrainer(DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset  # prompt_ids / chosen_ids / rejected_ids, from finetune.data.preference

        return KitDPOTrainer
    if loss == "kto":
        from trl import KTOTrainer

        class KitKTOTrainer(KTOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                if not self.calculate_KL:
                    return dataset
                # As TRL does: each row's KL completion is the previous row's within a batch (mismatched pairs).
                def add_kl(batch):
                    batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                    return batch

                return dataset.map(add_kl, batched=True, batch_size=args.per_device_train_batch_size)

        return KitKTOTrainer
    if loss == "simpo":
        from trl.experimental.cpo import CPOTrainer as Base
    else:
        from trl.experimental.orpo import ORPOTrainer as Base

    class KitPairTrainer(Base):
        def tokenize_row(self, feature, model=None) -> dict:
            """The columns CPO/ORPO's collator pads, from the kit's tokens (labels: the answer tokens only)."""
            prompt = feature["prompt_ids"]
            batch = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for key in ("chosen", "rejected"):
                ids = prompt + feature[f"{key}_ids"]
                batch[f"{key}_input_ids"] = ids
                batch[f"{key}_attention_mask"] = [1] * len(ids)
                batch[f"{key}_labels"] = [-100] * len(prompt) + feature[f"{key}_ids"]
            return batch

    return KitPairTrainer
