"""The tokenizer of a GGUF file: a byte-level BPE written from the merged model's tokenizer.json (tokens, types,
merges, llama.cpp's pre-tokenizer name, special ids, chat template), or, when the base came from a GGUF, that file's
tokenizer metadata carried over exactly. The EOS is the chat template's end-of-turn token, so generation stops.
"""

from __future__ import annotations

import json
import logging
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
    if model != "BPE" or spec.get("model", {}).get("byte_fallback"):
        if source_gguf is not None:
            return "carried over"
        raise FinetuneError(
            f"{path}: a {model} tokenizer{' with byte fallback (SentencePiece)' if model == 'BPE' else ''} cannot be "
            "written to GGUF by finetune export; it writes byte-level BPE tokenizers (Llama 3, SmolLM2, Qwen)."
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
    notes = VocabNotes("tokenizer.json", "gpt2", pre, vocab_size, None)
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
    notes.eos_token = reverse.get(eos_id) if eos_id is not None else None
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
