"""Preference tuning (`task: preference`): the rows and their exact problems, templating as SFT's, the reference
model (the base, or exactly the SFT run's model), DPO's loss and gradients against a hand-written DPO, and a toy
preference learned."""

from __future__ import annotations

import contextlib
import json
import math
import random

import pytest
import torch

from finetune.errors import DataError, FinetuneError
from finetune.recipe import validate_recipe
from support import CAPITALS, _merge_sections, sft_recipe, write_jsonl

LN2 = math.log(2)


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def capital_pairs(n: int = 20, seed: int = 0) -> list[dict]:
    """Chat pairs: the right capital preferred to a wrong one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        country = rng.choice(list(CAPITALS))
        wrong = rng.choice([c for c in CAPITALS.values() if c != CAPITALS[country]])
        rows.append({"prompt": chat(f"what is the capital of {country}"), "chosen": CAPITALS[country], "rejected": wrong})
    return rows


def pref_recipe(model_dir, tmp, rows=None, **sections) -> dict:
    train = write_jsonl(tmp / "pairs.jsonl", rows if rows is not None else capital_pairs())
    recipe = {
        "task": "preference",
        "model": {"name_or_path": str(model_dir)},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(train), "max_length": 64},
        "train": {"max_steps": 2, "micro_batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0,
                  "logging_steps": 1, "save_checkpoints": False, "num_threads": 1},
        "output": {"dir": str(tmp / "out")},
    }
    if (sections.get("preference") or {}).get("from_run"):
        recipe["adapter"] = {}  # the SFT run's LoRA continues with its own settings
    return _merge_sections(recipe, sections)


@pytest.fixture(scope="module")
def sft_run(tiny_llama_dir, tmp_path_factory):
    """A finished LoRA SFT run on the capitals: the starting point (and reference) of preference runs."""
    from finetune.runner import run

    tmp = tmp_path_factory.mktemp("sft-start")
    recipe = validate_recipe(sft_recipe(tiny_llama_dir, tmp, train={"epochs": 2, "logging_steps": 5, "num_threads": 1,
                                                                   "micro_batch_size": 8, "learning_rate": 3e-2,
                                                                   "warmup_ratio": 0.0, "save_checkpoints": False}))
    run(recipe)
    return tmp / "out"


def build(recipe_dict, tmp):
    """The preference task's trainer, built as the runner builds it (no training)."""
    from finetune.runtime import resolve_runtime
    from finetune.tasks.preference import PreferenceTask
    from finetune.training.arguments import training_arguments

    recipe = validate_recipe(recipe_dict)
    runtime = resolve_runtime(recipe)
    task = PreferenceTask(recipe, runtime)
    path, tokenizer = task.load_base()
    task.prepare_data(tokenizer, path, contextlib.nullcontext)
    model = task.load_model(path)
    task.prepare_model(model, tokenizer)
    model = task.attach_adapter(model, [])
    config_class, kwargs = task.trainer_config()
    args = training_arguments(recipe, runtime, tmp / "out", has_eval=False, config_class=config_class, **kwargs)
    return task, task.build_trainer(model, args, tokenizer, [])


# --------------------------------------------------------------------------------------------
# Rows: formats and bad rows (no model)
# --------------------------------------------------------------------------------------------


def read(tmp_path, rows, **data):
    from finetune.tasks.preference import PreferenceTask

    recipe = validate_recipe(pref_recipe(tmp_path / "nomodel", tmp_path, rows=rows, data=data))
    return PreferenceTask.read_rows(recipe, recipe.data.train)


