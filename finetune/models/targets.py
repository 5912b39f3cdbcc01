"""The modules a recipe names (`adapter.target_modules`, `adapter.modules_to_save`, `quantization.skip_modules`,
an image model's `image.head`), resolved against the model's own module names before any weights load.

Names a local checkpoint's safetensors headers show (each target a weight matrix) are confirmed from the headers
alone. Otherwise the model is built from its config on the meta device (no memory, no weights): a folder's or the hub
cache's config.json, a converted GGUF's, or a GGUF's header mapped to a config as transformers maps it; an image
model by `models/vision/`, whose own rules pick its LoRA targets. A language model's module names and types are
cached by its config, so a later check reads one small JSON file and imports neither torch nor transformers.
Entries match the way PEFT and transformers match them: a name or a `.`-suffix, one regular expression matched
against whole names, `all-linear`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.paths import cache_dir
from finetune.recipe import Recipe
from finetune.recipe.schema import is_pattern

log = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
_CACHE_VERSION = 1


@dataclass(frozen=True)
class Module:
    name: str  # full name, as `named_modules()` gives it
    kind: str  # its class name (`Linear`, `LlamaRMSNorm`, `LlamaDecoderLayer`...)
    lora: bool  # a layer PEFT's LoRA adapts (linear, embedding, convolution)
    linear: bool  # what `all-linear` takes (nn.Linear and transformers' Conv1D)
    block: bool  # holds other modules

    @property
    def leaf_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ModelModules:
    """A model's modules in model order, and the output layers `all-linear` leaves out (the LM head, a classifier's)."""

    model: str  # the model's name in messages
    modules: tuple[Module, ...]
    heads: tuple[str, ...]

    def linear_names(self) -> list[str]:
        """The distinct last parts of the linear layers' names (q_proj, k_proj...), in model order, heads left out."""
        names: list[str] = []
        for m in self.modules:
            if m.linear and m.name not in self.heads and m.leaf_name not in names:
                names.append(m.leaf_name)
        return names


# --------------------------------------------------------------------------------------------
# Matching, as PEFT and transformers match
# --------------------------------------------------------------------------------------------


def target_matches(entry: str, name: str) -> bool:
    """PEFT's `check_target_module_exists`: a pattern matches whole names; a name matches itself or a `.`-suffix."""
    if is_pattern(entry):
        return re.fullmatch(entry, name) is not None
    return name == entry or name.endswith("." + entry)


def saved_matches(entry: str, name: str) -> bool:
    """PEFT's `modules_to_save`: the name ends with the entry."""
    return name.endswith(entry)


def skip_matches(entry: str, name: str) -> bool:
    """transformers' `should_convert_module` (quantization's skipped modules): from the start up to a module
    boundary, as a regular expression with that boundary, or as a suffix."""
    try:
        return re.match(rf"(?:{entry})(?:(?<=\.)|(?=\.|$))", name) is not None or name.endswith(entry)
    except re.error:
        return name.endswith(entry)


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


def module_name_problems(recipe: Recipe, found: ModelModules) -> list[str]:
    """What the recipe names that the model does not have, one message per key."""
    problems = []
    a = recipe.adapter
    if a.type in ("lora", "qlora"):
        problems += _target_problems(a.target_modules, found)
        problems += _unmatched("adapter.modules_to_save", a.modules_to_save or [], found, saved_matches)
    if recipe.quantization.bits is not None:
        problems += _unmatched("quantization.skip_modules", recipe.quantization.skip_modules or [], found, skip_matches)
    return problems


def recipe_module_problems(recipe: Recipe, model: str) -> list[str]:
    """Every module the recipe names, checked against the model's own names. `model` is what the task builds:
    `causal_lm`, `classifier` (a sequence classifier) or `images` (an image classifier)."""
    if recipe.model.name_or_path is None:  # a new model (model.config): nothing to name yet
        return []
    if model == "images":
        return _image_problems(recipe)
    named = _named_entries(recipe)
    if not any(named.values()):  # all-linear alone names no module: nothing to look up
        return []
    cached = language_model_modules(recipe, classifier=model == "classifier", build=False)
    if cached is None and _checkpoint_shows(recipe, named):
        return []  # the checkpoint's tensor names show every entry, so the check needs neither torch nor a build
    found = cached or language_model_modules(recipe, classifier=model == "classifier")
    return module_name_problems(recipe, found) if found else []


