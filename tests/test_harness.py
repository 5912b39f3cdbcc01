"""lm-evaluation-harness on a model in memory: the shipped tasks scored as computed by hand, the adapter active."""

from __future__ import annotations

import pytest
import torch

from finetune.errors import FinetuneError
from finetune.evaluation import harness

TOPICS = ["business", "entertainment", "politics", "sports", "tech"]  # kit_bbc_topics' choices, in its order
N = 10  # documents: two per topic (the task interleaves them)


def topic_prompt(doc: dict) -> str:
    return f"Article: {doc['text']}\nTopic:"


@pytest.fixture(scope="module")
def bbc_llama(tmp_path_factory):
    """A tiny random Llama whose word-level vocabulary holds every word of the first N kit_bbc_topics prompts and
    topics, so each choice has a log-likelihood of its own (words outside the vocabulary would all be <unk>)."""
    from finetune.tiny import write_tiny_llama

    texts = [topic_prompt(doc) for doc in harness.shipped_docs("kit_bbc_topics")[:N]] + [" ".join(TOPICS)]
    folder = tmp_path_factory.mktemp("bbc-llama")
    write_tiny_llama(folder, texts, hidden=32, max_length=256)
    return folder


def load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # init_lora_weights=False: B is random too, so the adapter changes the outputs from the start
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def loglikelihoods(result: dict) -> torch.Tensor:
    return torch.tensor([sample["loglikelihoods"] for sample in result["samples"]])


def continuation_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(token | everything before it) over the continuation's tokens, the whole text in one forward."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    assert ids[: len(context_ids)] == context_ids and len(ids) > len(context_ids)
    with torch.no_grad():
        log_probs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(float(log_probs[i - 1, ids[i]]) for i in range(len(context_ids), len(ids)))


def test_topic_accuracy_equals_the_argmax_of_hand_computed_loglikelihoods(bbc_llama):
    model, tokenizer = load(bbc_llama)
    result = harness.run_tasks(model, tokenizer, ["kit_bbc_topics"], limit=N)["kit_bbc_topics"]

    docs = harness.shipped_docs("kit_bbc_topics")[:N]
    assert result["n"] == N and len(result["samples"]) == N
    correct = []
    for doc, sample in zip(docs, sorted(result["samples"], key=lambda s: s["doc_id"])):
        by_hand = [continuation_loglikelihood(model, tokenizer, topic_prompt(doc), " " + topic) for topic in TOPICS]
        assert len(set(by_hand)) == len(TOPICS)  # no ties: the comparison below means something
        assert sample["loglikelihoods"] == pytest.approx(by_hand, abs=1e-4)
        choice = TOPICS[max(range(len(TOPICS)), key=by_hand.__getitem__)]
        assert sample["choice"] == choice and sample["target"] == doc["label"]
        assert sample["correct"] == (choice == doc["label"])
        correct.append(choice == doc["label"])
    assert result["metrics"]["acc"] == pytest.approx(sum(correct) / N)
    assert set(result["stderr"]) == {"acc", "acc_norm"} and not result["chat_template"]


def test_the_adapter_is_active_and_disabling_it_gives_the_base_model(bbc_llama):
    model, tokenizer = load(bbc_llama)
    base = harness.run_tasks(model, tokenizer, ["kit_bbc_topics"], limit=N)["kit_bbc_topics"]
    peft_model = with_lora(model).train()
    adapter = harness.run_tasks(peft_model, tokenizer, ["kit_bbc_topics"], limit=N)["kit_bbc_topics"]
    with peft_model.disable_adapter():
        disabled = harness.run_tasks(peft_model, tokenizer, ["kit_bbc_topics"], limit=N)["kit_bbc_topics"]

    torch.testing.assert_close(loglikelihoods(disabled), loglikelihoods(base), atol=1e-5, rtol=0)
    assert (loglikelihoods(adapter) - loglikelihoods(base)).abs().max() > 0.1
    assert peft_model.training  # put back as it was: HFLM switches the model to eval mode


