"""The float8 (e4m3) frozen base: the host functions and the torch emulation (`fp8`), the Triton
FP8 GEMM with the LoRA term in its epilogue (`fp8_gemm`), rowwise quantisation (`fp8_quantize`)
and the backward's transposed weight codes (`fp8_transpose`)."""
