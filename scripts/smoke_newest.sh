#!/usr/bin/env bash
# The smoke suite (tests marked `smoke`) against the newest release of every dependency, in
# .venv-newest: catches a new transformers, peft, triton or trl release that breaks the product
# before a user meets it. Prints the versions it ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --newest
. .venv-newest/bin/activate
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|triton|trl|kernels|accelerate|datasets) '
python -m pytest -q -m smoke tests "$@"
