"""Safe by default, and one message for a bad model or adapter: weights load from safetensors only (a pickle is read
only when the recipe names it, and then with `torch.load(weights_only=True)`), remote code stays off unless the recipe
turns it on, and a folder that is not a model, a damaged adapter or an adapter for another base stop with one message
naming the files or models, never a traceback."""

from __future__ import annotations

import builtins
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from support import REPO, build_tiny_llama, capitals_data, sft_recipe
from finetune.errors import DataError, FinetuneError, RecipeError
from finetune.models.adapters import load_adapter
from finetune.models.loading import load_model, load_tokenizer, resolve_model_path
from finetune.recipe import validate_recipe
from finetune.runtime import resolve_runtime

IDS = torch.tensor([[1, 5, 9, 13, 17, 21]])


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune.cli", *args], capture_output=True, text=True, cwd=REPO)


def pickled_copy(model_dir: Path, folder: Path, name: str = "pytorch_model.bin") -> Path:
    """The model folder with its weights as a pickle only (tokenizer and config kept)."""
    shutil.copytree(model_dir, folder)
    (folder / "model.safetensors").unlink()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.save(model.state_dict(), folder / name)
    return folder


def make_adapter(base_dir: Path, out: Path, **save) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out, **save)
    return out


def base_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


class WritesAFile:
    """A pickle payload: unpickling it calls exec, which writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pickle code ran')",)


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("safety-adapter"))


def recipe_for(model_dir, tmp_path, **model):
    return validate_recipe(sft_recipe(model_dir, tmp_path, model={"name_or_path": str(model_dir), **model}))


# --------------------------------------------------------------------------------------------
# Pickled weights
# --------------------------------------------------------------------------------------------


def test_pickled_weights_only_are_refused_by_validate_without_a_traceback(tiny_llama_dir, tmp_path):
    folder = pickled_copy(tiny_llama_dir, tmp_path / "pickled")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(sft_recipe(folder, tmp_path)))
    result = cli("validate", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == (
        f"error: 1 problem in {path}:\n"
        f"  - model.name_or_path: {folder} holds its weights only as pickle (pytorch_model.bin), and unpickling runs "
        "any code the file carries, so the kit loads safetensors only. If you trust the file, set "
        "model.weights_file: pytorch_model.bin to read it with torch.load(weights_only=True), which loads tensors "
        "only and runs no code.\n"
    )
    # Every other path to the model (train, eval, chat, predict, merge's recipe) resolves it the same way.
    with pytest.raises(FinetuneError, match=r"^model\.name_or_path: .* holds its weights only as pickle"):
        resolve_model_path(recipe_for(folder, tmp_path).model)


@pytest.mark.parametrize("name", ["model.pt", "weights.pth"])
def test_other_pickle_suffixes_are_refused(tiny_llama_dir, tmp_path, name):
    folder = pickled_copy(tiny_llama_dir, tmp_path / "pickled", name)
    with pytest.raises(FinetuneError, match=rf"holds its weights only as pickle \({name}\).*model\.weights_file: {name}"):
        resolve_model_path(recipe_for(folder, tmp_path).model)


def test_named_pickle_is_read_with_weights_only_and_loads_the_same_model(tiny_llama_dir, tmp_path):
    folder = pickled_copy(tiny_llama_dir, tmp_path / "pickled")
    recipe = recipe_for(folder, tmp_path, weights_file="pytorch_model.bin")
    path = resolve_model_path(recipe.model)
    assert Path(path) != folder and (Path(path) / "model.safetensors").is_file()  # converted once, cached
    assert resolve_model_path(recipe.model) == path
    tokenizer = load_tokenizer(recipe, path)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_llama_dir).chat_template
    model = load_model(recipe, resolve_runtime(recipe), path, AutoModelForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, base_model(tiny_llama_dir)(input_ids=IDS).logits, rtol=0, atol=0)


def test_a_malicious_pickle_named_in_the_recipe_is_not_run(tiny_llama_dir, tmp_path):
    # The payload is real: an unrestricted unpickle runs it.
    probe = tmp_path / "probe.bin"
    torch.save({"w": WritesAFile(tmp_path / "ran-unrestricted")}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "ran-unrestricted").read_text() == "pickle code ran"

    marker = tmp_path / "ran-in-the-kit"
    folder = pickled_copy(tiny_llama_dir, tmp_path / "evil")
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "w": WritesAFile(marker)}, folder / "pytorch_model.bin")
    recipe = recipe_for(folder, tmp_path, weights_file="pytorch_model.bin")
    with pytest.raises(FinetuneError) as info:
        resolve_model_path(recipe.model)
    assert not marker.exists()
    assert str(info.value) == (
        f"model.weights_file: {folder / 'pytorch_model.bin'} holds more than tensors, so "
        "torch.load(weights_only=True) refused it and nothing in it was run (it calls exec). Use a checkpoint that is "
        "a plain state dict, or safetensors."
    )


def test_weights_file_problems_are_named(tiny_llama_dir, tmp_path):
    folder = pickled_copy(tiny_llama_dir, tmp_path / "pickled")
    with pytest.raises(FinetuneError, match=rf"^model\.weights_file: {folder / 'nope.bin'} not found\.$"):
        resolve_model_path(recipe_for(folder, tmp_path, weights_file="nope.bin").model)
    torch.save({"model.embed_tokens.weight": torch.zeros(3, 3)}, folder / "partial.bin")
    with pytest.raises(FinetuneError, match=r"^model\.weights_file: .*partial\.bin does not fit the LlamaForCausalLM .*missing: "):
        resolve_model_path(recipe_for(folder, tmp_path, weights_file="partial.bin").model)
    with pytest.raises(RecipeError, match="set either model.gguf_file or model.weights_file, not both"):
        recipe_for(folder, tmp_path, weights_file="pytorch_model.bin", gguf_file="m.gguf")


def test_merge_refuses_a_pickled_base(tiny_llama_dir, adapter, tmp_path):
    from finetune.merge.merging import merge_adapter

    folder = pickled_copy(tiny_llama_dir, tmp_path / "pickled")
    with pytest.raises(FinetuneError) as info:
        merge_adapter(adapter, tmp_path / "out", base=str(folder))
    assert str(info.value) == (
        f"base model: {folder} holds its weights only as pickle (pytorch_model.bin), and unpickling runs any code the "
        "file carries, so the kit loads safetensors only. Pass --base with a safetensors copy of the model."
    )
    assert not (tmp_path / "out").exists()


def test_a_pickled_adapter_is_refused(tiny_llama_dir, tmp_path):
    folder = make_adapter(tiny_llama_dir, tmp_path / "adapter", safe_serialization=False)
    assert (folder / "adapter_model.bin").is_file() and not (folder / "adapter_model.safetensors").exists()
    with pytest.raises(FinetuneError) as info:
        load_adapter(base_model(tiny_llama_dir), folder)
    assert str(info.value) == (
        f"{folder}: the adapter's weights are only a pickle (adapter_model.bin), and unpickling runs any code the "
        "file carries, so the kit loads adapter_model.safetensors only. Where you trust the file, load the adapter "
        "with PEFT and save_pretrained it again: PEFT writes safetensors."
    )


# --------------------------------------------------------------------------------------------
# Folders that are not models
# --------------------------------------------------------------------------------------------


def test_folders_that_are_not_models(tiny_llama_dir, tmp_path):
    from finetune.checks import recipe_problems

    def problems(folder):
        recipe = recipe_for(folder, tmp_path)
        return [p for p in recipe_problems(recipe, resolve_runtime(recipe)) if p.startswith("model.")]

    tokenizer_only = tmp_path / "tokenizer-only"
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(tokenizer_only)
    assert problems(tokenizer_only) == [f"model.name_or_path: {tokenizer_only} is a folder but not a model: it has no config.json."]

    parent = tmp_path / "models"
    shutil.copytree(tiny_llama_dir, parent / "llama")
    assert problems(parent) == [
        f"model.name_or_path: {parent} is a folder but not a model: it has no config.json. Model folders inside it: llama."
    ]

    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_llama_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    assert problems(no_weights) == [
        f"model.name_or_path: {no_weights} has a config.json but no weights (no model.safetensors or "
        "model.safetensors.index.json)."
    ]
    (no_weights / "config.json").write_text("{not json")
    assert problems(no_weights)[0].startswith(f"model.name_or_path: {no_weights / 'config.json'} is not valid JSON (")

    assert problems(tmp_path / "gone" / "model") == [f"model.name_or_path: {tmp_path / 'gone' / 'model'} not found (no such folder)."]
    assert problems(tiny_llama_dir) == []


def test_damaged_weights_and_a_missing_tokenizer_are_one_message(tiny_llama_dir, tmp_path):
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "damaged")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a download cut short
    recipe = recipe_for(folder, tmp_path)
    with pytest.raises(FinetuneError) as info:
        load_model(recipe, resolve_runtime(recipe), str(folder), AutoModelForCausalLM)
    assert str(info.value) == (
        f"model.name_or_path: the safetensors weights in {folder} cannot be read (Error while deserializing header: "
        "incomplete metadata, file not fully covered); the file is damaged."
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink()
    with pytest.raises(FinetuneError) as info:
        load_tokenizer(recipe, str(folder))
    assert str(info.value) == (
        f"model.name_or_path: {folder} has no tokenizer (none of tokenizer.json, tokenizer_config.json, "
        "tokenizer.model, vocab.json, vocab.txt)."
    )


def test_a_hub_id_while_offline_is_one_message(tmp_path):
    # conftest sets HF_HUB_OFFLINE=1 and an empty HF_HOME: nothing is cached.
    recipe = validate_recipe(sft_recipe(Path("nobody/no-such-model"), tmp_path))
    message = (
        "model.name_or_path: nobody/no-such-model is not a local folder and not in the hub cache, and offline mode is "
        "on (HF_HUB_OFFLINE). Download it once with network access (`hf download nobody/no-such-model`), or give a "
        "local model folder."
    )
    with pytest.raises(FinetuneError) as info:
        load_tokenizer(recipe, "nobody/no-such-model")
    assert str(info.value) == message
    with pytest.raises(FinetuneError) as info:
        load_model(recipe, resolve_runtime(recipe), "nobody/no-such-model", AutoModelForCausalLM)
    assert str(info.value) == message


def test_train_with_an_uncached_hub_id_offline_exits_with_one_message(tmp_path):
    recipe = sft_recipe(Path("nobody/no-such-model"), tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = cli("train", str(path))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "model.name_or_path: nobody/no-such-model is not a local folder and not in the hub cache" in result.stderr


def test_messages_data_without_a_chat_template_names_the_key(tiny_llama_dir, tmp_path):
    from finetune.tasks.sft import prepare_sft_data

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.chat_template = None
    with pytest.raises(DataError, match=r"the tokenizer has no chat template: set model\.chat_template"):
        prepare_sft_data(recipe_for(tiny_llama_dir, tmp_path), tokenizer)


# --------------------------------------------------------------------------------------------
# Adapters: damaged, or for another base
# --------------------------------------------------------------------------------------------


def test_a_truncated_adapter_names_the_file(tiny_llama_dir, adapter, tmp_path):
    from finetune.merge.merging import merge_adapter

    folder = shutil.copytree(adapter, tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    message = (
        f"{weights} cannot be read as safetensors (Error while deserializing header: incomplete metadata, file not "
        "fully covered); the adapter is damaged or incomplete."
    )
    with pytest.raises(FinetuneError) as info:
        load_adapter(base_model(tiny_llama_dir), folder)
    assert str(info.value) == message
    with pytest.raises(FinetuneError) as info:
        merge_adapter(folder, tmp_path / "out")
    assert str(info.value) == message and not (tmp_path / "out").exists()


def test_an_adapter_config_that_is_not_json_names_the_file(tiny_llama_dir, adapter, tmp_path):
    folder = shutil.copytree(adapter, tmp_path / "adapter")
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", ')
    with pytest.raises(FinetuneError) as info:
        load_adapter(base_model(tiny_llama_dir), folder)
    assert str(info.value) == (
        f"{folder / 'adapter_config.json'} is not valid JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 23 (char 22)); the adapter is damaged."
    )
    result = cli("merge", str(folder), "--out", str(tmp_path / "out"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"{folder / 'adapter_config.json'} is not valid JSON" in result.stderr


def test_an_adapter_for_a_base_of_other_shapes_names_both(adapter, tiny_llama_dir, llama64):
    with pytest.raises(FinetuneError) as info:
        load_adapter(base_model(llama64), adapter, check_base=False)  # the shapes alone, as the merge checks them
    message = str(info.value)
    assert message.startswith(f"adapter {adapter} does not fit the base model {llama64} (it was trained on {tiny_llama_dir}): size mismatch for ")
    assert "torch.Size([4, 32])" in message and message.endswith("(and 7 more)")


def test_an_adapter_naming_another_existing_base_is_refused(adapter, tiny_llama_dir, tmp_path):
    other = build_tiny_llama(tmp_path / "other-llama", seed=1)  # the same shapes: only the names tell them apart
    with pytest.raises(FinetuneError) as info:
        load_adapter(base_model(other), adapter)
    assert str(info.value) == (
        f"adapter {adapter} was trained on {tiny_llama_dir}, but the base model loaded is {other}: an adapter only "
        f"works on its own base. If both are the same model, set base_model_name_or_path in "
        f"{adapter / 'adapter_config.json'} to {other}."
    )
    assert isinstance(load_adapter(base_model(tiny_llama_dir), adapter), PeftModel)  # its own base loads


def test_chat_loads_its_adapter_through_the_same_checks(tiny_llama_dir, adapter, tmp_path):
    from finetune.commands.chat import load_for_chat

    run = shutil.copytree(adapter, tmp_path / "run")
    (run / "recipe.yaml").write_text(yaml.safe_dump(sft_recipe(tiny_llama_dir, tmp_path)))
    model, _, _ = load_for_chat(str(run))
    assert isinstance(model, PeftModel)
    (run / "adapter_config.json").write_text("[]")
    with pytest.raises(FinetuneError, match=r"adapter_config\.json is not an adapter config \(a JSON object\)"):
        load_for_chat(str(run))


# --------------------------------------------------------------------------------------------
# Remote code, plan, secrets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trust", [False, True])
def test_every_load_passes_the_recipes_trust_remote_code(tiny_llama_dir, tmp_path, monkeypatch, trust):
    import transformers

    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained.__func__

        def spy(klass, path, *args, _original=original, _cls=cls, **kwargs):
            seen.append((_cls.__name__, kwargs.get("trust_remote_code"), kwargs.get("use_safetensors")))
            return _original(klass, path, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    recipe = recipe_for(tiny_llama_dir, tmp_path, trust_remote_code=trust)
    load_tokenizer(recipe, str(tiny_llama_dir))
    load_model(recipe, resolve_runtime(recipe), str(tiny_llama_dir), AutoModelForCausalLM)
    assert seen == [("AutoTokenizer", trust, None), ("AutoModelForCausalLM", trust, True)]


def test_remote_code_in_a_checkpoint_does_not_run_by_default(tiny_llama_dir, tmp_path):
    marker = tmp_path / "remote-code-ran"
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-llama", auto_map={
        "AutoConfig": "modeling_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomModel",
    })  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    recipe = recipe_for(folder, tmp_path)
    with pytest.raises(FinetuneError) as info:
        load_model(recipe, resolve_runtime(recipe), str(folder), AutoModelForCausalLM)
    assert str(info.value) == (
        f"model.name_or_path: {folder} ships its own model code, which the kit runs only when the recipe sets "
        "model.trust_remote_code: true (it executes code that came with the checkpoint)."
    )
    assert not marker.exists()


def test_the_plan_says_when_remote_code_is_on(tiny_llama_dir, tmp_path):
    from finetune.models.parameters import ParamCounts
    from finetune.training.plan import make_plan

    line = "  remote code      ON (model.trust_remote_code) — runs code shipped with the checkpoint"
    counts = ParamCounts(trainable=10, total=100, weight_bytes=400, weight_bytes_unquantized=400)
    for trust in (False, True):
        recipe = recipe_for(tiny_llama_dir, tmp_path, trust_remote_code=trust)
        rendered = make_plan(recipe, resolve_runtime(recipe), counts, 40, 0, 0, str(tiny_llama_dir)).render()
        assert (line in rendered.splitlines()) == trust
        assert ("remote code" in rendered) == trust


def test_saved_recipes_redact_secret_values_from_the_environment(tmp_path, monkeypatch):
    from finetune.recipe import save_recipe

    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123")
    data = capitals_data(tmp_path / "train.jsonl")
    recipe = validate_recipe({
        "model": {"name_or_path": "org/model"},
        "data": {"train": [str(data), "https://user:0123456789abcdef0123@example.org/data.jsonl"]},
        "eval": {"prompts": ["my token is hf_abcdefghijklmnopqrstuvwxyz012345"]},
        "output": {"dir": str(tmp_path / "out")},
    })  # fmt: skip
    text = save_recipe(recipe, tmp_path / "saved").read_text()
    assert "0123456789abcdef0123" not in text and "hf_abcdefghijklmnop" not in text
    assert "https://user:<redacted>@example.org/data.jsonl" in text and "my token is <redacted>" in text