def test_formats_text_chat_implicit_prompt_and_unpaired(tmp_path):
    rows = read(tmp_path, [
        {"prompt": "q one", "chosen": "yes", "rejected": "no"},
        {"prompt": chat("q two"), "chosen": [{"role": "assistant", "content": "yes"}], "rejected": "no"},
        {"chosen": [*chat("q three"), {"role": "assistant", "content": "yes"}],
         "rejected": [*chat("q three"), {"role": "assistant", "content": "no"}]},
    ]).rows
    assert rows == [
        {"prompt": "q one", "chosen": "yes", "rejected": "no"},
        {"prompt": chat("q two"), "chosen": "yes", "rejected": "no"},
        {"prompt": chat("q three"), "chosen": "yes", "rejected": "no"},
    ]
    (tmp_path / "u").mkdir()
    unpaired = validate_recipe(pref_recipe(tmp_path, tmp_path / "u", rows=[{"prompt": "q", "completion": "a", "label": False}],
                                           preference={"loss": "kto"}))
    from finetune.tasks.preference import PreferenceTask

    assert PreferenceTask.read_rows(unpaired, unpaired.data.train).rows == [{"prompt": "q", "completion": "a", "label": False}]


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "q", "chosen": "same", "rejected": "same "}, "chosen and rejected are the same answer: the pair prefers nothing"),
    ({"prompt": "q", "chosen": "  ", "rejected": "no"}, "'chosen' is an empty answer"),
    ({"prompt": "q", "chosen": "yes"}, "'rejected' is missing"),
    ({"prompt": "", "chosen": "yes", "rejected": "no"}, "'prompt' is missing or empty"),
    ({"chosen": [*chat("q one"), {"role": "assistant", "content": "yes"}],
      "rejected": [*chat("q two"), {"role": "assistant", "content": "no"}]},
     "chosen and rejected conversations must share every message but the last (the prompt); they differ earlier, "
     "so the prompt is not a prefix of both"),
])
def test_each_bad_row_is_named_by_file_and_row(tmp_path, row, problem):
    good = {"prompt": "q", "chosen": "yes", "rejected": "no"}
    with pytest.raises(DataError) as err:
        read(tmp_path, [good, row])
    assert str(err.value) == (f"{tmp_path / 'pairs.jsonl'}, row 2: {problem}  (set data.on_bad_row: skip to drop such "
                              "rows and count them)")
    skipped = read(tmp_path, [good, row, good], on_bad_row="skip")
    assert (len(skipped.rows), skipped.skipped) == (2, 1)


def test_unpaired_rows_need_kto(tmp_path):
    with pytest.raises(DataError, match=r"^preference.loss: dpo needs pairs \(prompt, chosen, rejected\); the data holds "
                                        r"unpaired rows"):
        read(tmp_path, [{"prompt": "q", "completion": "a", "label": True}])


def test_templating_is_sfts_with_end_of_turn_and_one_bos(tiny_llama_dir):
    from finetune.data.preference import tokenize_preference_row
    from finetune.data.sft import tokenize_row
    from finetune.models.loading import load_tokenizer

    recipe = validate_recipe(pref_recipe(tiny_llama_dir, tiny_llama_dir.parent))
    tokenizer = load_tokenizer(recipe, str(tiny_llama_dir))
    prompt = [{"role": "system", "content": "you are a kit"}, *chat("what is the capital of france")]
    tokens = tokenize_preference_row({"prompt": prompt, "chosen": "paris", "rejected": "rome"}, tokenizer, 64)
    sft = tokenize_row({"messages": [*prompt, {"role": "assistant", "content": "paris"}]}, tokenizer, False)
    # The same ids as SFT trains on, and the answer is exactly SFT's labelled tokens (answer + end of turn).
    assert tokens["prompt_ids"] + tokens["chosen_ids"] == sft["input_ids"]
    assert tokens["chosen_ids"] == [t for t in sft["labels"] if t != -100]
    assert tokenizer.convert_ids_to_tokens(tokens["chosen_ids"])[-2:] == ["<|im_end|>", "\n"]
    text = tokenize_preference_row({"prompt": "the capital of france is", "chosen": " paris", "rejected": " rome"},
                                   tokenizer, 64)
    for ids in (text["prompt_ids"] + text["chosen_ids"], tokens["prompt_ids"] + tokens["rejected_ids"]):
        assert ids.count(tokenizer.bos_token_id) <= 1
    assert text["chosen_ids"][-1] == tokenizer.eos_token_id and text["chosen_ids"][0] != tokenizer.bos_token_id


