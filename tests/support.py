"""Helpers shared by several test files: paths, tiny-model builders, data writers and recipe builders.

A plain module (not a test file, not conftest): test files and conftest import from it; no test file imports another.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Tiny models and tokenizers, built offline
# --------------------------------------------------------------------------------------------

WORDS = (
    "the a an is are was what who where when how why which capital color colour of in on at to from and or "
    "paris london rome berlin madrid red green blue yellow black white one two three four five six seven eight "
    "nine ten cat dog bird fish sun moon star tree river sea mountain city country france england italy germany "
    "spain yes no hello hi thanks please good bad big small fast slow question answer user assistant system "
    "you i we they it this that number plus minus equals name my your kit recipe model adapter train"
).split()


def _corpus() -> list[str]:
    lines = [" ".join(WORDS[i : i + 12]) for i in range(0, len(WORDS), 6)]
    return lines * 4 + ["user assistant system hello what is the capital of france paris"]


def build_tokenizer(folder: Path, model_max_length: int = 256):
    """The tests' word-level tokenizer (ChatML specials and template), built offline from WORDS."""
    from finetune.tiny import build_tokenizer as build

    tokenizer = build(_corpus(), model_max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_llama(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A 2-layer random Llama (hidden 32) with the tests' tokenizer saved beside it."""
    from finetune.tiny import write_tiny_llama

    write_tiny_llama(folder, _corpus(), hidden=hidden, layers=layers, max_length=256, seed=seed)
    return folder


def build_tiny_bert(folder: Path, hidden: int = 32, seed: int = 0) -> Path:
    """A 2-layer random BERT (hidden 32, 128 positions) with a WordPiece tokenizer built offline from WORDS."""
    from finetune.tiny import write_tiny_bert

    write_tiny_bert(folder, _corpus(), hidden=hidden, layers=2, max_length=128, seed=seed)
    return folder


# --------------------------------------------------------------------------------------------
# Data writers
# --------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CAPITALS = {"france": "paris", "england": "london", "italy": "rome", "germany": "berlin", "spain": "madrid"}


def capitals_data(path: Path, n: int = 40) -> Path:
    """n chat rows asking for the capital of one of five countries (seeded)."""
    rng = random.Random(0)
    with path.open("w") as fh:
        for _ in range(n):
            country = rng.choice(list(CAPITALS))
            row = {
                "messages": [
                    {"role": "user", "content": f"what is the capital of {country}"},
                    {"role": "assistant", "content": CAPITALS[country]},
                ]
            }
            fh.write(json.dumps(row) + "\n")
    return path


KEYWORDS = ("cat", "dog", "bird", "fish")
FILLER = "the a is of in on at to from and or red green blue one two three sun moon tree river city".split()


def keyword_rows(n: int, keywords=KEYWORDS, seed: int = 0, weights=None) -> list[dict]:
    """A learnable task: three filler words and one keyword at a random place; the label is the keyword."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choices(keywords, weights)[0] if weights else keywords[i % len(keywords)]
        words = [rng.choice(FILLER) for _ in range(3)]
        words.insert(rng.randrange(4), label)
        rows.append({"text": " ".join(words), "label": label})
    return rows


STORY_WORDS = {
    "adjective": "old young small great wise quiet".split(),
    "noun": "king queen shepherd city river mountain servant prophet".split(),
    "verb": "saw found blessed followed feared remembered".split(),
}


def write_story_corpus(folder: Path, documents: int = 24, sentences: int = 30, seed: int = 0) -> Path:
    """A folder of text files, each a document of sentences from one small grammar ("the old king saw the city."):
    structure a tiny model learns in seconds, where a unigram model only knows the word frequencies."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(documents):
        words = {kind: rng.sample(options, 3) for kind, options in STORY_WORDS.items()}  # each document its favourites
        lines = [
            f"the {rng.choice(words['adjective'])} {rng.choice(words['noun'])} {rng.choice(words['verb'])} the "
            f"{rng.choice(words['noun'])}." for _ in range(sentences)
        ]
        (folder / f"doc{index:03d}.txt").write_text(" ".join(lines) + "\n")
    return folder


# --------------------------------------------------------------------------------------------
# Recipe builders
# --------------------------------------------------------------------------------------------


def _merge_sections(recipe: dict, sections: dict) -> dict:
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


def sft_recipe(model_dir: Path, tmp_path: Path, **sections) -> dict:
    """A LoRA SFT recipe on the capitals data; keyword sections are merged into (or replace) the defaults."""
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(capitals_data(tmp_path / "train.jsonl")), "max_length": 64},
        "train": {
            "epochs": 6,
            "micro_batch_size": 8,
            "learning_rate": 3e-2,
            "warmup_ratio": 0.0,
            "logging_steps": 1,
            "save_checkpoints": False,
            "num_threads": 1,
        },
        "output": {"dir": str(tmp_path / "out")},
    }
    return _merge_sections(recipe, sections)


