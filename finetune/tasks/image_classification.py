"""Image classification by transfer learning: a pretrained vision model with a new head, trained by LoRA on the
backbone (`adapter: lora`), the head alone (`adapter: head`) or every weight (`adapter: none`), via the Trainer.

Rows and images, checked (finetune/data/images.py) → model built, checkpoint loaded partially, head replaced
(finetune/models/vision/) → input size checked, backbone frozen as the mode says → adapter → train → save
adapter (or model), `labels.json`, `preprocessing.json` → the classification report and confusion matrix. The
metrics are the text classifier's (finetune/metrics/classification.py); `finetune predict --image` loads the run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from finetune.data.images import ImageDataset, Preprocessing, load_image_rows, prepare_image_data, recipe_preprocessing
from finetune.recipe import DataSource, Recipe
from finetune.tasks.base import Task
from finetune.metrics.classification import ClassificationMetrics, check_best_metric
from finetune.tasks.classification import write_eval_report

log = logging.getLogger("finetune")

MODES = {"lora": "LoRA on the backbone, head trained in full", "head": "head only (backbone and BatchNorm statistics frozen)",
         "none": "full fine-tune (every weight)"}  # fmt: skip


def save_image_files(out: Path, recipe: Recipe, labels, preprocessing: Preprocessing, hf: bool) -> None:
    """What loading the run again needs beside its weights: labels, preprocessing, and how to rebuild a plain model
    (`architecture.json`); a transformers model also gets a `preprocessor_config.json` its image processors read."""
    import json

    from finetune.models.vision import ARCHITECTURE_FILE, architecture_record

    labels.save(out)
    preprocessing.save(out)
    if hf:
        (out / "preprocessor_config.json").write_text(json.dumps(preprocessing.hf_processor_config(), indent=2) + "\n")
    else:
        (out / ARCHITECTURE_FILE).write_text(json.dumps(architecture_record(recipe, labels), indent=2) + "\n")


def save_whole_model(built, out: Path) -> None:
    """The whole model in the run folder, as a full fine-tune saves it: a transformers folder, or the plain model's
    state dict (`model.safetensors`, keys as `PlainImageClassifier` has them)."""
    if built.source.is_hf:
        built.model.save_pretrained(out)
        return
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in built.model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


class ImageClassificationTask(Task):
    """A pretrained image model, a new head for the recipe's labels, and LoRA, head-only or full training."""

    peft_task_type = None  # PEFT has no image task type; its image-classification guide uses a plain PeftModel
    needs_tokenizer = False

    @classmethod
    def read_rows(cls, recipe: Recipe, sources: list[DataSource], tokenizer=None):
        return load_image_rows(sources, recipe)

    @classmethod
    def data_facts(cls, recipe: Recipe, tokenizer=None):
        from finetune.data.images import report_facts

        return report_facts(recipe)

    def load_base(self):
        # No tokenizer: the preprocessing follows the checkpoint, settled once the model is built (prepare_model).
        return self.recipe.model.name_or_path, None

    def prepare_data(self, tokenizer, model_path: str, main_first) -> None:
        # Every image is decoded once here, before the model loads: a corrupt file costs seconds.
        recipe = self.recipe
        self.data = prepare_image_data(recipe)
        self.metrics = ClassificationMetrics(self.data.labels, recipe.eval.metrics)
        check_best_metric(recipe, self.metrics)
        labels = self.data.labels
        self.train_dataset = ImageDataset(self.data.train_rows, labels, None, train=True)
        if self.data.eval_rows:
            self.eval_dataset = ImageDataset(self.data.eval_rows, labels, None, train=False)
        self.skipped = self.data.skipped

    def load_model(self, path: str):
        from finetune.dtypes import torch_dtype
        from finetune.models.vision import build_image_model

        dtype = torch_dtype(self.recipe.model.dtype if self.recipe.model.dtype != "auto" else self.runtime.precision)
        self.built = build_image_model(self.recipe, self.data.labels, dtype=dtype)  # its load report is in the plan
        return self.built.model

    def prepare_model(self, model, tokenizer) -> list[str]:
        """Head found, preprocessing settled and the input size checked on the bare model; then the backbone frozen
        as the mode says (BatchNorm statistics for LoRA and head-only, every backbone weight for head-only)."""
        from finetune.models.vision import check_input_size, checkpoint_preprocessing, find_heads, freeze_backbone, freeze_norm_statistics

        recipe, built = self.recipe, self.built
        self.heads = find_heads(built, len(self.data.labels.names), recipe.image.head)
        self.preprocessing = recipe_preprocessing(recipe, *checkpoint_preprocessing(built))
        for dataset in (self.train_dataset, self.eval_dataset):
            if dataset is not None:
                dataset.preprocessing = self.preprocessing
        check_input_size(model, self.preprocessing.size, recipe.model.name_or_path)
        mode = recipe.adapter.type
        self.frozen_norms = freeze_norm_statistics(model, self.heads) if mode in ("lora", "head") else 0
        if mode == "head":
            freeze_backbone(model, self.heads)
        return self.heads

    def attach_adapter(self, model, heads: list[str]):
        from finetune.models.adapters import attach_adapter, build_lora_config
        from finetune.models.vision import lora_targets, plain_convolutions

        if self.recipe.train.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
            from finetune.errors import RecipeError

            raise RecipeError([f"train.gradient_checkpointing: {self.recipe.model.name_or_path} cannot recompute its "
                               "activations (no transformers gradient checkpointing); remove it."])  # fmt: skip
        if self.caches_features(heads):
            return self.cache_features(model, heads[0])
        if self.recipe.adapter.type != "lora":
            return attach_adapter(model, self.recipe, task_type=None, head_modules=heads)  # none / head: no PEFT
        from peft import get_peft_model

        self.targets = lora_targets(model, self.recipe, heads)
        swapped = plain_convolutions(model, self.targets)  # PEFT builds LoRA layers with the base layer's class
        if swapped:
            log.info("%d 1x1 convolution(s) of an nn.Conv2d subclass became plain nn.Conv2d for LoRA (same weights, "
                     "same output).", len(swapped))
        config = build_lora_config(self.recipe, None, heads)
        config.target_modules = set(self.targets)  # full names, resolved for this architecture
        if self.recipe.train.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        return get_peft_model(model, config)

    def caches_features(self, heads: list[str]) -> bool:
        c = self.recipe.image
        return self.recipe.adapter.type == "head" and c.cache_features and not c.augment and len(heads) == 1

    def cache_features(self, model, head: str):
        """Head-only without augmentation: every image goes through the frozen backbone once; the trainer then runs
        the head alone on what it received (`CachedFeatureClassifier`, which still holds the whole model)."""
        import time

        from finetune.data.images import FeatureDataset
        from finetune.models.plain_classifier import CachedFeatureClassifier
        from finetune.models.vision import head_inputs

        started = time.perf_counter()
        batch = max(32, self.recipe.train.micro_batch_size)
        self.train_dataset = FeatureDataset(*head_inputs(model, head, self.train_dataset, batch))
        if self.eval_dataset is not None:
            self.eval_dataset = FeatureDataset(*head_inputs(model, head, self.eval_dataset, batch))
        self.cached = (len(self.train_dataset), len(self.eval_dataset or []), time.perf_counter() - started)
        return CachedFeatureClassifier(model, head)

    def trainer_config(self) -> tuple[type, dict]:
        from transformers import TrainingArguments

        # PEFT's plain PeftModel hides the `labels` argument the Trainer looks for; pixels are not tokens.
        return TrainingArguments, {"label_names": ["labels"], "include_num_input_tokens_seen": "no"}

    def build_trainer(self, model, args, tokenizer, callbacks: list):
        from transformers import Trainer

        return Trainer(
            model=model,
            args=args,
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            compute_metrics=self.metrics if self.eval_dataset is not None else None,
            callbacks=callbacks,
        )

    def plan_lines(self) -> list[tuple[str, str]]:
        labels = self.data.labels
        lines = [
            ("labels", f"{len(labels.names)}: {', '.join(labels.names)}"),
            ("mode", MODES[self.recipe.adapter.type]),
            ("head", ", ".join(self.heads) + " (trained in full)"),
            ("images", self.preprocessing.describe()),
        ]
        if self.recipe.adapter.type == "lora":
            lines.append(("lora layers", f"{len(self.targets)} (e.g. {', '.join(self.targets[:3])})"))
        if getattr(self, "cached", None):
            train, held, seconds = self.cached
            lines.append(("features", f"cached: {train:,} train + {held:,} eval images through the frozen backbone once "
                                      f"({seconds:.1f} s); the head trains on them"))  # fmt: skip
        if self.frozen_norms:
            lines.append(("batchnorm", f"{self.frozen_norms} layer(s) of the backbone kept in eval mode (statistics frozen)"))
        if self.built.report is not None:
            lines += self.built.report.plan_lines()
        return lines

    def metrics_extra(self) -> dict:
        from dataclasses import asdict

        extra = {"labels": list(self.data.labels.names), "heads": self.heads, "preprocessing": asdict(self.preprocessing)}
        if self.built.report is not None:
            extra["checkpoint"] = self.built.report.as_dict()
        return extra

    def save_outputs(self, trainer, out: Path, metrics: dict) -> dict:
        """`labels.json`, `preprocessing.json` (and `architecture.json` or `preprocessor_config.json`), the full
        evaluation report with its confusion matrix, and images per second of training."""
        from finetune.training.callbacks import training_clock

        labels = self.data.labels
        if getattr(self, "cached", None):  # the trainer saved its feature classifier: the run keeps the whole model
            save_whole_model(self.built, out)
        save_image_files(out, self.recipe, labels, self.preprocessing, self.built.source.is_hf)
        if self.eval_dataset is not None:
            write_eval_report(out, {"loss": metrics["eval"].get("eval_loss"), **self.metrics.last_report}, labels)
        clock = training_clock(trainer)
        a = trainer.args
        images = trainer.state.global_step * a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
        return {"images_per_second": round(images / clock.seconds, 2)} if clock.seconds else {}