def test_a_row_over_max_length_is_reported_never_cut(tiny_llama_dir, tmp_path):
    from finetune.tasks.preference import PreferenceTask
    from finetune.models.loading import load_tokenizer

    long = {"prompt": chat("what is the capital of france " * 6), "chosen": "paris", "rejected": "rome"}
    recipe = validate_recipe(pref_recipe(tiny_llama_dir, tmp_path, rows=[capital_pairs(1)[0], long], data={"max_length": 32}))
    tokenizer = load_tokenizer(recipe, str(tiny_llama_dir))
    with pytest.raises(DataError, match=r"pairs.jsonl, row 2: the prompt and chosen answer are \d+ tokens, over "
                                        r"data.max_length=32: a cut answer would be scored on part of itself"):
        PreferenceTask.read_rows(recipe, recipe.data.train, tokenizer)


def test_validate_data_reads_the_pairs(tiny_llama_dir, tmp_path, capsys):
    from finetune.commands.validate import validate_command

    rows = [*capital_pairs(3), {"prompt": "q", "chosen": "a", "rejected": "a"}]
    recipe = validate_recipe(pref_recipe(tiny_llama_dir, tmp_path, rows=rows, data={"on_bad_row": "skip"}))
    assert validate_command(recipe, "r.yaml", check_rows=True) == 0
    assert "  data.train: 3 usable rows, 1 unusable skipped" in capsys.readouterr().out


def test_from_run_must_be_a_run_of_the_same_base(tiny_llama_dir, llama64, sft_run, tmp_path):
    from finetune.checks import recipe_problems
    from finetune.runtime import resolve_runtime

    ok = validate_recipe(pref_recipe(tiny_llama_dir, tmp_path, preference={"from_run": str(sft_run)}))
    assert recipe_problems(ok, resolve_runtime(ok)) == []
    ranked = validate_recipe(pref_recipe(tiny_llama_dir, tmp_path, preference={"from_run": str(sft_run)}, adapter={"r": 4}))
    assert recipe_problems(ranked, resolve_runtime(ranked)) == [
        f"adapter.r: with preference.from_run, the run's LoRA keeps training with its own settings (rank, alpha, "
        f"targets; see {sft_run}/adapter_config.json); remove adapter.r."
    ]
    other = validate_recipe(pref_recipe(llama64, tmp_path, preference={"from_run": str(sft_run)}))
    assert recipe_problems(other, resolve_runtime(other)) == [
        f"preference.from_run: {sft_run} was trained on {tiny_llama_dir}, but model.name_or_path is {llama64}: its "
        f"adapter only fits its own base; set model.name_or_path: {tiny_llama_dir}."
    ]
    missing = validate_recipe(pref_recipe(tiny_llama_dir, tmp_path, preference={"from_run": str(tmp_path)}))
    assert recipe_problems(missing, resolve_runtime(missing)) == [
        f"preference.from_run: {tmp_path} is not a finished LoRA run (no recipe.yaml and adapter_config.json); train "
        "the SFT run first, or give its output.dir."
    ]


# --------------------------------------------------------------------------------------------
# The reference and the loss
# --------------------------------------------------------------------------------------------


def first_log(result) -> dict:
    return next(h for h in result.metrics["log_history"] if "loss" in h)


@pytest.mark.parametrize("start", ["base", "sft", "sft-qlora"])
def test_step_zero_loss_is_ln2_and_rewards_zero(tiny_llama_dir, sft_run, tmp_path, start):
    """At step 0 the policy is the reference, whatever it starts from: a wrong reference (the bare base after SFT)
    shows as a loss away from ln 2 and non-zero rewards. The SFT run's LoRA also continues on a 4-bit base (QLoRA)."""
    from finetune.runner import run

    preference = {"from_run": str(sft_run)} if start != "base" else {}
    adapter = {"type": "qlora"} if start == "sft-qlora" else {}
    result = run(validate_recipe(pref_recipe(tiny_llama_dir, tmp_path, preference=preference, adapter=adapter,
                                             train={"max_steps": 1})))
    first = first_log(result)
    assert first["loss"] == pytest.approx(LN2, abs=1e-4)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[key] == pytest.approx(0.0, abs=1e-4), key
    assert "rewards/accuracies" in first and "logps/chosen" in first
    saved = json.loads((tmp_path / "out" / "train_metrics.json").read_text())
    assert saved["log_history"][0]["rewards/margins"] == first["rewards/margins"]
    assert not (tmp_path / "out" / "ref").exists()  # the frozen reference copy is not part of the result
    if start == "sft":  # the run is served like an SFT run: `finetune chat` loads its base and its adapter
        from finetune.commands.chat import load_for_chat

        model, _, recipe = load_for_chat(str(tmp_path / "out"))
        assert recipe.task == "preference" and list(model.peft_config) == ["default"]


