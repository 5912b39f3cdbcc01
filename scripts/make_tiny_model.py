"""Write a tiny random Llama and a word-level tokenizer that covers your data, to try a recipe in seconds.

    .venv/bin/python scripts/make_tiny_model.py .cache/tiny_llama --data recipes/data/kit_train.jsonl

The recipes `recipes/tiny_*.yaml` point at `.cache/tiny_llama`: they exist to check a launcher, a ZeRO
config or a multi-node setup end to end (loss falls, an adapter is saved) without downloading a model.
The model is random (hidden 32, 2 layers; 47,520 parameters with the demo data's 452 words), so what it
learns is the data's word statistics. The tokenizer is word-level, built from the words of `--data` (any
string in the rows: chat `messages`, alpaca, prompt/completion or `text`), with ChatML special tokens and
chat template, so every word of that data has an id.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.tiny import texts_of, write_tiny_llama  # noqa: E402


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
    tokenizer, model = write_tiny_llama(args.folder, texts, args.hidden, args.layers, args.max_length, args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.folder}: random Llama, hidden {args.hidden}, {args.layers} layers, {params:,} parameters, vocabulary {len(tokenizer)} words")
    return 0


if __name__ == "__main__":
    sys.exit(main())
