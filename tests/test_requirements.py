"""Packages a recipe's options need, and the files and names it gives (chat template, tokenizer folder, metrics,
lm_eval tasks), resolved by `finetune validate` before anything loads: one message per value, naming the key, what
is missing and the fix."""

from __future__ import annotations

import importlib.util

import pytest

from support import cls_recipe, sft_recipe
from finetune.checks import recipe_problems
from finetune.commands.validate import validate_command
from finetune.errors import RecipeError
from finetune.recipe import validate_recipe
from finetune.requirements import REQUIREMENTS, package_problems
from finetune.runtime import resolve_runtime


@pytest.fixture
def installed(monkeypatch):
    """Which packages the requirements check sees as installed: name -> bool; others as they are here."""
    packages: dict[str, bool] = {}
    real = importlib.util.find_spec

    def find_spec(name, *args):
        if name in packages:
            return object() if packages[name] else None
        return real(name, *args)

    monkeypatch.setattr("finetune.requirements.importlib.util.find_spec", find_spec)
    return packages


@pytest.mark.parametrize("sections, package, message", [
    ({"train": {"optimizer": "paged_adamw_8bit"}}, "bitsandbytes",
     "train.optimizer: paged_adamw_8bit needs bitsandbytes, which is not installed here: pip install 'finetune-kit[quant]' (or use adamw_torch)."),
    ({"adapter": {"type": "qlora"}}, "bitsandbytes",
     "quantization.bits: 4 needs bitsandbytes, which is not installed here: pip install 'finetune-kit[quant]' (or load the model unquantized: no quantization.bits, adapter.type lora instead of qlora)."),
    ({"train": {"report_to": ["wandb", "tensorboard"]}}, "wandb",
     "train.report_to: wandb needs wandb, which is not installed here: pip install wandb (or remove wandb from train.report_to)."),
    ({"deepspeed": "zero2"}, "deepspeed",
     "deepspeed: zero2 needs deepspeed, which is not installed here: pip install 'finetune-kit[deepspeed]' (or remove deepspeed)."),
    ({"model": {"attn_implementation": "flash_attention_2"}}, "flash_attn",
     "model.attn_implementation: flash_attention_2 needs flash_attn, which is not installed here: pip install flash-attn --no-build-isolation (CUDA only) (or use sdpa)."),
    ({"eval": {"tasks": ["kit_qa"]}}, "lm_eval",
     "eval.tasks: kit_qa needs lm_eval, which is not installed here: pip install 'finetune-kit[eval]' (or eval.tasks: [])."),
])  # fmt: skip
def test_a_missing_package_is_one_message(sections, package, message, installed, tiny_llama_dir, tmp_path):
    recipe = validate_recipe(sft_recipe(tiny_llama_dir, tmp_path, **sections))
    installed.update({"bitsandbytes": True, "wandb": True, "tensorboard": True, "deepspeed": True, "flash_attn": True,
                      "lm_eval": True, "evaluate": True})  # fmt: skip
    assert package_problems(recipe) == []
    installed[package] = False
    assert package_problems(recipe) == [message]


def test_tensorboard_or_tensorboardx_will_do(installed, tiny_llama_dir, tmp_path):
    recipe = validate_recipe(sft_recipe(tiny_llama_dir, tmp_path, train={"report_to": "tensorboard"}))
    installed.update(tensorboard=False, tensorboardX=True)
    assert package_problems(recipe) == []
    installed["tensorboardX"] = False
    assert package_problems(recipe) == [
        "train.report_to: tensorboard needs tensorboard, which is not installed here: pip install tensorboard "
        "(or remove tensorboard from train.report_to)."
    ]


def test_every_requirement_names_a_recipe_key():
    from finetune.recipe.reference import description

    for requirement in REQUIREMENTS:
        assert description(requirement.key), requirement.key


def test_named_files_and_metrics_are_resolved(tiny_llama_dir, tiny_bert_dir, tmp_path):
    def problems(recipe: dict) -> list[str]:
        r = validate_recipe(recipe)
        return recipe_problems(r, resolve_runtime(r))

    assert problems(sft_recipe(tiny_llama_dir, tmp_path, model={"chat_template": "chatmll"})) == [
        "model.chat_template: 'chatmll' is neither a built-in template (chatml), a file, nor Jinja text."
    ]
    assert problems(sft_recipe(tiny_llama_dir, tmp_path, model={"chat_template": str(tmp_path / "t.jinja")})) == [
        f"model.chat_template: file not found: {tmp_path / 't.jinja'}"
    ]
    metrics = cls_recipe(tiny_bert_dir, tmp_path, eval={"metrics": ["acuracy", "f1", str(tmp_path / "mine.py")]})
    assert problems(metrics) == [
        "eval.metrics: 'acuracy' is not a metric shipped with the kit (did you mean 'accuracy'?); the hub is offline "
        "here (HF_HUB_OFFLINE). Shipped metrics (offline): accuracy, f1, precision, recall, confusion_matrix; or the "
        "path to an evaluate metric script.",
        f"eval.metrics: no evaluate metric script at {tmp_path / 'mine.py'}: expected a .py file.",
    ]


def test_a_new_models_tokenizer_folder_must_hold_a_tokenizer(tiny_tokenizer_dir, tmp_path):
    from finetune.models.checkpoint import tokenizer_problem

    def model(tokenizer: str):
        return validate_recipe({"task": "pretrain", "model": {"config": {"layers": 1, "hidden_size": 16, "heads": 2,
                                "context_length": 32}, "tokenizer": tokenizer}, "data": {"train": "x.txt", "max_length": 32},
                                "output": {"dir": str(tmp_path / "out")}}).model  # fmt: skip

    assert tokenizer_problem(model(str(tiny_tokenizer_dir))) is None
    assert tokenizer_problem(model(str(tmp_path))) == f"model.tokenizer: {tmp_path} holds no tokenizer (no tokenizer.json or tokenizer_config.json)."
    assert tokenizer_problem(model("/nowhere/tok")) == "model.tokenizer: /nowhere/tok not found (no such folder)."
    assert tokenizer_problem(model("someone/tokenizer")) is None  # a hub id: loaded later


def test_validate_checks_lm_eval_task_names(tiny_llama_dir, tmp_path):
    recipe = validate_recipe(sft_recipe(tiny_llama_dir, tmp_path, eval={"tasks": ["kit_qaa"]}))
    with pytest.raises(RecipeError) as error:
        validate_command(recipe, "recipe.yaml")
    assert error.value.problems == [
        "eval.tasks: unknown eval task 'kit_qaa'. Did you mean 'kit_qa'? Shipped tasks: kit_bbc_topics, kit_mmlu_dev, kit_qa."
    ]
