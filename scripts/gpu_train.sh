#!/usr/bin/env bash
# The GPU speed check in one call per lent machine (docs/gpu_check.md has the commands and what they answer):
# the varlen attention test on the device, the prepared probes of benchmarks/gpu_check.py, then
# benchmarks/gpu_train.py (the kit against trl sft and a hand-written PEFT loop at real sizes).
#
#   bash scripts/gpu_train.sh --dry-run                    any machine: the benchmark's tiny run, every variant
#   bash scripts/gpu_train.sh --pack DIR                   (here, with pip access) the offline bundle: gpu_check's
#                                                          wheels, configs and data, plus Liger's wheel
#   bash scripts/gpu_train.sh --offline DIR [--no-probes] [benchmark options]
#                                                          (there: CUDA torch, no package index) install DIR's
#                                                          wheels beside the machine's torch, then run
#
# Benchmark options go to `python -m benchmarks.gpu_train` (--only, --steps, --rounds, --budget, --work, --out).
# Reports: benchmarks/results/gpu_check/ (probes; GPU_CHECK_OUT=DIR to move) and benchmarks/results/gpu_train.json
# (--out to move).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

case "${1:-}" in
  --dry-run)
    shift
    PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
    exec "$PY" -m benchmarks.gpu_train --dry-run "$@" ;;
  --pack)
    [ -n "${2:-}" ] || { echo "usage: $0 --pack DIR" >&2; exit 2; }
    exec .venv/bin/python -m benchmarks.gpu_check --pack "$2" ;;
  --offline)
    [ -n "${2:-}" ] || { echo "usage: $0 --offline DIR [--no-probes] [benchmark options]" >&2; exit 2; }
    BUNDLE=$(cd "$2" && pwd); shift 2
    PROBES=1
    if [ "${1:-}" = "--no-probes" ]; then PROBES=0; shift; fi
    PY=${PYTHON:-python3}
    SITE=${SITE:-/tmp/finetune-gpu-site}
    [ -d "$SITE/liger_kernel" ] || "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$BUNDLE"/wheels/*.whl
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
    "$PY" -c "import torch, torch.nn.attention.varlen as v, inspect; print('torch', torch.__version__, torch.cuda.get_device_name(), 'varlen', inspect.signature(v.varlen_attn))" || true
    status=0
    if [ "$PROBES" = 1 ]; then
      "$PY" -m pytest -q -p no:randomly -p no:cacheprovider -m gpu tests/test_varlen_attention.py || status=1
      "$PY" -m benchmarks.gpu_check --weights random --assets "$BUNDLE" --steps 20 \
        --only lora_bf16,lora_bf16_padded,lora_bf16_batch32 --out "${GPU_CHECK_OUT:-benchmarks/results/gpu_check}" || status=1
    fi
    "$PY" -m benchmarks.gpu_train --tokenizer "$BUNDLE/models/smollm2" "$@" || status=1
    exit $status ;;
  *)
    echo "usage: $0 --dry-run | --pack DIR | --offline DIR [--no-probes] [benchmark options]" >&2; exit 2 ;;
esac
