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

REPO = Path(__file__).resolve().parent.parent

WORDS = (
    "the a an is are was what who where when how why which capital color colour of in on at to from and or "
    "paris london rome berlin madrid red green blue yellow black white one two three four five six seven eight "
    "nine ten cat dog bird fish sun moon star tree river sea mountain city country france england italy germany "
    "spain yes no hello hi thanks please good bad big small fast slow question answer user assistant system "
    "you i we they it this that number plus minus equals name my your kit recipe model adapter train"
).split()


def _corpus() -> list[str]:
    lines = [" ".join(WORDS[i : i + 12]) for i in range(0, len(WORDS), 6)]
    return lines * 4 + ["user assistant system hello what is the capital of france paris"]


def build_tokenizer(folder: Path, model_max_length: int = 256):
    """The tests' word-level tokenizer (ChatML specials and template), built offline from WORDS."""
    from finetune.tiny import build_tokenizer as build

    tokenizer = build(_corpus(), model_max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    build_tokenizer(folder)
    return folder


def build_tiny_llama(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A 2-layer random Llama (hidden 32) with the tests' tokenizer saved beside it."""
    from finetune.tiny import write_tiny_llama

    write_tiny_llama(folder, _corpus(), hidden=hidden, layers=layers, max_length=256, seed=seed)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """Session-wide tiny Llama checkpoint folder. Treat as read-only."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def build_tiny_bert(folder: Path, hidden: int = 32, seed: int = 0) -> Path:
    """A 2-layer random BERT (hidden 32, 128 positions) with a WordPiece tokenizer built offline from WORDS."""
    from finetune.tiny import write_tiny_bert

    write_tiny_bert(folder, _corpus(), hidden=hidden, layers=2, max_length=128, seed=seed)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """Session-wide tiny BERT encoder folder (no head: classification adds one). Treat as read-only."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
