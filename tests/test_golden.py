"""Golden numbers: each task's tiny seeded CPU run, its first losses and token counts pinned (torchtune's habit).

A silent change to templating, masking, packing, the head, image preprocessing or the loss moves these numbers, and
the failure names what moved. The runs go through the kit's own runner, fp32 on one CPU thread, 4 optimizer steps.

Re-pinning, when a change is intended: run

    python scripts/pin_golden.py           # prints the numbers measured now
    python scripts/pin_golden.py --write   # and writes them over the pinned block below

(it runs this file with FINETUNE_PIN_GOLDEN=1, in which each test prints its measured numbers instead of comparing
them), and say in the commit message what changed them and why. Numbers pinned with torch 2.13.0 (CPU), transformers 5.25.0, trl 1.16, peft 0.21 (constraints.txt).
"""

from __future__ import annotations

import os

import pytest
import torch

from finetune.recipe import validate_recipe
from support import CAPITALS, cls_recipe, image_recipe, keyword_rows, pretrain_recipe, sft_recipe, write_jsonl, write_story_corpus

PIN = os.environ.get("FINETUNE_PIN_GOLDEN") == "1"
STEPS = 4

# Each run's per-step training losses, then its counts; re-pin with scripts/pin_golden.py (see the docstring).
GOLDEN: dict[str, dict] = {}
# --- pinned numbers (scripts/pin_golden.py) ---
GOLDEN['sft'] = {'losses': [5.126445770263672, 3.4736721515655518, 2.152116537094116, 1.9565805196762085], 'train_rows': 40, 'input_tokens': 680, 'trained_tokens': 120}
GOLDEN['sft_packed'] = {'losses': [5.046351909637451, 3.0837552547454834, 2.1522390842437744, 1.8820570707321167], 'train_rows': 14, 'trained_tokens': 120}
GOLDEN['classification'] = {'losses': [1.3974940776824951, 1.3775758743286133, 1.7648255825042725, 1.63901948928833], 'eval_losses': [1.5713629722595215, 1.4803937673568726], 'train_rows': 64}
GOLDEN['image_classification'] = {'losses': [1.5998713970184326, 1.2272700071334839, 1.1938586235046387, 1.0779012441635132], 'eval_losses': [1.287179708480835, 0.9598897099494934], 'train_rows': 27}
GOLDEN['pretrain'] = {'losses': [5.811156749725342, 5.3104248046875, 4.70965051651001, 4.308539867401123], 'train_blocks': 68, 'tokens_seen': 1024, 'vocab_size': 320}
GOLDEN['preference'] = {'losses': [0.6931471824645996, 0.7388043403625488, 0.796466588973999, 0.6163851022720337], 'margins': [0.0, -0.06569637358188629, -0.15567803382873535, 0.17914806306362152], 'train_rows': 24}
# --- end of pinned numbers ---

# fp32 on one thread is deterministic here; the tolerance absorbs other CPUs' kernels (summation order).
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _quick(**train) -> dict:
    return {"max_steps": STEPS, "logging_steps": 1, "num_threads": 1, "seed": 0, **train}


def _losses(result) -> list[float]:
    return [h["loss"] for h in result.metrics["log_history"] if "loss" in h]


