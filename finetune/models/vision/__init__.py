"""Image classifiers for transfer learning, one concern per module:

- `source.py`: where the model comes from (a Hugging Face folder or hub id, `timm:NAME`, `MODULE:CALLABLE`) and
  what is wrong with it and its `image.checkpoint` before anything loads;
- `partial_loading.py`: a plain state dict loaded partially (matching keys load, the rest are reported);
- `building.py`: the model built with a head for the recipe's labels;
- `preprocessing.py`: the input size, mean and std the checkpoint was trained with;
- `heads.py`: the head found, the backbone (weights and BatchNorm statistics) frozen, its features computed once, the
  input size checked with one forward pass before training;
- `lora.py`: LoRA targets per architecture;
- `architecture_file.py`: how a plain (non-transformers) model is saved and rebuilt.

The names callers use are imported here, so `from finetune.models.vision import build_image_model` works.
"""

from finetune.models.vision.architecture_file import ARCHITECTURE_FILE, architecture_record, build_plain_from_record
from finetune.models.vision.building import BuiltModel, build_empty_model, build_image_model, label_kwargs, plain_classifier
from finetune.models.vision.heads import check_input_size, find_heads, freeze_backbone, freeze_norm_statistics, head_inputs, in_heads
from finetune.models.vision.lora import lora_targets, plain_convolutions, prepare_for_saved_adapter
from finetune.models.vision.partial_loading import LoadReport, load_partial
from finetune.models.vision.preprocessing import IMAGENET_MEAN, IMAGENET_STD, checkpoint_preprocessing
from finetune.models.vision.source import VisionSource, checkpoint_path, read_state_dict, vision_problems, vision_source

__all__ = [
    "ARCHITECTURE_FILE", "IMAGENET_MEAN", "IMAGENET_STD", "BuiltModel", "LoadReport", "VisionSource",
    "architecture_record", "build_empty_model", "build_image_model", "build_plain_from_record", "check_input_size", "checkpoint_path",
    "checkpoint_preprocessing", "find_heads", "freeze_backbone", "freeze_norm_statistics", "head_inputs", "in_heads",
    "label_kwargs", "load_partial", "lora_targets", "plain_classifier", "plain_convolutions",
    "prepare_for_saved_adapter", "read_state_dict", "vision_problems", "vision_source",
]  # fmt: skip
