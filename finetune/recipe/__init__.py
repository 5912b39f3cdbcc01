"""The recipe: one typed, documented schema for a fine-tuning run, and its loader.

Every field is documented once (its `description`); `finetune explain` and the README's
recipe reference are generated from these descriptions. Unknown keys are errors with a
"did you mean" hint, and every problem of a recipe is reported at once with its key path.
"""

from finetune.recipe.loading import apply_overrides, format_errors, load_recipe, recipe_to_dict, save_recipe, validate_recipe
from finetune.recipe.reference import description, explain, reference_markdown
from finetune.recipe.schema import (
    AdapterConfig,
    ArchitectureConfig,
    ClassificationConfig,
    DataConfig,
    DataSource,
    Dtype,
    EvalConfig,
    ImageConfig,
    ExportConfig,
    MergeConfig,
    ModelConfig,
    OutputConfig,
    PretrainConfig,
    QuantizationConfig,
    Recipe,
    Section,
    TrainConfig,
    combination_problems,
)

__all__ = [
    "AdapterConfig", "ArchitectureConfig", "ClassificationConfig", "DataConfig", "DataSource", "Dtype", "EvalConfig", "ImageConfig",
    "ExportConfig", "MergeConfig", "ModelConfig", "OutputConfig", "PretrainConfig", "QuantizationConfig", "Recipe", "Section", "TrainConfig", "apply_overrides",
    "combination_problems", "description", "explain", "format_errors", "load_recipe", "recipe_to_dict", "reference_markdown",
    "save_recipe", "validate_recipe",
]
