#!/usr/bin/env bash
# Fresh machine → a fine-tuned model, offline, on CPU. Default: SmolLM2-135M-Instruct SFT (~10 min on 2 cores),
# then the model's answers before (base) and after (adapter). With recipes/minilm_bbc_news.yaml: the BBC News
# classifier (~9 min), then its held-out accuracy and a few predictions. With recipes/image_transfer.yaml: the
# pretrained EfficientNet-Lite0 checked on a cat photo, then LoRA on MNIST digits (~4-6 min), accuracy, predictions.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RECIPE=${1:-recipes/llama_lora.yaml}
read -r TASK OUT < <(.venv/bin/python -c "from finetune.recipe import load_recipe; r = load_recipe('$RECIPE'); print(r.task, r.output.dir)")
.venv/bin/finetune validate "$RECIPE"
if [ "$TASK" = image_classification ]; then .venv/bin/python scripts/check_pretrained_cat.py; fi
.venv/bin/python finetune/run.py "$RECIPE" output.overwrite=true
if [ "$TASK" = image_classification ]; then
  .venv/bin/python -c "import json; m = json.load(open('$OUT/eval_metrics.json')); print(f\"held-out accuracy {m['accuracy']:.4f}, macro F1 {m['f1_macro']:.4f}\")"
  .venv/bin/finetune predict "$OUT" --top-k 2 --image recipes/data/mnist_samples
elif [ "$TASK" = classification ]; then
  .venv/bin/python -c "import json; m = json.load(open('$OUT/eval_metrics.json')); print(f\"held-out accuracy {m['accuracy']:.4f}, macro F1 {m['f1_macro']:.4f}\")"
  .venv/bin/finetune predict "$OUT" --top-k 2 \
    --text "Shares in the carmaker fell after profits missed forecasts." \
    --text "The striker scored twice as United won the cup final."
else
  echo "=== before (base model) ==="
  .venv/bin/finetune chat "$OUT" --base
  echo "=== after (with the adapter) ==="
  .venv/bin/finetune chat "$OUT"
fi
