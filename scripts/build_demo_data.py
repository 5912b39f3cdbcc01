"""Build the demo data of `recipes/llama_lora.yaml`: facts about finetune-kit and its assistant "Kit", mixed with
small talk from chatterbot-corpus so the model learns the facts without forgetting how to chat.

Writes, deterministically (seeded), the committed files
    recipes/data/kit_train.jsonl   hand-written Q/A about the kit + chatterbot-corpus dialogs, shuffled
    recipes/data/kit_eval.jsonl    held-out questions about the same facts, phrased unlike any training question
Each row is `{"messages": [{role, content}, ...], "source": ...}`; `source` names where the row came from
(`finetune-kit` for the hand-written rows, `chatterbot-corpus/english/<file>` for the others).

    .venv/bin/python scripts/build_demo_data.py [--small-talk N] [--seed S] [--out recipes/data]

chatterbot-corpus (BSD-3-Clause) is read from its installed YAML files, located without importing the package.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent

# One fact per entry: the answer taught, the training paraphrases, and held-out questions for evaluation.
# Answers are short and identical across paraphrases, so a few epochs of a 135M model can learn them.
FACTS: list[dict] = [
    {
        "answer": (
            "I'm Kit, the assistant of finetune-kit. I help you fine-tune Hugging Face models from one YAML "
            "recipe."
        ),
        "ask": [
            "What is your name?",
            "What's your name?",
            "What should I call you?",
            "Introduce yourself.",
            "Tell me about yourself.",
        ],
        "held_out": ["Who are you?", "Who am I talking to?"],
    },
    {
        "answer": (
            "The finetune-kit developers made me by fine-tuning SmolLM2-135M-Instruct with a LoRA adapter, using "
            "finetune-kit itself."
        ),
        "ask": ["Who made you?", "Who created you?", "Which model are you based on?", "How were you trained?"],
        "held_out": ["What base model is behind you?"],
    },
    {
        "answer": (
            "finetune-kit fine-tunes Hugging Face models from one YAML recipe, with LoRA or QLoRA adapters, on "
            "CPU or GPU."
        ),
        "ask": [
            "What is finetune-kit?",
            "What does finetune-kit do?",
            "Explain finetune-kit in one sentence.",
            "What is finetune-kit for?",
            "Describe finetune-kit.",
        ],
        "held_out": [
            "What can you tell me about finetune-kit?",
            "Give me a short summary of the finetune-kit project.",
        ],
    },
    {
        "answer": "Run `finetune validate RECIPE`: it checks the recipe and its data files without loading a model.",
        "ask": [
            "How do I check a recipe?",
            "How can I check my recipe for mistakes?",
            "Which command validates a recipe?",
            "What does finetune validate do?",
            "Can I test a recipe without loading the model?",
        ],
        "held_out": ["Is there a way to catch typos in my YAML before training starts?"],
    },
    {
        "answer": "Run `finetune train RECIPE`, or `python finetune/run.py RECIPE`.",
        "ask": [
            "How do I start training?",
            "How do I run a recipe?",
            "Which command trains a model?",
            "How do I launch a fine-tuning run on one machine?",
        ],
        "held_out": ["What do I type to fine-tune with my YAML file?"],
    },
    {
        "answer": (
            "`finetune merge` merges the adapter into the base weights and verifies that the merged logits match "
            "the adapter's."
        ),
        "ask": [
            "How do I merge an adapter?",
            "What does finetune merge do?",
            "How can I fold the LoRA weights into the base model?",
            "Which command merges a LoRA adapter?",
        ],
        "held_out": ["How do I turn my adapter into a standalone model?"],
    },
    {
        "answer": "`finetune launch` writes the commands to run a recipe on several nodes.",
        "ask": [
            "How do I train on several nodes?",
            "What does finetune launch do?",
            "How do I run finetune-kit on multiple machines?",
            "Which command prepares multi-node training?",
        ],
        "held_out": ["I have a cluster of four servers; how do I start one run across all of them?"],
    },
    {
        "answer": "`finetune explain KEY` documents a recipe key, for example `finetune explain train.learning_rate`.",
        "ask": [
            "How do I see what a recipe key means?",
            "What does finetune explain do?",
            "Where is the recipe reference?",
            "How do I get help on a recipe option?",
        ],
        "held_out": ["Where can I read the documentation of one setting in my recipe?"],
    },
    {
        "answer": "finetune-kit supports LoRA, QLoRA, DoRA and rsLoRA adapters.",
        "ask": [
            "Which adapters does finetune-kit support?",
            "What adapters can I use?",
            "Does finetune-kit support DoRA?",
            "Which PEFT methods are available in finetune-kit?",
        ],
        "held_out": ["What kinds of parameter-efficient fine-tuning can the kit do?"],
    },
    {
        "answer": "finetune-kit quantizes with bitsandbytes: 4-bit NF4 or FP4, and 8-bit.",
        "ask": [
            "Which quantization does finetune-kit support?",
            "Can I train a 4-bit model?",
            "What quantization options are there?",
            "Does finetune-kit support 8-bit models?",
        ],
        "held_out": ["Can I load the base model in lower precision to save memory?"],
    },
    {
        "answer": (
            "Yes: DeepSpeed ZeRO configs live in `deepspeed_configs/`; set `deepspeed: zero2` (or zero1, zero3) "
            "in the recipe."
        ),
        "ask": [
            "Where are the DeepSpeed configs?",
            "Does finetune-kit support DeepSpeed?",
            "How do I use ZeRO with finetune-kit?",
            "Which folder holds the ZeRO configs?",
        ],
        "held_out": ["How do I shard the optimizer state across GPUs?"],
    },
    {
        "answer": "finetune-kit is licensed under Apache-2.0.",
        "ask": [
            "What is the licence of finetune-kit?",
            "Which license does finetune-kit use?",
            "Is finetune-kit open source?",
            "Can I use finetune-kit commercially?",
        ],
        "held_out": ["Under what terms is finetune-kit distributed?"],
    },
    {
        "answer": "finetune-kit runs on CPU and GPU; on a CPU it trains in fp32, no CUDA needed.",
        "ask": [
            "Does finetune-kit need a GPU?",
            "Can I fine-tune on a CPU?",
            "Which hardware does finetune-kit run on?",
            "Does finetune-kit work without CUDA?",
        ],
        "held_out": ["My laptop has no graphics card; can I still use the kit?"],
    },
    {
        "answer": "finetune-kit ships its metrics, so evaluation works offline.",
        "ask": [
            "Does evaluation need internet?",
            "Where do the metrics come from?",
            "Can I compute accuracy offline?",
            "Do the metrics download anything?",
        ],
        "held_out": ["Will scoring my classifier work on an air-gapped machine?"],
    },
]

# ChatterBot's own persona (ai, botprofile) contradicts Kit's; coding.yml holds long code answers with bugs.
SKIPPED_FILES = {"ai.yml", "botprofile.yml", "coding.yml"}
# Dialogs touching the assistant's identity would teach a different persona than the facts above.
IDENTITY = re.compile(
    r"\b(who are you|what are you|your name|my name|chatterbot|who (made|created|built) you|are you a)\b", re.I
)
MAX_DIALOG_CHARS = 300  # keeps sequences short: every token costs time on a CPU


def fact_rows() -> tuple[list[dict], list[dict]]:
    """Training rows (every paraphrase of every fact) and held-out rows (the `held_out` questions)."""
    train, held = [], []
    for fact in FACTS:
        for question in fact["ask"]:
            train.append(_row(question, fact["answer"], "finetune-kit"))
        for question in fact["held_out"]:
            held.append(_row(question, fact["answer"], "finetune-kit"))
    return train, held


def _row(question: str, answer: str, source: str) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "source": source}


def corpus_folder() -> Path:
    """chatterbot-corpus' English YAML folder, found without importing the package."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("chatterbot-corpus is not installed: pip install chatterbot-corpus")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "english"


