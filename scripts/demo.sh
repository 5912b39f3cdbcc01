#!/usr/bin/env bash
# Fresh machine → fine-tuned SmolLM2-135M-Instruct adapter, offline, on CPU (about 10 minutes on 2 cores).
# Shows the model's answers to held-out questions before (base) and after (adapter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RECIPE=${1:-recipes/llama_lora.yaml}
OUT=$(.venv/bin/python -c "from finetune.recipe import load_recipe; print(load_recipe('$RECIPE').output.dir)")
.venv/bin/finetune validate "$RECIPE"
.venv/bin/python finetune/run.py "$RECIPE" output.overwrite=true
echo "=== before (base model) ==="
.venv/bin/finetune chat "$OUT" --base
echo "=== after (with the adapter) ==="
.venv/bin/finetune chat "$OUT"
