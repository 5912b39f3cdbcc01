"""Recipe values the model's config rules out, checked by `finetune validate` (and training, and launch) from the
config alone, without loading weights: an adapter rank above the hidden size, a max_length past the context, a
label count a classifier's head cannot take. A config that cannot be read here (a hub id not cached) skips them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from support import REPO, cls_recipe, keyword_rows, sft_recipe
from finetune.checks import model_config_problems
from finetune.errors import RecipeError
from finetune.models.gguf import gguf_config, gguf_metadata
from finetune.recipe import validate_recipe


def validate(tmp_path: Path, recipe: dict, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return subprocess.run([sys.executable, "-m", "finetune.cli", "validate", str(path), *args],
                          capture_output=True, text=True, cwd=REPO)  # fmt: skip


def test_rank_and_max_length_are_checked_against_config_json(tiny_llama_dir, tmp_path):
    # The tiny Llama: hidden_size 32, max_position_embeddings 256.
    result = validate(tmp_path, sft_recipe(tiny_llama_dir, tmp_path), "adapter.r=33", "data.max_length=257")
    assert result.returncode == 2 and result.stdout == ""
    source = f"{tiny_llama_dir}/config.json"
    assert result.stderr.splitlines()[1:] == [
        f"  - adapter.r: 33 is larger than any layer of the model (hidden_size is 32 in {source}): no layer's update "
        "can have a rank above 32, so the rest only costs memory. Typical ranks are 4 to 64.",
        f"  - data.max_length: 257 is longer than the model reads (max_position_embeddings is 256 in {source}); "
        "use at most 256.",
    ]
    result = validate(tmp_path, sft_recipe(tiny_llama_dir, tmp_path), "adapter.r=32", "data.max_length=256")
    assert result.returncode == 0, result.stderr
    # A full fine-tune has no rank; a length the recipe leaves at its default is not the recipe's claim.
    recipe = validate_recipe(sft_recipe(tiny_llama_dir, tmp_path, adapter={"type": "none", "r": 64}, data={"max_length": 64}))
    assert model_config_problems(recipe) == []
    data = sft_recipe(tiny_llama_dir, tmp_path)
    del data["data"]["max_length"]
    assert validate_recipe(data).data.max_length == 1024 and model_config_problems(validate_recipe(data)) == []


def write_tiny_gguf(path: Path, context: int = 64, hidden: int = 16) -> Path:
    """A GGUF with a Llama's metadata, a tokenizer's arrays (which the reader skips) and one tensor."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_block_count(2)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b"])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0])
    writer.add_string("general.name", "tiny")
    writer.add_tensor("token_embd.weight", np.zeros((3, hidden), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_config_comes_from_its_header(tmp_path):
    from gguf import GGUFReader

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    assert gguf_config(path) == {"model_type": "llama", "max_position_embeddings": 64, "hidden_size": 16, "num_hidden_layers": 2}
    reference = {name: field.contents() for name, field in GGUFReader(path).fields.items()}  # the gguf package's reader
    ours = gguf_metadata(path)
    assert ours and all(reference[key] == pytest.approx(value) for key, value in ours.items())
    assert set(reference) - set(ours) == {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count",
                                          "tokenizer.ggml.tokens", "tokenizer.ggml.scores"}  # fmt: skip
    (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(20))
    with pytest.raises(ValueError, match="not a GGUF file of version 2 or 3"):
        gguf_metadata(tmp_path / "not.gguf")


def test_a_gguf_model_is_checked_without_converting_it(tmp_path):
    from finetune.models.gguf import converted_folder

    model = tmp_path / "model"
    model.mkdir()
    write_tiny_gguf(model / "tiny.gguf")
    result = validate(tmp_path, sft_recipe(model, tmp_path, model={"gguf_file": "tiny.gguf"}), "adapter.r=17", "data.max_length=65")
    assert result.returncode == 2
    assert result.stderr.splitlines()[1:] == [
        "  - adapter.r: 17 is larger than any layer of the model (hidden_size is 16 in tiny.gguf): no layer's update "
        "can have a rank above 16, so the rest only costs memory. Typical ranks are 4 to 64.",
        "  - data.max_length: 65 is longer than the model reads (max_position_embeddings is 64 in tiny.gguf); use at most 64.",
    ]
    assert not converted_folder(model / "tiny.gguf").exists()  # read from the header: nothing was converted


def test_a_hub_id_not_in_the_cache_skips_the_config_checks(tmp_path):
    # conftest sets HF_HUB_OFFLINE=1 and an empty HF_HOME: nothing is cached, and validate must not fail on it.
    result = validate(tmp_path, sft_recipe(Path("nobody/no-such-model"), tmp_path), "adapter.r=4096", "data.max_length=100000")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK: ")


def classifier_with_a_head(tiny_bert_dir: Path, folder: Path, labels: int) -> Path:
    """The tiny BERT saved as a sequence classifier with a head of `labels` outputs."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=labels)
    model.save_pretrained(folder)
    for path in tiny_bert_dir.iterdir():
        if path.name != "config.json" and not path.name.endswith(".safetensors"):
            shutil.copy2(path, folder / path.name)
    return folder


def test_a_classifier_head_must_fit_the_label_count(tiny_bert_dir, tmp_path):
    model = classifier_with_a_head(tiny_bert_dir, tmp_path / "classifier", labels=3)
    assert json.loads((model / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    recipe = cls_recipe(model, tmp_path, keyword_rows(40))  # 4 labels: bird, cat, dog, fish
    message = (
        f"model.name_or_path: {model} is already a classifier with a 3-label head (LABEL_0, LABEL_1, LABEL_2 in "
        f"{model}/config.json), but the training data has 4 labels (bird, cat, dog, fish). Train it on 3 labels, "
        "or start from a model without a classification head."
    )
    assert validate(tmp_path, recipe).returncode == 0  # without --data the labels are not known
    result = validate(tmp_path, recipe, "--data")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-2:] == [f"error: 1 problem in {tmp_path / 'recipe.yaml'}:", f"  - {message}"]
    # Training stops with the same message before the model is loaded (transformers would refuse the head later).
    from finetune.runner import run

    with pytest.raises(RecipeError) as err:
        run(validate_recipe(recipe))
    assert err.value.problems == [message]
    # Three labels fit the head.
    rows = [r for r in keyword_rows(40) if r["label"] != "fish"]
    assert validate(tmp_path, cls_recipe(model, tmp_path, rows), "--data").returncode == 0
