"""A pretraining corpus as token ids, packed into blocks of `data.max_length` tokens.

Each split's documents are tokenized once, each followed by the end-of-text token, into one flat file of ids
(nanoGPT's `train.bin`), cached by content and memory-mapped; block i of a split is its ids [i*L, (i+1)*L), and the
labels are the ids (the model shifts them). So a corpus of any size streams (one document in memory at a time), the
token count is exact before training starts, every token of a split is in exactly one block but for the last partial
block (dropped, and counted), and the two splits are separate files: no block crosses from the training documents into
the held-out ones. Blocks do cross document boundaries, and so does attention within a block, as in GPT-2 and nanoGPT
pretraining: the end-of-text token is what tells the model that a new document starts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from finetune.data.cache import code_digest, fingerprint, tokenizer_fingerprint
from finetune.data.text import EMPTY_CORPUS, Corpus, Tally
from finetune.errors import DataError

ENTRY = "entry.json"  # written last, into the folder before it is renamed into place: no entry, no cache hit


@dataclass
class TokenSplit:
    """One split's ids in a flat file: `tokens` ids of `dtype`, from `documents` documents."""

    path: Path
    tokens: int
    documents: int
    dtype: str

    def ids(self):
        """The ids, memory-mapped read-only (nothing is loaded until a block is read)."""
        import numpy as np

        if self.tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.tokens,))


@dataclass
class TokenizedCorpus:
    """Both splits' ids, where they are cached, and what reading the documents left out."""

    train: TokenSplit
    eval: TokenSplit | None
    folder: Path
    cached: bool  # read from the cache, not tokenized now
    empty_documents: int = 0
    skipped_rows: int = 0


