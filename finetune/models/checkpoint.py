"""What a model folder holds, checked before anything loads: a config.json and weights in safetensors.

Pickled weights (`pytorch_model.bin`, `.pt`, `.pth`) are refused: unpickling runs whatever code the file carries.
A pickle the recipe names in `model.weights_file` is read once with `torch.load(weights_only=True)` (tensors only,
no code) and cached as a safetensors folder, which every later load reads instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.paths import PACKAGE_SCHEME, cache_dir, resolve_package_path
from finetune.recipe import ModelConfig

log = logging.getLogger(__name__)

SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Pickles a Trainer writes beside the weights (arguments, optimizer, RNG): they hold no model weights.
TRAINER_PICKLES = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state")
# Files a converted folder keeps from the original besides the weights (config, tokenizer, chat template).
_KEPT_SUFFIXES = (".json", ".jinja", ".model", ".txt", ".tiktoken")


def pickled_weights(folder: Path) -> list[str]:
    """The pickle files in `folder` that may hold weights."""
    return sorted(
        p.name for p in folder.iterdir()
        if p.is_file() and p.suffix in PICKLE_SUFFIXES and not p.name.startswith(TRAINER_PICKLES)
    )  # fmt: skip


def pickle_refusal(folder: Path, pickles: list[str], fix: str | None = None) -> str:
    """Why a folder whose weights are only pickles is not loaded, and what to do instead."""
    if fix is None:
        fix = (
            f"If you trust the file, set model.weights_file: {pickles[0]} to read it with "
            "torch.load(weights_only=True), which loads tensors only and runs no code."
            if len(pickles) == 1
            else "Convert them to one model.safetensors where you trust them (transformers' save_pretrained writes it)."
        )
    return (
        f"{folder} holds its weights only as pickle ({', '.join(pickles)}), and unpickling runs any code the file "
        f"carries, so the kit loads safetensors only. {fix}"
    )


def folder_problem(folder: Path, fix: str | None = None) -> str | None:
    """What keeps `folder` from loading as a model (no config.json, no weights, only pickled weights), or None."""
    if not (folder / "config.json").is_file():
        if (folder / "adapter_config.json").is_file():
            return f"{folder} holds a PEFT adapter, not a model (no config.json); give the adapter's base model instead."
        inside = sorted(p.name for p in folder.iterdir() if (p / "config.json").is_file())
        hint = f" Model folders inside it: {', '.join(inside)}." if inside else ""
        return f"{folder} is a folder but not a model: it has no config.json.{hint}"
    try:
        config = json.loads((folder / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        return f"{folder / 'config.json'} is not valid JSON ({exc}); the model folder is damaged."
    if not isinstance(config, dict):
        return f"{folder / 'config.json'} is not a model config (a JSON object); the model folder is damaged."
    named = config.get("transformers_weights")  # transformers loads the file a config names before any other
    if named and not str(named).endswith((".safetensors", ".safetensors.index.json")):
        return f"{folder / 'config.json'} names {named} as its weights (transformers_weights); the kit loads safetensors only."
    if any((folder / name).is_file() for name in SAFETENSORS_WEIGHTS):
        return None
    pickles = pickled_weights(folder)
    if pickles:
        return pickle_refusal(folder, pickles, fix)
    return f"{folder} has a config.json but no weights (no {' or '.join(SAFETENSORS_WEIGHTS)})."


def _looks_like_a_path(name: str) -> bool:
    # Hub ids are `name` or `org/name`; anything else with slashes, or starting like a path, is meant as a folder.
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def local_name(model: ModelConfig) -> str:
    """`model.name_or_path` with a `package://` path resolved to its folder."""
    name = model.name_or_path
    return str(resolve_package_path(name)) if name.startswith(PACKAGE_SCHEME) else name


def model_problem(model: ModelConfig) -> str | None:
    """What is wrong with the recipe's model that can be seen without loading it (stat calls only), naming its key.

    A hub id is not checked here: whether it is cached or reachable is found out when it loads."""
    try:
        name = local_name(model)
    except FinetuneError as exc:
        return str(exc)
    if model.gguf_file:
        return None  # the GGUF conversion checks its file
    folder = Path(name).expanduser()
    if model.weights_file:
        if not folder.is_dir():
            return f"model.weights_file: model.name_or_path must be a local model folder to read it from; {name} is not one."
        if not (folder / "config.json").is_file():
            return f"model.name_or_path: {folder_problem(folder)}"
        if not (folder / model.weights_file).is_file():
            return f"model.weights_file: {folder / model.weights_file} not found."
        return None
    if folder.is_dir():
        problem = folder_problem(folder)
        return f"model.name_or_path: {problem}" if problem else None
    if folder.exists():
        return f"model.name_or_path: {name} is a file; give the folder that holds the model (its config.json and weights)."
    if _looks_like_a_path(name):
        return f"model.name_or_path: {name} not found (no such folder)."
    return None


def tokenizer_problem(model: ModelConfig) -> str | None:
    """`model.tokenizer` (a new model's tokenizer): a local folder must hold a tokenizer; hub ids load later."""
    if model.tokenizer is None:
        return None
    try:
        name = str(resolve_package_path(model.tokenizer, key="model.tokenizer")) if model.tokenizer.startswith(PACKAGE_SCHEME) else model.tokenizer
    except FinetuneError as exc:
        return str(exc)
    folder = Path(name).expanduser()
    if folder.is_dir():
        if any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")):
            return None
        return f"model.tokenizer: {folder} holds no tokenizer (no tokenizer.json or tokenizer_config.json)."
    if folder.exists():
        return f"model.tokenizer: {name} is a file; give the folder that holds the tokenizer."
    return f"model.tokenizer: {name} not found (no such folder)." if _looks_like_a_path(name) else None


def model_config(model: ModelConfig) -> tuple[dict, str] | None:
    """The model's config (as config.json holds it) and where it was read, without loading any weights: a local
    folder's config.json, a GGUF's converted folder or else its header, or a hub id's config.json in the local hub
    cache. None when it cannot be read here (a hub id not downloaded, a damaged file): checks that need it are
    skipped, and loading reports the rest."""
    from finetune.models.gguf import converted_folder, gguf_config

    if model.name_or_path is None:  # a new model from model.config: nothing to read yet
        return None
    try:
        name = local_name(model)
    except FinetuneError:
        return None
    folder = Path(name).expanduser()
    try:
        if model.gguf_file:
            source = folder / model.gguf_file
            if (converted_folder(source) / "config.json").is_file():
                return _json_object(converted_folder(source) / "config.json"), model.gguf_file
            return gguf_config(source), model.gguf_file
        if (folder / "config.json").is_file():
            return _json_object(folder / "config.json"), f"{model.name_or_path.rstrip('/')}/config.json"
        if folder.exists() or _looks_like_a_path(name):
            return None
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=model.revision)  # the cache only, no network
        return (_json_object(Path(cached)), f"{name}'s config.json") if isinstance(cached, str) else None
    except (OSError, ValueError, UnicodeDecodeError):  # unreadable, not JSON, not GGUF, not a hub id
        return None


