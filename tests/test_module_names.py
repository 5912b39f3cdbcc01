"""What a recipe names outside itself is resolved before any weights load: adapter targets, modules to save and
quantization's skipped modules against the model's own module names (built on the meta device from its config),
packages an option needs, generation lengths against the model's context. `finetune validate` and `finetune train`
give the same one-line messages, with exit code 2 and no traceback; the weights file here is garbage, so a load
would have failed with another error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from support import REPO, cls_recipe, image_recipe, sft_recipe
from finetune.errors import RecipeError
from finetune.models.targets import recipe_module_problems, target_matches
from finetune.recipe import validate_recipe

LLAMA_LINEAR = "Its linear layers: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj."


@pytest.fixture
def unreadable_llama(tiny_llama_dir, tmp_path) -> Path:
    """The tiny Llama's config and tokenizer, with weights that cannot load: whatever reads them fails."""
    folder = tmp_path / "tiny-model"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors: reading this would fail")
    return folder


def cli(command: str, tmp_path: Path, recipe: dict, *overrides: str) -> subprocess.CompletedProcess:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return subprocess.run([sys.executable, "-m", "finetune.cli", command, str(path), *overrides],
                          capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip


def reported(result: subprocess.CompletedProcess) -> list[str]:
    """The problems of an `error: N problem(s)` report (train logs a line or two before it)."""
    lines = result.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    return lines[start + 1 :]


def problems(recipe: dict, model: str = "causal_lm") -> list[str]:
    return recipe_module_problems(validate_recipe(recipe), model)


@pytest.mark.parametrize("command", ["validate", "train"])
def test_a_wrong_target_is_one_message_before_the_weights_load(command, unreadable_llama, tmp_path):
    recipe = sft_recipe(unreadable_llama, tmp_path)
    result = cli(command, tmp_path, recipe, "adapter.target_modules=[foo_proj, q_proj]")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "safetensors" not in result.stderr
    assert reported(result) == [
        f"  - adapter.target_modules: 'foo_proj' matches no module of tiny-model (did you mean 'o_proj'?). {LLAMA_LINEAR}"
    ]


@pytest.mark.parametrize("command", ["validate", "train"])
def test_a_tracker_that_is_not_installed_is_refused_before_the_model_loads(command, unreadable_llama, tmp_path):
    recipe = sft_recipe(unreadable_llama, tmp_path, train={"report_to": ["mlflow"]})
    result = cli(command, tmp_path, recipe)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert reported(result) == [
        "  - train.report_to: mlflow needs mlflow, which is not installed here: pip install mlflow "
        "(or remove mlflow from train.report_to)."
    ]


def test_an_empty_target_list_says_what_to_write(unreadable_llama, tmp_path):
    result = cli("validate", tmp_path, sft_recipe(unreadable_llama, tmp_path), "adapter.target_modules=[]")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert reported(result) == [
        "  - adapter.target_modules: an empty list adapts nothing; write all-linear (every linear layer but the "
        "output head), or the layers' names, e.g. [q_proj, v_proj]"
    ]


def test_max_new_tokens_must_fit_the_context(unreadable_llama, tmp_path):
    # The tiny Llama reads 256 positions.
    result = cli("validate", tmp_path, sft_recipe(unreadable_llama, tmp_path), "eval.max_new_tokens=256")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert reported(result) == [
        f"  - eval.max_new_tokens: 256 new tokens do not fit the model's context (max_position_embeddings is 256 in "
        f"{unreadable_llama}/config.json), which holds the prompt and the answer together; use fewer than 256 "
        "(answers rarely need more than 512)."
    ]
    assert cli("validate", tmp_path, sft_recipe(unreadable_llama, tmp_path), "eval.max_new_tokens=255").returncode == 0


def test_chat_and_eval_max_new_tokens_are_checked_before_the_model_loads(tiny_llama_dir, tmp_path):
    from finetune.checks import new_tokens_problem

    recipe = validate_recipe(sft_recipe(tiny_llama_dir, tmp_path))
    assert new_tokens_problem(recipe, 255, "--max-new-tokens") is None
    assert new_tokens_problem(recipe, 300, "--max-new-tokens") == (
        f"--max-new-tokens: 300 new tokens do not fit the model's context (max_position_embeddings is 256 in "
        f"{tiny_llama_dir}/config.json), which holds the prompt and the answer together; use fewer than 256 "
        "(answers rarely need more than 512)."
    )


def test_regex_and_all_linear_pass_and_match_what_peft_adapts(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    pattern = r".*\.layers\.1\.self_attn\.(q|v)_proj"
    for targets in (["all-linear"], [pattern], ["q_proj", "v_proj"], ["layers.0.mlp.down_proj"]):
        assert problems(sft_recipe(tiny_llama_dir, tmp_path, adapter={"target_modules": targets})) == [], targets
    # The same matching as PEFT's: the modules our check accepts are the ones PEFT wraps.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    names = [n for n, _ in model.named_modules()]
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=pattern))
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in peft.named_modules() if hasattr(m, "lora_A"))
    assert wrapped == sorted(n for n in names if target_matches(pattern, n)) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]  # fmt: skip
    result = cli("validate", tmp_path, sft_recipe(tiny_llama_dir, tmp_path), f"adapter.target_modules={pattern}")
    assert result.returncode == 0, result.stderr
    # The recipe hands PEFT the pattern as a string (its regex form), names as a list.
    from finetune.models.adapters import build_lora_config

    def targets(value):
        return build_lora_config(validate_recipe(sft_recipe(tiny_llama_dir, tmp_path, adapter={"target_modules": value})), "CAUSAL_LM").target_modules

    assert targets(pattern) == pattern and targets("all-linear") == "all-linear" and targets(["q_proj"]) == {"q_proj"}


