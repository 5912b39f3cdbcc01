"""The package layout keeps its layering: every import of every module (also those inside functions) goes to the
same layer or a lower one, and no modules import each other in a circle. docs/architecture.md draws the layers."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "finetune"

# Lowest first. Each entry is a whole folder or a top-level module, so a path says its layer; a module may import its
# own layer and those below.
LAYERS = [
    ["finetune.dtypes", "finetune.errors", "finetune.notices", "finetune.registry", "finetune.tiny"],
    ["finetune.paths", "finetune.recipe"],
    ["finetune.runtime", "finetune.requirements"],
    ["finetune.models", "finetune.data", "finetune.metrics", "finetune.distributed"],
    ["finetune.checks", "finetune.training", "finetune.merge"],
    ["finetune.tasks", "finetune.evaluation", "finetune.launcher"],
    ["finetune.runner"],
    ["finetune.commands", "finetune.cli", "finetune.run"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if not _only_a_docstring(p)}


def _only_a_docstring(path: Path) -> bool:
    """A package's `__init__.py` that only documents the package: it imports nothing, so it has no layer."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(isinstance(node, ast.Expr) for node in body)


def layer_of(name: str) -> int:
    matches = [(len(prefix), index) for index, layer in enumerate(LAYERS) for prefix in layer
               if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} is in no layer: add it to LAYERS (and to docs/architecture.md)"
    return max(matches)[1]


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The kit's modules `path` imports anywhere in it (`from finetune.x import y` counts `finetune.x.y` if a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("finetune.") or name == "finetune":
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: {m for m in imports_of(path, known) if m != name and m != "finetune"} for name, path in found.items()}


def test_every_module_has_a_layer():
    names = modules()
    assert len(names) > 40, sorted(names)  # the walk really found the package
    for name in names:
        layer_of(name)


def test_folders_and_layers_agree():
    """A layer names whole folders and top-level modules, never a module inside a folder: a file sits in its layer's
    folder, so the folder map and the layer map cannot disagree (a layer-0 registry inside the layer-5 `tasks/`)."""
    entries = [prefix for layer in LAYERS for prefix in layer]
    assert len(entries) == len(set(entries)), entries
    for prefix in entries:
        name = prefix.removeprefix("finetune.")
        assert "." not in name, f"{prefix}: a module inside a folder; move it to its layer's folder or the top level"
        assert (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file(), f"{prefix}: no such folder or module"


def test_no_module_imports_a_higher_layer():
    upward = [f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
              for name, targets in import_graph().items() for target in sorted(targets) if layer_of(target) > layer_of(name)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [node, target]) if target in stack else f"{node} -> {target}")
            elif target not in state:
                visit(target, stack + [node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, "\n".join(cycles)


def test_the_checks_catch_what_they_are_for(tmp_path, monkeypatch):
    """An upward import and a cycle in a scratch package are found (the tests above could pass by finding nothing)."""
    scratch = tmp_path / "finetune"
    (scratch / "recipe").mkdir(parents=True)
    (scratch / "__init__.py").write_text('"""The scratch package."""\n')
    (scratch / "errors.py").write_text("def f():\n    from finetune.runner import run\n")  # upward, inside a function
    (scratch / "recipe" / "__init__.py").write_text("from finetune.runner import run\n")
    (scratch / "runner.py").write_text("from finetune.recipe import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", scratch)
    graph = import_graph()
    assert graph["finetune.errors"] == {"finetune.runner"}
    assert graph["finetune.recipe"] == {"finetune.runner"} and graph["finetune.runner"] == {"finetune.recipe"}
    try:
        test_no_module_imports_a_higher_layer()
    except AssertionError as exc:
        assert "finetune.errors (layer 0) imports finetune.runner (layer 6)" in str(exc)
    else:
        raise AssertionError("the upward import was not found")
    try:
        test_no_import_cycles()
    except AssertionError as exc:
        assert "finetune.recipe" in str(exc) and "finetune.runner" in str(exc)
    else:
        raise AssertionError("the cycle was not found")