def _json_object(path: Path) -> dict:
    config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    return config


def read_pickled_state_dict(path: Path, key: str = "model.weights_file") -> dict:
    """A state dict from a pickle, read with `torch.load(weights_only=True)`: tensors and plain containers only, so
    nothing in the file runs. Anything else in it is refused with the reason, naming the recipe's `key`."""
    import pickle

    import torch

    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))  # the function or class the pickle wanted to call
        detail = f"it calls {found[1]}" if found else str(exc).strip().splitlines()[0]
        raise FinetuneError(
            f"{key}: {path} holds more than tensors, so torch.load(weights_only=True) refused it and "
            f"nothing in it was run ({detail}). Use a checkpoint that is a plain state dict, or safetensors."
        ) from None
    except Exception as exc:  # torch raises many types for a file that is not a torch pickle at all
        raise FinetuneError(f"{key}: {path} is not a PyTorch weights file ({type(exc).__name__}: {exc}).") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        keys = list(state_dict)[:5] if isinstance(state_dict, dict) else []
        what = f"a dict with keys {keys}" if keys else type(state_dict).__name__
        raise FinetuneError(
            f"{key}: {path} is not a state dict of tensors (it holds {what}); save the model's "
            "state_dict() alone."
        )
    return state_dict


def convert_pickled_weights(model: ModelConfig) -> Path:
    """The safetensors folder for `model.weights_file`, converted once and cached (keyed by the file's path, size
    and mtime, written to a temporary folder renamed at the end, one process at a time), like a GGUF."""
    from filelock import FileLock

    folder = Path(local_name(model)).expanduser()
    problem = model_problem(model)
    if problem:
        raise FinetuneError(problem)
    source = folder / model.weights_file
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    target = cache_dir() / "weights" / f"{folder.name}-{source.stem}-{key}"
    if (target / "config.json").is_file():  # renamed into place only when complete
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        log.info("Reading %s with torch.load(weights_only=True) once; cached as safetensors in %s", source, target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".partial-"))
        try:
            _write_safetensors_copy(folder, source, model.trust_remote_code, tmp)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_safetensors_copy(folder: Path, source: Path, trust_remote_code: bool, out: Path) -> None:
    """The model built from the folder's config and the state dict (the checkpoint's own architecture, so its keys
    match), saved with save_pretrained; config, tokenizer and template files are copied beside it."""
    import torch
    import transformers
    from transformers import AutoConfig

    state_dict = read_pickled_state_dict(source)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    if model_class is None:
        raise FinetuneError(
            f"model.weights_file: {folder / 'config.json'} names no transformers architecture "
            f"({architecture or 'no architectures'}), so the weights cannot be matched to a model; convert them yourself."
        )
    floats = [t.dtype for t in state_dict.values() if t.dtype.is_floating_point]
    dtype = max(set(floats), key=floats.count) if floats else torch.float32
    # Mismatched shapes are collected in `info` (and reported below) instead of raised as transformers' RuntimeError.
    model, info = model_class.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True
    )
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:
        parts = [f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if keys]  # fmt: skip
        raise FinetuneError(
            f"model.weights_file: {source} does not fit the {architecture} in {folder / 'config.json'} ({'; '.join(parts)})."
        )
    for path in folder.iterdir():
        kept = path.suffix in _KEPT_SUFFIXES or (trust_remote_code and path.suffix == ".py")
        # Not another checkpoint's index, nor an adapter config (transformers would load that adapter on top).
        if path.is_file() and kept and not path.name.endswith(".index.json") and path.name != "adapter_config.json":
            shutil.copy2(path, out / path.name)
    model.save_pretrained(out)
