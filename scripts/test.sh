#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the CPU test suite; Triton kernels run in the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q tests "$@"