def cls_recipe(model_dir: Path, tmp: Path, rows: list[dict] | None = None, **sections) -> dict:
    """A LoRA classification recipe on keyword rows; keyword sections are merged into (or replace) the defaults."""
    train = write_jsonl(tmp / "train.jsonl", rows if rows is not None else keyword_rows(400))
    recipe = {
        "task": "classification",
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(train), "eval_fraction": 0.2, "max_length": 32},
        "train": {
            "epochs": 5,
            "micro_batch_size": 16,
            "learning_rate": 1e-2,
            "warmup_ratio": 0.0,
            "logging_steps": 5,
            "eval_steps": 1000,  # only the evaluations before and after training
            "save_checkpoints": False,
            "num_threads": 1,
        },
        "output": {"dir": str(tmp / "out")},
    }
    return _merge_sections(recipe, sections)


# --------------------------------------------------------------------------------------------
# Tiny image models and a separable toy image set
# --------------------------------------------------------------------------------------------

TOY_COLORS = {"blue": (30, 30, 200), "green": (30, 200, 30), "red": (200, 30, 30)}


def build_tiny_resnet(folder: Path, num_labels: int = 5, seed: int = 0) -> Path:
    """A random 2-stage ResNet (basic blocks, 16/32 channels, BatchNorm) with a `num_labels`-class head."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=num_labels)
    model = ResNetForImageClassification(config)
    with torch.no_grad():  # running statistics a trained model would have, so a change to them shows
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.9, 1.1)
    model.save_pretrained(folder)
    return folder


def build_tiny_vit(folder: Path, num_labels: int = 5, seed: int = 0) -> Path:
    """A random 2-layer ViT (hidden 32, 8x8 patches of 32x32 images) with a `num_labels`-class head."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=num_labels)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folder)
    return folder


def write_toy_images(folder: Path, per_class: int = 12, size: int = 32, seed: int = 0) -> Path:
    """`folder/<color>/NNN.png`: noisy images of one dominant colour per class (separable by any backbone)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, color in TOY_COLORS.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(color)[None, None] + rng.normal(0, 40, (size, size, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(folder / name / f"{i:03d}.png")
    return folder


def tiny_convnet(num_classes: int = 10, width: int = 8):
    """A plain nn.Module classifier with a depthwise convolution, built by `support:tiny_convnet` in image recipes."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=width), nn.ReLU(),  # depthwise
        nn.Conv2d(width, 2 * width, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )  # fmt: skip


