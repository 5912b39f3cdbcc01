"""Preference pairs built offline (`finetune pairs`): prompts with reference answers from the kit's SFT files, the
reference answer chosen and the model's own answer rejected, near-ties dropped by chrF, provenance on every row."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from finetune.data.cache import file_digest, fingerprint
from finetune.errors import DataError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def prompt_and_reference(row: dict, origin: str) -> tuple[list[dict] | str, str]:
    """A normalised SFT row (`finetune.data.sft.normalise_row`) as (prompt, reference answer): a conversation up to
    its last assistant turn and that turn's text, or a prompt/completion pair."""
    if "messages" in row:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if last == 0:
            raise DataError(f"{origin}: the conversation starts with the answer; there is no prompt to answer")
        return messages[:last], messages[last]["content"]
    if "prompt" in row:
        return row["prompt"], row["completion"]
    raise DataError(f"{origin}: a raw text row has no prompt and reference answer; give chat or prompt/completion rows")


def sentence_chrf(answer: str, reference: str) -> float:
    """sacrebleu's chrF of one answer against its reference, 0-100."""
    from sacrebleu.metrics import CHRF

    return float(CHRF().sentence_score(answer, [reference]).score)


def model_digest(*folders: Path) -> str:
    """A short hash of the weights that answered: every weights file of the model (and adapter) folders."""
    digests = []
    for folder in folders:
        for path in sorted(Path(folder).iterdir()):
            if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
                digests.append((path.name, file_digest(path)))
    return fingerprint(*digests)[:16]


@dataclass
class Pairs:
    """The pairs written and what was dropped, and why."""

    rows: list[dict] = field(default_factory=list)
    ties: int = 0
    empty: int = 0
    unfinished: int = 0  # answers cut by max_new_tokens, kept and marked


def build_pairs(prompts: list, references: list[str], answers: list[dict], tie_chrf: float, provenance: dict) -> Pairs:
    """One pair per prompt whose answer (`{answer, finished}`) differs enough from the reference: chrF below
    `tie_chrf` (a near-copy of the reference would teach nothing, or the wrong thing); an empty answer is dropped too.
    An answer cut by the token limit is kept, marked `finished: false` in its provenance."""
    out = Pairs()
    for prompt, reference, generated in zip(prompts, references, answers):
        answer = generated["answer"]
        if not answer.strip():
            out.empty += 1
            continue
        score = sentence_chrf(answer, reference)
        if score >= tie_chrf:
            out.ties += 1
            continue
        out.unfinished += not generated["finished"]
        out.rows.append({"prompt": prompt, "chosen": reference, "rejected": answer,
                         "provenance": {**provenance, "chrf": round(score, 2), "finished": generated["finished"]}})
    return out