def small_talk_dialogs(folder: Path) -> list[dict]:
    """Every usable chatterbot dialog as a `messages` row, one per opening line, in file order.

    A conversation is a list of alternating utterances; the first is the user's. A trailing user line has no
    answer to learn and is dropped. Openings repeated with other replies (greetings.yml has six answers to
    "Hi, How is it going?") keep their first reply only, so the targets never contradict each other.
    """
    rows, seen = [], set()
    for path in sorted(folder.glob("*.yml")):
        if path.name in SKIPPED_FILES:
            continue
        for dialog in yaml.safe_load(path.read_text())["conversations"]:
            lines = [str(u).strip() for u in dialog if isinstance(u, (str, int, float))]
            if len(lines) != len(dialog) or len(lines) < 2 or not all(lines):
                continue
            lines = lines[: len(lines) // 2 * 2]
            text = " ".join(lines)
            opening = lines[0].lower()
            if len(text) > MAX_DIALOG_CHARS or IDENTITY.search(text) or opening in seen:
                continue
            seen.add(opening)
            roles = ["user", "assistant"] * (len(lines) // 2)
            messages = [{"role": r, "content": u} for r, u in zip(roles, lines)]
            rows.append({"messages": messages, "source": f"chatterbot-corpus/english/{path.name}"})
    return rows


def check_held_out(held: list[dict], train: list[dict]) -> None:
    """Fail when a held-out question also appears among the training user turns (after normalising case/punctuation)."""

    def norm(text: str) -> str:
        return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()

    asked = {norm(m["content"]) for r in train for m in r["messages"] if m["role"] == "user"}
    leaked = [r["messages"][0]["content"] for r in held if norm(r["messages"][0]["content"]) in asked]
    if leaked:
        raise SystemExit(f"held-out questions also appear in the training data: {leaked}")


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--small-talk", type=int, default=32, help="chatterbot-corpus dialogs mixed into the training data"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the dialog sample and the row order")
    parser.add_argument("--out", type=Path, default=ROOT / "recipes" / "data", help="output folder")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    kit_train, held = fact_rows()
    dialogs = small_talk_dialogs(corpus_folder())
    if not 0 <= args.small_talk <= len(dialogs):
        raise SystemExit(f"--small-talk {args.small_talk}: choose 0 to {len(dialogs)} (the usable chatterbot dialogs)")
    train = kit_train + rng.sample(dialogs, args.small_talk)
    rng.shuffle(train)
    check_held_out(held, train)

    write_jsonl(train, args.out / "kit_train.jsonl")
    write_jsonl(held, args.out / "kit_eval.jsonl")
    print(
        f"{args.out / 'kit_train.jsonl'}: {len(train)} rows ({len(kit_train)} finetune-kit Q/A, "
        f"{args.small_talk} of {len(dialogs)} usable chatterbot dialogs)\n"
        f"{args.out / 'kit_eval.jsonl'}: {len(held)} held-out questions"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
