#!/usr/bin/env bash
# Creates a virtual environment with the CPU build of torch and the package (editable) with its
# test extras.
#   bash scripts/setup.sh              .venv, every version pinned by constraints.txt (what the
#                                      suite passes on; what the README's commands and CI use)
#   bash scripts/setup.sh --newest     .venv-newest, the newest release of every dependency, for
#                                      the smoke suite (scripts/smoke_newest.sh); torch stays the
#                                      CPU wheel 2.13.0: the index's newer builds are CUDA builds
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
PINS=(-c constraints.txt)
if [ "${1:-}" = "--newest" ]; then
    VENV=.venv-newest
    printf 'torch==2.13.0\n' > "${TMPDIR:-/tmp}/unsloth-compile-torch-pin.txt"
    PINS=(-c "${TMPDIR:-/tmp}/unsloth-compile-torch-pin.txt" --upgrade --upgrade-strategy eager)
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip >/dev/null
# torch first, exactly the CPU wheel: a bare `torch` requirement would fetch a CUDA build.
python -m pip install -q "${PINS[@]}" "torch==2.13.0"
python -m pip install -q "${PINS[@]}" -e ".[test]"