def _named_entries(recipe: Recipe) -> dict[str, list[str]]:
    """The entries that name modules, by key; `all-linear` names none."""
    a, q = recipe.adapter, recipe.quantization
    lora = a.type in ("lora", "qlora")
    return {
        "adapter.target_modules": [t for t in a.target_modules if t != ALL_LINEAR] if lora else [],
        "adapter.modules_to_save": list(a.modules_to_save or []) if lora else [],
        "quantization.skip_modules": list(q.skip_modules or []) if q.bits is not None else [],
    }


# Configs of mixture-of-experts models: transformers 5 fuses their experts' checkpoint tensors into one parameter on
# load, so the checkpoint's names are not the model's modules there.
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


def _checkpoint_shows(recipe: Recipe, named: dict[str, list[str]]) -> bool:
    """Whether the local checkpoint's tensor names (its safetensors headers, read without the weights) show that
    every named entry exists: each target a weight matrix, each other entry some module. Only a yes is trusted; a
    no (or no checkpoint here) leaves the answer to the model built on the meta device, which also words the message."""
    from finetune.models.checkpoint import model_config

    found = model_config(recipe.model)
    if found is None or any(k in found[0] or k in (found[0].get("text_config") or {}) for k in _EXPERT_KEYS):
        return False
    if any(is_pattern(e) for entries in named.values() for e in entries):
        return False  # a pattern matches whole names, and a checkpoint's prefixes may differ from the model's
    shapes = checkpoint_shapes(recipe)
    if not shapes:
        return False
    matrices = {name.rsplit(".", 1)[0] for name, shape in shapes.items() if name.endswith(".weight") and len(shape) >= 2}
    parents = {name.rsplit(".", 1)[0] for name in shapes} | {p for n in shapes for p in _prefixes(n)}
    blocks = {p for m in matrices for p in _prefixes(m + ".weight")}  # modules that hold other modules
    for entry in named["adapter.target_modules"]:
        matched = [m for m in parents if target_matches(entry, m)]
        if not matched or any(m not in matrices or m in blocks for m in matched):
            return False
    checks = (("adapter.modules_to_save", saved_matches), ("quantization.skip_modules", skip_matches))
    return all(any(match(e, m) for m in parents) for key, match in checks for e in named[key])


