"""Print (or, with --write, re-pin) the golden numbers of tests/test_golden.py: each task's tiny seeded run.

    python scripts/pin_golden.py           # print the measured numbers
    python scripts/pin_golden.py --write   # replace the pinned block in tests/test_golden.py with them

Re-pin only when a change of the numbers is intended, and say in the commit message what moved them and why.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST = REPO / "tests" / "test_golden.py"
START, END = "# --- pinned numbers (scripts/pin_golden.py) ---", "# --- end of pinned numbers ---"


def measure() -> list[str]:
    env = {**os.environ, "FINETUNE_PIN_GOLDEN": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:randomly", "-q", "-s", str(TEST)],
        cwd=REPO, env=env, capture_output=True, text=True,
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("GOLDEN[")]
    if proc.returncode != 0 or not lines:
        sys.exit(proc.stdout[-4000:] + proc.stderr[-4000:] + "\nthe golden runs failed; nothing pinned")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the pinned numbers in tests/test_golden.py")
    args = parser.parse_args()
    lines = measure()
    print("\n".join(lines))
    if args.write:
        text = TEST.read_text()
        block = "\n".join([START, *lines, END])
        text, count = re.subn(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
        if count != 1:
            sys.exit(f"{TEST}: the markers {START!r} ... {END!r} were not found once")
        TEST.write_text(text)
        print(f"pinned in {TEST.relative_to(REPO)}")


if __name__ == "__main__":
    main()
