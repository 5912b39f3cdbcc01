"""Shared fixtures: tiny random models and tokenizers built offline; no network, ever."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Set before transformers/datasets are imported anywhere in the test session.
_HF_HOME = tempfile.mkdtemp(prefix="finetune-tests-hf-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = _HF_HOME
os.environ.setdefault("FINETUNE_CACHE", str(Path(_HF_HOME) / "finetune"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
# DeepSpeed JIT-compiles its CPU communication op once (~1-3 min); keep it in the checkout's cache.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "torch_extensions"))

import pytest  # noqa: E402

from support import REPO, build_tiny_bert, build_tiny_llama, build_tokenizer  # noqa: E402,F401


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    build_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """Session-wide tiny Llama checkpoint folder (hidden 32). Treat as read-only."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def llama64(tmp_path_factory) -> Path:
    """Session-wide tiny Llama with hidden 64. Treat as read-only.

    bitsandbytes' CPU 4-bit kernels work on blocks of 64 input features: hidden 32 is too small to quantize."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-64"), hidden=64)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """Session-wide tiny BERT encoder folder (no head: classification adds one). Treat as read-only."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_resnet_dir(tmp_path_factory) -> Path:
    """Session-wide tiny random ResNet (BatchNorm, 5-class head). Treat as read-only."""
    from support import build_tiny_resnet

    return build_tiny_resnet(tmp_path_factory.mktemp("tiny-resnet"))


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    """Session-wide tiny random ViT (32x32 images, 5-class head). Treat as read-only."""
    from support import build_tiny_vit

    return build_tiny_vit(tmp_path_factory.mktemp("tiny-vit"))


@pytest.fixture(scope="session")
def toy_images_dir(tmp_path_factory) -> Path:
    """Session-wide folder of class folders: 3 colours x 12 noisy 32x32 PNGs. Treat as read-only."""
    from support import write_toy_images

    return write_toy_images(tmp_path_factory.mktemp("toy-images"))
