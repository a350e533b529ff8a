"""The LoRA linear on CUDA: the host functions (`lora_linear_triton`), the Triton GEMM with the
low-rank epilogue (`lora_gemm`, its shared epilogue `lora_epilogue`) and the rank-sized GEMMs
(`lowrank_thin`), and the inputs they take (`supported_inputs`, shared with the NF4 base)."""
