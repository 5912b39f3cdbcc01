"""Generation metrics match hand computations and sacrebleu on fixed inputs, in ASCII and other scripts."""

from __future__ import annotations

import string
from fractions import Fraction

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from finetune.metrics.text import (
    GENERATION_METRICS,
    ROW_METRICS,
    answer_tokens,
    bleu,
    chrf,
    exact_match,
    normalize_answer,
    rouge_l,
    row_scores,
    score_generations,
    text_tokens,
    token_f1,
)

# Sentences of at least 4 tokens, so standard BLEU (no effective order) is defined on them.
PREDICTIONS = [
    "the cat sat on the mat",
    "a quick brown fox jumps over the lazy dog",
    "Die Größe der Straße ist beeindruckend",
    "Où est le café près de la gare ?",
    "我 喜欢 猫 和 狗",
]
REFERENCES = [
    "the cat is sitting on the mat",
    "the quick brown fox jumped over a lazy dog",
    "Die Größe dieser Straße ist beeindruckend",
    "Où se trouve le café près de la gare ?",
    "我 喜欢 狗 和 猫",
]


def f1(common: int, predicted: int, expected: int) -> Fraction:
    """2PR/(P+R) x 100 from counts, in exact fractions."""
    precision, recall = Fraction(common, predicted), Fraction(common, expected)
    return 100 * 2 * precision * recall / (precision + recall)


# ---- normalisation and tokens

def test_normalisation_is_unicode_aware():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("«Bonjour !» ¿Qué?") == "bonjour qué"  # Unicode punctuation, accents kept
    assert normalize_answer("Cafe\u0301") == normalize_answer("CAFÉ") == "café"  # NFKC composes, casefold
    assert normalize_answer("Größe") == normalize_answer("GRÖSSE") == "grösse"  # casefold, not lower
    assert normalize_answer("ＡＢＣ ﬁne") == "abc fine"  # NFKC: full-width letters, ligatures
    assert normalize_answer("你好！") == "你 好"
    assert normalize_answer("cafe") != normalize_answer("café")


def test_punctuation_deleted_is_a_superset_of_squad():
    assert normalize_answer("hello" + string.punctuation + "world") == "helloworld"  # deleted, not spaced
    assert normalize_answer("U.S.") == "us"


def test_only_whole_english_articles_are_dropped():
    assert answer_tokens("The theory of an apple and a then") == ["theory", "of", "apple", "and", "then"]
    assert text_tokens("The cat") == ["the", "cat"]  # ROUGE-L keeps articles


def test_unspaced_scripts_split_per_character_and_marks_stay_in_words():
    assert text_tokens("我用Python写代码") == ["我", "用", "python", "写", "代", "码"]
    assert text_tokens("東京タワー") == ["東", "京", "タ", "ワ", "ー"]
    assert text_tokens("แมว") == ["แ", "ม", "ว"]
    assert text_tokens("ก่อน") == ["ก\u0e48", "อ", "น"]  # the tone mark stays on its consonant
    # Devanagari vowel signs are combining marks: Python's \w alone would cut "हिन्दी" into ह, न, द.
    assert text_tokens("हिन्दी भाषा") == ["हिन्दी", "भाषा"]


# ---- exact match and token F1

def test_exact_match():
    assert exact_match("The cat sat.", "the cat sat") == 100.0
    assert exact_match("The cat sat.", "a cat sat down") == 0.0
    assert exact_match("Die GRÖSSE", "die Größe") == 100.0
    assert exact_match("我喜欢猫", "我喜欢狗") == 0.0
    assert exact_match("我 喜欢猫。", "我喜欢猫") == 100.0  # spaces between CJK characters do not matter


def test_token_f1_by_hand():
    # [cat, sat] vs [cat, sat, down]: 2 common, P = 2/2, R = 2/3, F1 = 2 * 1 * 2/3 / (5/3) = 4/5
    assert token_f1("The cat sat.", "a cat sat down") == pytest.approx(80.0)
    assert float(f1(2, 2, 3)) == pytest.approx(80.0)
    # bag of tokens, counts clipped: [cat, cat, cat] vs [cat, dog]: 1 common, P = 1/3, R = 1/2, F1 = 2/5
    assert token_f1("cat cat cat", "cat dog") == pytest.approx(float(f1(1, 3, 2))) == pytest.approx(40.0)
    assert token_f1("dog", "cat") == 0.0