def test_non_layers_are_refused_with_the_reason(tiny_llama_dir, tmp_path):
    def refused(*targets):
        return problems(sft_recipe(tiny_llama_dir, tmp_path, adapter={"target_modules": list(targets)}))

    assert refused("norm") == [
        "adapter.target_modules: 'norm' matches model.norm (LlamaRMSNorm), which LoRA cannot adapt: a normalization "
        f"layer: it holds a scale vector, not a matrix a low-rank update could be added to. {LLAMA_LINEAR}"
    ]
    assert refused("q_proj", "mlp") == [
        "adapter.target_modules: 'mlp' matches model.layers.0.mlp (LlamaMLP) and 1 more, which LoRA cannot adapt: a "
        f"block of layers, not a layer: name the linear layers inside it. {LLAMA_LINEAR}"
    ]
    assert refused(r"model\.layers\.9\..*") == [
        rf"adapter.target_modules: regular expression 'model\.layers\.9\..*' matches no module of {tiny_llama_dir.name}. "
        + LLAMA_LINEAR
    ]
    # Two bad entries: one message, the list of linear layers once.
    assert refused("qproj", "vproj") == [
        f"adapter.target_modules: 'qproj' matches no module of {tiny_llama_dir.name} (did you mean 'q_proj'?). "
        f"adapter.target_modules: 'vproj' matches no module of {tiny_llama_dir.name} (did you mean 'v_proj'?). "
        + LLAMA_LINEAR
    ]


def test_modules_to_save_and_skipped_modules_must_exist(tiny_llama_dir, tmp_path):
    recipe = sft_recipe(tiny_llama_dir, tmp_path, adapter={"modules_to_save": ["lm_head", "embed_tokns"]})
    assert problems(recipe) == [
        f"adapter.modules_to_save: 'embed_tokns' (did you mean 'embed_tokens'?) matches no module of "
        f"{tiny_llama_dir.name}. {LLAMA_LINEAR}"
    ]
    quantized = sft_recipe(tiny_llama_dir, tmp_path, adapter={"type": "qlora"}, quantization={"skip_modules": ["lm_heads"]})
    assert problems(quantized) == [
        f"quantization.skip_modules: 'lm_heads' (did you mean 'lm_head'?) matches no module of {tiny_llama_dir.name}. "
        + LLAMA_LINEAR
    ]
    quantized["quantization"]["skip_modules"] = ["lm_head", r"model\.layers\.0"]
    assert problems(quantized) == []


def test_a_classifier_is_checked_as_the_classifier_it_becomes(tiny_bert_dir, tmp_path):
    ok = cls_recipe(tiny_bert_dir, tmp_path, adapter={"target_modules": ["query", "value"], "modules_to_save": ["classifier"]})
    assert problems(ok, "classifier") == []
    wrong = cls_recipe(tiny_bert_dir, tmp_path, adapter={"target_modules": ["q_proj"]})
    assert problems(wrong, "classifier") == [
        f"adapter.target_modules: 'q_proj' matches no module of {tiny_bert_dir.name}. "
        "Its linear layers: query, key, value, dense."
    ]