def sequence_logp(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + answer])
    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    return logps.gather(-1, ids[0, 1:, None])[len(prompt) - 1 :, 0].sum()


def test_reference_is_the_sft_model_not_the_base(tiny_llama_dir, sft_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from finetune.models.adapters import load_adapter

    _, trainer = build(pref_recipe(tiny_llama_dir, tmp_path, preference={"from_run": str(sft_run)}), tmp_path)
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    base_chosen = torch.stack([sequence_logp(base, r["prompt_ids"], r["chosen_ids"]) for r in rows]).detach()
    sft = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), sft_run).eval()
    with torch.no_grad():
        sft_chosen = torch.stack([sequence_logp(sft, r["prompt_ids"], r["chosen_ids"]) for r in rows])
        sft_rejected = torch.stack([sequence_logp(sft, r["prompt_ids"], r["rejected_ids"]) for r in rows])
    torch.testing.assert_close(ref_chosen, sft_chosen, atol=1e-4, rtol=0)
    torch.testing.assert_close(ref_rejected, sft_rejected, atol=1e-4, rtol=0)
    assert (ref_chosen - base_chosen).abs().max() > 0.05  # the SFT run moved the capitals' log-probs away from the base
    # One model in memory: the reference is a frozen adapter, not a copy of the weights.
    assert trainer.ref_model is None
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if ".ref." in n)


