"""bitsandbytes' import-time "Failed to load CPU gemm_4bit_forward from kernels-community" line is dropped at its
logger by `finetune.notices`, in the `finetune` commands, `scripts/setup.sh`'s check and the benchmarks alike.

The line is logged only on CPUs with AVX512-bf16; each child process here imports bitsandbytes as on such a CPU
(its native `has_avx512bf16_cpu` answers yes), so the line is logged on any machine."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest

from finetune.notices import quiet_library_notices
from support import REPO

# Makes `bitsandbytes.cextension.lib.has_avx512bf16_cpu()` answer yes, right after that module is imported and
# before `bitsandbytes.backends.cpu.ops` asks it.
AS_ON_AN_AVX512_BF16_CPU = """
import importlib.abc, importlib.machinery, sys

class _AVX512BF16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.cextension":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.lib.has_avx512bf16_cpu = lambda: True

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _AVX512BF16())
"""
# Run after the code under test: whether bitsandbytes took the AVX512-bf16 branch, which logs the line.
BRANCH_TAKEN = "\nimport bitsandbytes.backends.cpu.ops as ops; print('avx512bf16 branch:', hasattr(ops, 'gemm_4bit_forward_kernel'))\n"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", AS_ON_AN_AVX512_BF16_CPU + code + BRANCH_TAKEN],
                          capture_output=True, text=True, cwd=REPO, timeout=300)  # fmt: skip


def setup_sh_check() -> str:
    """The Python code of the version check at the end of scripts/setup.sh."""
    text = (REPO / "scripts" / "setup.sh").read_text()
    found = re.findall(r'^python -c "(.*)"$', text, flags=re.MULTILINE)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize(
    "code",
    [
        pytest.param("import peft", id="without the filter: the line is there"),
        pytest.param(setup_sh_check(), id="scripts/setup.sh"),
        pytest.param("import benchmarks.common, peft", id="benchmarks"),
        pytest.param("from finetune.commands.common import setup_logging; setup_logging(); import peft", id="finetune commands"),
    ],
)
def test_the_kernels_community_line_is_dropped_at_its_source(code):
    done = run_python(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "avx512bf16 branch: True"  # the line was logged
    line = "Failed to load CPU gemm_4bit_forward from kernels-community"
    if code == "import peft":
        assert line in done.stderr
    else:
        assert line not in done.stderr, done.stderr


def test_other_messages_of_those_loggers_still_show(caplog):
    quiet_library_notices()
    quiet_library_notices()  # once per process: a second call adds no second filter
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "No module named 'kernels'")
        logger.warning("something else")
    assert caplog.messages == ["something else"]