def test_token_f1_non_ascii():
    # [我, 喜, 欢, 猫] vs [我, 喜, 欢, 狗]: 3 common of 4 each, F1 = 3/4
    assert token_f1("我喜欢猫", "我喜欢狗") == pytest.approx(75.0)
    # [die, grösse, ist, wichtig] vs [grösse, ist, wichtig] (German "die" is not dropped): P = 3/4, R = 1, F1 = 6/7
    assert token_f1("Die Größe ist wichtig", "GRÖSSE ist wichtig!") == pytest.approx(float(f1(3, 4, 3)))
    assert token_f1("Die Größe ist wichtig", "GRÖSSE ist wichtig!") == pytest.approx(600 / 7)


# ---- ROUGE-L

@pytest.mark.parametrize(
    ("prediction", "reference", "predicted", "expected", "lcs"),
    [
        # LCS the-cat-sat
        ("the cat sat", "the black cat sat down",
         ["the", "cat", "sat"], ["the", "black", "cat", "sat", "down"], 3),
        # LCS the-cat-on-mat
        ("The cat sat on the mat.", "the cat lay on a mat",
         ["the", "cat", "sat", "on", "the", "mat"], ["the", "cat", "lay", "on", "a", "mat"], 4),
        # LCS die-grösse-strasse
        ("Die Größe der Straße", "die Größe einer Straße ist",
         ["die", "grösse", "der", "strasse"], ["die", "grösse", "einer", "strasse", "ist"], 3),
        # LCS le-café (or où, or est): order differs
        ("Où est le café ?", "le café est où",
         ["où", "est", "le", "café"], ["le", "café", "est", "où"], 2),
        # LCS 我-喜-欢
        ("我喜欢猫", "我非常喜欢狗", ["我", "喜", "欢", "猫"], ["我", "非", "常", "喜", "欢", "狗"], 3),
    ],
)
def test_rouge_l_against_hand_lcs(prediction, reference, predicted, expected, lcs):
    assert text_tokens(prediction) == predicted and text_tokens(reference) == expected
    hand = f1(lcs, len(predicted), len(expected))
    assert rouge_l([prediction], [reference]) == pytest.approx(float(hand))
    assert row_scores(prediction, reference)["rouge_l"] == pytest.approx(float(hand))


def test_rouge_l_hand_values():
    assert rouge_l(["the cat sat"], ["the black cat sat down"]) == pytest.approx(75.0)  # P 1, R 3/5
    assert rouge_l(["我喜欢猫"], ["我非常喜欢狗"]) == pytest.approx(60.0)  # P 3/4, R 1/2
    assert rouge_l(["Die Größe der Straße"], ["die Größe einer Straße ist"]) == pytest.approx(200 / 3)
    # the corpus score is the mean of the rows
    assert rouge_l(["the cat sat", "我喜欢猫"], ["the black cat sat down", "我非常喜欢狗"]) == pytest.approx(67.5)


def test_rouge_l_equals_rouge_score_default_on_plain_ascii():
    default = rouge_scorer.RougeScorer(["rougeL"])
    for prediction, reference in zip(PREDICTIONS[:2], REFERENCES[:2]):
        expected = 100 * default.score(reference, prediction)["rougeL"].fmeasure
        assert rouge_l([prediction], [reference]) == pytest.approx(expected)


def test_rouge_score_default_tokenizer_fails_non_ascii_and_ours_does_not():
    default = rouge_scorer.RougeScorer(["rougeL"])
    # It replaces every character outside [a-z0-9] by a space: identical Chinese or Russian answers score 0 ...
    for text in ("我喜欢猫", "кошка сидит на ковре"):
        assert default.score(text, text)["rougeL"].fmeasure == 0.0
        assert rouge_l([text], [text]) == 100.0
    assert default.score("我非常喜欢狗", "我喜欢猫")["rougeL"].fmeasure == 0.0
    assert rouge_l(["我喜欢猫"], ["我非常喜欢狗"]) == pytest.approx(60.0)
    # ... and "Größe" (size) matches "Grüße" (greetings) perfectly, both being [gr, e].
    assert default.score("Grüße", "Größe")["rougeL"].fmeasure == 1.0
    assert rouge_l(["Größe"], ["Grüße"]) == 0.0


# ---- BLEU and chrF

