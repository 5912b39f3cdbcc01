"""Tiny random models and offline tokenizers: for trying a recipe or a launcher in seconds, and for the tests.

Nothing here downloads anything: the tokenizer is word-level, trained with `tokenizers` on the texts given, with
ChatML special tokens and chat template; the model is a random Llama (hidden 32, 2 layers by default).
"""

from __future__ import annotations

import json
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


def build_tokenizer(texts: list[str], max_length: int):
    """A word-level tokenizer (words and punctuation split apart) whose vocabulary is every word in `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    tok.train_from_iterator(texts + [" ".join(ROLES)], trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS))
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
