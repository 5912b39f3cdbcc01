"""A byte-level BPE tokenizer trained on a corpus, for a model pretrained from scratch, cached by the corpus' content.

Byte-level (GPT-2's scheme): any text is bytes, every byte is a token, so any text encodes and decodes back exactly,
with no unknown token. The special tokens: `<|endoftext|>` ends each document (and starts the samples),
`<|pad|>` pads, and `<|im_start|>` / `<|im_end|>` are reserved so the pretrained model can be fine-tuned on chats with
the ChatML template it carries. The tokenizers library's BPE trainer breaks ties by pair ids, so the same corpus and
size give the same tokenizer in every process.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

from finetune.data.cache import code_digest, fingerprint
from finetune.models.templates import BUILTIN

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [END_OF_TEXT, PAD, "<|im_start|>", "<|im_end|>"]


def train_bpe(texts: Iterable[str], vocab_size: int, model_max_length: int | None = None):
    """A `PreTrainedTokenizerFast` of `vocab_size` tokens (specials included) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=END_OF_TEXT, bos_token=END_OF_TEXT, pad_token=PAD,
        extra_special_tokens=SPECIAL_TOKENS[2:],  # the chat tokens count as special (SFT stops on <|im_end|>)
        model_max_length=model_max_length or int(1e30),  # transformers' "no limit"; the run sets the model's context
        clean_up_tokenization_spaces=False,  # decoding gives back the bytes, " ." and " 's" included
    )
    tokenizer.chat_template = BUILTIN["chatml"]
    return tokenizer


def cached_bpe(texts: Iterable[str], corpus_key: str, vocab_size: int, cache: Path):
    """The BPE for the corpus named `corpus_key`: read from `cache` when trained before, else trained on `texts` and
    saved there (whole or not at all). Returns the tokenizer, its folder and whether it came from the cache."""
    from transformers import AutoTokenizer

    key = fingerprint("bpe", code_digest(__file__), corpus_key, vocab_size, _versions())
    folder = cache / f"bpe-{vocab_size}-{key}"
    if (folder / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(folder)), folder, True
        except Exception:  # noqa: BLE001 - a damaged entry is retrained, never a failed run
            shutil.rmtree(folder, ignore_errors=True)
    tokenizer = train_bpe(texts, vocab_size)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer.save_pretrained(str(partial))
    try:
        partial.rename(folder)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(partial, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(folder)), folder, False


def _versions() -> tuple[str, str]:
    import tokenizers
    import transformers

    return tokenizers.__version__, transformers.__version__
