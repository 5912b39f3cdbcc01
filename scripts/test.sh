#!/usr/bin/env bash
# Install everything (into .venv) and run the test suite, offline. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m slow` for the slow tests or `bash scripts/test.sh tests/test_data.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# DeepSpeed JIT-compiles its CPU communication op on first use (~3 min); keep the build inside the checkout
# so it is paid once per clone, not once per test.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
bash scripts/build_deepspeed_ops.sh
exec .venv/bin/python -m pytest "$@"
