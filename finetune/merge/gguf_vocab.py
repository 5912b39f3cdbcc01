"""The tokenizer of a GGUF file: a byte-level BPE written from the merged model's tokenizer.json (tokens, types,
merges, llama.cpp's pre-tokenizer name, special ids, chat template), a SentencePiece BPE (Llama 2, Mistral) as
llama.cpp's "llama" vocabulary (pieces, scores, types), or, when the base came from a GGUF, that file's
tokenizer metadata carried over exactly. The EOS is the chat template's end-of-turn token, so generation stops.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import FinetuneError

log = logging.getLogger(__name__)

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) for the byte-level BPEs of the supported families, told apart
# by the pre-tokenizer of tokenizer.json rather than llama.cpp's hash of one tokenized string (the hash list changes
# with every llama.cpp release; the regexes below do not).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX_OLD = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@dataclass
class VocabNotes:
    """What the tokenizer part of the file is, for export_report.json."""

    source: str  # "tokenizer.json" or the GGUF file it was carried over from
    model: str
    pre: str | None
    tokens: int
    eos_token: str | None
    notes: list[str] = field(default_factory=list)


def _pre_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, or None when it is not one llama.cpp implements."""
    if pre is None:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    regexes = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        if regexes[0] == LLAMA3_REGEX:
            return "llama-bpe"
        if regexes[0] in (QWEN2_REGEX, QWEN2_REGEX_OLD):
            return "qwen2"
    return None


def check_tokenizer(folder: Path, source_gguf: Path | None) -> str:
    """Refuse a tokenizer llama.cpp cannot read the way transformers does, before any work; returns its kind."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        if source_gguf is not None:
            return "carried over"
        raise FinetuneError(f"{folder}: no tokenizer.json; a GGUF file needs the model's tokenizer.")
    spec = json.loads(path.read_text())
    model = spec.get("model", {}).get("type")
    if model == "BPE" and spec["model"].get("byte_fallback"):
        return "sentencepiece"
    if model != "BPE":
        if source_gguf is not None:
            return "carried over"
        raise FinetuneError(
            f"{path}: a {model} tokenizer cannot be written to GGUF by finetune export; it writes byte-level BPE "
            "tokenizers (Llama 3, SmolLM2, Qwen) and SentencePiece BPE with byte fallback (Llama 2, Mistral)."
            + (" transformers' GGUF loader reads a SentencePiece vocabulary back as BPE, so a Unigram one could not be"
               " verified." if model == "Unigram" else "")  # fmt: skip
        )
    if _pre_name(spec.get("pre_tokenizer")) is None and source_gguf is None:
        raise FinetuneError(
            f"{path}: its pre-tokenizer is not one llama.cpp implements for BPE (gpt-2, smollm, llama-bpe, qwen2); "
            "llama.cpp would split text differently."
        )
    return "bpe"


def end_of_turn(tokenizer) -> str | None:
    """The special token that ends an assistant turn in the chat template (ChatML's <|im_end|>), if any."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    marker = "\x00ANSWER\x00"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # a template that refuses this conversation: no end-of-turn to learn from it
        return None
    after = text.split(marker, 1)[-1] if marker in text else ""
    specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=after.find)
    return next((t for t in specials if t and t in after), None)


def add_vocab(writer, folder: Path, vocab_size: int) -> VocabNotes:
    """The tokenizer of `folder` in the file: SentencePiece ("llama") or byte-level BPE ("gpt2")."""
    if check_tokenizer(folder, None) == "sentencepiece":
        return add_sentencepiece_vocab(writer, folder, vocab_size)
    return add_bpe_vocab(writer, folder, vocab_size)


def _sentencepiece_pieces(folder: Path, unk_token: str | None) -> list[tuple[str, float, int]]:
    """(piece, score, type) in id order: from tokenizer.model as llama.cpp's `_set_vocab_sentencepiece` reads it,
    else from tokenizer.json's BPE, a merge's score being minus its rank so that merging by score is BPE's order."""
    import gguf

    model_file = folder / "tokenizer.model"
    if model_file.is_file():
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor(model_file=str(model_file))
        pieces = []
        for i in range(sp.vocab_size()):
            kind = gguf.TokenType.NORMAL
            if sp.is_unknown(i):
                kind = gguf.TokenType.UNKNOWN
            elif sp.is_control(i):
                kind = gguf.TokenType.CONTROL
            elif sp.is_unused(i):
                kind = gguf.TokenType.UNUSED
            elif sp.is_byte(i):
                kind = gguf.TokenType.BYTE
            pieces.append((sp.id_to_piece(i), sp.get_score(i), kind))
        return pieces
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    rank = {}
    for r, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    unk = model.get("unk_token") or unk_token  # transformers 5 writes null there and keeps it on the tokenizer
    pieces = []
    for token, i in sorted(model["vocab"].items(), key=lambda kv: kv[1]):
        kind = gguf.TokenType.NORMAL
        if token == unk:
            kind = gguf.TokenType.UNKNOWN
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            kind = gguf.TokenType.BYTE
        # As SentencePiece scores its BPE pieces: merges first by rank, then the other pieces below every merge.
        pieces.append((token, -float(rank[token] if token in rank else len(rank) + i), kind))
    return pieces