def test_loss_and_gradients_equal_a_hand_written_dpo(tiny_llama_dir, sft_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from finetune.models.adapters import load_adapter

    beta = 0.3
    recipe = pref_recipe(tiny_llama_dir, tmp_path, preference={"from_run": str(sft_run), "beta": beta})
    _, trainer = build(recipe, tmp_path)
    model = trainer.model
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy away from the reference, so the loss is not ln 2 and every term counts
        for name, param in model.named_parameters():
            if ".default." in name and "lora_B" in name:
                param.add_(0.05 * torch.randn_like(param))
    rows = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    kit_grads = {n: p.grad.clone() for n, p in trained.items()}
    model.zero_grad()

    reference = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), sft_run).eval()
    with torch.no_grad():
        ref = {k: torch.stack([sequence_logp(reference, r["prompt_ids"], r[f"{k}_ids"]) for r in rows]) for k in ("chosen", "rejected")}
    pol = {k: torch.stack([sequence_logp(model, r["prompt_ids"], r[f"{k}_ids"]) for r in rows]) for k in ("chosen", "rejected")}
    by_hand = -torch.nn.functional.logsigmoid(beta * ((pol["chosen"] - ref["chosen"]) - (pol["rejected"] - ref["rejected"]))).mean()
    by_hand.backward()
    assert abs(loss.item() - LN2) > 1e-3
    torch.testing.assert_close(loss.detach(), by_hand.detach(), atol=1e-5, rtol=1e-5)
    assert len(kit_grads) > 0
    for name, param in trained.items():
        torch.testing.assert_close(kit_grads[name], param.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_non_finite_loss_stops_naming_the_step(caplog):
    from transformers import TrainerControl, TrainerState

    from finetune.training.watch import PreferenceWatch

    watch, state = PreferenceWatch(), TrainerState()
    state.global_step = 7
    with pytest.raises(FinetuneError, match=r"^the loss is nan at step 7: fp16 overflow"):
        watch.on_log(None, state, TrainerControl(), logs={"loss": float("nan")})
    for value in (-10.0, -11.0, -12.5):
        watch.on_evaluate(None, state, TrainerControl(), metrics={"eval_logps/chosen": value})
    assert "logps/chosen has fallen at each of the last three evaluations (-10.00 -> -11.00 -> -12.50)" in caplog.text


# --------------------------------------------------------------------------------------------
# A toy preference is learned
# --------------------------------------------------------------------------------------------


def ending_pairs(words, good: str, bad: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(24):
        answer = " ".join(rng.sample(words, 2))
        rows.append({"prompt": chat(f"what is {rng.choice(words)}"), "chosen": f"{answer} {good}", "rejected": f"{answer} {bad}"})
    return rows


def test_dpo_learns_a_toy_preference_the_reference_lacks(tiny_llama_dir, tmp_path):
    """Answers that end in a given word are preferred: the word the base finds the less likely, so the reference's
    held-out accuracy is low and only a trained policy can exceed it."""
    from finetune.evaluation.preference import pair_scores
    from finetune.models.adapters import load_adapter
    from finetune.models.loading import load_tokenizer
    from finetune.data.preference import tokenize_preference_row
    from finetune.runner import run
    from transformers import AutoModelForCausalLM

    words = "cat dog bird fish sun moon tree river".split()
    recipe = validate_recipe(pref_recipe(tiny_llama_dir, tmp_path))
    tokenizer = load_tokenizer(recipe, str(tiny_llama_dir))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    probe = [tokenize_preference_row(r, tokenizer, 64) for r in ending_pairs(words, "yes", "no", seed=9)]
    good, bad = ("no", "yes") if pair_scores(base, probe).likelihood_accuracy > 0.5 else ("yes", "no")
    held = [tokenize_preference_row(r, tokenizer, 64) for r in ending_pairs(words, good, bad, seed=1)]
    before = pair_scores(base, held)
    write_jsonl(tmp_path / "held.jsonl", ending_pairs(words, good, bad, seed=1))
    result = run(validate_recipe(pref_recipe(
        tiny_llama_dir, tmp_path, rows=ending_pairs(words, good, bad, seed=0),
        data={"eval": str(tmp_path / "held.jsonl")},
        train={"max_steps": 24, "learning_rate": 2e-2, "eval_steps": 24, "logging_steps": 4},
        preference={"beta": 0.5},
    )))
    evals = [h for h in result.metrics["log_history"] if "eval_rewards/accuracies" in h]
    assert evals[0]["eval_loss"] == pytest.approx(LN2, abs=1e-4)  # before training: the policy is the reference
    assert evals[-1]["eval_rewards/accuracies"] == 1.0 and evals[-1]["eval_rewards/margins"] > 0.5
    tuned = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "out").eval()
    after = pair_scores(tuned, held)
    assert after.against(before, beta=0.5)["pair_accuracy"] == 1.0
    assert before.likelihood_accuracy <= 0.5 < after.likelihood_accuracy


# --------------------------------------------------------------------------------------------
# finetune pairs
# --------------------------------------------------------------------------------------------


def test_pairs_are_deterministic_for_a_seed_drop_ties_and_carry_provenance(sft_run, tmp_path, capsys):
    from finetune.cli import main

    data = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [*chat(f"what is the capital of {c}"), {"role": "assistant", "content": f"{cap} is the answer"}]}
        for c, cap in CAPITALS.items()
    ])

    def pairs(name, *extra):
        assert main(["pairs", str(sft_run), "--data", str(data), "--out", str(tmp_path / name), "--max-new-tokens", "6",
                     *extra]) == 0
        return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]

    sampled = pairs("a.jsonl", "--temperature", "1.0", "--seed", "3")
    assert pairs("b.jsonl", "--temperature", "1.0", "--seed", "3") == sampled
    assert pairs("c.jsonl", "--temperature", "1.0", "--seed", "4") != sampled
    first = sampled[0]
    assert first["prompt"] == chat("what is the capital of france") and first["chosen"] == "paris is the answer"
    assert set(first["provenance"]) == {"model", "model_hash", "decoding", "max_new_tokens", "tie_chrf", "chrf", "finished"}
    assert first["provenance"]["decoding"] == {"temperature": 1.0, "top_p": 1.0, "seed": 3}
    assert first["provenance"]["model"] == str(sft_run) and len(first["provenance"]["model_hash"]) == 16

    greedy = pairs("greedy.jsonl")
    # References equal to the model's own greedy answers are ties: those rows are dropped and counted.
    assert all(isinstance(r["provenance"]["finished"], bool) for r in greedy)
    tied = [{"messages": [*r["prompt"], {"role": "assistant", "content": r["rejected"]}]} for r in greedy[:2]]
    write_jsonl(data, [*tied, {"messages": [*chat("what is the capital of spain"), {"role": "assistant", "content": "madrid is the capital of spain"}]}])
    capsys.readouterr()
    left = pairs("ties.jsonl")
    assert "dropped 2 near-ties with chrF >= 90.0" in capsys.readouterr().out
    assert [r["chosen"] for r in left] == ["madrid is the capital of spain"] and left[0]["provenance"]["decoding"] == {"greedy": True}
    # The file is a preference file the task reads.
    from finetune.tasks.preference import PreferenceTask

    pref = validate_recipe(pref_recipe(tmp_path, tmp_path, rows=left))
    assert PreferenceTask.read_rows(pref, pref.data.train).rows[0]["chosen"] == "madrid is the capital of spain"


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------

