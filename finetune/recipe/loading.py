"""Reading a recipe: YAML, `key.path=value` overrides, validation with one readable line per problem, and saving
the resolved recipe (secrets redacted)."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from finetune.errors import RecipeError
from finetune.recipe.schema import Recipe


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a YAML recipe, apply `key.path=value` overrides and validate; raises RecipeError with every problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError([f"recipe file not found: {path}"]) from None
    except OSError as exc:  # a folder, no permission, a name too long
        raise RecipeError([f"recipe file not readable: {path} ({exc.strerror})"]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError(
            [f"not valid YAML: line {line} is not UTF-8 (byte 0x{raw[exc.start]:02x}); save the recipe as UTF-8"],
            source=str(path),
        ) from None
    try:
        data = read_yaml(text)
    except yaml.YAMLError as exc:
        raise RecipeError([f"not valid YAML: {exc}"], source=str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        sections = ", ".join(Recipe.model_fields)
        raise RecipeError(
            [f"the file must hold a mapping of sections ({sections}), got {type(data).__name__}"], source=str(path)
        )
    data = apply_overrides(data, overrides)
    recipe = validate_recipe(data, source=str(path))
    problems = path_problems(recipe)
    if problems:
        raise RecipeError(problems, source=str(path))
    resolve_data_paths(recipe, path.resolve().parent)
    return recipe


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading `1e-4` and `5E3` as numbers as YAML 1.2 does: YAML 1.1 wants a dot
    (`1.0e-4`) and reads `1e-4` as text, which the recipe's strict types would then refuse."""


class _RecipeDumper(yaml.SafeDumper):
    """The safe dumper that quotes what `_RecipeLoader` would read as a number (a revision `1234e56`)."""


for _resolver in (_RecipeLoader, _RecipeDumper):
    _resolver.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
    )


def read_yaml(text: str) -> Any:
    """One YAML document, read safely (plain data only), as recipe files and `key.path=value` overrides are read."""
    loader = _RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def write_yaml(data: Any) -> str:
    """`data` as YAML that `read_yaml` reads back as the same values (keys in their order)."""
    return yaml.dump(data, Dumper=_RecipeDumper, sort_keys=False)


def path_problems(recipe: Recipe) -> list[str]:
    """Paths no file system can hold (a NUL byte, a name too long): said here, before anything stats them."""
    m = recipe.model
    paths = [("model.name_or_path", m.name_or_path), ("model.tokenizer", m.tokenizer), ("output.dir", recipe.output.dir)]
    paths += [("model.config.file", m.config.file)] if m.config is not None else []
    paths += [(f"data.{key}[{i}].path", s.path) for key in ("train", "eval") for i, s in enumerate(getattr(recipe.data, key) or [])]
    problems = []
    for key, text in paths:
        if text is None:
            continue
        try:
            os.stat(text)
        except (FileNotFoundError, NotADirectoryError):
            pass
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte, which pathlib's own checks let through
            problems.append(f"{key}: not a usable path ({getattr(exc, 'strerror', None) or exc}): {_show(text)}")
    return problems


