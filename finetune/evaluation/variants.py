"""The models `finetune eval` compares, from one load of the base weights.

`base` is the run's model with its adapter disabled, `adapter` the model as trained (unmerged adapter), `merged` the
folder `finetune merge` wrote, or else the adapter merged into the loaded weights in memory (and unmerged after).
A full fine-tune (no adapter) is compared with its base, which then needs a load of its own.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

from finetune.errors import FinetuneError
from finetune.evaluation.source import VARIANTS, EvalSource, available_variants

log = logging.getLogger(__name__)


@dataclass
class Variants:
    """`use(name)` yields the model in that variant's state; the states share one set of base weights."""

    model: object  # the run's model: PeftModel over the base, or the fine-tuned full model
    tokenizer: object
    names: list[str]
    model_class: type | None = None  # the transformers auto class of these models
    base_model: object | None = None  # a full fine-tune's base, loaded apart
    merged_model: object | None = None  # loaded from a `finetune merge` folder
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # what a task needs besides the model (a classifier's labels)

    @contextmanager
    def use(self, name: str):
        if name == "base":
            if self.base_model is not None:
                yield self.base_model
            else:
                with self.model.disable_adapter():
                    yield self.model
        elif name == "adapter":
            yield self.model
        elif name == "start":  # a preference run's SFT start (its reference), loaded beside the trained adapter
            self.model.set_adapter("start")
            try:
                yield self.model
            finally:
                self.model.set_adapter("default")
        elif self.merged_model is not None:
            yield self.merged_model
        else:
            # Merged in place in fp32, so it differs from the adapter by rounding only; unmerged afterwards.
            self.model.merge_adapter()
            try:
                yield self.model
            finally:
                self.model.unmerge_adapter()

    @property
    def merged_from(self) -> str:
        return "folder" if self.merged_model is not None else "in-memory merge"


def choose_variants(source: EvalSource, requested: list[str] | None) -> tuple[list[str], list[str]]:
    """The variants to build, in report order, and notes on the default ones that cannot be built here.

    A variant the user asked for by name and that cannot be built is an error; one of the defaults is left out
    with a note."""
    unknown = [v for v in requested or () if v not in VARIANTS]
    if unknown:
        raise FinetuneError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}.")
    why = available_variants(source)
    if requested:
        blocked = [f"{v}: {why[v]}" for v in requested if why[v]]
        if blocked:
            raise FinetuneError("cannot build variant " + "; ".join(blocked) + ".")
        return [v for v in VARIANTS if v in requested], []
    return [v for v in VARIANTS if not why[v]], [f"{v} left out: {why[v]}" for v in VARIANTS if why[v]]


def load_variants(source: EvalSource, names: list[str], runtime, tokenizer) -> Variants:
    """Load what `names` need: the base once (quantized as in training), the run's adapter on it, a merged folder."""
    if source.scoring == "classifier":
        variants = _classification(source, runtime)
    else:
        variants = _causal_lm(source, runtime, tokenizer)
    variants.names = names
    if "start" in names:
        variants.model.load_adapter(source.recipe.preference.from_run, adapter_name="start")
    if source.merged_dir is not None and "merged" in names:
        variants.merged_model = _load_merged(source, variants.model_class)
    if source.run_dir is not None and not source.has_adapter and "base" in names:
        variants.base_model = _load_full_base(source, runtime, variants.model_class, variants.extra.get("model_kwargs", {}))
    for model in (variants.model, variants.base_model, variants.merged_model):
        if model is not None:
            model.eval()
    return variants


def _causal_lm(source: EvalSource, runtime, tokenizer) -> Variants:
    from transformers import AutoModelForCausalLM, GenerationConfig

    from finetune.models.loading import (
        load_model,
        quiet_transformers,
        resolve_model_path,
    )
    from finetune.models.quantization import use_exact_4bit_kernels

    recipe = source.recipe
    if source.run_dir is None:  # only a merged folder: it is the whole model
        model = _load_merged(source, AutoModelForCausalLM)
        variants = Variants(model, tokenizer, [], merged_model=model)
    else:
        path = resolve_model_path(recipe.model) if source.has_adapter else str(source.run_dir)
        with quiet_transformers():
            model = load_model(recipe, runtime, path, AutoModelForCausalLM)
        if recipe.is_quantized:
            use_exact_4bit_kernels(model)  # the kernel training evaluated with (see finetune.models.quantization)
        if (source.run_dir / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(source.run_dir)  # the end-of-turn stop token
        if source.has_adapter:
            from finetune.models.adapters import load_adapter

            model = load_adapter(model, source.run_dir)
        variants = Variants(model, tokenizer, [])
    variants.model_class = AutoModelForCausalLM
    return variants


def _classification(source: EvalSource, runtime) -> Variants:
    from transformers import AutoModelForSequenceClassification

    from finetune.evaluation.classifier import load_classifier

    if source.run_dir is None:
        raise FinetuneError(
            f"{source.merged_dir}: the classification run this merged model came from was not found; "
            "give the run folder (with --merged for the merged model)."
        )
    from transformers import set_seed

    # The new head is initialised from the seed, as training initialised it: `base` is the model training started from.
    set_seed(source.recipe.train.seed)
    classifier = load_classifier(source.run_dir)
    variants = Variants(classifier.model, classifier.tokenizer, [], extra={
        "classifier": classifier, "model_kwargs": classifier.labels.config_kwargs(),
    })
    variants.model_class = AutoModelForSequenceClassification
    return variants


def _load_merged(source: EvalSource, model_class):
    import torch

    from finetune.models.loading import load_checkpoint, quiet_transformers

    with quiet_transformers():
        model = load_checkpoint(model_class, source.merged_dir, None, dtype=torch.float32)
    return model.eval()


def _load_full_base(source: EvalSource, runtime, model_class, model_kwargs: dict):
    from finetune.models.loading import (
        load_model,
        quiet_transformers,
        resolve_model_path,
    )

    with quiet_transformers():
        return load_model(source.recipe, runtime, resolve_model_path(source.recipe.model), model_class, **model_kwargs)