def add_sentencepiece_vocab(writer, folder: Path, vocab_size: int) -> VocabNotes:
    """A SentencePiece tokenizer (Llama 2, Mistral) as llama.cpp writes it: model "llama", pieces with scores and
    types (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE for <0xNN>), added tokens over them, special ids, add_bos."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    entries = dict(enumerate(_sentencepiece_pieces(folder, tokenizer.unk_token)))
    for i, added in tokenizer.added_tokens_decoder.items():
        kind = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
        if i not in entries:
            entries[i] = (added.content, -1000.0, kind)
        elif entries[i][2] != gguf.TokenType.UNKNOWN:  # a piece the tokenizer treats as an added (special) token
            entries[i] = (added.content, entries[i][1], kind)
    if max(entries) >= vocab_size:
        raise FinetuneError(f"{folder}: the tokenizer has ids up to {max(entries)}, beyond the model's {vocab_size} rows.")
    # The embedding's rows the tokenizer never produces are UNUSED pads, as llama.cpp's converter writes them.
    pad = lambda i: (f"[PAD{i}]", -1000.0, gguf.TokenType.UNUSED)  # noqa: E731
    tokens, scores, types = (list(column) for column in zip(*(entries.get(i) or pad(i) for i in range(vocab_size))))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, n_vocab=vocab_size)
    # add_bos/add_eos as the tokenizer behaves (transformers 5's add_bos_token attribute can say False while its
    # post-processor adds <s>), so that llama.cpp adds what the model was trained with.
    ids = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = bool(ids) and ids[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = bool(ids) and ids[-1] == tokenizer.eos_token_id
    source = "tokenizer.model" if (folder / "tokenizer.model").is_file() else "tokenizer.json"
    return _finish(writer, special, tokenizer, VocabNotes(source, "llama", "default", vocab_size, None), tokens)


def add_bpe_vocab(writer, folder: Path, vocab_size: int) -> VocabNotes:
    """tokenizer.json as llama.cpp's `_set_vocab_gpt2` writes it (and gguf's SpecialVocab for merges and ids)."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    pre = _pre_name(spec.get("pre_tokenizer"))
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:  # the embedding has rows the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    return _finish(writer, special, tokenizer, VocabNotes("tokenizer.json", "gpt2", pre, vocab_size, None), tokens)


def _finish(writer, special, tokenizer, notes: VocabNotes, tokens: list[str]) -> VocabNotes:
    """Special ids (the EOS being the chat template's end-of-turn token) and the chat template, into the file."""
    eot = end_of_turn(tokenizer)
    if eot is not None:
        eot_id = tokenizer.convert_tokens_to_ids(eot)
        if special.special_token_ids.get("eos") != eot_id:
            notes.notes.append(f"EOS set to the chat template's end-of-turn token {eot} (was {tokenizer.eos_token})")
        special.special_token_ids["eos"] = eot_id
    if tokenizer.chat_template and isinstance(tokenizer.chat_template, str):
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    eos_id = special.special_token_ids.get("eos")
    notes.eos_token = tokens[eos_id] if eos_id is not None and eos_id < len(tokens) else None
    return notes


def carry_over_vocab(writer, source: Path, tokenizer_folder: Path | None) -> VocabNotes:
    """The source GGUF's tokenizer.* metadata, copied field by field with its types; the run's chat template
    replaces the source's when the run changed it."""
    import gguf

    reader = gguf.GGUFReader(source)
    template = None
    if tokenizer_folder is not None and (tokenizer_folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        template = AutoTokenizer.from_pretrained(tokenizer_folder).chat_template
    notes = VocabNotes(str(source), "", None, 0, None)
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    for key, f in fields.items():
        value = f.contents()
        if key == gguf.Keys.Tokenizer.CHAT_TEMPLATE and template and template != value:
            value = template
            notes.notes.append("chat template: the run's, not the source GGUF's")
        kind = f.types[0]
        sub = f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, kind, sub_type=sub)
    if template and gguf.Keys.Tokenizer.CHAT_TEMPLATE not in fields:
        writer.add_chat_template(template)
        notes.notes.append("chat template: the run's (the source GGUF had none)")
    notes.model = fields[gguf.Keys.Tokenizer.MODEL].contents()
    notes.pre = fields[gguf.Keys.Tokenizer.PRE].contents() if gguf.Keys.Tokenizer.PRE in fields else None
    notes.tokens = len(fields[gguf.Keys.Tokenizer.LIST].data)
    eos = fields.get(gguf.Keys.Tokenizer.EOS_ID)
    if eos is not None:
        notes.eos_token = fields[gguf.Keys.Tokenizer.LIST].contents(int(eos.contents()))
    return notes


def source_vocab_size(source: Path) -> int:
    """How many tokens a GGUF file's tokenizer has."""
    import gguf

    return len(gguf.GGUFReader(source).fields[gguf.Keys.Tokenizer.LIST].data)