KILL_DRIVER = """
import os, signal, sys
from transformers import TrainerCallback
from finetune.commands.common import guarded
from finetune.recipe import load_recipe
from finetune.runner import run

class KillAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)

sys.exit(guarded(lambda: run(load_recipe(sys.argv[1]), callbacks=[KillAt()]) and 0))
"""


@pytest.mark.slow  # a subprocess that imports the stack and is killed: about 20 s
def test_a_killed_dpo_run_resumes_with_the_uninterrupted_losses(tiny_llama_dir, sft_run, tmp_path):
    import subprocess
    import sys

    import yaml

    from finetune.recipe import load_recipe
    from finetune.runner import run
    from support import REPO

    def recipe_file(folder):
        folder.mkdir()
        recipe = pref_recipe(tiny_llama_dir, folder, preference={"from_run": str(sft_run)},
                             train={"max_steps": 8, "save_checkpoints": True, "save_steps": 2, "save_total_limit": 2})
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        return folder / "recipe.yaml"

    def losses(folder):
        history = json.loads((folder / "out" / "train_metrics.json").read_text())["log_history"]
        return {h["step"]: h["loss"] for h in history if "loss" in h}

    run(load_recipe(recipe_file(tmp_path / "whole")))
    killed = recipe_file(tmp_path / "killed")
    (tmp_path / "driver.py").write_text(KILL_DRIVER)
    done = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(killed), "5"], cwd=REPO, timeout=600,
                          capture_output=True, text=True)
    assert done.returncode == -9, done.stderr[-2000:]
    assert (tmp_path / "killed" / "out" / "checkpoint-4").is_dir()
    result = run(load_recipe(killed))
    assert result.trainer.state.global_step == 8
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-4, abs=1e-6), step


# --------------------------------------------------------------------------------------------
# finetune eval of a preference run
# --------------------------------------------------------------------------------------------


def test_eval_compares_base_reference_and_tuned_on_held_out_pairs(tiny_llama_dir, sft_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from finetune.evaluation.preference import pair_scores
    from finetune.evaluation.side_by_side import EvalOptions, evaluate_run, held_out_pairs
    from finetune.evaluation.source import resolve_source
    from finetune.models.adapters import load_adapter
    from finetune.models.loading import load_tokenizer
    from finetune.runner import run

    held = write_jsonl(tmp_path / "held.jsonl", capital_pairs(8, seed=5))
    recipe = validate_recipe(pref_recipe(tiny_llama_dir, tmp_path, rows=capital_pairs(24), data={"eval": str(held)},
                                         preference={"from_run": str(sft_run), "beta": 0.5},
                                         train={"max_steps": 12, "eval_steps": 12}))
    run(recipe)
    evaluation, out = evaluate_run(tmp_path / "out", EvalOptions(tasks=[], max_new_tokens=4))
    assert evaluation.variants == ["base", "start", "adapter", "merged"]
    metrics = evaluation.metrics
    assert metrics["start"]["pairs/mean_margin"] == 0.0 and metrics["start"]["pairs/reward_accuracy"] == 0.0
    assert metrics["adapter"]["pairs/reward_accuracy"] > 0.5 and metrics["adapter"]["pairs/mean_margin"] > 0
    assert metrics["merged"]["pairs/mean_margin"] == pytest.approx(metrics["adapter"]["pairs/mean_margin"], abs=1e-3)
    assert "held_out/loss" in metrics["start"] and len(evaluation.predictions) == 8
    # The start variant (the reference) is the SFT run's model.
    source = resolve_source(tmp_path / "out")
    tokens, _, _ = held_out_pairs(source, None, load_tokenizer(recipe, str(tiny_llama_dir)), None)
    sft = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), sft_run).eval()
    assert metrics["start"]["pairs/likelihood_accuracy"] == pair_scores(sft, tokens).likelihood_accuracy
    assert "| pairs/reward_accuracy |" in (out / "report.md").read_text()


