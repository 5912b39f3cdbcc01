"""Regenerate the recipe reference in README.md from the schema's field descriptions.

    python scripts/gen_readme_reference.py          # rewrite README.md in place
    python scripts/gen_readme_reference.py --check  # exit 1 if README.md is stale
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from finetune.recipe import reference_markdown  # noqa: E402

START, END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Only check; exit 1 when README.md is stale.")
    args = parser.parse_args()
    readme = REPO / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"README.md lacks the {START} / {END} markers", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    updated = f"{head}{START}\n{reference_markdown()}{END}{tail}"
    if args.check:
        return 0 if updated == text else 1
    readme.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
