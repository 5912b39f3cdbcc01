#!/usr/bin/env bash
# Pre-build DeepSpeed's CPU shared-memory collective op (`deepspeed_shm_comm`) once, so that
# the first ZeRO run (and every CI run) does not pay its JIT compile (66 s with 2 cores here;
# minutes on a busy machine).
#
# Why: `deepspeed.comm.TorchBackend.__init__` calls `build_shm_op()`, which JIT-compiles
# csrc/cpu/comm/shm*.cpp through torch.utils.cpp_extension.load() on the CPU accelerator.
# That build lands in $TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/ and is reused by every later
# process that sees the same TORCH_EXTENSIONS_DIR. Export the same directory when training.
#
# Usage: scripts/build_deepspeed_ops.sh            (default dir: .cache/torch_extensions)
#        TORCH_EXTENSIONS_DIR=/some/dir scripts/build_deepspeed_ops.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
# Compile with every core: this is the one step where parallelism pays (ninja honours MAX_JOBS).
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
mkdir -p "$TORCH_EXTENSIONS_DIR"
echo "deepspeed_shm_comm -> $TORCH_EXTENSIONS_DIR (compiled on the first run, about 1-3 minutes; reused after)"
"$PYTHON" - <<'PY'
import os
import time

import deepspeed
from deepspeed.accelerator import get_accelerator

builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
    # Same test DeepSpeed applies before it tries the op: nothing will be compiled at run time either.
    print(f"deepspeed_shm_comm is not used by the {get_accelerator()._name} accelerator; nothing to build")
    raise SystemExit(0)
start = time.perf_counter()
module = builder.load(verbose=False)
print(f"{builder.NAME}: ready after {time.perf_counter() - start:.1f} s: {module.__file__}")
print(f"export TORCH_EXTENSIONS_DIR={os.environ['TORCH_EXTENSIONS_DIR']}")
PY
