. scripts/gpu_env.sh
UNSLOTH_LORA_AUTOTUNE=0 timeout 110 $PY -m pytest -q -m gpu tests/test_compress_saved.py --tb=line -p no:warnings -p no:logging 2>&1 | grep -v DEBUG | tail -5
