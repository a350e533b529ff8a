#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and the package (editable) with test/example extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first, exactly the CPU wheel: a bare `torch` requirement would fetch a CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
