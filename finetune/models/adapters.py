"""The PEFT adapter: a `LoraConfig` from the recipe, attached the way PEFT intends (k-bit preparation first); a saved
adapter checked and loaded onto its base (`load_adapter`, for merge, chat, eval and predict)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.models.quantization import use_exact_4bit_kernels
from finetune.recipe import Recipe
from finetune.recipe.schema import is_pattern

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def build_lora_config(recipe: Recipe, task_type: str, head_modules: list[str] | None = None):
    """A peft `LoraConfig`, or None for a full fine-tune (or a head-only one)."""
    a = recipe.adapter
    if a.type in ("none", "head"):
        return None
    from peft import LoraConfig

    targets = a.target_modules
    # PEFT reads a string as `all-linear` or a regular expression matched against whole names, a list as names.
    target = targets[0] if targets == ["all-linear"] or is_pattern(targets[0]) else targets
    modules_to_save = list(a.modules_to_save or [])
    for head in head_modules or []:
        if head not in modules_to_save:
            modules_to_save.append(head)
    return LoraConfig(
        r=a.r,
        lora_alpha=a.alpha,
        lora_dropout=a.dropout,
        target_modules=target,
        use_rslora=a.use_rslora,
        use_dora=a.use_dora,
        bias=a.bias,
        modules_to_save=modules_to_save or None,
        task_type=task_type,
    )


def attach_adapter(model, recipe: Recipe, task_type: str, head_modules: list[str] | None = None):
    """Wrap the model with its adapter (and prepare a quantized base for training the way PEFT intends)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if recipe.is_quantized:
        use_exact_4bit_kernels(model)  # evaluations between training steps must not switch kernels
        # Casts norms and other small float params to fp32 for stable training and freezes the quantized base.
        # Checkpointing is switched on below with the non-deprecated transformers 5 API instead of PEFT's call.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if recipe.train.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if recipe.adapter.type != "none":
            # Frozen embeddings produce no grad, so checkpointed blocks would see inputs without requires_grad.
            model.enable_input_require_grads()
    config = build_lora_config(recipe, task_type, head_modules)
    if config is None:
        return model
    return get_peft_model(model, config)


def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json of a saved adapter, once the folder is known to load: the config is a JSON object and the
    weights are safetensors whose header covers the file. A pickled adapter_model.bin is refused."""
    folder = Path(folder)
    config_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise FinetuneError(f"{folder}: no {ADAPTER_CONFIG}; not a PEFT adapter or finetune run folder.")
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise FinetuneError(
                f"{folder}: the adapter's weights are only a pickle (adapter_model.bin), and unpickling runs any code "
                f"the file carries, so the kit loads {ADAPTER_WEIGHTS} only. Where you trust the file, load the adapter "
                "with PEFT and save_pretrained it again: PEFT writes safetensors."
            )
        raise FinetuneError(f"{folder}: no {ADAPTER_WEIGHTS}.")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FinetuneError(f"{config_path} is not valid JSON ({exc}); the adapter is damaged.") from None
    if not isinstance(config, dict):
        raise FinetuneError(f"{config_path} is not an adapter config (a JSON object); the adapter is damaged.")
    from safetensors import safe_open

    try:
        with safe_open(weights, framework="pt") as f:  # reads the header only, checked against the file's size
            f.keys()
    except Exception as exc:  # safetensors raises SafetensorError (or OSError) for a damaged file
        raise FinetuneError(f"{weights} cannot be read as safetensors ({exc}); the adapter is damaged or incomplete.") from None
    return config


def same_model(a: str, b: str) -> bool:
    """Whether two names of a base model are the same model: equal, the same folder, or a hub id and its cached copy."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return any(f"models--{hub.replace('/', '--')}" in folder.parts for hub, folder in ((a, pb), (b, pa)))


def load_adapter(model, folder: Path, check_base: bool = True):
    """The adapter saved in `folder` put on `model` with PEFT (unmerged, for inference), after the checks PEFT leaves to
    a traceback: damaged files, pickled weights, and an adapter made for another base.

    With `check_base`, an adapter whose adapter_config.json names another base folder that exists is refused even
    when the shapes agree (a fine-tune of the same architecture would load silently and answer wrongly)."""
    from peft import PeftModel

    folder = Path(folder)
    config = read_adapter_config(folder)
    named = config.get("base_model_name_or_path") or "an unnamed base"
    loaded = getattr(getattr(model, "config", None), "name_or_path", None) or "the base loaded"
    if check_base and named != "an unnamed base" and not same_model(named, loaded):
        if Path(named).expanduser().is_dir():
            raise FinetuneError(
                f"adapter {folder} was trained on {named}, but the base model loaded is {loaded}: an adapter only "
                f"works on its own base. If both are the same model, set base_model_name_or_path in "
                f"{folder / ADAPTER_CONFIG} to {loaded}."
            )
        log.warning("Adapter %s names base %s, which is not here; loading it on %s.", folder, named, loaded)
    try:
        return PeftModel.from_pretrained(model, folder)
    except (RuntimeError, ValueError, KeyError) as exc:  # size mismatches, target modules the base lacks
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        sizes = [line for line in lines if line.startswith("size mismatch")]
        detail = sizes[0] + (f" (and {len(sizes) - 1} more)" if len(sizes) > 1 else "") if sizes else (lines or [repr(exc)])[0]
        raise FinetuneError(
            f"adapter {folder} does not fit the base model {loaded} (it was trained on {named}): {detail}"
        ) from None