def test_packing_is_refused_by_the_schema(tmp_path):
    from finetune.errors import RecipeError

    with pytest.raises((RecipeError, ValueError), match=r"data.packing is for sft; preference scores each example as a "
                                                         r"whole sequence. Remove it."):
        validate_recipe(pref_recipe(tmp_path, tmp_path, data={"packing": True}))


@pytest.mark.parametrize("loss, step_zero", [("ipo", (1 / (2 * 0.1)) ** 2), ("kto", 0.5), ("simpo", None), ("orpo", None)])
def test_every_loss_trains_through_the_kit(tiny_llama_dir, tmp_path, loss, step_zero):
    """IPO at step 0 is (1/(2 beta))^2 (the margin is 0, its target 1/(2 beta)); KTO's is 1 - sigmoid(0) = 0.5 (the
    policy is the reference and the KL baseline is 0). SimPO and ORPO have no reference: their first loss is finite."""
    from finetune.runner import run

    data = {"eval_fraction": 0.25} if loss == "kto" else {}  # KTO: the split keeps both answers of a pair together
    result = run(validate_recipe(pref_recipe(tiny_llama_dir, tmp_path, preference={"loss": loss}, data=data,
                                             train={"max_steps": 3, "eval_steps": 3})))
    logs = [h for h in result.metrics["log_history"] if "loss" in h]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    if step_zero is not None:
        assert logs[0]["loss"] == pytest.approx(step_zero, abs=1e-4)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(logs[0])
    assert result.metrics["preference"]["loss"] == loss
    if loss == "kto":  # 20 pairs: 5 held out, read as 10 unpaired rows; 15 trained on, as 30
        assert (len(result.trainer.train_dataset), len(result.trainer.eval_dataset)) == (30, 10)
        assert sum(result.trainer.eval_dataset["label"]) == 5


@pytest.mark.slow  # two DeepSpeed processes: about a minute on CPUs
def test_two_zero2_processes_give_the_one_process_losses(tiny_llama_dir, tmp_path):
    """DPO under ZeRO-2 on 2 processes x 4 pairs equals 1 process x 8 pairs (16 pairs: whole batches only)."""
    import os
    import subprocess
    import sys

    from finetune.recipe import load_recipe
    from finetune.runner import run
    from support import REPO, free_port

    pairs = write_jsonl(tmp_path / "pairs16.jsonl", capital_pairs(16))
    common = ["task=preference", f"model.name_or_path={tiny_llama_dir}", f"data.train={pairs}", "train.max_steps=4",
              "train.num_threads=1", "train.logging_steps=1"]
    recipe = REPO / "recipes" / "tiny_zero2.yaml"
    one = run(load_recipe(recipe, [*common, f"output.dir={tmp_path / 'one'}", "deepspeed=null", "train.micro_batch_size=8"]))
    done = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "launch", str(recipe), *common, f"output.dir={tmp_path / 'two'}",
         "--nproc-per-node", "2", "--main-port", str(free_port()), "--join-timeout", "120"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "train_metrics.json").read_text())["log_history"]
    expected = [h["loss"] for h in one.metrics["log_history"] if "loss" in h]
    assert [h["loss"] for h in two if "loss" in h] == pytest.approx(expected, rel=1e-4)
    assert expected[0] == pytest.approx(LN2, abs=1e-4)