def _check(task: str, measured: dict) -> None:
    """Compare `measured` with GOLDEN[task] (or print it, in pin mode), naming what moved."""
    if PIN:
        print(f"\nGOLDEN[{task!r}] = {measured!r}")
        return
    assert task in GOLDEN, f"no golden numbers for {task}: run scripts/pin_golden.py"
    golden = GOLDEN[task]
    assert measured.keys() == golden.keys(), f"{task}: measured {sorted(measured)}, pinned {sorted(golden)}"
    for key, expected in golden.items():
        if isinstance(expected, list):
            torch.testing.assert_close(
                torch.tensor(measured[key], dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                **TOLERANCE,
                msg=lambda m, key=key: (
                    f"{task}: the {key} of the seeded tiny run moved (templating, masking, packing, the head or the "
                    f"loss changed?): measured {measured[key]}, pinned {expected}. If intended, re-pin "
                    f"(python scripts/pin_golden.py).\n{m}"
                ),
            )  # fmt: skip
        else:
            assert measured[key] == expected, (
                f"{task}: {key} moved (templating, masking, truncation or packing changed?): measured {measured[key]}, "
                f"pinned {expected}. If intended, re-pin (python scripts/pin_golden.py)."
            )


def _run(recipe: dict):
    from finetune.runner import run

    return run(validate_recipe(recipe))


def _supervised_tokens(dataset) -> int:
    """Tokens the loss is computed on: labels other than -100."""
    return sum(sum(1 for label in row if label != -100) for row in dataset["labels"])


def test_sft_golden(tiny_llama_dir, tmp_path):
    result = _run(sft_recipe(tiny_llama_dir, tmp_path, train=_quick()))
    dataset = result.trainer.train_dataset
    _check("sft", {
        "losses": _losses(result),
        "train_rows": len(dataset),
        "input_tokens": sum(len(ids) for ids in dataset["input_ids"]),
        "trained_tokens": _supervised_tokens(dataset),
    })  # fmt: skip


def test_sft_packed_golden(tiny_llama_dir, tmp_path):
    result = _run(sft_recipe(tiny_llama_dir, tmp_path, data={"packing": True}, train=_quick()))
    dataset = result.trainer.train_dataset
    _check("sft_packed", {
        "losses": _losses(result),
        "train_rows": len(dataset),
        "trained_tokens": _supervised_tokens(dataset),
    })  # fmt: skip


def test_classification_golden(tiny_bert_dir, tmp_path):
    result = _run(cls_recipe(tiny_bert_dir, tmp_path, rows=keyword_rows(80), train=_quick()))
    evals = [h["eval_loss"] for h in result.metrics["log_history"] if "eval_loss" in h]
    _check("classification", {"losses": _losses(result), "eval_losses": evals, "train_rows": len(result.trainer.train_dataset)})


def test_image_classification_golden(tiny_resnet_dir, toy_images_dir, tmp_path):
    result = _run(image_recipe(tiny_resnet_dir, toy_images_dir, tmp_path / "out", train=_quick(micro_batch_size=4)))
    evals = [h["eval_loss"] for h in result.metrics["log_history"] if "eval_loss" in h]
    _check("image_classification", {"losses": _losses(result), "eval_losses": evals, "train_rows": len(result.trainer.train_dataset)})


def test_pretrain_golden(tmp_path):
    corpus = write_story_corpus(tmp_path / "docs", documents=12, sentences=20)
    result = _run(pretrain_recipe(tmp_path, corpus, train=_quick()))
    _check("pretrain", {
        "losses": _losses(result),
        "train_blocks": len(result.trainer.train_dataset),
        "tokens_seen": result.metrics["num_input_tokens_seen"],
        "vocab_size": len(result.tokenizer),
    })  # fmt: skip


def test_preference_golden(tiny_llama_dir, tmp_path):
    import random

    rng, capitals = random.Random(0), dict(CAPITALS)
    pairs = []
    for _ in range(24):  # the right capital preferred to a wrong one, as chat prompts
        country = rng.choice(sorted(capitals))
        wrong = rng.choice([c for c in sorted(capitals.values()) if c != capitals[country]])
        pairs.append({"prompt": [{"role": "user", "content": f"what is the capital of {country}"}],
                      "chosen": capitals[country], "rejected": wrong})
    result = _run({
        "task": "preference",
        "model": {"name_or_path": str(tiny_llama_dir)},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), "max_length": 64},
        "train": _quick(micro_batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, save_checkpoints=False),
        "output": {"dir": str(tmp_path / "out")},
    })  # fmt: skip
    logs = [h for h in result.metrics["log_history"] if "loss" in h]
    _check("preference", {
        "losses": _losses(result),
        "margins": [h["rewards/margins"] for h in logs],
        "train_rows": len(result.trainer.train_dataset),
    })  # fmt: skip


@pytest.mark.skipif(PIN, reason="pin mode prints the numbers")
def test_every_task_has_golden_numbers():
    from finetune.registry import TASKS

    missing = set(TASKS) - {name.removesuffix("_packed") for name in GOLDEN}
    assert not missing, f"tasks without golden numbers: {sorted(missing)}; add a run to tests/test_golden.py"