def _prefixes(name: str) -> list[str]:
    """The modules above a tensor's own module: `a.b.c.weight` -> `a`, `a.b`."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) - 1)]


def checkpoint_shapes(recipe: Recipe) -> dict[str, list[int]]:
    """Tensor name -> shape of the recipe's local safetensors checkpoint (a folder, or a GGUF's converted folder),
    from the files' headers alone; empty when there is none here."""
    import struct

    from finetune.models.checkpoint import local_name
    from finetune.models.gguf import converted_folder

    m = recipe.model
    try:
        folder = Path(local_name(m)).expanduser()
        if m.gguf_file:
            folder = converted_folder(folder / m.gguf_file)
        elif m.weights_file:
            return {}
        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
        shapes: dict[str, list[int]] = {}
        for file in files:
            with open(folder / file, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                if size > 100_000_000:
                    return {}
                header = json.loads(fh.read(size))
            shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
        return shapes
    except (FinetuneError, OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
        return {}


def _image_problems(recipe: Recipe) -> list[str]:
    """An image model's head (`image.head`) and LoRA targets, resolved per architecture as training resolves them."""
    from finetune.models.vision import build_empty_model, find_heads, lora_targets

    if recipe.adapter.type != "lora" and recipe.image.head is None:
        return []
    built = build_empty_model(recipe)
    if built is None:
        return []
    try:
        heads = find_heads(built, 2, recipe.image.head)
    except FinetuneError as exc:  # a head found by its label count is only known with the real labels
        return [str(exc)] if recipe.image.head else []
    try:
        if recipe.adapter.type == "lora":
            lora_targets(built.model, recipe, heads)
    except FinetuneError as exc:
        return [str(exc)]
    return []


def _linear_list(found: ModelModules) -> str:
    names = found.linear_names()
    shown = ", ".join(names[:24]) + (f", ... ({len(names)} in all)" if len(names) > 24 else "")
    return f"Its linear layers: {shown}." if names else "It has no linear layers."


def _did_you_mean(entry: str, found: ModelModules) -> str:
    if is_pattern(entry):
        return ""
    leaves = list(dict.fromkeys(m.leaf_name for m in found.modules if m.lora or not m.block))
    close = difflib.get_close_matches(entry.rsplit(".", 1)[-1], leaves, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _target_problems(targets: list[str], found: ModelModules) -> list[str]:
    if targets == [ALL_LINEAR]:
        if not found.linear_names():
            return [f"adapter.target_modules: all-linear: {found.model} has no linear layer outside its output head; "
                    "name the layers to adapt."]  # fmt: skip
        return []
    problems, wrong_type = [], []
    for entry in targets:
        matched = [m for m in found.modules if target_matches(entry, m.name)]
        if not matched:
            what = "regular expression" if is_pattern(entry) else ""
            problems.append(
                f"adapter.target_modules: {what + ' ' if what else ''}'{entry}' matches no module of {found.model}"
                f"{_did_you_mean(entry, found)}."
            )
            continue
        refused = [m for m in matched if not m.lora]
        if refused:
            wrong_type.append(_refusal(entry, refused))
    if not problems and not wrong_type:
        return []
    return [" ".join(problems + wrong_type) + " " + _linear_list(found)]


def _refusal(entry: str, refused: list[Module]) -> str:
    first = refused[0]
    more = f" and {len(refused) - 1} more" if len(refused) > 1 else ""
    if first.block:
        why = "a block of layers, not a layer: name the linear layers inside it"
    elif "norm" in first.kind.lower():
        why = "a normalization layer: it holds a scale vector, not a matrix a low-rank update could be added to"
    else:
        why = "LoRA adapts linear, embedding and convolution layers only"
    return f"adapter.target_modules: '{entry}' matches {first.name} ({first.kind}){more}, which LoRA cannot adapt: {why}."


def _unmatched(key: str, entries: list[str], found: ModelModules, matches) -> list[str]:
    missing = [e for e in entries if not any(matches(e, m.name) for m in found.modules)]
    if not missing:
        return []
    parts = [f"'{e}'{_did_you_mean(e, found)}" for e in missing]
    verb = "matches" if len(missing) == 1 else "match"
    return [f"{key}: {', '.join(parts)} {verb} no module of {found.model}. {_linear_list(found)}"]


# --------------------------------------------------------------------------------------------
# The model's modules, built on the meta device and cached by config
# --------------------------------------------------------------------------------------------


def model_label(recipe: Recipe) -> str:
    """The model's name in messages: the GGUF file without its quantization suffix, a folder's name, a hub id or a
    `package://` path as written."""
    m = recipe.model
    if m.gguf_file:
        return Path(m.gguf_file).name.split(".")[0]
    name = m.name_or_path.rstrip("/")
    return Path(name).name if "://" not in name and Path(name).expanduser().exists() else name


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "none"


def language_model_modules(recipe: Recipe, classifier: bool, build: bool = True) -> ModelModules | None:
    """The modules of the recipe's language model (a causal LM, or a sequence classifier when `classifier`), or None
    when its config cannot be read here (a hub id not in the local cache) or transformers cannot build it (or,
    with `build=False`, when they are not cached yet)."""
    found = _language_config(recipe)
    if found is None:
        return None
    identity, read_config = found
    key = json.dumps([_CACHE_VERSION, identity, classifier, _package_version("transformers")], sort_keys=True, default=str)
    path = cache_dir() / "modules" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    cached = _read_cache(path)
    if cached is None:
        if not build:
            return None
        cached = _build_language_model(recipe, read_config(), classifier)
        if cached is None:
            return None
        _write_cache(path, cached)
    modules, heads = cached
    return ModelModules(model_label(recipe), modules, heads)


def _language_config(recipe: Recipe):
    """What identifies the model's architecture (the config.json as a dict; a GGUF not converted yet: the file), and
    how to read the config transformers would build it from. None when neither can be read here."""
    from finetune.models.checkpoint import local_name, model_config
    from finetune.models.gguf import converted_folder, gguf_metadata

    m = recipe.model
    if m.gguf_file:
        try:
            source = Path(local_name(m)).expanduser() / m.gguf_file
            if not (converted_folder(source) / "config.json").is_file():
                # The file's identity, as its conversion is keyed: mapping its header needs transformers' tables.
                return converted_folder(source).name, lambda: _gguf_as_config(lambda: gguf_metadata(source))
        except (FinetuneError, OSError):
            return None
    found = model_config(m)
    return (found[0], lambda: found[0]) if found else None


def _gguf_as_config(read_metadata) -> dict | None:
    """A GGUF's metadata as the config transformers derives from it (`GGUF_CONFIG_MAPPING`), enough to build the
    architecture: its type, sizes and layer count. None for a file that is not GGUF."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    try:
        metadata = read_metadata()
    except (OSError, ValueError):
        return None
    arch = str(metadata.get("general.architecture"))
    model_type = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss"}.get(arch, arch)
    config: dict = {"model_type": model_type}
    for theirs, ours in GGUF_CONFIG_MAPPING.get(model_type, GGUF_CONFIG_MAPPING.get(arch, {})).items():
        value = metadata.get(f"{arch}.{theirs}")
        if ours and isinstance(value, (int, float)) and not isinstance(value, bool):
            config[ours] = value
    return config


def _build_language_model(recipe: Recipe, config_dict: dict | None, classifier: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from finetune.models.checkpoint import local_name
    from finetune.models.loading import quiet_transformers

    if config_dict is None:
        return None
    model_type = config_dict.get("model_type")
    trust = recipe.model.trust_remote_code
    try:
        with quiet_transformers():
            if model_type in CONFIG_MAPPING:
                config = CONFIG_MAPPING[model_type].from_dict(dict(config_dict))
            elif trust and Path(local_name(recipe.model)).expanduser().is_dir():
                config = AutoConfig.from_pretrained(local_name(recipe.model), trust_remote_code=True, local_files_only=True)
            else:
                return None
            if classifier:
                config.num_labels = max(2, getattr(config, "num_labels", 2))
            auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
            with torch.device("meta"):  # no memory and no initialisation: only the modules' names and types
                model = auto.from_config(config, trust_remote_code=trust)
    except Exception as exc:  # an architecture this transformers cannot build: loading reports it
        log.info("Module names of %s not checked (%s: %s); loading will report it.", recipe.model.name_or_path,
                 type(exc).__name__, exc)
        return None
    return describe_modules(model, _head_names(model, classifier))


def _head_names(model, classifier: bool) -> tuple[str, ...]:
    """What `all-linear` leaves out (PEFT): the output embeddings, else a classifier's head."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = [n for n, m in model.named_modules() if output is not None and m is output]
    if not heads and classifier:
        base = getattr(model, "base_model_prefix", "")
        heads = [n for n, child in model.named_children() if n != base and next(child.parameters(), None) is not None]
    return tuple(heads)


def describe_modules(model, heads: tuple[str, ...] = ()) -> tuple[tuple[Module, ...], tuple[str, ...]]:
    """Every named module of `model` (built on any device) with what LoRA can do with it."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    lora_types = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)
    modules = tuple(
        Module(name, type(m).__name__, isinstance(m, lora_types), isinstance(m, (nn.Linear, Conv1D)),
               next(m.children(), None) is not None and not isinstance(m, lora_types))  # fmt: skip
        for name, m in model.named_modules() if name
    )
    return modules, tuple(heads)


def _read_cache(path: Path):
    try:
        data = json.loads(path.read_text())
        return tuple(Module(*row) for row in data["modules"]), tuple(data["heads"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path, found) -> None:
    modules, heads = found
    data = {"modules": [[m.name, m.kind, m.lora, m.linear, m.block] for m in modules], "heads": list(heads)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{hashlib.sha256(str(id(data)).encode()).hexdigest()[:6]}.tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)  # whole or not at all, whoever else writes the same key
    except OSError as exc:  # a read-only cache only costs the next check its build
        log.debug("Module names not cached in %s: %s", path, exc)