def test_kit_qa_prompts_through_the_chat_template_and_scores_on_the_kits_scale(bbc_llama):
    model, tokenizer = load(bbc_llama)
    result = harness.run_tasks(model, tokenizer, ["kit_qa"], limit=3)["kit_qa"]

    questions = [doc["question"] for doc in harness.shipped_docs("kit_qa")[:3]]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in questions]
    samples = sorted(result["samples"], key=lambda s: s["doc_id"])
    assert [s["prompt"] for s in samples] == prompts and result["chat_template"]
    assert all("<|im_end|>" not in s["response"] and 0 <= s["token_f1"] <= 100 for s in samples)
    assert result["n"] == 3 and set(result["metrics"]) == {"exact_match", "token_f1"}


def test_unknown_task_names_its_near_match():
    with pytest.raises(FinetuneError) as error:
        harness.check_tasks(["kit_qa", "kit_mmlu_dve"])
    assert str(error.value) == (
        "unknown eval task 'kit_mmlu_dve'. Did you mean 'kit_mmlu_dev'? Shipped tasks: kit_bbc_topics, kit_mmlu_dev, kit_qa."
    )


def test_shipped_tasks_never_index_lm_evals_builtin_tasks(bbc_llama, monkeypatch):
    """lm_eval's index of its ~15,000 task files takes ~16 s on 2 cores; shipped names must not build it."""
    from lm_eval.tasks._index import TaskIndex

    build = TaskIndex.build
    indexed = []

    def spy(paths, **kwargs):
        paths = list(paths)
        indexed.extend(paths)
        return build(paths, **kwargs)

    monkeypatch.setattr(TaskIndex, "build", staticmethod(spy))
    monkeypatch.setattr(harness, "_builtin_manager", harness._builtin_manager.__wrapped__)  # no index cached earlier
    harness.check_tasks(list(harness.local_tasks()))
    with pytest.raises(FinetuneError, match="Did you mean 'kit_qa'"):
        harness.check_tasks(["kit_qq"])  # a `kit_` typo is checked against the shipped tasks only
    model, tokenizer = load(bbc_llama)
    result = harness.run_tasks(model, tokenizer, ["kit_mmlu_dev"], limit=2)["kit_mmlu_dev"]
    assert result["n"] == 2 and indexed == []


def test_mmlu_dev_documents_come_from_lm_evals_own_files():
    docs = harness.shipped_docs("kit_mmlu_dev")
    # lm_eval ships 282 of MMLU's 285 development questions; one of them has five choices.
    assert len(docs) == 281 and len({doc["subject"] for doc in docs}) == 57
    assert len({doc["subject"] for doc in docs[:57]}) == 57  # any prefix spreads over the subjects
    assert all(len(doc["choices"]) == 4 and 0 <= doc["answer"] < 4 for doc in docs)


@pytest.mark.slow
def test_builtin_task_offline_says_it_needs_the_hub(bbc_llama):
    model, tokenizer = load(bbc_llama)
    harness.check_tasks(["hellaswag"])  # a built-in: known, so no error yet
    with pytest.raises(FinetuneError, match="built-in task whose data comes from the Hugging Face Hub"):
        harness.run_tasks(model, tokenizer, ["hellaswag"], limit=2)


def test_kit_qa_rows_are_the_demos_held_out_rows():
    """kit_qa.jsonl is a copy (the recipes folder is not installed with the package); it must not drift."""
    import json

    from support import REPO

    rows = [json.loads(line) for line in (REPO / "recipes" / "data" / "kit_eval.jsonl").read_text().splitlines() if line]
    expected = [{"question": row["messages"][0]["content"], "answer": row["messages"][1]["content"]} for row in rows]
    assert harness.shipped_docs("kit_qa") == expected