def test_an_image_models_targets_and_head_are_resolved_on_the_meta_device(tiny_resnet_dir, toy_images_dir, tmp_path):
    ok = image_recipe(tiny_resnet_dir, toy_images_dir, tmp_path / "out")
    assert problems(ok, "images") == []
    wrong = image_recipe(tiny_resnet_dir, toy_images_dir, tmp_path / "out", adapter={"target_modules": ["convolution_x"]})
    [problem] = problems(wrong, "images")
    assert problem.startswith("adapter.target_modules: convolution_x match(es) no linear or 2-D convolution layer of the backbone")
    head = image_recipe(tiny_resnet_dir, toy_images_dir, tmp_path / "out", image={"head": "clasifier"})
    [problem] = problems(head, "images")
    assert problem.startswith("image.head: the model has no layer named 'clasifier' with weights")


def write_llama_gguf(path: Path) -> Path:
    """A GGUF whose header describes a 3-layer Llama (no real weights: the check reads the header only)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_string("general.name", "tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_block_count(3)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_is_checked_from_its_header_and_later_checks_skip_torch(tmp_path):
    write_llama_gguf(tmp_path / "Tiny-Chat.Q8_0.gguf")
    recipe = sft_recipe(tmp_path, tmp_path, model={"name_or_path": str(tmp_path), "gguf_file": "Tiny-Chat.Q8_0.gguf"},
                        adapter={"target_modules": ["attn_q"]})  # fmt: skip
    expected = f"adapter.target_modules: 'attn_q' matches no module of Tiny-Chat. {LLAMA_LINEAR}"
    assert problems(recipe) == [expected]
    # Cached by the file's identity: a second check reads a JSON file and imports neither torch nor transformers.
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code = (
        "import sys; from finetune.recipe import load_recipe; from finetune.checks import _module_name_problems;"
        f"print(_module_name_problems(load_recipe({str(tmp_path / 'recipe.yaml')!r}))[0]);"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.splitlines() == [expected, "[]"]


def test_a_model_that_cannot_be_read_here_is_left_to_loading(tmp_path):
    # A hub id not in the cache: nothing to check against, and no network asked.
    recipe = sft_recipe(tmp_path, tmp_path, model={"name_or_path": "someone/not-cached"}, adapter={"target_modules": ["x"]})
    assert problems(recipe) == []


def test_the_schema_refuses_patterns_it_cannot_hand_to_peft(tiny_llama_dir, tmp_path):
    for targets, message in (
        (["q_proj", ".*v_proj"], "'.*v_proj' is a regular expression (matched against whole module names, as PEFT does), "
                                 "which must be the only entry"),
        (["(q_proj"], "'(q_proj' is not a regular expression"),
    ):  # fmt: skip
        with pytest.raises(RecipeError) as error:
            validate_recipe(sft_recipe(tiny_llama_dir, tmp_path, adapter={"target_modules": targets}))
        assert message in str(error.value)


def test_the_module_cache_is_written_whole(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    assert len(problems(sft_recipe(tiny_llama_dir, tmp_path, adapter={"target_modules": ["q_proj", "nope"]}))) == 1
    [cached] = (tmp_path / "cache" / "modules").glob("*.json")
    data = json.loads(cached.read_text())
    assert data["heads"] == ["lm_head"]
    assert ["model.layers.0.self_attn.q_proj", "Linear", True, True, False] in data["modules"]
    assert not list((tmp_path / "cache" / "modules").glob("*.tmp"))


def test_names_the_checkpoint_shows_need_no_torch(tiny_llama_dir, tmp_path, monkeypatch):
    """Named targets that the safetensors header shows as weight matrices are confirmed from the header alone; the
    model is built (and its modules cached) only when the header does not settle it."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    recipe = sft_recipe(tiny_llama_dir, tmp_path, adapter={"target_modules": ["q_proj", "self_attn.v_proj"],
                                                           "modules_to_save": ["lm_head"]})  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code = (
        "import sys; from finetune.recipe import load_recipe; from finetune.checks import _module_name_problems;"
        f"print(_module_name_problems(load_recipe({str(tmp_path / 'recipe.yaml')!r})));"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.splitlines() == ["[]", "[]"]
    assert not (tmp_path / "cache" / "modules").exists()
