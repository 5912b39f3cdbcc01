"""Loading the base model and its tokenizer as the recipe says: path resolution, dtype, quantization."""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

from finetune.dtypes import torch_dtype
from finetune.errors import FinetuneError
from finetune.models.checkpoint import convert_pickled_weights, folder_problem, local_name, model_problem
from finetune.models.gguf import convert_gguf
from finetune.models.quantization import build_bnb_config, compute_dtype_name
from finetune.recipe import ModelConfig, Recipe
from finetune.runtime import Runtime

log = logging.getLogger(__name__)


def resolve_model_path(model: ModelConfig) -> str:
    """A path or hub id that `from_pretrained` can load from safetensors, checked before anything loads: a folder
    that is not a model is refused; a GGUF, or a pickle named in `model.weights_file`, is converted once and cached."""
    name = local_name(model)
    if model.gguf_file:
        return str(convert_gguf(Path(name), model.gguf_file))
    if model.weights_file:
        with quiet_transformers():
            return str(convert_pickled_weights(model))
    problem = model_problem(model)
    if problem:
        raise FinetuneError(problem)
    return name


def load_failure(key: str | None, path: str, exc: Exception, what: str = "model") -> FinetuneError:
    """One message for a `from_pretrained` that failed on the user's input: remote code not allowed, a hub id that is
    not cached while offline or unreachable, a hub model without safetensors, or whatever transformers said."""
    from huggingface_hub.constants import is_offline_mode

    where = f"{key}: " if key else ""
    text = str(exc).strip()
    if "trust_remote_code" in text:
        return FinetuneError(
            f"{where}{path} ships its own model code, which the kit runs only when the recipe sets "
            "model.trust_remote_code: true (it executes code that came with the checkpoint)."
        )
    if not Path(path).exists():
        if is_offline_mode() or "couldn't connect" in text.lower():
            why = "offline mode is on (HF_HUB_OFFLINE)" if is_offline_mode() else "the hub cannot be reached"
            return FinetuneError(
                f"{where}{path} is not a local folder and not in the hub cache, and {why}. Download it once with "
                f"network access (`hf download {path}`), or give a local model folder."
            )
        if "cannot be loaded with `safetensors`" in text:
            return FinetuneError(
                f"{where}{path} has no safetensors weights on the hub, only pickles, and unpickling runs any code the "
                "file carries, so the kit does not load them. Download the folder and name its weights file in "
                "model.weights_file (read with torch.load(weights_only=True)), or use a safetensors copy."
            )
    first = text.splitlines()[0] if text else type(exc).__name__
    return FinetuneError(f"{where}cannot load the {what} from {path}: {first}")


def load_checkpoint(model_class, path, key: str | None, trust_remote_code: bool = False, **kwargs):
    """`model_class.from_pretrained(path)` the kit's way: weights from safetensors only, code shipped with the checkpoint
    run only when the recipe turns it on, and a folder or hub id that cannot load is one message naming `key`."""
    from safetensors import SafetensorError

    if Path(path).is_dir():
        problem = folder_problem(Path(path))
        if problem:
            raise FinetuneError(f"{key}: {problem}" if key else problem)
    try:
        return model_class.from_pretrained(path, use_safetensors=True, trust_remote_code=trust_remote_code, **kwargs)
    except SafetensorError as exc:
        where = f"{key}: " if key else ""
        raise FinetuneError(f"{where}the safetensors weights in {path} cannot be read ({exc}); the file is damaged.") from None
    except OSError as exc:  # transformers' "not found / not cached / not reachable / not valid JSON"
        raise load_failure(key, str(path), exc) from None
    except ValueError as exc:
        if "trust_remote_code" not in str(exc) and "Unrecognized" not in str(exc):
            raise
        raise load_failure(key, str(path), exc) from None


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


# Any of these makes a folder hold a tokenizer (fast, sentencepiece, WordPiece or BPE vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(recipe: Recipe, path: str):
    from transformers import AutoTokenizer

    from finetune.models.templates import resolve_chat_template

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
        )
    except (OSError, ValueError) as exc:  # not cached while offline, remote code not allowed, no tokenizer files
        if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
            raise FinetuneError(f"model.name_or_path: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}).") from None
        raise load_failure("model.name_or_path", path, exc, what="tokenizer") from None
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
    return load_checkpoint(
        auto_class,
        path,
        "model.name_or_path",
        trust_remote_code=recipe.model.trust_remote_code,
        dtype=torch_dtype(dtype_name),
        quantization_config=bnb,
        revision=recipe.model.revision,
        attn_implementation=recipe.model.attn_implementation,
        **kwargs,
    )


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
