"""Write a tiny random Llama and a word-level tokenizer that covers your data, to try a recipe in seconds.

    .venv/bin/python scripts/make_tiny_model.py .cache/tiny_llama --data recipes/data/kit_train.jsonl

The recipes `recipes/tiny_*.yaml` point at `.cache/tiny_llama`: they exist to check a launcher, a ZeRO
config or a multi-node setup end to end (loss falls, an adapter is saved) without downloading a model.
The model is random (hidden 32, 2 layers; 47,520 parameters with the demo data's 452 words), so what it
learns is the data's word statistics. The tokenizer is word-level, trained on the words of `--data` (any
string in the rows: chat `messages`, alpaca, prompt/completion or `text`), with ChatML special tokens and
chat template, so every word of that data has an id.
"""

from __future__ import annotations

import argparse
import json
import sys
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="Where to write the model and tokenizer (created).")
    parser.add_argument("--data", type=Path, action="append", required=True, help="A JSONL/JSON data file whose words the tokenizer must know (repeatable).")
    parser.add_argument("--hidden", type=int, default=32, help="Hidden size (default 32).")
    parser.add_argument("--layers", type=int, default=2, help="Decoder layers (default 2).")
    parser.add_argument("--max-length", type=int, default=512, help="Longest sequence, in tokens (default 512).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights (default 0).")
    args = parser.parse_args(argv)

    texts = [text for path in args.data for text in texts_of(path)]
    tokenizer = build_tokenizer(texts, args.max_length)
    model = build_model(tokenizer, args.hidden, args.layers, args.max_length, args.seed)
    args.folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.folder)
    model.save_pretrained(args.folder)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.folder}: random Llama, hidden {args.hidden}, {args.layers} layers, {params:,} parameters, vocabulary {len(tokenizer)} words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