def resolve_data_paths(recipe: Recipe, recipe_dir: Path) -> None:
    """A relative data path is read from the working directory, or else from the recipe file's folder."""
    for source in [*recipe.data.train, *(recipe.data.eval or [])]:
        path = Path(source.path)
        if path.is_absolute() or path.exists():
            continue
        beside = recipe_dir / path
        if beside.exists():
            source.path = str(beside)


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set `a.b.c=value` pairs into a copy of `data`; each value is read as YAML, like the same value in a recipe
    file: `3` and `1e-4` are numbers, `true` is a boolean, `[a, b]` a list, `'3'` and anything else text."""
    import copy

    data = copy.deepcopy(data)
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r}: expected key.path=value")
            continue
        parts = key.strip().split(".")
        if not all(parts):
            problems.append(f"override {item!r}: {key.strip()!r} has an empty part; expected key.path=value")
            continue
        try:
            value = read_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            if raw.strip()[:1] in "[{":
                problems.append(
                    f"override {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]}); "
                    f"quote items with special characters, e.g. {key.strip()}='[\"Who are you?\"]'"
                )
                continue
            value = raw
        node = data
        for depth, part in enumerate(parts[:-1], 1):
            child = node.get(part)
            if isinstance(child, str) and parts[:depth] == ["adapter"]:
                child = {"type": child}  # `adapter: lora` is shorthand for `adapter: {type: lora}`
            elif isinstance(child, str) and parts[:depth] in (["data", "train"], ["data", "eval"]):
                child = {"path": child}  # a data source given as its path
            elif child is None:
                child = {}
            if not isinstance(child, dict):
                where = ".".join(parts[:depth])
                problems.append(f"override {item!r}: {where} is {_show(child)}, not a section with keys; set {where}=... instead")
                break
            node[part] = child
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise RecipeError(problems)
    return data


def validate_recipe(data: dict, source: str | None = None) -> Recipe:
    problems: list[str] = []
    data = _named_keys_only(data, (), problems)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(problems + format_errors(exc), source=source) from None
    if problems:
        raise RecipeError(problems, source=source)
    return recipe


def _named_keys_only(value: Any, loc: tuple, problems: list[str], section: type[BaseModel] = Recipe) -> Any:
    """`value` without the keys of its sections that are not strings, each reported. YAML reads an unquoted `1:`,
    `yes:` or `~:` as a number, a boolean or null, which pydantic would report under a garbled name."""
    if isinstance(value, list):
        return [_named_keys_only(v, (*loc, i), problems, section) for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, sub in value.items():
        if isinstance(key, str):
            field = section.model_fields.get(key)
            inner = _section_type(field.annotation) if field is not None else None
            out[key] = _named_keys_only(sub, (*loc, key), problems, inner) if inner is not None else sub
            continue
        spelled = yaml.safe_dump(key, default_flow_style=True).strip().removesuffix("...").strip()
        read_as = {bool: "true/false", type(None): "null", int: "a number", float: "a number"}.get(type(key), type(key).__name__)
        where = f"{_dotted(loc)}: key" if loc else "top-level key"
        problems.append(f"{where} {spelled} is not a name: YAML read it as {read_as} (quote it if it is meant as text).")
    return out


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _model_at(loc: tuple, root: type[BaseModel] = None) -> type[BaseModel] | None:
    """The pydantic model class found by walking `loc` (list indices skipped) from the Recipe root."""
    model = root or Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _section_type(field.annotation)
        if model is None:
            return None
    return model


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _field_at(loc: tuple):
    if not loc:
        return None
    *parent, last = [p for p in loc if not isinstance(p, int)] or [None]
    model = _model_at(tuple(parent))
    return model.model_fields.get(last) if model is not None and last is not None else None


def _clean_loc(loc: tuple) -> tuple:
    # Pydantic adds type tags to locations inside unions and validators ("list[str]", "function-after[...]").
    return tuple(p for p in loc if isinstance(p, int) or ("[" not in p and p not in _TYPE_TAGS))


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "literal"}


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "recipe"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "finite_number": "a finite number",
}


def format_errors(exc: ValidationError) -> list[str]:
    """One readable line per problem: key path, what is wrong, what is allowed, and a did-you-mean hint."""
    problems: list[str] = []
    for err in exc.errors():
        loc = _clean_loc(tuple(err["loc"]))
        where = _dotted(loc)
        kind = err["type"]
        value = err.get("input")
        if kind == "extra_forbidden":
            parent = _model_at(loc[:-1])
            allowed = _field_names(parent) if parent else []
            key = str(loc[-1])
            hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            msg = f"{where}: unknown key."
            msg += f" Did you mean '{hint[0]}'?" if hint else f" Allowed keys: {', '.join(allowed)}."
        elif kind == "missing":
            field = _field_at(loc)
            section = _section_type(field.annotation) if field is not None else None
            doc = (field.description if field is not None else None) or (section.__doc__ if section else None)
            what = f" ({doc.strip().rstrip('.')})" if doc else ""
            msg = f"{where}: required key is missing{what}."
        elif kind in ("literal_error", "enum"):
            allowed = [str(a) for a in _literal_values(_field_at(loc))]
            msg = f"{where}: {_show(value)} is not allowed; choose one of: {', '.join(allowed)}."
            hint = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.6)
            if hint:
                msg += f" Did you mean '{hint[0]}'?"
        elif kind in _EXPECTED:
            msg = f"{where}: expected {_EXPECTED[kind]}, got {_show(value)} ({type(value).__name__})."
            msg += _type_hint(kind, value)
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            interval = _interval(_field_at(loc))
            if interval:  # bounded on both sides: say the whole range
                hint = _RANGE_HINTS.get(re.sub(r"\[\d+\]", "", where))
                msg = f"{where}: {_show(value)} is out of range {interval}" + (f"; {hint}" if hint else "")
            else:
                bound = {
                    "greater_than": "greater than",
                    "greater_than_equal": "at least",
                    "less_than": "less than",
                    "less_than_equal": "at most",
                }[kind]
                limit = next(iter(err.get("ctx", {}).values()), "?")
                msg = f"{where}: must be {bound} {limit}, got {_show(value)}."
        elif kind == "too_short":
            msg = f"{where}: needs at least {err.get('ctx', {}).get('min_length', 1)} item(s), got {_show(value)}."
        elif kind == "value_error":
            text = str(err.get("ctx", {}).get("error", err["msg"]))
            for line in text.splitlines():
                problems.append(line if where == "recipe" else f"{where}: {line}")
            continue
        else:
            msg = f"{where}: {err['msg']} (got {_show(value)})."
        problems.append(msg)
    return problems


def _type_hint(kind: str, value: Any) -> str:
    """The fix for a value of the wrong type that is one edit from right: quoted text that would have the expected
    type without its quotes (`'1e-4'`, `"true"`), or a whole number written as a float (`1e3` for an integer)."""
    if kind == "int_type" and isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return f" Write it as a whole number: {int(value)}."
    wanted = {"int_type": (int,), "float_type": (int, float), "bool_type": (bool,)}.get(kind)
    if wanted is None or not isinstance(value, str):
        return ""
    try:
        unquoted = read_yaml(value)
    except yaml.YAMLError:
        return ""
    if type(unquoted) not in wanted:  # type(), not isinstance: a boolean is not a number here
        return ""
    return f" It is quoted, so it is text: write {value} without quotes."


# What a sensible value looks like, after "out of range", for keys where the range alone does not say.
_RANGE_HINTS = {
    "train.learning_rate": "typical LoRA rates are 1e-5 to 2e-3",
    "adapter.r": "typical ranks are 4 to 64",
    "train.warmup_ratio": "a fraction of the training steps, e.g. 0.03",
    "data.eval_fraction": "a fraction of the training rows, e.g. 0.1",
    "adapter.dropout": "typical values are 0 to 0.1",
}


def _interval(field) -> str | None:
    """`(0, 1]` for a field bounded on both sides (gt/ge and lt/le in its metadata), else None."""
    if field is None:
        return None
    low = high = None
    for item in field.metadata:
        for name, bracket in (("gt", "("), ("ge", "[")):
            if getattr(item, name, None) is not None:
                low = f"{bracket}{getattr(item, name)}"
        for name, bracket in (("lt", ")"), ("le", "]")):
            if getattr(item, name, None) is not None:
                high = f"{getattr(item, name)}{bracket}"
    return f"{low}, {high}" if low and high else None


def _literal_values(field) -> list:
    if field is None:
        return []
    values: list = []

    def walk(annotation: Any) -> None:
        if get_origin(annotation) is Literal:
            values.extend(get_args(annotation))
        else:
            for arg in get_args(annotation):
                walk(arg)

    walk(field.annotation)
    return values


# Keys that hold credentials: `token`, `hub_token`, `password`, `api_key`... (not `max_new_tokens`).
_SECRET_KEY = re.compile(r"(^|_)(token|password|secret|api_key|access_key)$", re.IGNORECASE)


# Values too, in any field (a URL or path with a token in it): Hugging Face tokens, and the value of any environment
# variable named like a secret (HF_TOKEN, WANDB_API_KEY...; 8+ characters, so flags such as X_TOKEN=1 stay).
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<redacted>" if _SECRET_KEY.search(k) and v else _redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    if isinstance(value, str):
        for secret in (v for k, v in os.environ.items() if _SECRET_KEY.search(k) and len(v) >= 8):
            value = value.replace(secret, "<redacted>")
        return _HF_TOKEN.sub("<redacted>", value)
    return value


def recipe_to_dict(recipe: Recipe) -> dict:
    """The resolved recipe (defaults filled in), with anything that looks like a secret redacted."""
    return _redact(recipe.model_dump(mode="json"))


def save_recipe(recipe: Recipe, folder: str | os.PathLike, name: str = "recipe.yaml") -> Path:
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(write_yaml(recipe_to_dict(recipe)))
    return path