def test_bleu_and_chrf_equal_sacrebleu():
    assert bleu(PREDICTIONS, REFERENCES) == sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    assert chrf(PREDICTIONS, REFERENCES) == sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score
    non_ascii = slice(2, None)
    assert bleu(PREDICTIONS[non_ascii], REFERENCES[non_ascii]) == pytest.approx(
        sacrebleu.corpus_bleu(PREDICTIONS[non_ascii], [REFERENCES[non_ascii]]).score)
    assert chrf(PREDICTIONS[non_ascii], REFERENCES[non_ascii]) == pytest.approx(
        sacrebleu.corpus_chrf(PREDICTIONS[non_ascii], [REFERENCES[non_ascii]]).score)
    assert 0 < bleu(PREDICTIONS, REFERENCES) < 100 and 0 < chrf(PREDICTIONS, REFERENCES) < 100


def test_bleu_uses_effective_order_for_short_answers():
    predictions, references = ["Paris", "4", "blue whale"], ["Paris", "4", "blue whale"]
    # No prediction has 3 tokens: standard BLEU is ~0 for perfect answers, effective order gives 100.
    assert sacrebleu.corpus_bleu(predictions, [references]).score == pytest.approx(0.0, abs=1e-6)
    assert bleu(predictions, references) == pytest.approx(100.0)
    predictions = ["Paris", "5", "blue shark"]
    assert bleu(predictions, references) == pytest.approx(
        sacrebleu.corpus_bleu(predictions, [references], use_effective_order=True).score)


@pytest.mark.parametrize("metric", [bleu, chrf])
def test_corpus_metrics_perfect_and_disjoint(metric):
    assert metric(["the cat sat on the mat", "我喜欢猫"], ["the cat sat on the mat", "我喜欢猫"]) == pytest.approx(100.0)
    assert metric(["xyz uvw qqq kkk"], ["abc def ghi lmn"]) == 0.0


# ---- everything together

def test_score_generations_keys_order_and_values():
    scores = score_generations(PREDICTIONS, REFERENCES)
    assert tuple(scores) == GENERATION_METRICS
    rows = [row_scores(p, r) for p, r in zip(PREDICTIONS, REFERENCES)]
    assert scores["exact_match"] == pytest.approx(sum(row["exact_match"] for row in rows) / len(rows))
    assert scores["token_f1"] == pytest.approx(sum(token_f1(p, r) for p, r in zip(PREDICTIONS, REFERENCES)) / 5)
    assert scores["rouge_l"] == pytest.approx(rouge_l(PREDICTIONS, REFERENCES))
    assert scores["bleu"] == bleu(PREDICTIONS, REFERENCES)
    assert scores["chrf"] == chrf(PREDICTIONS, REFERENCES)
    assert all(isinstance(value, float) and 0 <= value <= 100 for value in scores.values())


def test_every_metric_is_100_for_perfect_and_0_for_disjoint_answers():
    texts = ["The Eiffel Tower is in Paris", "Größe zählt", "我喜欢猫"]
    assert score_generations(texts, texts) == pytest.approx(dict.fromkeys(GENERATION_METRICS, 100.0))
    assert score_generations(["xyz uvw qqq"], ["abc def ghi"]) == dict.fromkeys(GENERATION_METRICS, 0.0)


def test_row_scores():
    scores = row_scores("The cat sat.", "a cat sat down")
    assert tuple(scores) == ROW_METRICS == ("exact_match", "token_f1", "rouge_l")
    # ROUGE-L keeps articles: [the, cat, sat] vs [a, cat, sat, down], LCS 2, P 2/3, R 2/4
    assert scores == pytest.approx({"exact_match": 0.0, "token_f1": 80.0, "rouge_l": float(f1(2, 3, 4))})


# ---- edge cases

def test_empty_answers():
    assert row_scores("", "") == {"exact_match": 100.0, "token_f1": 100.0, "rouge_l": 100.0}
    assert row_scores(" .!", "the") == {"exact_match": 100.0, "token_f1": 100.0, "rouge_l": 0.0}  # articles count in ROUGE
    for prediction, reference in (("", "cat"), ("cat", ""), ("...", "cat")):
        assert row_scores(prediction, reference) == {"exact_match": 0.0, "token_f1": 0.0, "rouge_l": 0.0}
    assert rouge_l(["", "cat"], ["", "cat"]) == 100.0


@pytest.mark.parametrize("metric", [rouge_l, bleu, chrf, score_generations])
def test_bad_rows_are_refused(metric):
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metric(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        metric([], [])
    with pytest.raises(TypeError, match="single string"):
        metric("the cat", "the cat")
    with pytest.raises(TypeError, match="prediction 1 is NoneType"):
        metric(["cat", None], ["cat", "dog"])
