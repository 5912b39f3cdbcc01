"""Pretraining a causal LM on raw text: from scratch (a new model from `model.config`, with a tokenizer trained on the
corpus) or continued (any causal LM the kit loads, in full or with LoRA/QLoRA). Documents are packed into blocks of
`data.max_length` tokens (finetune/data/packing.py) and trained by the transformers Trainer on every token."""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path

from finetune.recipe import DataSource, Recipe
from finetune.tasks.base import Task

log = logging.getLogger("finetune")


def pretrain_trainer_class():
    """The Trainer, logging each evaluation's perplexity beside its loss."""
    from transformers import Trainer

    class PretrainTrainer(Trainer):
        def log(self, logs: dict, start_time=None) -> None:
            if "eval_loss" in logs:  # the same dict `evaluate` returns: the perplexity reaches its caller too
                logs["eval_perplexity"] = round(math.exp(min(logs["eval_loss"], 700.0)), 4)
            super().log(logs, start_time)

    return PretrainTrainer


class PretrainTask(Task):
    """Causal LM on raw text, loss on every token; trained by the transformers Trainer."""

    peft_task_type = "CAUSAL_LM"

    def __init__(self, recipe: Recipe, runtime):
        from finetune.data.text import Corpus

        super().__init__(recipe, runtime)
        self.corpus = Corpus(recipe.data)
        self.tokenizer = None
        self.tokenizer_note = ""
        self.tokens = None  # finetune.data.packing.TokenizedCorpus
        self.baseline = None  # the unigram model's held-out cross-entropy and perplexity
        self.flops = None  # FLOPs per trained token, once the trainer's model is known

    @classmethod
    def read_rows(cls, recipe: Recipe, sources: list[DataSource], tokenizer=None):
        """Every document of `sources` as a row `{text}` (`finetune validate --data`)."""
        from finetune.data.rows import Rows
        from finetune.data.text import Tally, read_documents
        from finetune.errors import DataError

        tally = Tally()
        rows = Rows([{"text": text} for source in sources for text in read_documents(source, recipe.data.on_bad_row, tally)],
                    tally.skipped, tally.problems)
        if not rows.rows:
            raise DataError(f"{', '.join(s.path for s in sources)}: the corpus is empty: no document has any text.")
        return rows.checked(sources)

    @classmethod
    def data_facts(cls, recipe: Recipe, tokenizer=None):
        from finetune.data.packing import report_facts
        from finetune.data.text import Corpus

        return report_facts(Corpus(recipe.data), tokenizer, recipe.data.max_length, recipe.train.micro_batch_size)

    @property
    def new_model(self) -> bool:
        return self.recipe.model.config is not None

    def load_base(self):
        """A new model's tokenizer: `model.tokenizer`, or a BPE trained on the training split (by the main process
        first, then read from the cache by the others). A pretrained model's path and tokenizer otherwise."""
        from accelerate import PartialState

        if not self.new_model:
            path, self.tokenizer = super().load_base()
            self.tokenizer_note = "the model's own"
            return path, self.tokenizer
        with PartialState().main_process_first():
            self.tokenizer = self._given_tokenizer() if self.recipe.model.tokenizer else self._trained_tokenizer()
        return None, self.tokenizer

    def _given_tokenizer(self):
        from transformers import AutoTokenizer

        from finetune.models.loading import load_failure
        from finetune.paths import PACKAGE_SCHEME, resolve_package_path

        name = self.recipe.model.tokenizer
        path = str(resolve_package_path(name, key="model.tokenizer")) if name.startswith(PACKAGE_SCHEME) else name
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=self.recipe.model.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise load_failure("model.tokenizer", path, exc, what="tokenizer") from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # blocks are never padded; generation wants a pad id
        self.tokenizer_note = f"{name} ({len(tokenizer):,} tokens)"
        return tokenizer

    def _trained_tokenizer(self):
        from finetune.data.text import EMPTY_CORPUS
        from finetune.errors import DataError
        from finetune.models.tokenizer_training import cached_bpe
        from finetune.paths import cache_dir

        texts = self.corpus.train_texts()
        first = next(texts, None)  # an empty corpus stops here, before a tokenizer of nothing is trained and cached
        if first is None:
            raise DataError(EMPTY_CORPUS)
        size = self.recipe.pretrain.vocab_size
        tokenizer, folder, cached = cached_bpe(
            itertools.chain([first], texts), self.corpus.fingerprint(), size, cache_dir() / "tokenizers"
        )
        context = self.recipe.model.config.context_length
        if context:
            tokenizer.model_max_length = context  # saved with the run: the longest input the model was built for
        short = f" (asked for {size:,}: the corpus has no more merges)" if len(tokenizer) < size else ""
        how = "from the cache" if cached else "trained on the training split now"
        self.tokenizer_note = f"byte-level BPE, {len(tokenizer):,} tokens{short}, {how} ({folder})"
        return tokenizer

    def prepare_data(self, tokenizer, model_path: str | None, main_first) -> None:
        """The corpus tokenized into cached files and cut into blocks; the unigram baseline of the held-out blocks."""
        from finetune.data.packing import Blocks, check_blocks, tokenize_corpus, unigram_baseline
        from finetune.paths import cache_dir

        length = self.recipe.data.max_length
        self.tokens = tokenize_corpus(self.corpus, tokenizer, cache_dir() / "pretrain", main_first)
        check_blocks(self.tokens, length)
        self.train_dataset = Blocks(self.tokens.train, length)
        self.eval_dataset = Blocks(self.tokens.eval, length) if self.tokens.eval is not None else None
        self.skipped = self.tokens.skipped_rows
        if self.eval_dataset is not None:
            self.baseline = unigram_baseline(self.tokens.train, self.eval_dataset, len(tokenizer))

    def model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def load_model(self, path: str | None):
        """A new model, randomly initialised with `train.seed` (fp32 weights unless `model.dtype` says otherwise: mixed
        precision keeps fp32 master weights), or the pretrained one loaded as usual."""
        if not self.new_model:
            return super().load_model(path)
        from finetune.dtypes import torch_dtype
        from finetune.models.architecture import build_config, new_model

        model = self.recipe.model
        config = build_config(model.config, self.tokenizer, model.trust_remote_code)
        dtype = torch_dtype("fp32" if model.dtype == "auto" else model.dtype)
        return new_model(config, dtype, self.recipe.train.seed, model.attn_implementation)

    def prepare_model(self, model, tokenizer) -> list[str]:
        """Generation stops at the end of a document and pads with the tokenizer's pad token."""
        generation = model.generation_config
        if generation.eos_token_id is None:
            generation.eos_token_id = tokenizer.eos_token_id
        if generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id
        return []

    def trainer_config(self) -> tuple[type, dict]:
        from transformers import TrainingArguments

        # Blocks hold no padding (and the pad id may be EOS, a real token here): every id counts.
        return TrainingArguments, {"include_num_input_tokens_seen": "all"}

    def build_trainer(self, model, args, tokenizer, callbacks: list):
        from transformers import default_data_collator

        from finetune.models.architecture import training_flops_per_token

        trainer = pretrain_trainer_class()(
            model=model,
            args=args,
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            processing_class=tokenizer,
            data_collator=default_data_collator,  # blocks are all max_length long: stacked, never padded
            callbacks=callbacks,
        )
        self.flops = training_flops_per_token(trainer.model, self.recipe.data.max_length)
        return trainer

    def plan_rows(self, trainer) -> dict:
        return {"train_rows": len(self.train_dataset), "rows_before_packing": self.tokens.train.documents}

    def plan_lines(self) -> list[tuple[str, str]]:
        length = self.recipe.data.max_length
        lines = [("tokenizer", self.tokenizer_note), ("training tokens", self._split_line(self.train_dataset))]
        if self.eval_dataset is not None:
            lines.append(("held-out tokens", self._split_line(self.eval_dataset)))
        if self.tokens.empty_documents:
            lines.append(("empty documents", f"{self.tokens.empty_documents:,} (no text: nothing to learn, left out)"))
        lines.append(("attention", "crosses document boundaries within a block, as in GPT-2 (EOS ends each document)"))
        flops = self.flops
        lines.append((
            "FLOPs/token",
            f"{flops['flops_per_token'] / 1e6:,.2f} M per trained token: 6 x {flops['trained_matmul_weights']:,} trained "
            f"+ 4 x {flops['frozen_matmul_weights']:,} frozen matmul weights + {flops['attention_flops_per_token'] / 1e6:,.2f} M "
            f"attention at {length} tokens",
        ))
        if self.baseline is not None:
            lines.append((
                "unigram",
                f"held-out perplexity {self.baseline['perplexity']:,.1f} (loss {self.baseline['cross_entropy']:.3f}) for a "
                "model that knows only each token's training frequency: the bar to beat",
            ))
        return lines

    def _split_line(self, blocks) -> str:
        split = blocks.split
        return (
            f"{split.tokens:,} in {split.documents:,} documents = {len(blocks):,} blocks of {blocks.length}, "
            f"{blocks.dropped:,} left over after the last block (not used)" + ("; tokens from the cache" if self.tokens.cached else "")
        )

    def metrics_extra(self) -> dict:
        blocks = {"train": self.train_dataset, "eval": self.eval_dataset}
        corpus = {
            name: {"tokens": b.split.tokens, "documents": b.split.documents, "blocks": len(b), "tokens_left_over": b.dropped}
            for name, b in blocks.items() if b is not None
        }
        corpus["empty_documents"] = self.tokens.empty_documents
        extra = {"corpus": corpus, "tokenizer": self.tokenizer_note, "flops": self.flops}
        if self.baseline is not None:
            extra["unigram_baseline"] = self.baseline
        return extra

    def save_outputs(self, trainer, out: Path, metrics: dict) -> dict:
        """Model FLOPs utilisation, the held-out perplexity against the unigram baseline, and seeded samples
        continuing `eval.prompts` (`samples.json`)."""
        from finetune.training.callbacks import training_clock
        from finetune.training.outputs import write_json
        from finetune.training.speed import matmul_flops_per_second, model_flops_utilization

        found: dict = {}
        clock = training_clock(trainer)
        if clock.seconds and clock.tokens:
            peak = matmul_flops_per_second(self.runtime.device, self.runtime.precision)
            per_second = clock.tokens / clock.seconds
            mfu = model_flops_utilization(self.flops["flops_per_token"], per_second, peak, trainer.args.world_size)
            found["mfu"] = {"mfu": round(mfu, 4), "model_flops_per_second": round(self.flops["flops_per_token"] * per_second),
                            "matmul_peak_flops_per_process": round(peak), "tokens_per_second": round(per_second, 2)}
            print(f"\nSpeed: {per_second:,.0f} tokens/s, MFU {100 * mfu:.1f}% of the {peak / 1e9:,.1f} GFLOP/s measured "
                  f"for {self.runtime.precision} matrix products here", flush=True)
        held = metrics.get("eval") or {}
        if "eval_loss" in held and self.baseline is not None:
            ppl = math.exp(min(held["eval_loss"], 700.0))
            found["perplexity"] = {"held_out": round(ppl, 3), "unigram": self.baseline["perplexity"],
                                   "unigram_over_model": round(self.baseline["perplexity"] / ppl, 2)}
            print(f"Held-out: loss {held['eval_loss']:.4f}, perplexity {ppl:,.2f}; the unigram baseline's "
                  f"{self.baseline['perplexity']:,.2f} is {self.baseline['perplexity'] / ppl:,.1f}x higher", flush=True)
        if self.recipe.eval.prompts:
            found["samples"] = self._samples(trainer)
            write_json(Path(out) / "samples.json", {"samples": found["samples"]})
        return found

    def _samples(self, trainer) -> list[dict]:
        from finetune.data.packing import document_ids
        from finetune.models.generation import sample_continuations

        recipe, tokenizer = self.recipe, trainer.processing_class
        prefix, eos = document_ids(tokenizer)  # in training, a document starts after the previous one's EOS
        samples = sample_continuations(
            trainer.model, tokenizer, recipe.eval.prompts, recipe.eval.max_new_tokens, [eos, *prefix],
            recipe.pretrain.sample_temperature, recipe.pretrain.sample_top_k, recipe.train.seed, recipe.data.max_length,
        )
        for sample in samples:
            print(f"\n> {sample['text']}", flush=True)
        return samples
