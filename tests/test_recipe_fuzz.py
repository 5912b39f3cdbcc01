"""Fuzzing the recipe loader: every shipped recipe, mutated at random, gives RecipeError problems that each name a
key path (or the override, or the file) and never any other exception; a value of the wrong type (a boolean for a
number, quoted text for a boolean...) is refused with a problem naming its key, never coerced.

The seed changes from run to run and is printed; replay a failure with `FUZZ_SEED=<seed>`. `FUZZ_CASES` sets the
number of cases (default 1000).
"""

from __future__ import annotations

import copy
import math
import os
import random
import re
import time
from pathlib import Path
from types import UnionType
from typing import Any, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from finetune.errors import RecipeError
from finetune.recipe import Recipe, load_recipe
from finetune.recipe.loading import write_yaml
from support import REPO

CASES = int(os.environ.get("FUZZ_CASES", "1000"))
SEED = int(os.environ["FUZZ_SEED"]) if os.environ.get("FUZZ_SEED") else random.SystemRandom().randrange(2**32)

# Problems about the file itself rather than a key (the RecipeError's head names the file).
FILE_PROBLEMS = ("recipe file not found: ", "recipe file not readable: ", "not valid YAML: ",
                 "the file must hold a mapping of sections", "top-level key ")


def shipped_recipes() -> list[Path]:
    """Every YAML under recipes/, recursively, except data files (recipes/**/data/)."""
    found = sorted(p for p in (REPO / "recipes").rglob("*.y*ml") if "data" not in p.relative_to(REPO / "recipes").parts)
    assert len(found) >= 6, found
    return found


