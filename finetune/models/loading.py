"""Loading the base model and its tokenizer as the recipe says: path resolution, dtype, quantization."""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

from finetune.dtypes import torch_dtype
from finetune.errors import FinetuneError
from finetune.models.gguf import convert_gguf
from finetune.models.quantization import build_bnb_config, compute_dtype_name
from finetune.paths import PACKAGE_SCHEME, resolve_package_path
from finetune.recipe import ModelConfig, Recipe
from finetune.runtime import Runtime

log = logging.getLogger(__name__)


def resolve_model_path(model: ModelConfig) -> str:
    """A path or hub id that `from_pretrained` can load without `gguf_file` (GGUF is converted once and cached)."""
    name = model.name_or_path
    if name.startswith(PACKAGE_SCHEME):
        name = str(resolve_package_path(name))
    if model.gguf_file:
        return str(convert_gguf(Path(name), model.gguf_file))
    return name


def load_base(recipe: Recipe):
    """The base model's loadable path and its tokenizer.

    The main process resolves the path first (a GGUF is converted once and cached); the other ranks then read
    its cache instead of converting at the same time.
    """
    from accelerate import PartialState

    from finetune.models.loading import resolve_model_path

    with PartialState().main_process_first():
        path = resolve_model_path(recipe.model)
    return path, load_tokenizer(recipe, path)


def load_tokenizer(recipe: Recipe, path: str):
    from transformers import AutoTokenizer

    from finetune.models.templates import resolve_chat_template

    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
    )
    if recipe.model.chat_template:
        tokenizer.chat_template = resolve_chat_template(recipe.model.chat_template)
    if tokenizer.pad_token is None:
        # Padding positions are masked out of the loss and attention, so reusing eos is safe here.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class _OnceFilter(logging.Filter):
    """Let each distinct message through once: bitsandbytes warns on every 8-bit matmul call."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def load_model(recipe: Recipe, runtime: Runtime, path: str, auto_class, **kwargs):
    """Load the base model in the runtime's dtype, quantized when the recipe asks."""
    bnb = build_bnb_config(recipe, runtime)
    dtype_name = recipe.model.dtype if recipe.model.dtype != "auto" else runtime.precision
    if bnb is not None:
        # Non-quantized modules (norms, head) stay in the compute dtype; bitsandbytes owns the linear weights.
        dtype_name = compute_dtype_name(recipe, runtime)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
        if not any(isinstance(f, _OnceFilter) for f in bnb_log.filters):
            bnb_log.addFilter(_OnceFilter())
        kwargs.setdefault("device_map", {"": local_rank if runtime.device == "cuda" else "cpu"})
    try:
        model = auto_class.from_pretrained(
            path,
            dtype=torch_dtype(dtype_name),
            quantization_config=bnb,
            revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
            attn_implementation=recipe.model.attn_implementation,
            **kwargs,
        )
    except OSError as exc:
        raise FinetuneError(f"model.name_or_path: cannot load {path!r}: {exc}") from None
    return model


@contextmanager
def quiet_transformers():
    """Silence transformers' load reports and progress bars (and bitsandbytes' 8-bit cast notice) while the kit loads
    a model whose report it makes itself (a merge's check, a classifier whose head comes with its adapter)."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
