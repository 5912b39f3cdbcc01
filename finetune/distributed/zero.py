"""DeepSpeed ZeRO configs: find them by name, read them, and catch combinations that fail late or silently.

Everything here runs before the model is loaded (and before `finetune launch` starts any process), so a
config that would train alone, save an empty model or spend minutes compiling C++ ops is reported in seconds.
DeepSpeed itself is not imported: the configs are plain JSON and the checks are about their keys.
One diagnostic runs inside a job instead: `partition_counts`, what each rank holds of every weight
(FINETUNE_REPORT_PARTITION, written by the trainer), to see that ZeRO-3 really split the model.
"""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.recipe import Recipe

CONFIG_FOLDER = "deepspeed_configs"

# Where a bare name (`zero2`) is looked up, in order: the source checkout next to the package (also an
# editable install), then a copy installed as data files (`share/finetune-kit/deepspeed_configs`).
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # finetune/distributed/zero.py -> the checkout


def config_folders() -> list[Path]:
    """Folders that may hold the shipped configs, existing ones only, in lookup order."""
    candidates = [
        _PACKAGE_ROOT / CONFIG_FOLDER,
        Path(sys.prefix) / "share" / "finetune-kit" / CONFIG_FOLDER,
    ]
    seen, found = set(), []
    for folder in candidates:
        if folder.is_dir() and folder.resolve() not in seen:
            seen.add(folder.resolve())
            found.append(folder)
    return found


def available_configs() -> dict[str, Path]:
    """Shipped config names (without `.json`) → file; the first folder that has a name wins."""
    configs: dict[str, Path] = {}
    for folder in config_folders():
        for path in sorted(folder.glob("*.json")):
            configs.setdefault(path.stem, path)
    return configs


def resolve_deepspeed_config(name_or_path: str | Path) -> Path:
    """A shipped config by name (`zero2`, `zero2.json`) or an existing JSON file by path."""
    text = str(name_or_path).strip()
    path = Path(text).expanduser()
    if path.is_file():
        return path.resolve()
    looks_like_path = "/" in text or "\\" in text or text.startswith(".") or text.startswith("~")
    name = text.removesuffix(".json")
    configs = available_configs()
    if not looks_like_path and name in configs:
        return configs[name]
    names = sorted(configs)
    if looks_like_path:
        raise FinetuneError(f"deepspeed: config file {text} not found. Shipped configs: {', '.join(names) or 'none found'}.")
    hint = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    where = ", ".join(str(f) for f in config_folders()) or f"no {CONFIG_FOLDER}/ folder found"
    message = f"deepspeed: no config named '{text}'."
    message += f" Did you mean '{hint[0]}'?" if hint else ""
    message += f" Shipped configs: {', '.join(names) or 'none'} (from {where}); or give a path to a JSON file."
    raise FinetuneError(message)


def load_deepspeed_config(name_or_path: str | Path) -> dict:
    """The parsed config; a JSON syntax error names the file, line and column."""
    path = resolve_deepspeed_config(name_or_path)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FinetuneError(f"deepspeed: {path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}.") from None
    if not isinstance(config, dict):
        raise FinetuneError(f"deepspeed: {path}: a DeepSpeed config is a JSON object, got {type(config).__name__}.")
    return config


# --------------------------------------------------------------------------------------------
# Checks before launch
# --------------------------------------------------------------------------------------------

_GATHER_KEYS = (
    "stage3_gather_16bit_weights_on_model_save",
    "gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save",  # deprecated spelling, still honoured by DeepSpeed
)


def zero_stage(config: dict) -> int:
    """ZeRO stage of a config (0 when it has no `zero_optimization` section)."""
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    return stage if isinstance(stage, int) else -1


def offloads(config: dict) -> dict[str, dict]:
    """`offload_optimizer` / `offload_param` sections whose device is not `none`."""
    zero = config.get("zero_optimization") or {}
    found = {}
    for key in ("offload_optimizer", "offload_param"):
        section = zero.get(key)
        if isinstance(section, dict) and section.get("device", "none") not in (None, "none"):
            found[key] = section
    return found


