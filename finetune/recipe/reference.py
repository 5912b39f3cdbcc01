"""The recipe's documentation, generated from the schema: the README's reference and `finetune explain`."""

from __future__ import annotations

import difflib
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel

from finetune.errors import RecipeError
from finetune.recipe.loading import _model_at, _section_type
from finetune.recipe.schema import Recipe


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " / ".join(str(a) for a in get_args(annotation))
    if origin in (list,):
        return f"list[{_type_name(get_args(annotation)[0])}]"
    if origin is dict:
        return "mapping"
    args = get_args(annotation)
    if args:
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " / ".join(parts) + (" / null" if type(None) in args else "")
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "section"
        return annotation.__name__
    return str(annotation)


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return ""
    return f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"


def reference_markdown() -> str:
    """The recipe reference, generated from the schema (the README embeds it; a test keeps them equal)."""
    lines = []
    top = [(name, f) for name, f in Recipe.model_fields.items() if _section_type(f.annotation) is None]
    lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    lines += [f"| `{n}` | {_type_name(f.annotation)} | {_default(f)} | {f.description} |" for n, f in top]
    for name, field in Recipe.model_fields.items():
        section = _section_type(field.annotation)
        if section is None:
            continue
        lines += ["", f"#### `{name}` — {section.__doc__.strip()}", ""]
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key, sub in section.model_fields.items():
            nested = _section_type(sub.annotation)
            if nested is not None:
                listed = any(get_origin(a) is list for a in (sub.annotation, *get_args(sub.annotation)))
                kind, index = ("list of sources", "[]") if listed else ("section / null", "")
                lines.append(f"| `{name}.{key}` | {kind} | {_default(sub)} | {sub.description} |")
                for k2, f2 in nested.model_fields.items():
                    lines.append(f"| `{name}.{key}{index}.{k2}` | {_type_name(f2.annotation)} | {_default(f2)} | {f2.description} |")
            else:
                lines.append(f"| `{name}.{key}` | {_type_name(sub.annotation)} | {_default(sub)} | {sub.description} |")
    return "\n".join(lines) + "\n"


def description(key: str) -> str:
    """The schema's description of a dotted recipe key, e.g. `merge.dtype` (CLI flags that mirror a key use it)."""
    *parents, name = key.split(".")
    model = _model_at(tuple(parents))
    if model is None or name not in model.model_fields:
        raise KeyError(key)
    return model.model_fields[name].description


def explain(path: str | None = None) -> str:
    """Plain-text help for the whole recipe, a section (`train`) or a key (`train.learning_rate`)."""
    if not path:
        return reference_markdown()
    parts = path.split(".")
    model = _model_at(tuple(parts[:-1]))
    field = model.model_fields.get(parts[-1]) if model else None
    if field is None:
        names = list(Recipe.model_fields) + [
            f"{s}.{k}" for s, f in Recipe.model_fields.items() if (m := _section_type(f.annotation)) for k in m.model_fields
        ]
        hint = difflib.get_close_matches(path, names, n=1, cutoff=0.6)
        raise RecipeError([f"{path}: no such recipe key." + (f" Did you mean '{hint[0]}'?" if hint else "")])
    section = _section_type(field.annotation)
    if section is not None:
        out = [f"{path}: {section.__doc__.strip()}"]
        for key, sub in section.model_fields.items():
            out.append(f"  {key} ({_type_name(sub.annotation)}, default {_default(sub) or '-'}): {sub.description}")
        return "\n".join(out) + "\n"
    return f"{path} ({_type_name(field.annotation)}, default {_default(field) or '-'}): {field.description}\n"