def _section(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _section(arg)
        if found is not None:
            return found
    return None


def schema_paths(model: type[BaseModel] = Recipe, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the schema (list indices left out), mapped to its field; sections are keys too."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        out[path] = field
        section = _section(field.annotation)
        if section is not None:
            out.update(schema_paths(section, path + "."))
    return out


SCHEMA = schema_paths()
SECTIONS = {p for p, f in SCHEMA.items() if _section(f.annotation) is not None}
MAPPINGS = {p for p, f in SCHEMA.items() if any(get_origin(t) is dict for t in (f.annotation, *get_args(f.annotation)))}
NUMERIC = [p for p, f in SCHEMA.items() if any(t in (int, float) for t in (f.annotation, *get_args(f.annotation)))]
REQUIRED = ["model", "model.name_or_path", "data", "data.train", "output", "output.dir"]
# Sections that are lists of sections (`data.train: [{path: ...}, ...]`): their keys are not set by a dotted path.
LISTED = {p for p, f in SCHEMA.items() if _section(f.annotation) is not None and any(get_origin(t) is list for t in (f.annotation, *get_args(f.annotation)))}


def scalar_kind(field) -> str | None:
    """`int`, `float`, `bool` or `str` for a field of exactly that type (or that type or None), else None."""
    annotation = field.annotation
    types = [t for t in get_args(annotation) if t is not type(None)] if get_origin(annotation) is UnionType else [annotation]
    return types[0].__name__ if len(types) == 1 and types[0] in (int, float, bool, str) else None


TYPED = {p: scalar_kind(f) for p, f in SCHEMA.items()
         if scalar_kind(f) and not any(p.startswith(s + ".") for s in LISTED)}  # fmt: skip
# Values of another type than the key's, as a recipe file holds them and as an override writes them.
WRONG_TYPES = {
    "int": ([True, False, 2.5, "8", "1e-4", [1]], ["true", "no", "2.5", "'8'", "[1]"]),
    "float": ([True, False, "1e-4", "0.5", [0.1]], ["true", "off", "'1e-4'", "\"0.5\"", "[0.1]"]),
    "bool": ([1, 0, "true", "yes", 1.0], ["1", "0", "'true'", "1.0"]),
    "str": ([1, 2.5, True, ["a"]], ["1", "2.5", "true", "[a]"]),
}

# A key path, then a colon ("train.learning_rate: ...") or, for a dotted path, a space ("data.packing is for sft").
NAME, STEP = r"[A-Za-z_]\w*", r"(?:\.[A-Za-z_]\w*|\[\d+\])"
KEY = re.compile(rf"^({NAME}{STEP}*)(?=:)|^({NAME}{STEP}+)(?= )")


def problem_names_a_key(problem: str, overrides: list[str]) -> str | None:
    """None when `problem` starts with a key path of the schema (an unknown key: its parent is a section), with
    `override '<one of overrides>'`, or is about the file; otherwise why not."""
    if problem.startswith("override "):
        quoted = [repr(o) for o in overrides]
        return None if any(problem.startswith(f"override {q}") for q in quoted) else "names an override not given"
    if problem.startswith(FILE_PROBLEMS):
        return None
    head, unknown, _ = problem.partition(": unknown key")
    if unknown:  # the key is the user's (any spelling); its parent must be a section of the schema
        parent = re.sub(r"\[\d+\]", "", head.rpartition(".")[0])
        return None if parent == "" or parent in SECTIONS else f"parent of unknown key {head!r} is not a section"
    match = KEY.match(problem)
    if not match:
        return "does not start with a key path"
    key = re.sub(r"\[\d+\]", "", match.group(1) or match.group(2))
    if key in SCHEMA:
        return None
    prefix = key
    while "." in prefix:  # a user's key inside a mapping field (`data.train[0].columns.messages`)
        prefix = prefix.rpartition(".")[0]
        if prefix in MAPPINGS:
            return None
    return f"{key!r} is not a key of the schema"


# --------------------------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------------------------

ODD_STRINGS = ["", " ", "x", "five", "1e-3", "0x10", "None", "yes", "\x00", "a" * 5000, "../../etc", "package://", "é"]
OUT_OF_RANGE = [0, -1, -1e-9, 5.0, 1e30, 2**40, -(2**40), 2**32, 1.5, math.inf, -math.inf, math.nan, 0.0, 10_001]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.choice(["str", "int", "float", "list", "dict", "none", "bool"] if depth < 2 else ["str", "int", "none", "bool"])
    if kind == "str":
        return rng.choice(ODD_STRINGS)
    if kind == "int":
        return rng.choice([0, 1, -1, 7, 2**31, 10**20])
    if kind == "float":
        return rng.choice([0.5, -0.5, 1e-12, 3.0, math.inf, math.nan])
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "dict":
        keys = ["a", "type", "path", "r", "x y", 1, True, 2.5, None]  # YAML reads `1:`, `yes:`, `~:` as non-strings
        return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randint(0, 2))}
    if kind == "none":
        return None
    return rng.choice([True, False])


