#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job: a LoRA fine-tune of the pretrained MiniLM-L6
# on the bundled Debian package-sections data, compiled with backend="unsloth".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python examples/finetune_classifier.py "$@"
