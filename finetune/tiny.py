"""Tiny random models and offline tokenizers: for trying a recipe or a launcher in seconds, and for the tests.

Nothing here downloads anything. The Llama tokenizer is word-level, its vocabulary every word of the texts given, with
ChatML special tokens and chat template; the model is a random Llama (hidden 32, 2 layers by default). The BERT
tokenizer is WordPiece (lowercased, whole words plus single characters to spell any other word with); the model is a
random BERT encoder. Both vocabularies are built here in a fixed order, not trained with a `tokenizers` trainer: the
WordPiece trainer breaks ties in hash order, so its vocabulary (size and ids) changed from one process to the next, and
with it the "seeded" tiny model.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# "\n" is a token of its own: the chat template separates the role from the content with it.
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>", "\n"]
ROLES = ["system", "user", "assistant"]


def texts_of(path: Path) -> list[str]:
    """Every string value of a JSONL/JSON file's rows (message contents included), for the tokenizer's vocabulary."""
    raw = path.read_text()
    rows = json.loads(raw) if path.suffix == ".json" else [json.loads(line) for line in raw.splitlines() if line.strip()]
    found: list[str] = []

    def walk(value) -> None:
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(rows)
    return found


def _ordered_vocab(specials: list[str], words: Counter, extra: tuple[str, ...] = ()) -> dict[str, int]:
    """Ids in a fixed order: the special tokens as given, the words by falling count then alphabetically, then `extra`."""
    vocab = {token: i for i, token in enumerate(specials)}
    for token in [w for w, _ in sorted(words.items(), key=lambda item: (-item[1], item[0]))] + list(extra):
        vocab.setdefault(token, len(vocab))
    return vocab


def _words(tok, texts: list[str]) -> Counter:
    """Every word of `texts` as the tokenizer's own normalizer and pre-tokenizer cut them, with its count."""
    counts: Counter = Counter()
    for text in texts:
        if tok.normalizer is not None:
            text = tok.normalizer.normalize_str(text)
        counts.update(word for word, _ in tok.pre_tokenizer.pre_tokenize_str(text))
    return counts


def build_tokenizer(texts: list[str], max_length: int):
    """A word-level tokenizer (words and punctuation split apart) whose vocabulary is every word in `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    splitter = Tokenizer(models.WordLevel(vocab={"<unk>": 0}, unk_token="<unk>"))
    splitter.pre_tokenizer = pre_tokenizers.Whitespace()
    vocab = _ordered_vocab(SPECIAL_TOKENS, _words(splitter, texts + [" ".join(ROLES)]))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        model_max_length=max_length,
    )
    fast.chat_template = CHATML
    return fast


BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_wordpiece_tokenizer(texts: list[str], max_length: int):
    """A lowercasing BERT WordPiece tokenizer: every word of `texts` is one token; any other word made of their
    characters is spelled with single-character pieces (`c ##a ##t`), and the rest is [UNK]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    def bare(vocab: dict[str, int]):
        tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        return tok

    words = _words(bare({"[UNK]": 0}), texts)
    chars = sorted({c for word in words for c in word})
    vocab = _ordered_vocab(BERT_SPECIAL_TOKENS, words, tuple(chars + ["##" + c for c in chars]))
    tok = bare(vocab)
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(BERT_SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return BertTokenizerFast(tokenizer_object=tok, model_max_length=max_length)


def build_model(tokenizer, hidden: int, layers: int, max_length: int, seed: int):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        # With the default 0.02 the logits of so small a model stay near 0 whatever LoRA does to the layers
        # below the frozen head, and the loss could hardly fall; 0.2 gives the head a usable range.
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model


def write_tiny_llama(folder: Path, texts: list[str], hidden: int = 32, layers: int = 2, max_length: int = 512, seed: int = 0):
    """Build and save a tiny random Llama with a tokenizer covering `texts`; returns the tokenizer and model."""
    tokenizer = build_tokenizer(texts, max_length)
    model = build_model(tokenizer, hidden, layers, max_length, seed)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return tokenizer, model


def write_tiny_bert(folder: Path, texts: list[str], hidden: int = 32, layers: int = 2, max_length: int = 128, seed: int = 0):
    """Build and save a tiny random BERT encoder (no head) with a WordPiece tokenizer covering `texts`; returns the
    tokenizer and model."""
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = build_wordpiece_tokenizer(texts, max_length)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,  # as for the tiny Llama: at 0.02 a LoRA on so small a model learns by luck
    )
    model = BertModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return tokenizer, model
