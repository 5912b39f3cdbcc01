"""The recipe schema: every shipped recipe validates, bad recipes give exact messages, docs cannot drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.errors import RecipeError
from finetune.recipe import load_recipe, reference_markdown, validate_recipe
from support import REPO

MINIMAL = {"model": {"name_or_path": "some/model"}, "data": {"train": "train.jsonl"}, "output": {"dir": "out"}}


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune.cli", *args], capture_output=True, text=True, cwd=cwd)


def write_recipe(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def recipe_files() -> list[Path]:
    """Every YAML under recipes/, recursively, except data files (recipes/**/data/)."""
    return sorted(p for p in (REPO / "recipes").rglob("*.y*ml") if "data" not in p.relative_to(REPO / "recipes").parts)


SHIPPED_RECIPES = {
    "llama_lora.yaml",
    "llama_dpo.yaml",
    "llama_lora_8bit.yaml",
    "llama_qlora.yaml",
    "minilm_bbc_news.yaml",
    "image_transfer.yaml",
    "pretrain_continued_lora.yaml",
    "pretrain_tiny.yaml",
    "pretrain_tiny_sft.yaml",
    "tiny_zero2.yaml",
    "tiny_zero3_offload.yaml",
}


def test_every_shipped_recipe_validates_with_the_cli_loader():
    files = recipe_files()
    names = {str(p.relative_to(REPO / "recipes")) for p in files}
    # The walk must find at least every recipe we ship (a recipe added later only grows the set).
    assert SHIPPED_RECIPES <= names, f"recipes missing from the walk: {sorted(SHIPPED_RECIPES - names)}"
    for path in files:
        recipe = load_recipe(path)  # the loader `finetune train/validate` use; raises RecipeError on any problem
        assert recipe.model.name_or_path or recipe.model.config, path
    print(f"validated {len(files)} recipes")


def test_minimal_recipe_fills_documented_defaults():
    recipe = validate_recipe(MINIMAL)
    assert recipe.task == "sft"
    assert recipe.adapter.type == "lora" and recipe.adapter.target_modules == ["all-linear"]
    assert recipe.train.precision == "auto"
    assert recipe.data.train[0].path == "train.jsonl"


def test_shorthands():
    recipe = validate_recipe({**MINIMAL, "adapter": "none", "train": {"report_to": "tensorboard"}})
    assert recipe.adapter.type == "none"
    assert recipe.train.report_to == ["tensorboard"]


def test_one_dtype_spelling_in_every_section_with_torch_names_as_aliases(tmp_path):
    keys = ["model.dtype", "quantization.compute_dtype", "quantization.storage_dtype", "train.precision", "merge.dtype"]
    path = write_recipe(tmp_path, MINIMAL)
    for torch_name, short in (("float32", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16")):
        recipe = load_recipe(path, [f"{key}={torch_name}" for key in keys])
        values = [recipe.model.dtype, recipe.quantization.compute_dtype, recipe.quantization.storage_dtype,
                  recipe.train.precision, recipe.merge.dtype]
        assert values == [short] * len(keys), torch_name
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ["train.precision=f16", "merge.dtype=int8"])
    assert err.value.problems == [
        "train.precision: 'f16' is not allowed; choose one of: auto, fp32, bf16, fp16. Did you mean 'fp16'?",
        "merge.dtype: 'int8' is not allowed; choose one of: fp32, bf16, fp16.",
    ]


def test_typo_gives_did_you_mean(tmp_path):
    path = write_recipe(tmp_path, {**MINIMAL, "train": {"learnig_rate": 1e-4}})
    result = cli("validate", str(path))
    assert result.returncode == 2
    assert result.stderr == (
        f"error: 1 problem in {path}:\n  - train.learnig_rate: unknown key. Did you mean 'learning_rate'?\n"
    )
    assert "Traceback" not in result.stderr


def test_unknown_section_lists_allowed_keys():
    with pytest.raises(RecipeError) as err:
        validate_recipe({**MINIMAL, "trainer": {}})
    assert err.value.problems == ["trainer: unknown key. Did you mean 'train'?"]
    with pytest.raises(RecipeError) as err:
        validate_recipe({**MINIMAL, "zzz": 1})
    assert err.value.problems[0].startswith("zzz: unknown key. Allowed keys: task, model, adapter, quantization, data,")


def test_wrong_type_says_what_was_expected(tmp_path):
    path = write_recipe(tmp_path, {**MINIMAL, "train": {"micro_batch_size": "four"}})
    result = cli("validate", str(path))
    assert result.returncode == 2
    assert "  - train.micro_batch_size: expected an integer, got 'four' (str).\n" in result.stderr


def test_booleans_and_text_are_not_numbers(tmp_path):
    """Strict types: `true` is not 1.0, `1` is not true, quoted text is not a number; YAML numbers (`1e-4` too, which
    YAML 1.1 reads as text) are, in a file and in an override alike."""
    result = cli("validate", "recipes/llama_lora.yaml", "train.learning_rate=true")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (
        "error: 1 problem in recipes/llama_lora.yaml:\n  - train.learning_rate: expected a number, got True (bool).\n"
    )
    path = write_recipe(tmp_path, MINIMAL)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ["train.micro_batch_size=true", "adapter.alpha=true", "data.packing=1", "train.max_steps=1e3",
                           "train.learning_rate='1e-4'"])  # fmt: skip
    assert err.value.problems == [
        "adapter.alpha: expected a number, got True (bool).",
        "data.packing: expected true or false, got 1 (int).",
        "train.max_steps: expected an integer, got 1000.0 (float). Write it as a whole number: 1000.",
        "train.micro_batch_size: expected an integer, got True (bool).",
        "train.learning_rate: expected a number, got '1e-4' (str). It is quoted, so it is text: write 1e-4 without quotes.",
    ]
    recipe = load_recipe(path, ["train.learning_rate=1e-4", "adapter.alpha=16", "train.epochs=2", "train.max_steps=10"])
    assert (recipe.train.learning_rate, recipe.adapter.alpha, recipe.train.epochs, recipe.train.max_steps) == (1e-4, 16.0, 2.0, 10)
    path.write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\noutput: {dir: o}\n"
                    "train: {learning_rate: 5E-5, warmup_ratio: 1e-2, micro_batch_size: '4'}\n")  # fmt: skip
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.problems == [
        "train.micro_batch_size: expected an integer, got '4' (str). It is quoted, so it is text: write 4 without quotes."
    ]
    path.write_text(path.read_text().replace("'4'", "4"))
    recipe = load_recipe(path)
    assert (recipe.train.learning_rate, recipe.train.warmup_ratio, recipe.train.micro_batch_size) == (5e-5, 1e-2, 4)


def test_saved_recipe_reads_back_the_same(tmp_path):
    """Text that the loader would read as a number (a revision `1234e56`) is quoted when a recipe is saved."""
    from finetune.recipe import save_recipe

    recipe = validate_recipe({**MINIMAL, "model": {"name_or_path": "some/model", "revision": "1234e56"}})
    saved = save_recipe(recipe, tmp_path)
    assert load_recipe(saved) == recipe


def test_missing_required_field_names_it(tmp_path):
    path = write_recipe(tmp_path, {"model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}})
    result = cli("validate", str(path))
    assert result.returncode == 2
    assert result.stderr == (
        f"error: 1 problem in {path}:\n"
        "  - output: required key is missing (Where the adapter, tokenizer, resolved recipe, metrics and plots are written).\n"
    )


def test_all_problems_reported_at_once(tmp_path):
    path = write_recipe(
        tmp_path,
        {
            "model": {"name_or_path": "m"},
            "adapter": {"type": "lorra", "r": 0},
            "data": {"train": "t.jsonl"},
            "train": {"optimizer": "adam"},
            "output": {"dir": "o"},
        },
    )
    result = cli("validate", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: 3 problems in {path}:",
        "  - adapter.type: 'lorra' is not allowed; choose one of: lora, qlora, none, head. Did you mean 'lora'?",
        "  - adapter.r: 0 is out of range (0, 4096]; typical ranks are 4 to 64",
        "  - train.optimizer: 'adam' is not allowed; choose one of: adamw_torch, adamw_8bit, paged_adamw_8bit, "
        "paged_adamw_32bit, adafactor, sgd.",
    ]


def test_out_of_range_values_name_the_key_and_the_range(tmp_path):
    path = write_recipe(tmp_path, {**MINIMAL, "train": {"learning_rate": 5.0}})
    result = cli("validate", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == (
        f"error: 1 problem in {path}:\n"
        "  - train.learning_rate: 5.0 is out of range (0, 1]; typical LoRA rates are 1e-5 to 2e-3\n"
    )
    overrides = ["train.warmup_ratio=1", "adapter.dropout=-0.1", "train.seed=-1", "train.epochs=.inf",
                 "data.max_length=0", "train.micro_batch_size=0"]
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ["train.learning_rate=1e-4", *overrides])
    assert err.value.problems == [
        "adapter.dropout: -0.1 is out of range [0, 1); typical values are 0 to 0.1",
        "data.max_length: 0 is out of range (0, 1048576]",
        "train.epochs: expected a finite number, got inf (float).",
        "train.micro_batch_size: must be greater than 0, got 0.",
        "train.warmup_ratio: 1 is out of range [0, 1); a fraction of the training steps, e.g. 0.03",
        "train.seed: -1 is out of range [0, 4294967296)",
    ]


def test_keys_yaml_reads_as_values_and_unusable_paths(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\noutput: {dir: o}\ntrain: {yes: 1, 3: x}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.problems == [
        "train: key true is not a name: YAML read it as true/false (quote it if it is meant as text).",
        "train: key 3 is not a name: YAML read it as a number (quote it if it is meant as text).",
    ]
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(tmp_path, MINIMAL), ["output.dir=" + "x" * 5000, "data.train=a\0b.jsonl"])
    assert err.value.problems == [
        "output.dir: not a usable path (File name too long): '" + "x" * 56 + "...",
        "data.train[0].path: not a usable path (embedded null byte): 'a\\x00b.jsonl'",
    ]
    path.write_bytes(b"model: {name_or_path: caf\xe9}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert err.value.problems == ["not valid YAML: line 1 is not UTF-8 (byte 0xe9); save the recipe as UTF-8"]


def test_training_data_cannot_be_an_empty_list():
    with pytest.raises(RecipeError) as err:
        validate_recipe({**MINIMAL, "data": {"train": []}})
    assert err.value.problems == ["data.train: needs at least 1 item(s), got []."]


def test_data_source_encoding_is_checked():
    data = {"train": [{"path": "a.jsonl", "encoding": "latin-1"}, {"path": "b.jsonl", "encoding": "latin-9x"},
                      {"path": "c.parquet", "encoding": "utf-8"}]}
    with pytest.raises(RecipeError) as err:
        validate_recipe({**MINIMAL, "data": data})
    assert err.value.problems == [
        "data.train[1].encoding: 'latin-9x' is not a text encoding Python knows (e.g. utf-8, latin-1, cp1252, utf-16)",
        "data.train[2]: encoding: a .parquet file is binary (its strings are always UTF-8); remove encoding",
    ]


def test_overrides_go_through_validation(tmp_path):
    path = write_recipe(tmp_path, MINIMAL)
    recipe = load_recipe(path, ["train.learning_rate=1e-3", "adapter.target_modules=[q_proj, v_proj]", "data.packing=true"])
    assert recipe.train.learning_rate == 1e-3
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    assert recipe.data.packing is True
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ["train.epocs=2", "train.learning_rate=fast"])
    assert err.value.problems == [
        "train.learning_rate: expected a number, got 'fast' (str).",
        "train.epocs: unknown key. Did you mean 'epochs'?",
    ]
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ["no_equals_sign"])
    assert err.value.problems == ["override 'no_equals_sign': expected key.path=value"]
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ["train..seed=1", "train.seed.value=1", "model.name_or_path.x=1"])
    assert err.value.problems == [
        "override 'train..seed=1': 'train..seed' has an empty part; expected key.path=value",
        "override 'model.name_or_path.x=1': model.name_or_path is 'some/model', not a section with keys; "
        "set model.name_or_path=... instead",
    ]
    # A data source given as its path, or an adapter as its type, takes keys in overrides too.
    recipe = load_recipe(path, ["data.train.limit=5", "adapter=none", "adapter.type=lora"])
    assert recipe.data.train[0].limit == 5 and recipe.data.train[0].path == "train.jsonl"


def test_cross_field_problem_names_keys():
    with pytest.raises(RecipeError) as err:
        validate_recipe({**MINIMAL, "data": {"train": "t.jsonl", "eval": "e.jsonl", "eval_fraction": 0.1}})
    assert err.value.problems == ["data: set either data.eval or data.eval_fraction, not both"]


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    result = cli("validate", str(bad))
    assert result.returncode == 2 and result.stderr.startswith(f"error: 1 problem in {bad}:\n  - not valid YAML:")
    result = cli("validate", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert result.stderr == f"error: 1 problem:\n  - recipe file not found: {tmp_path / 'nope.yaml'}\n"


def test_validate_checks_data_files_exist(tmp_path):
    path = write_recipe(tmp_path, {**MINIMAL, "data": {"train": str(tmp_path / "missing.jsonl")}})
    result = cli("validate", str(path))
    assert result.returncode == 2
    assert f"  - data.train: data file not found: {tmp_path / 'missing.jsonl'}\n" in result.stderr


def test_resolved_recipe_redacts_secrets(tmp_path):
    from finetune.recipe.loading import _redact

    assert _redact({"hub": {"token": "hf_abc", "name": "x"}, "api_key": ""}) == {
        "hub": {"token": "<redacted>", "name": "x"},
        "api_key": "",
    }


def test_readme_reference_is_generated_from_schema():
    readme = (REPO / "README.md").read_text()
    assert reference_markdown() in readme, "README recipe reference is stale: run `python scripts/gen_readme_reference.py`"


def test_explain_key_and_typo():
    result = cli("explain", "train.learning_rate")
    assert result.returncode == 0
    assert result.stdout == "train.learning_rate (float, default `0.0002`): Peak learning rate.\n"
    result = cli("explain", "train.learnig_rate")
    assert result.returncode == 2
    assert "train.learnig_rate: no such recipe key. Did you mean 'train.learning_rate'?" in result.stderr


def test_every_command_help_exits_zero():
    from finetune.cli import build_parser

    parser = build_parser()
    commands = list(parser._subparsers._group_actions[0].choices)
    assert {"train", "validate", "explain", "chat"} <= set(commands)
    for command in [None, *commands]:
        result = cli(*([command] if command else []), "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert "usage:" in result.stdout
    run_py = subprocess.run([sys.executable, str(REPO / "finetune" / "run.py"), "--help"], capture_output=True, text=True)
    assert run_py.returncode == 0 and "usage:" in run_py.stdout


def test_commands_take_options_and_overrides_in_any_order():
    from finetune.cli import parse_arguments

    args = parse_arguments(["validate", "r.yaml", "train.seed=1", "--data", "adapter.r=4"])
    assert (args.command, args.recipe, args.overrides, args.data) == ("validate", "r.yaml", ["train.seed=1", "adapter.r=4"], True)
    args = parse_arguments(["train", "r.yaml", "train.seed=1", "adapter.r=4"])
    assert (args.command, args.recipe, args.overrides) == ("train", "r.yaml", ["train.seed=1", "adapter.r=4"])
    args = parse_arguments(["launch", "--dry-run", "r.yaml", "train.seed=1", "--nproc-per-node", "2", "adapter.r=4"])
    assert (args.recipe, args.overrides, args.nproc_per_node, args.dry_run) == ("r.yaml", ["train.seed=1", "adapter.r=4"], 2, True)
    assert parse_arguments(["validate", "r.yaml"]).overrides == []


@pytest.mark.parametrize("command", ["train", "validate", "launch"])
def test_overrides_are_not_listed_as_required(command):
    result = cli(command)
    assert result.returncode == 2
    assert result.stderr.endswith(f"finetune {command}: error: the following arguments are required: recipe\n")
    if command != "launch":  # launch's usage line wraps: its many options
        assert result.stderr.splitlines()[0] == f"usage: finetune {command} [-h]{' [--data]' if command == 'validate' else ''} recipe [key.path=value ...]"
    if command == "train":  # and `python finetune/run.py`, the launchers' entry point
        run_py = subprocess.run([sys.executable, str(REPO / "finetune" / "run.py")], capture_output=True, text=True)
        assert run_py.stderr.endswith("finetune train: error: the following arguments are required: recipe\n")


def test_override_list_that_is_not_yaml_says_how_to_quote(tmp_path):
    path = write_recipe(tmp_path, MINIMAL)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ["eval.prompts=[Who are you?]"])
    assert err.value.problems == [
        "override 'eval.prompts=[Who are you?]': the value is not valid YAML (while parsing a flow sequence); "
        "quote items with special characters, e.g. eval.prompts='[\"Who are you?\"]'"
    ]


def test_relative_data_paths_are_found_beside_the_recipe(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("")
    path = write_recipe(tmp_path, {**MINIMAL, "data": {"train": "data/train.jsonl", "eval": "data/missing.jsonl"}})
    monkeypatch.chdir(REPO)  # not the recipe's folder
    recipe = load_recipe(path)
    assert recipe.data.train[0].path == str(tmp_path / "data" / "train.jsonl")
    assert recipe.data.eval[0].path == "data/missing.jsonl"  # found nowhere: left as written, validate reports it