def nodes(data: Any, path: tuple = ()) -> list[tuple]:
    """Paths (tuples of keys and indices) of every value inside `data`."""
    out = []
    if isinstance(data, dict):
        for key, value in data.items():
            out.append((*path, key))
            out += nodes(value, (*path, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            out.append((*path, index))
            out += nodes(value, (*path, index))
    return out


def parent_of(data: Any, path: tuple):
    for part in path[:-1]:
        data = data[part]
    return data


def typo(rng: random.Random, key: str) -> str:
    if len(key) >= 3 and rng.random() < 0.5:
        i = rng.randrange(len(key) - 1)
        swapped = key[:i] + key[i + 1] + key[i] + key[i + 2 :]
        if swapped != key:
            return swapped
    if len(key) >= 2:
        i = rng.randrange(len(key))
        return key[:i] + key[i + 1 :]
    return key + key


def set_path(data: dict, dotted: str, value: Any) -> None:
    """Set a dotted schema path in `data`, making sections on the way (replacing what is in the way)."""
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[last] = value


def mutate(rng: random.Random, data: Any) -> tuple[Any, list[str], str]:
    """One random mutation of `data` (a recipe mapping): the new data, overrides, and what was done."""
    kind = rng.choice(["type", "range", "typo", "delete", "nesting", "path", "override", "override", "root"])
    all_nodes = nodes(data) if isinstance(data, dict) else []
    if kind == "root":
        return rng.choice([[], "recipe", 3, [data], None, True]), [], "root replaced"
    if kind == "type" and all_nodes:
        path = rng.choice(all_nodes)
        value = random_value(rng)
        parent_of(data, path)[path[-1]] = value
        return data, [], f"type {path} = {value!r:.60}"
    if kind == "path":
        key = rng.choice(["data.train", "data.eval", "model.name_or_path", "output.dir", "deepspeed", "model.chat_template"])
        value = rng.choice(ODD_STRINGS + [{"path": rng.choice(ODD_STRINGS)}, [rng.choice(ODD_STRINGS)]])
        set_path(data, key, value)
        return data, [], f"path {key} = {value!r:.60}"
    if kind == "range":
        key = rng.choice(NUMERIC)
        value = rng.choice(OUT_OF_RANGE)
        set_path(data, key, value)
        return data, [], f"range {key} = {value!r}"
    if kind == "typo":
        keyed = [p for p in all_nodes if isinstance(p[-1], str)]
        if keyed:
            path = rng.choice(keyed)
            parent = parent_of(data, path)
            new = typo(rng, path[-1])
            parent[new] = parent.pop(path[-1])
            return data, [], f"typo {path} -> {new!r}"
    if kind == "delete":
        key = rng.choice(REQUIRED + [".".join(map(str, p)) for p in all_nodes if all(isinstance(x, str) for x in p)])
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
        return data, [], f"delete {key}"
    if kind == "nesting":
        sections = [p for p in all_nodes if isinstance(parent_of(data, p)[p[-1]], (dict, list))]
        scalars = [p for p in all_nodes if not isinstance(parent_of(data, p)[p[-1]], (dict, list))]
        if sections and (not scalars or rng.random() < 0.5):
            path = rng.choice(sections)
            value = rng.choice(["lora", 16, None, True, "data/train.jsonl", 0.5])
        elif scalars:
            path = rng.choice(scalars)
            value = rng.choice([{"type": "lora"}, {"path": "x.jsonl"}, [1, 2], {"a": {"b": 1}}, copy.deepcopy(data.get("train", {}))])
        else:
            return data, [], "nesting (nothing to change)"
        parent_of(data, path)[path[-1]] = value
        return data, [], f"nesting {path} = {value!r:.60}"
    # Overrides, as `finetune train RECIPE key=value` gives them.
    key = rng.choice(list(SCHEMA))
    if rng.random() < 0.3:
        key = ".".join(typo(rng, part) if rng.random() < 0.5 else part for part in key.split("."))
    raw = rng.choice(["abc", "5", "-3", "1e9", "0", "5.0", "[1, 2]", "{a: 1}", "null", "true", "", "[unclosed", "{",
                      "=", "a=b", "[Who are you?]", "'quoted'", "{type: lora}", ".inf", "1e-3"])
    item = rng.choice([f"{key}={raw}", f"{key}={raw}", "noequals", f"={raw}", f".{key}={raw}", f"{key}..x={raw}",
                       f"{key}.sub={raw}", f"{key} ={raw}"])
    return data, [item], f"override {item!r}"


def wrong_type(rng: random.Random, data: dict) -> tuple[dict, list[str], str, str]:
    """A value of the wrong type for one typed key, in the file or as an override: the data, overrides, what was
    done, and the key that must be refused."""
    key = rng.choice(sorted(TYPED))
    in_file, in_override = WRONG_TYPES[TYPED[key]]
    if rng.random() < 0.5:
        value = rng.choice(in_file)
        set_path(data, key, value)
        return data, [], f"wrong type {key} = {value!r}", key
    item = f"{key}={rng.choice(in_override)}"
    return data, [item], f"wrong type override {item!r}", key


# --------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------


def test_problem_check_can_fail():
    """The check below rejects lines that name no key, keys outside the schema, and overrides not given."""
    assert problem_names_a_key("train.learning_rate: 5.0 is out of range (0, 1]", []) is None
    assert problem_names_a_key("data.train[0].limit: must be greater than 0, got 0.", []) is None
    assert problem_names_a_key("train.lr: unknown key. Did you mean 'learning_rate'?", []) is None
    assert problem_names_a_key("override 'x=1': expected key.path=value", ["x=1"]) is None
    assert problem_names_a_key("something went wrong", []) == "does not start with a key path"
    assert problem_names_a_key("train.lr: must be greater than 0", []) == "'train.lr' is not a key of the schema"
    assert problem_names_a_key("trian.lr: unknown key.", []) == "parent of unknown key 'trian.lr' is not a section"
    assert problem_names_a_key("data.train[0].columns.text: expected a string", []) is None
    assert problem_names_a_key("data.train[0].text: expected a string", []) == "'data.train.text' is not a key of the schema"
    assert problem_names_a_key("override 'y=1': expected key.path=value", ["x=1"]) == "names an override not given"


def test_wrong_type_mutations_cover_every_kind():
    """The typed keys the fuzz gives wrong types to: numbers, booleans and text of every section."""
    assert {"train.learning_rate", "train.micro_batch_size", "adapter.alpha", "adapter.r", "data.max_length",
            "data.packing", "model.name_or_path", "train.resume", "merge.tolerance"} <= set(TYPED)  # fmt: skip
    assert not any(key.startswith(("data.train.", "data.eval.")) for key in TYPED)
    assert TYPED["adapter.alpha"] == "float" and TYPED["train.max_steps"] == "int" and TYPED["deepspeed"] == "str"
    assert "adapter.type" not in TYPED and "eval.prompts" not in TYPED  # a Literal, a list


def test_mutated_recipes_give_recipe_errors_naming_keys(tmp_path):
    print(f"\nrecipe fuzz: FUZZ_SEED={SEED} FUZZ_CASES={CASES}")
    rng = random.Random(SEED)
    originals = {path: yaml.safe_load(path.read_text()) for path in shipped_recipes()}
    target = tmp_path / "case.yaml"
    start, outcomes = time.perf_counter(), {"error": 0, "valid": 0, "wrong type": 0}
    for case in range(CASES):
        source = rng.choice(list(originals))
        data, overrides, done, must_refuse = copy.deepcopy(originals[source]), [], [], None
        if rng.random() < 0.2:  # one value of the wrong type, alone, so nothing else can hide or remove it
            data, overrides, what, must_refuse = wrong_type(rng, data)
            done.append(what)
        for _ in range(rng.choice([1, 1, 2, 3]) if must_refuse is None else 0):
            if not isinstance(data, dict):  # the root was replaced: nothing left to mutate inside
                break
            data, more, what = mutate(rng, data)
            overrides += more
            done.append(what)
        target.write_text(write_yaml(data))  # the kit's own writer: what it reads back is what was mutated
        where = f"FUZZ_SEED={SEED}, case {case}: {source.name} with {done}"
        try:
            load_recipe(target, overrides)
        except RecipeError as exc:
            error = exc
        except Exception as exc:  # anything else would reach the user as a traceback
            pytest.fail(f"{where}: {type(exc).__name__}: {exc}")
        else:
            assert must_refuse is None, f"{where}: accepted (the value was coerced to the key's type)"
            outcomes["valid"] += 1
            continue
        outcomes["error"] += 1
        assert error.problems, where
        for problem in error.problems:
            assert isinstance(problem, str) and problem.strip(), where
            why = problem_names_a_key(problem, overrides)
            assert why is None, f"{where}: problem {problem!r} {why}"
        if must_refuse is not None:
            outcomes["wrong type"] += 1
            assert any(p.startswith(f"{must_refuse}: expected ") for p in error.problems), f"{where}: {error.problems}"
    seconds = time.perf_counter() - start
    print(f"recipe fuzz: {CASES} cases in {seconds:.1f}s: {outcomes['error']} refused "
          f"({outcomes['wrong type']} of them a wrong type), {outcomes['valid']} still valid")  # fmt: skip
    assert outcomes["error"] >= CASES // 2, outcomes  # the mutations must mostly break recipes, or they test nothing
    assert outcomes["wrong type"] >= CASES // 10, outcomes
    assert seconds < 30 * max(1, CASES / 1000), f"{CASES} cases took {seconds:.0f}s"


# --------------------------------------------------------------------------------------------
# Module names, through `finetune validate`: the model is built without weights and every name checked against it
# --------------------------------------------------------------------------------------------

REAL_NAMES = {"causal_lm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              "classifier": ["query", "key", "value", "dense"]}  # fmt: skip
NOT_LAYERS = {"causal_lm": ["mlp", "self_attn", "layers", "input_layernorm", "norm"],
              "classifier": ["attention", "LayerNorm", "encoder", "intermediate"]}  # fmt: skip


def module_name_mutation(rng: random.Random, model: str) -> tuple[str, Any, bool]:
    """A key naming modules, a value for it, and whether the value must be accepted."""
    real = REAL_NAMES[model]
    kind = rng.choice(["typo", "odd", "not a layer", "empty", "regex none", "regex bad", "regex mixed", "to save",
                       "real", "regex real", "all-linear"])  # fmt: skip
    if kind == "typo":
        return "adapter.target_modules", [rng.choice(real), typo(rng, rng.choice(real))], False
    if kind == "odd":
        return "adapter.target_modules", [rng.choice(["x", "five", "proj", "q-proj", "attn_q", "Wqkv", "c_attn"])], False
    if kind == "not a layer":
        return "adapter.target_modules", [rng.choice(real), rng.choice(NOT_LAYERS[model])], False
    if kind == "empty":
        return "adapter.target_modules", [], False
    if kind == "regex none":
        return "adapter.target_modules", rf".*\.layers\.{rng.randint(5, 99)}\..*", False
    if kind == "regex bad":
        return "adapter.target_modules", rng.choice(["(q_proj", "[a-", "*"]), False
    if kind == "regex mixed":
        return "adapter.target_modules", [rng.choice(real), ".*_proj"], False
    if kind == "to save":
        return "adapter.modules_to_save", [rng.choice(real + ["embed_tokens", "classifier"]) + "s"], False  # PEFT: a suffix
    if kind == "real":
        return "adapter.target_modules", rng.sample(real, rng.randint(1, len(real))), True
    if kind == "regex real":
        return "adapter.target_modules", rf".*\.(?:{'|'.join(rng.sample(real, 2))})", True
    return "adapter.target_modules", "all-linear", True


def test_module_name_mutations_through_validate(tiny_llama_dir, tiny_bert_dir, tmp_path):
    from finetune.commands.validate import validate_command
    from support import cls_recipe, sft_recipe

    rng = random.Random(SEED)
    bases = {"causal_lm": sft_recipe(tiny_llama_dir, tmp_path), "classifier": cls_recipe(tiny_bert_dir, tmp_path)}
    target = tmp_path / "case.yaml"
    outcomes = {"refused": 0, "accepted": 0}
    for case in range(60):
        model = rng.choice(sorted(bases))
        key, value, valid = module_name_mutation(rng, model)
        data = copy.deepcopy(bases[model])
        set_path(data, key, value)
        target.write_text(write_yaml(data))
        where = f"FUZZ_SEED={SEED}, case {case}: {model} {key} = {value!r}"
        try:
            validate_command(load_recipe(target), str(target))
        except RecipeError as exc:
            assert not valid, f"{where}: refused {exc.problems}"
            assert any(p.startswith(f"{key}: ") for p in exc.problems), f"{where}: {exc.problems}"
            for problem in exc.problems:
                assert problem_names_a_key(problem, []) is None and "\n" not in problem, f"{where}: {problem!r}"
            outcomes["refused"] += 1
        except Exception as exc:  # anything else would reach the user as a traceback
            pytest.fail(f"{where}: {type(exc).__name__}: {exc}")
        else:
            assert valid, f"{where}: accepted"
            outcomes["accepted"] += 1
    assert outcomes["refused"] >= 20 and outcomes["accepted"] >= 5, outcomes
