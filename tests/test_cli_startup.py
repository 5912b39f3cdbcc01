"""Start-up guarantees: `finetune --help` (and every command's `--help`) imports no heavy library, and neither does
`finetune validate` on a machine without a GPU, so they answer in well under a second (benchmarks/startup.py times
them). Each runs in a fresh interpreter: this test session has imported everything already."""

from __future__ import annotations

import glob
import json
import subprocess
import sys

import pytest
import yaml

from finetune.cli import COMMANDS
from support import sft_recipe

HEAVY = {"torch", "transformers", "datasets", "accelerate", "peft", "trl", "deepspeed", "bitsandbytes", "numpy"}

RUN_CLI = """
import json, sys
from finetune.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"exit": code, "modules": sorted({name.split(".")[0] for name in sys.modules})}))
"""


def imported_by(*args: str) -> set[str]:
    """The top-level packages a fresh `finetune ARGS` process has imported once it succeeded."""
    proc = subprocess.run([sys.executable, "-c", RUN_CLI, *args], capture_output=True, text=True, check=True)
    done = json.loads(proc.stdout.splitlines()[-1])
    assert done["exit"] == 0, proc.stdout + proc.stderr
    return set(done["modules"])


@pytest.mark.parametrize("args", [("--help",), *((name, "--help") for name in COMMANDS)], ids=" ".join)
def test_help_imports_no_heavy_library(args):
    assert imported_by(*args) & HEAVY == set()


GPU_FILES = ("/dev/nvidia*", "/dev/kfd", "/dev/dxg")


@pytest.mark.skipif(any(glob.glob(p) for p in GPU_FILES), reason="with a GPU, torch is asked about it")
def test_validate_imports_no_heavy_library_without_a_gpu(tiny_llama_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(sft_recipe(tiny_llama_dir, tmp_path)))
    assert imported_by("validate", str(recipe)) & HEAVY == set()
