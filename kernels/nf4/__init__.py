"""The 4-bit NF4 frozen base on CUDA: the host functions of the NF4 LoRA linear (`nf4_lora`),
the Triton GEMMs that dequantise W in their main loop (`nf4_gemm`), the one-pass dequantisation
(`nf4_dequantize`) and the decoding both share (`nf4_tiles`)."""
