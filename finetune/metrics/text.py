"""Generation metrics: model answers scored against reference answers, offline, every score on a 0-100 scale.

All five metrics share one scale (100 = perfect, 0 = nothing in common) so one report table or chart reads
consistently: exact match and token F1 (SQuAD-style, means over rows), ROUGE-L (mean F-measure over rows), and
corpus BLEU and chrF from sacrebleu (which reports 0-100 already).

SQuAD's normalisation and rouge_score's default tokenizer are ASCII-only (rouge_score turns every character outside
[a-z0-9] into a space, so Chinese or Russian answers score 0 and "Größe" matches "Grüße"). Here text is normalised
the same way for EM, F1 and ROUGE-L, for any script:

- NFKC then casefold ("Ｃafé" = "café", "Größe" = "GRÖSSE"); accents are kept, as they tell words apart (ou/où).
- Punctuation and symbols are deleted by Unicode category (P*, S*: a superset of `string.punctuation`, which SQuAD
  deletes), so "«Bonjour !»" = "bonjour". As in SQuAD, deleting them also makes "-5" = "5" and "3.14" = "314":
  grade numeric answers with a task-specific metric.
- Words are runs of letters, digits and combining marks (Python's `\\w` would split "हिन्दी" at its vowel signs).
  Scripts written without spaces (Chinese, Japanese kana, Thai, Lao, Khmer, Myanmar) give one token per character
  with its combining marks, so "我喜欢猫" vs "我喜欢狗" earns partial credit without a word segmenter.
- EM and F1 then drop the English articles a/an/the, as SQuAD does; ROUGE-L keeps them, as ROUGE does.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sacrebleu.metrics import BLEU, CHRF

__all__ = [
    "GENERATION_METRICS",
    "ROW_METRICS",
    "answer_tokens",
    "bleu",
    "chrf",
    "exact_match",
    "normalize_answer",
    "rouge_l",
    "row_scores",
    "score_generations",
    "text_tokens",
    "token_f1",
]

GENERATION_METRICS = ("exact_match", "token_f1", "rouge_l", "bleu", "chrf")
ROW_METRICS = ("exact_match", "token_f1", "rouge_l")

_ARTICLES = frozenset({"a", "an", "the"})
# Scripts written without spaces between words: each character (with its combining marks) is a token.
_UNSPACED = re.compile(
    "["
    "\u0e00-\u0eff"  # Thai, Lao
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u3000-\u30ff"  # CJK symbols (々, 〇), Hiragana, Katakana
    "\u31f0-\u31ff"  # Katakana phonetic extensions
    "\u3400-\u4dbf"  # CJK Extension A
    "\u4e00-\u9fff"  # CJK Unified Ideographs
    "\uf900-\ufaff"  # CJK Compatibility Ideographs
    "\U00020000-\U0003ffff"  # CJK Extensions B and later
    "]"
)


def text_tokens(text: str) -> list[str]:
    """Tokens of `text` after NFKC, casefolding and deleting punctuation and symbols; articles kept (ROUGE-L's)."""
    # NFKC again after casefold: casefolding can leave decomposed characters (e.g. "ǰ" -> "j" + caron).
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    tokens: list[str] = []
    word = ""
    after_single = False  # the last token is a single character that a following combining mark belongs to
    for char in text:
        kind = unicodedata.category(char)[0]
        if kind in "PS":  # deleted, not a separator, as SQuAD does: "U.S." -> "us"
            continue
        if kind in "LN" and _UNSPACED.match(char):
            if word:
                tokens.append(word)
                word = ""
            tokens.append(char)
            after_single = True
        elif kind in "LN" or (kind == "M" and not after_single):
            word += char
            after_single = False
        elif kind == "M":
            tokens[-1] += char
        else:  # whitespace, controls
            if word:
                tokens.append(word)
                word = ""
            after_single = False
    if word:
        tokens.append(word)
    return tokens


def answer_tokens(text: str) -> list[str]:
    """The tokens exact match and token F1 compare: `text_tokens` without the English articles a/an/the."""
    return [token for token in text_tokens(text) if token not in _ARTICLES]


def normalize_answer(text: str) -> str:
    """The normalised answer, tokens joined by single spaces (SQuAD's `normalize_answer`, Unicode-aware)."""
    return " ".join(answer_tokens(text))


def exact_match(prediction: str, reference: str) -> float:
    """100.0 if the normalised answers are equal, else 0.0 (two answers empty after normalisation are equal)."""
    return 100.0 if answer_tokens(prediction) == answer_tokens(reference) else 0.0


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's bag-of-tokens F1 x 100; both empty after normalisation gives 100, one empty gives 0."""
    predicted, expected = answer_tokens(prediction), answer_tokens(reference)
    if not predicted or not expected:
        return 100.0 if predicted == expected else 0.0
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 100.0 * 2 * precision * recall / (precision + recall)


class _UnicodeTokenizer:
    """rouge_score's tokenizer interface over `text_tokens`."""

    def tokenize(self, text: str) -> list[str]:
        return text_tokens(text)


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    # rouge_score imports nltk (~2 s), so only when ROUGE is asked for. No stemming: Porter is English-only and
    # would mangle other languages' words; off is also rouge_score's and evaluate's default, so scores compare.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_UnicodeTokenizer())


def _rouge_l_row(prediction: str, reference: str) -> float:
    if not text_tokens(prediction) and not text_tokens(reference):
        return 100.0  # rouge_score says 0; both empty is a perfect answer, as for EM and F1
    return 100.0 * _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure over rows x 100, on Unicode tokens (rouge_score's LCS, its tokenizer replaced)."""
    _check_rows(predictions, references)
    return sum(map(_rouge_l_row, predictions, references)) / len(predictions)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus BLEU (one reference per row, 13a tokenizer, case-sensitive, exp smoothing), 0-100.

    With effective order (signature `eff:yes`): the geometric mean stops at the longest n-gram order the
    predictions have at all. It changes the score only when every prediction is shorter than 4 tokens, where
    standard BLEU is ~0 even for perfect answers; short answers are common in fine-tuning evals. 13a does not
    split Chinese or Japanese into words: read chrF for those.
    """
    _check_rows(predictions, references)
    return float(BLEU(effective_order=True).corpus_score(list(predictions), [list(references)]).score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu corpus chrF (character 6-grams, beta 2, no word n-grams), 0-100; works for any script."""
    _check_rows(predictions, references)
    return float(CHRF().corpus_score(list(predictions), [list(references)]).score)


def row_scores(prediction: str, reference: str) -> dict[str, float]:
    """One row's exact match, token F1 and ROUGE-L (the per-row metrics; BLEU and chrF are corpus scores)."""
    _check_rows([prediction], [reference])
    return {
        "exact_match": exact_match(prediction, reference),
        "token_f1": token_f1(prediction, reference),
        "rouge_l": _rouge_l_row(prediction, reference),
    }


def score_generations(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Every generation metric, keyed in `GENERATION_METRICS` order; EM, F1 and ROUGE-L are means over rows."""
    _check_rows(predictions, references)
    rows = [row_scores(p, r) for p, r in zip(predictions, references)]
    scores = {name: sum(row[name] for row in rows) / len(rows) for name in ROW_METRICS}
    scores["bleu"] = bleu(predictions, references)
    scores["chrf"] = chrf(predictions, references)
    return {name: scores[name] for name in GENERATION_METRICS}


def _check_rows(predictions: Sequence[str], references: Sequence[str]) -> None:
    """Refuse what would score silently wrong: a bare string (scored per character), unequal lengths, non-strings."""
    for name, rows in (("predictions", predictions), ("references", references)):
        if isinstance(rows, str):
            raise TypeError(f"{name} must be a list of strings, got a single string")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references: one reference per prediction")
    if not predictions:
        raise ValueError("no predictions to score")
    for name, rows in (("prediction", predictions), ("reference", references)):
        for index, row in enumerate(rows):
            if not isinstance(row, str):
                raise TypeError(f"{name} {index} is {type(row).__name__}, not str")
