"""`finetune eval`: base, adapter and merged side by side; the numbers checked against hand computations."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from support import cls_recipe, sft_recipe, write_jsonl

from finetune.errors import DataError, FinetuneError
from finetune.evaluation.side_by_side import EvalOptions, evaluate_run
from finetune.recipe import validate_recipe

NO_TASKS = EvalOptions(tasks=[])


@pytest.fixture(scope="module")
def sft_run(llama64, tmp_path_factory):
    """A tiny SFT run on the capitals data, 20% held out; it learns the answers."""
    from finetune.runner import run

    tmp = tmp_path_factory.mktemp("eval-sft")
    recipe = validate_recipe(sft_recipe(llama64, tmp, data={"eval_fraction": 0.2}, eval={"max_new_tokens": 8}))
    run(recipe)
    return tmp / "out"


def copy_run(run_dir, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("eval", "checkpoint-*"))
    return target


def test_perplexity_is_exp_of_the_mean_completion_token_loss(llama64):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.evaluation.language import held_out_loss, loss_examples

    tokenizer = AutoTokenizer.from_pretrained(llama64)
    model = AutoModelForCausalLM.from_pretrained(llama64).eval()
    rows = [
        {"messages": [{"role": "user", "content": "what is the capital of france"}, {"role": "assistant", "content": "paris"}]},
        {"prompt": "the capital of italy is", "completion": " rome"},
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello how are you today"}]},
    ]
    examples = loss_examples(rows, tokenizer, max_length=64)
    result = held_out_loss(model, examples, tokenizer.pad_token_id, batch_size=2)  # batched and padded

    # By hand: each row alone, no padding; -log p(token) for every completion token, one mean over all tokens.
    losses = []
    for example in examples:
        with torch.no_grad():
            logits = model(torch.tensor([example["input_ids"]])).logits[0]
        log_probs = logits.log_softmax(-1)
        for position, label in enumerate(example["labels"][1:]):
            if label != -100:
                losses.append(-float(log_probs[position, label]))
    assert result["tokens"] == len(losses) > len(examples)  # weighted per token, not per row
    assert result["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    # Only completion tokens: the prompt's tokens are not scored.
    assert result["tokens"] < sum(len(e["input_ids"]) - 1 for e in examples)


def test_trained_model_beats_its_base_and_merged_equals_adapter(sft_run):
    evaluation, out = evaluate_run(sft_run, NO_TASKS)
    base, adapter, merged = (evaluation.metrics[v] for v in ("base", "adapter", "merged"))
    assert adapter["held_out/loss"] < base["held_out/loss"] - 1
    assert adapter["generation/exact_match"] >= 50 > base["generation/exact_match"]
    # The in-memory fp32 merge differs from the adapter by float rounding only (the tolerance PEFT's tests use).
    assert evaluation.comparisons["adapter_vs_merged_max_abs_logit_diff"] < 1e-4
    assert merged["held_out/loss"] == pytest.approx(adapter["held_out/loss"], abs=1e-4)
    assert evaluation.comparisons["adapter_vs_base_max_abs_logit_diff"] > 1 and not evaluation.warnings

    report = json.loads((out / "report.json").read_text())
    assert report["deltas_vs_base"]["adapter"]["held_out/loss"] == pytest.approx(adapter["held_out/loss"] - base["held_out/loss"])
    assert report["variants"] == ["base", "adapter", "merged"] and report["seed"] == 42
    assert set(report["seconds"]["adapter"]) == {"held_out_loss", "generation"}
    markdown = (out / "report.md").read_text()
    assert "| metric | base | fine-tuned | merged | Δ fine-tuned − base |" in markdown
    assert "| held_out/loss (lower is better) |" in markdown and "## Side by side" in markdown
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == report["facts"]["generated_rows"] == 8
    assert all(set(p) >= {"prompt", "reference", "base", "adapter", "merged"} for p in predictions)
    assert (out / "metrics.png").stat().st_size > 10_000


def test_an_adapter_that_changed_nothing_is_flagged(sft_run, tmp_path):
    from safetensors.torch import load_file, save_file

    run = copy_run(sft_run, tmp_path)
    weights = load_file(run / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()}, run / "adapter_model.safetensors")
    evaluation, out = evaluate_run(run, EvalOptions(tasks=[], variants=["base", "adapter"]))
    assert evaluation.comparisons["adapter_vs_base_max_abs_logit_diff"] == 0
    assert evaluation.warnings and evaluation.warnings[0].startswith("THE ADAPTER CHANGED NOTHING")
    assert "> **Warning:** THE ADAPTER CHANGED NOTHING" in (out / "report.md").read_text()


def test_a_merged_folder_is_the_merged_variant(sft_run, tmp_path):
    from finetune.merge.merging import merge_adapter

    merge_adapter(sft_run, tmp_path / "merged", dtype="bf16")
    evaluation, out = evaluate_run(tmp_path / "merged", EvalOptions(tasks=[], out=str(tmp_path / "report")))
    assert evaluation.variants == ["base", "adapter", "merged"]  # the adapter run found from merge_report.json
    assert evaluation.facts["merged_from"] == "folder"
    diff = evaluation.comparisons["adapter_vs_merged_max_abs_logit_diff"]
    assert 1e-4 < diff < 0.1 * evaluation.comparisons["adapter_max_abs_logit"]  # bf16 rounding: visible, small
    assert (out / "report.json").is_file() and not (tmp_path / "merged" / "eval").exists()


def test_classification_run_reports_each_variant(tiny_bert_dir, tmp_path):
    from finetune.runner import run

    run(validate_recipe(cls_recipe(tiny_bert_dir, tmp_path)))
    evaluation, out = evaluate_run(tmp_path / "out")
    base, adapter, merged = (evaluation.metrics[v] for v in ("base", "adapter", "merged"))
    assert adapter["accuracy"] > 0.9 and adapter["accuracy"] > base["accuracy"] + 0.3
    assert merged["accuracy"] == adapter["accuracy"] and "f1[cat]" in adapter and "f1_macro" in adapter
    history = json.loads((tmp_path / "out" / "train_metrics.json").read_text())["log_history"]
    before_training = next(h for h in history if "eval_accuracy" in h and h["step"] == 0)
    assert base["accuracy"] == pytest.approx(before_training["eval_accuracy"])  # the same seeded head
    reports = json.loads((out / "report.json").read_text())["facts"]["reports"]
    assert len(reports["adapter"]["confusion_matrix"]) == 4 and reports["adapter"]["num_examples"] == 80
    with pytest.raises(FinetuneError, match=r"^--tasks kit_qa: lm_eval tasks score a causal LM"):
        evaluate_run(tmp_path / "out", EvalOptions(tasks=["kit_qa"]))


def test_not_a_run_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FinetuneError) as err:
        evaluate_run(tmp_path)
    assert str(err.value) == (
        f"{tmp_path}: not a finished run (no recipe.yaml with an adapter or model weights) nor a merged model "
        "(no merge_report.json). Give a run's output.dir or a folder written by `finetune merge`."
    )
    with pytest.raises(FinetuneError, match="no such folder"):
        evaluate_run(tmp_path / "missing")


def test_unknown_variant_and_one_that_cannot_be_built(sft_run, tmp_path):
    with pytest.raises(FinetuneError, match=r"^--variants: unknown tuned; choose from base, adapter, merged\.$"):
        evaluate_run(sft_run, EvalOptions(tasks=[], variants=["base", "tuned"]))
    run = copy_run(sft_run, tmp_path)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["adapter"]["type"] = "qlora"
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(FinetuneError) as err:
        evaluate_run(run, EvalOptions(tasks=[], variants=["adapter", "merged"]))
    assert str(err.value) == (
        "cannot build variant merged: the run trained on a 4-bit base, and merging into quantized weights in memory "
        "would not be the model you ship: run `finetune merge RUN_DIR --out DIR` and pass `--merged DIR`."
    )
    assert not (run / "eval").exists()


def test_bad_held_out_rows_stop_before_any_model_load_and_write_nothing(sft_run, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError) as err:
        evaluate_run(sft_run, EvalOptions(tasks=[], data=str(bad), out=str(tmp_path / "report")))
    assert str(err.value).startswith(f"{bad}, row 1: no non-empty assistant message to learn from")
    assert not (tmp_path / "report").exists() and not list(tmp_path.glob(".report*"))


def test_cli_prints_the_report_and_runs_after_training(llama64, tmp_path, capsys):
    from finetune.commands import train

    recipe = sft_recipe(llama64, tmp_path, data={"eval_fraction": 0.2}, train={"epochs": 1},
                        eval={"after_training": True, "tasks": [], "variants": "base,adapter", "max_new_tokens": 4})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert train.main([str(path)]) == 0
    report = json.loads((tmp_path / "out" / "eval" / "report.json").read_text())
    assert report["variants"] == ["base", "adapter"] and "held_out/loss" in report["metrics"]["adapter"]
    assert "| metric | base | fine-tuned | Δ fine-tuned − base |" in capsys.readouterr().out


def test_a_shipped_lm_eval_task_gets_a_column_per_variant(sft_run, tmp_path):
    evaluation, out = evaluate_run(
        sft_run, EvalOptions(tasks=["kit_qa"], limit=2, variants=["base", "adapter"], out=str(tmp_path / "report"))
    )
    report = json.loads((out / "report.json").read_text())
    assert set(report["lm_eval"]["kit_qa"]) == {"base", "adapter"}
    assert all(report["lm_eval"]["kit_qa"][v]["n"] == 2 for v in ("base", "adapter"))
    for variant in ("base", "adapter"):
        assert set(evaluation.metrics[variant]) >= {"kit_qa/exact_match", "kit_qa/token_f1", "held_out/loss"}
        assert report["seconds"][variant]["kit_qa"] > 0
    base_answers = [s["response"] for s in report["lm_eval"]["kit_qa"]["base"]["samples"]]
    adapter_answers = [s["response"] for s in report["lm_eval"]["kit_qa"]["adapter"]["samples"]]
    assert base_answers != adapter_answers  # the adapter was active in one and disabled in the other
    assert "| kit_qa/exact_match |" in (out / "report.md").read_text()


def test_unknown_task_names_the_near_match_before_any_model_load(sft_run, tmp_path):
    with pytest.raises(FinetuneError) as err:
        evaluate_run(sft_run, EvalOptions(tasks=["kit_mmlu_dve"], out=str(tmp_path / "report")))
    assert str(err.value) == (
        "unknown eval task 'kit_mmlu_dve'. Did you mean 'kit_mmlu_dev'? "
        "Shipped tasks: kit_bbc_topics, kit_mmlu_dev, kit_qa."
    )
    assert not (tmp_path / "report").exists()


def test_after_training_settings_are_checked_before_training(llama64, tmp_path):
    from finetune.runner import run

    recipe = validate_recipe(sft_recipe(llama64, tmp_path, data={"eval_fraction": 0.2},
                                        eval={"after_training": True, "tasks": ["kit_q"]}))
    with pytest.raises(FinetuneError, match=r"^unknown eval task 'kit_q'\. Did you mean 'kit_qa'\?"):
        run(recipe)
    assert not (tmp_path / "out" / "adapter_config.json").exists()
    no_held_out = validate_recipe(sft_recipe(llama64, tmp_path, eval={"after_training": True, "tasks": []}))
    with pytest.raises(FinetuneError, match=r"^eval.after_training needs held-out rows"):
        run(no_held_out)


def test_a_change_within_two_standard_errors_is_called_noise():
    from finetune.evaluation.report import _delta

    assert _delta("kit_mmlu_dev/acc", -0.0175, set(), noise=0.09) == "-0.0175 (within 2 s.e.)"
    assert _delta("kit_bbc_topics/acc", -0.2, set(), noise=0.07) == "-0.2 ✗"
    assert _delta("held_out/loss", -5.0, {"held_out/loss"}) == "-5 ✓"  # lower is better, no standard error known


def test_a_full_fine_tune_is_compared_with_its_base(llama64, tmp_path):
    from finetune.runner import run

    run(validate_recipe(sft_recipe(llama64, tmp_path, adapter="none", data={"eval_fraction": 0.2},
                                   train={"epochs": 2, "learning_rate": 1e-3}, eval={"max_new_tokens": 4})))
    evaluation, _ = evaluate_run(tmp_path / "out", NO_TASKS)
    assert evaluation.variants == ["base", "adapter"]
    assert evaluation.notes == ["merged left out: a full fine-tune has no adapter to merge: its `adapter` column is "
                                "the fine-tuned model"]
    assert evaluation.metrics["adapter"]["held_out/loss"] < evaluation.metrics["base"]["held_out/loss"]


def test_qlora_run_is_evaluated_on_its_4bit_base_without_an_in_memory_merge(llama64, tmp_path):
    from finetune.runner import run

    result = run(validate_recipe(sft_recipe(llama64, tmp_path, adapter={"type": "qlora", "r": 4},
                                            data={"eval_fraction": 0.2}, train={"epochs": 2}, eval={"max_new_tokens": 4})))
    evaluation, _ = evaluate_run(tmp_path / "out", NO_TASKS)
    assert evaluation.variants == ["base", "adapter"]
    assert evaluation.notes[0].startswith("merged left out: the run trained on a 4-bit base")
    # The adapter variant is the model training evaluated: the same held-out loss as the Trainer's final one.
    # (The Trainer's eval_loss is a mean over batches of per-batch token means; one batch here, so they agree.)
    assert evaluation.metrics["adapter"]["held_out/loss"] == pytest.approx(result.metrics["eval"]["eval_loss"], rel=1e-4)