def _precision(recipe: Recipe, has_cuda: bool) -> str | None:
    """The run's precision (`fp32`/`bf16`/`fp16`), or None where it depends on the GPU (as finetune.runtime decides)."""
    precision = recipe.train.precision
    if precision == "auto":
        return None if has_cuda else "fp32"
    return precision


def _compute_dtype(recipe: Recipe, has_cuda: bool) -> str | None:
    """The dtype 4-bit matmuls will run in (`fp32`/`bf16`/`fp16`), or None where it depends on the GPU."""
    if recipe.quantization.compute_dtype != "auto":
        return recipe.quantization.compute_dtype
    precision = _precision(recipe, has_cuda)
    return precision


def deepspeed_problems(recipe: Recipe, config: dict, has_cuda: bool) -> list[str]:
    """Config/recipe combinations that would fail or silently lose work; each names its keys and the fix."""
    problems: list[str] = []
    zero = config.get("zero_optimization") or {}
    stage = zero_stage(config)
    if stage not in (0, 1, 2, 3):
        problems.append(f"deepspeed: zero_optimization.stage is {zero.get('stage')!r}; use 0, 1, 2 or 3.")
        return problems

    q = recipe.quantization
    if stage == 3 and q.bits == 4:
        compute = _compute_dtype(recipe, has_cuda)
        if q.storage_dtype == "uint8" or (compute is not None and q.storage_dtype != compute):
            want = compute or "bf16, or fp16 on GPUs without bf16"
            problems.append(
                f"quantization.storage_dtype: {q.storage_dtype} with ZeRO-3: to partition a 4-bit model, ZeRO-3 (like FSDP) "
                f"needs the packed weights stored in the dtype of the model's other weights ({want}). "
                f"Set quantization.storage_dtype: {compute or 'bf16'} (equal to the compute dtype: "
                "quantization.compute_dtype, or train.precision when that is auto)."
            )

    if stage == 3 and not any(zero.get(k) is True for k in _GATHER_KEYS):
        problems.append(
            "deepspeed: zero_optimization.stage3_gather_16bit_weights_on_model_save is not true: with ZeRO-3 each "
            "rank holds a slice of every weight, and without it a full fine-tune saves no weights (only DeepSpeed's "
            "sharded checkpoint, to rebuild with zero_to_fp32.py) and accelerate's get_state_dict refuses to gather. "
            "Set it to true (deepspeed_configs/zero3.json does)."
        )

    found_offloads = offloads(config)
    if "offload_param" in found_offloads and stage != 3:
        problems.append(
            f"deepspeed: zero_optimization.offload_param only works with ZeRO stage 3 (stage is {stage}), DeepSpeed "
            "ignores it otherwise. Use stage 3 (deepspeed: zero3_offload) or remove offload_param."
        )
    if "offload_optimizer" in found_offloads and stage == 0:
        problems.append(
            "deepspeed: zero_optimization.offload_optimizer needs ZeRO stage 1, 2 or 3 (stage is 0). "
            "Set zero_optimization.stage: 2 (deepspeed: zero2_offload) or remove offload_optimizer."
        )
    for key, section in found_offloads.items():
        if section.get("device") == "nvme" and not section.get("nvme_path"):
            problems.append(f"deepspeed: zero_optimization.{key}.device is nvme but nvme_path is not set: give a folder on the NVMe disk.")

    problems += _mismatches(recipe, config, has_cuda)
    return problems


def _mismatches(recipe: Recipe, config: dict, has_cuda: bool) -> list[str]:
    """Explicit config values that contradict the recipe; the HF integration would reject them after the model load."""
    t = recipe.train
    pairs = [
        ("train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size"),
        ("gradient_accumulation_steps", t.gradient_accumulation_steps, "train.gradient_accumulation_steps"),
        ("gradient_clipping", t.max_grad_norm, "train.max_grad_norm"),
    ]
    problems = []
    for key, wanted, recipe_key in pairs:
        value = config.get(key, "auto")
        if value != "auto" and value != wanted:
            problems.append(f"deepspeed: {key} is {value!r} but {recipe_key} is {wanted!r}; set {key} to \"auto\" so the recipe decides.")
    precision = _precision(recipe, has_cuda)
    for section, name in (("bf16", "bf16"), ("fp16", "fp16")):
        enabled = (config.get(section) or {}).get("enabled", "auto")
        if enabled == "auto" or precision is None:
            continue
        if bool(enabled) != (precision == name):
            problems.append(
                f"deepspeed: {section}.enabled is {str(enabled).lower()} but the run's precision is {precision} "
                f"(train.precision: {t.precision}); set {section}.enabled to \"auto\"."
            )
    return problems