def document_ids(tokenizer) -> tuple[list[int], int]:
    """The ids before each document (the tokenizer's BOS, when it adds one itself) and the id after it (EOS)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no end-of-text (EOS) token to separate documents with; pretraining needs one.")
    probe = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    prefix = [bos] if bos is not None and probe and probe[0] == bos and bos != tokenizer.eos_token_id else []
    return prefix, tokenizer.eos_token_id


def id_dtype(tokenizer) -> str:
    return "uint16" if len(tokenizer) <= 2**16 else "uint32"


def tokenize_corpus(corpus: Corpus, tokenizer, cache: Path, main_first=None) -> TokenizedCorpus:
    """The corpus' ids, from the cache (keyed by the corpus' content, the tokenizer and this code) or tokenized now
    and cached. `main_first` (accelerate's `main_process_first`) lets the main process tokenize while the others wait."""
    import tokenizers
    import transformers

    prefix, eos = document_ids(tokenizer)
    key = fingerprint(
        "pretrain-tokens", _code(), corpus.fingerprint(), tokenizer_fingerprint(tokenizer), prefix, eos, id_dtype(tokenizer),
        tokenizers.__version__, transformers.__version__,
    )
    folder = cache / key
    with main_first() if main_first is not None else contextlib.nullcontext():
        found = _read_entry(folder)
        if found is None:
            found = _write_entry(folder, corpus, tokenizer, prefix, eos)
    return found


def _code() -> str:
    from finetune.data import cache, text

    return code_digest(__file__, text.__file__, cache.__file__)


def _write_entry(folder: Path, corpus: Corpus, tokenizer, prefix: list[int], eos: int) -> TokenizedCorpus:
    dtype = id_dtype(tokenizer)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tally = Tally()
    splits = {"train": _write_split(corpus.train_texts(tally), tokenizer, partial / "train.bin", dtype, prefix, eos)}
    if corpus.has_eval:
        splits["eval"] = _write_split(corpus.eval_texts(tally), tokenizer, partial / "eval.bin", dtype, prefix, eos)
    meta = {"dtype": dtype, "splits": splits, "empty_documents": tally.empty, "skipped_rows": tally.skipped,
            "problems": tally.problems[:20]}
    (partial / ENTRY).write_text(json.dumps(meta))
    try:
        partial.rename(folder)
    except OSError:  # another process (another node's main rank) finished first: use its copy
        shutil.rmtree(partial, ignore_errors=True)
    found = _read_entry(folder)
    found.cached = False
    return found


def _write_split(texts: Iterator[str], tokenizer, path: Path, dtype: str, prefix: list[int], eos: int) -> dict:
    """Append each document's ids and EOS to `path`, tokenizing batches of about a megabyte of text at a time."""
    import numpy as np

    tokens = documents = 0
    with open(path, "wb") as fh:

        def flush(batch: list[str]) -> None:
            nonlocal tokens, documents
            # Raw text never makes a special token: a literal "<|endoftext|>" in a document is text, not its end.
            # verbose=False: a document longer than the model's context is expected here, not worth a warning.
            encoded = tokenizer(batch, add_special_tokens=False, split_special_tokens=True, verbose=False)
            for ids in encoded["input_ids"]:
                block = np.asarray([*prefix, *ids, eos], dtype=dtype)
                fh.write(block.tobytes())
                tokens += len(block)
                documents += 1

        batch, size = [], 0
        for text in texts:
            batch.append(text)
            size += len(text)
            if size >= 1 << 20:
                flush(batch)
                batch, size = [], 0
        if batch:
            flush(batch)
    return {"tokens": tokens, "documents": documents}


def _read_entry(folder: Path) -> TokenizedCorpus | None:
    """The cached corpus in `folder`, or None; a damaged entry (files cut short, bad meta) is removed."""
    import logging

    if not (folder / ENTRY).is_file():
        return None
    try:
        meta = json.loads((folder / ENTRY).read_text())
        splits = {}
        for name, counts in meta["splits"].items():
            split = TokenSplit(folder / f"{name}.bin", int(counts["tokens"]), int(counts["documents"]), meta["dtype"])
            expected = split.tokens * (2 if split.dtype == "uint16" else 4)
            if split.path.stat().st_size != expected:
                raise ValueError(f"{split.path.name} holds {split.path.stat().st_size} bytes, expected {expected}")
            splits[name] = split
        return TokenizedCorpus(splits["train"], splits.get("eval"), folder, True, meta["empty_documents"], meta["skipped_rows"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logging.getLogger(__name__).warning("Ignoring a damaged cache entry %s (%s); tokenizing again", folder, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None


class Blocks:
    """The blocks of one split, for a `DataLoader`: row i is `{"input_ids", "labels"}` of ids [i*L, (i+1)*L)."""

    def __init__(self, split: TokenSplit, length: int):
        self.split = split
        self.length = length
        self._ids = None  # opened on first use, in the process that reads (DataLoader workers included)

    def __len__(self) -> int:
        return self.split.tokens // self.length

    @property
    def dropped(self) -> int:
        """Ids after the last whole block: too few for a block of their own, so not trained on."""
        return self.split.tokens - len(self) * self.length

    def __getitem__(self, index: int) -> dict:
        import numpy as np

        if not 0 <= index < len(self):
            raise IndexError(index)
        if self._ids is None:
            self._ids = self.split.ids()
        ids = np.asarray(self._ids[index * self.length : (index + 1) * self.length], dtype=np.int64)
        return {"input_ids": ids, "labels": ids.copy()}

    def __getstate__(self) -> dict:  # a memmap is reopened, not pickled, by another process
        return {**self.__dict__, "_ids": None}


def check_blocks(corpus: TokenizedCorpus, length: int) -> None:
    """The errors that make training pointless: an empty corpus, or one smaller than a block, for either split."""
    for key, split in (("data.train", corpus.train), ("data.eval", corpus.eval)):
        if split is None:
            continue
        what = "the held-out split" if key == "data.eval" else "the training corpus"
        if split.documents == 0:
            raise DataError(EMPTY_CORPUS if key == "data.train" else f"{key}: {what} is empty: no document has any text.")
        if split.tokens < length:
            documents = f"{split.documents:,} document" + ("s" if split.documents != 1 else "")
            raise DataError(
                f"{key}: {what} is {split.tokens:,} tokens ({documents}), less than one block of "
                f"data.max_length {length} tokens; lower data.max_length or add text."
            )


def unigram_baseline(train: TokenSplit, eval_blocks: Blocks, vocab_size: int) -> dict:
    """The cross-entropy of the held-out blocks' targets (each block's ids after its first, as the model predicts
    them) under the add-one smoothed unigram distribution of the training tokens, and its perplexity: the score of a
    model that knows each token's frequency and nothing else."""
    import numpy as np

    counts = np.ones(vocab_size, dtype=np.float64)  # add-one (Laplace) smoothing: no held-out token has probability 0
    ids = train.ids()
    for start in range(0, train.tokens, 1 << 24):
        counts += np.bincount(np.asarray(ids[start : start + (1 << 24)], dtype=np.int64), minlength=vocab_size)[:vocab_size]
    log_p = np.log(counts / counts.sum())
    total, n = 0.0, 0
    held = eval_blocks.split.ids()
    L = eval_blocks.length
    for start in range(0, len(eval_blocks), 4096):
        stop = min(len(eval_blocks), start + 4096)
        targets = np.asarray(held[start * L : stop * L], dtype=np.int64).reshape(-1, L)[:, 1:]
        total -= log_p[targets].sum()
        n += targets.size
    loss = total / max(1, n)
    return {"cross_entropy": round(float(loss), 4), "perplexity": round(math.exp(loss), 2), "targets": int(n)}


def report_facts(corpus: Corpus, tokenizer, max_length: int, micro_batch_size: int):
    """The corpus' documents as `tokenize_corpus` tokenizes them (BOS prefix, EOS after each), for the data report:
    one row per document, every token trained, none cut (documents are packed into blocks)."""
    from finetune.data.report import DataFacts, RowFacts, Tally

    prefix, eos = document_ids(tokenizer)
    tally = Tally()

    def facts():
        for split, texts in (("train", corpus.train_texts(tally)), ("eval", corpus.eval_texts(tally))):
            for number, text in enumerate(texts, 1):
                ids = [*prefix, *tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"], eos]
                yield RowFacts(split=split, origin=f"{split} document {number}", text=text, tokens=len(ids),
                               trained=len(ids), kept=len(ids), trained_kept=len(ids), ids=ids, trained_mask=[True] * len(ids))

    return DataFacts(rows=facts(), batching="blocks", max_length=max_length, micro_batch_size=micro_batch_size,
                     tally=tally, decode=tokenizer.decode)
