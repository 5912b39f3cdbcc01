"""Code outside `finetune/tasks/` asks a task what it is (its traits in `finetune/registry.py`), never what it is
called: a comparison with a task's name (`recipe.task == "sft"`, `task in ("sft", "pretrain")`, a `match` case, a
dict keyed by task names) is what made adding a task mean editing a dozen files."""

from __future__ import annotations

import ast
from pathlib import Path

from finetune.registry import TASKS

PACKAGE = Path(__file__).resolve().parent.parent / "finetune"
ALLOWED = {PACKAGE / "registry.py"}  # where the names are defined, with their traits


def _names_in(node: ast.AST) -> list[str]:
    """Task names written as string constants in `node`: itself, or the items of a tuple/list/set literal."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [i.value for i in items if isinstance(i, ast.Constant) and i.value in TASKS]


def task_name_uses(source: str, names=TASKS) -> list[tuple[int, str]]:
    """(line, what) for each comparison with a task's name, match case on one, or dict keyed by them."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                found += [(node.lineno, f"compares with {name!r}") for name in _names_in(operand)]
        elif isinstance(node, ast.match_case):
            found += [(node.pattern.lineno, f"matches {n.value.value!r}") for n in ast.walk(node.pattern)
                      if isinstance(n, ast.MatchValue) and isinstance(n.value, ast.Constant) and n.value.value in names]
        elif isinstance(node, ast.Dict):
            found += [(node.lineno, f"dict keyed by {name!r}") for key in node.keys if key is not None for name in _names_in(key)]
    return found


def test_no_task_name_is_compared_outside_the_tasks():
    files = [p for p in PACKAGE.rglob("*.py") if (PACKAGE / "tasks") not in p.parents and p not in ALLOWED]
    assert len(files) > 60, len(files)  # the walk found the package
    uses = [f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
            for path in files for line, what in task_name_uses(path.read_text())]
    assert not uses, "read the task's traits (finetune.registry.traits) instead:\n" + "\n".join(uses)


def test_the_check_finds_each_form():
    """Each form of a name comparison is found (the test above could pass by finding nothing); traits are not."""
    source = '''
if recipe.task == "sft": pass
if "classification" != task: pass
if recipe.task in ("pretrain", "sft"): pass
RUN = {"image_classification": 1}
match recipe.task:
    case "sft": pass
if traits(recipe.task).inputs == "images" and name == "merged": pass
'''
    assert [line for line, _ in task_name_uses(source)] == [2, 3, 4, 4, 5, 7]