def deepspeed_warnings(recipe: Recipe, config: dict, has_cuda: bool) -> list[str]:
    """Settings that work but cost time or ignore part of the recipe; printed, never fatal."""
    warnings: list[str] = []
    optimizer = config.get("optimizer")
    if isinstance(optimizer, dict) and not has_cuda:
        torch_adam = (optimizer.get("params") or {}).get("torch_adam") is True
        if not torch_adam:
            warnings.append(
                f"deepspeed: the \"optimizer\" block ({optimizer.get('type', '?')}) makes DeepSpeed JIT-compile its C++ "
                "optimizer op on first use (3-5 minutes on CPU). Remove the block to use train.optimizer "
                "(the shipped configs have none), or set optimizer.params.torch_adam: true."
            )
    if isinstance(optimizer, dict):
        warnings.append("deepspeed: the \"optimizer\" block replaces train.optimizer, train.learning_rate and train.weight_decay.")
    if isinstance(config.get("scheduler"), dict):
        warnings.append("deepspeed: the \"scheduler\" block replaces train.lr_scheduler and train.warmup_ratio.")
    found_offloads = offloads(config)
    if "offload_optimizer" in found_offloads and optimizer is None and config.get("zero_force_ds_cpu_optimizer", True) is not False:
        if not has_cuda:
            warnings.append(
                "deepspeed: offload_optimizer without zero_force_ds_cpu_optimizer: false makes accelerate swap "
                "train.optimizer for DeepSpeedCPUAdam, which compiles the cpu_adam op (3-5 minutes on CPU). "
                "Set \"zero_force_ds_cpu_optimizer\": false to keep the Trainer's optimizer (the shipped *_offload configs do)."
            )
    if not has_cuda and any(section.get("pin_memory") for section in found_offloads.values()):
        warnings.append(
            "deepspeed: offload pin_memory has no effect without CUDA (DeepSpeed's CPU accelerator does not page-lock); "
            "harmless, and kept on in the shipped configs for GPU machines."
        )
    return warnings


# --------------------------------------------------------------------------------------------
# What ZeRO-3 really partitioned (FINETUNE_REPORT_PARTITION)
# --------------------------------------------------------------------------------------------

PARTITION_REPORT_ENV = "FINETUNE_REPORT_PARTITION"


def partition_counts(model) -> dict:
    """Per weight: its full size and the values this process holds of it, as seen inside a running job.

    ZeRO-3 swaps each weight's data for an empty tensor and keeps this rank's slice in `ds_tensor` (full size
    in `ds_numel`), gathering the whole weight only while a layer runs; weights under
    `stage3_param_persistence_threshold` (`ds_persist`) stay whole once gathered. Without ZeRO-3 every process
    holds every weight whole. Reads attributes only: DeepSpeed is not imported.
    """
    weights = {}
    for name, param in model.named_parameters():
        shard = getattr(param, "ds_tensor", None)
        weights[name] = {
            "numel": int(getattr(param, "ds_numel", param.numel())),
            "partition": int(shard.numel()) if shard is not None else int(param.numel()),
            "whole_in_memory": int(param.data.numel()),  # 0 while ZeRO-3 has the weight released
            "persistent": bool(getattr(param, "ds_persist", False)),
            "trainable": param.requires_grad,
        }
    total = sum(w["numel"] for w in weights.values())
    held = sum(w["partition"] for w in weights.values())
    whole = sum(w["whole_in_memory"] for w in weights.values())
    return {
        "params": total,
        "partition": held,
        "fraction": held / total if total else 0.0,
        "whole_in_memory": whole,
        "weights": weights,
    }


def write_partition_report(model, folder: str | Path, rank: int, world_size: int) -> Path:
    """`partition_counts` of this rank as `folder/partition-rank{rank}.json`."""
    path = Path(folder) / f"partition-rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rank": rank, "world_size": world_size, **partition_counts(model)}, indent=1))
    return path
