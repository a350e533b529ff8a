. scripts/gpu_env.sh
mkdir -p $OUT/r
( export CUDA_VISIBLE_DEVICES=0
  timeout 200 $PY -m unsloth_compile.bench e2e --preset llama-1b --steps 6 --warmup 2 --variants peft+unsloth --out $OUT/r/e2e ) > $OUT/r/gpu0.log 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  UNSLOTH_LORA_AUTOTUNE=0 timeout 200 $PY -m pytest -v -m gpu tests/test_cudagraphs_gpu.py tests/test_compress_saved.py tests/test_linear_cross_entropy.py \
    --tb=short -p no:warnings -p no:logging 2>&1 | grep -v DEBUG | grep -v "^$" ) > $OUT/r/gpu1.log 2>&1 &
wait
tar czf $OUT/results.tgz -C $OUT r
grep "^| peft\|recompute\|gqa" $OUT/r/gpu0.log | head; echo ====; grep "PASS\|FAIL\|SKIP\|ERROR\|passed\|failed\|^E " $OUT/r/gpu1.log | tail -30