def image_recipe(model: str, images, out: Path, **sections) -> dict:
    """An image_classification recipe dict: LoRA r=4 on `model`, a held-out quarter, a few quick epochs."""
    recipe = {
        "task": "image_classification",
        "model": {"name_or_path": str(model)},
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(images), "eval_fraction": 0.25},
        "image": {"ignore_mismatched_sizes": True, "size": 32, "augment": False},
        "train": {"epochs": 6, "micro_batch_size": 8, "learning_rate": 1e-2, "logging_steps": 50, "save_checkpoints": False,
                  "warmup_ratio": 0.0, "num_threads": 1},  # fmt: skip
        "output": {"dir": str(out)},
    }
    return _merge_sections(recipe, sections)


def pretrain_recipe(tmp: Path, corpus: Path, **sections) -> dict:
    """Pretraining from scratch of a 2-layer Llama (hidden 64) with a BPE trained on `corpus` (a text file or folder);
    keyword sections are merged into (or replace) the defaults."""
    recipe = {
        "task": "pretrain",
        "model": {"config": {"layers": 2, "hidden_size": 64, "heads": 4, "kv_heads": 2, "context_length": 64}},
        "pretrain": {"vocab_size": 320},
        "data": {"train": str(corpus), "eval_fraction": 0.15, "max_length": 32},
        "train": {
            "max_steps": 40,
            "micro_batch_size": 8,
            "learning_rate": 1e-2,
            "warmup_ratio": 0.0,
            "logging_steps": 5,
            "eval_steps": 1000,  # only the evaluations before and after training
            "save_checkpoints": False,
            "num_threads": 1,
        },
        "output": {"dir": str(tmp / "out")},
    }
    return _merge_sections(recipe, sections)


def tiny_same_padding_net(num_classes: int = 10, depth: int = 22):
    """A plain classifier whose 1x1 convolutions (`blocks.N.pointwise`) are an `nn.Conv2d` subclass padding in its own
    forward (as EfficientNet ports do), `depth` of them: more than the 20 targets above which PEFT saves target names
    as the shortest suffixes that select them (here `pointwise`)."""
    import torch.nn.functional as F
    from torch import nn

    class SamePaddingConv2d(nn.Conv2d):
        def __init__(self, in_channels, out_channels, kernel_size, image_size=None, **kwargs):
            assert image_size is not None  # PEFT cannot build one of these with the base layer's arguments
            super().__init__(in_channels, out_channels, kernel_size, **kwargs)

        def forward(self, x):
            pad = self.kernel_size[0] - 1
            return F.conv2d(F.pad(x, [pad // 2, pad - pad // 2] * 2), self.weight, self.bias, self.stride, 0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.pointwise = SamePaddingConv2d(8, 8, 1, image_size=32)

        def forward(self, x):
            return F.relu(self.pointwise(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = SamePaddingConv2d(3, 8, 3, image_size=32)
            self.blocks = nn.ModuleList(Block() for _ in range(depth))
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            x = F.relu(self.stem(x))
            for block in self.blocks:
                x = block(x)
            return self.fc(x.mean((2, 3)))

    return Net()


def uneven_chat_rows(path, n: int = 24, seed: int = 0):
    """Chat rows of very different lengths, so a padded batch is mostly padding."""
    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n):
            country = rng.choice(list(CAPITALS))
            chatter = " ".join(rng.choices(FILLER, k=rng.randint(0, 30)))
            row = {"messages": [
                {"role": "user", "content": f"{chatter} what is the capital of {country}".strip()},
                {"role": "assistant", "content": CAPITALS[country] + (" " + chatter if rng.random() < 0.5 else "")},
            ]}  # fmt: skip
            fh.write(json.dumps(row) + "\n")
    return path


def packed_row(examples: list[list[int]]) -> tuple:
    """input_ids, position_ids and boundaries of `examples` back to back, as TRL's padding-free collator builds them."""
    import torch

    ids = torch.tensor([t for ex in examples for t in ex])[None]
    positions = torch.cat([torch.arange(len(ex)) for ex in examples])[None]
    bounds = torch.tensor([0, *torch.tensor([len(ex) for ex in examples]).cumsum(0).tolist()], dtype=torch.int32)
    return ids, positions, bounds
