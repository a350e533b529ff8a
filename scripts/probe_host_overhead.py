"""Host enqueue time vs wall time of one LoRA linear fwd+bwd (torch.ops.unsloth.lora_linear),
per main-GEMM choice, at llama-8b.attn.q and llama-1b.mlp.up (M = 8192, r = 16). GPU only.

    python3 scripts/probe_host_overhead.py

The host-enqueue table of docs/bench/kernel_notes.md. Host time >= wall time means the step is
CPU-bound: the GPU waits for Python.
"""
import statistics
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

import unsloth_compile  # noqa: F401  registers torch.ops.unsloth.*
from unsloth_compile.kernels import knobs, lora_gemm
from unsloth_compile.kernels.timed_choice import CHOICES

def host(fn, n=40):
    for _ in range(3): fn()
    torch.cuda.synchronize(); ts = []
    for _ in range(n):
        torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); ts.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize(); return statistics.median(ts)

M = 8192
for (K, N) in [(4096, 4096), (2048, 8192)]:
    r = 16; dev = "cuda"
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16).requires_grad_()
    W = (torch.randn(N, K, device=dev) * K**-0.5).to(torch.bfloat16)
    A = (torch.randn(r, K, device=dev) * K**-0.5).requires_grad_()
    B = (torch.randn(N, r, device=dev) * 0.01).requires_grad_()
    dy = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
    def base_step():
        torch.autograd.grad(F.linear(x, W), [x], dy)
    def ours_step():
        out = torch.ops.unsloth.lora_linear(x, W, None, A, B, None, None, None, 2.0, None, False, x.dtype, "triton")[0]
        torch.autograd.grad(out, [x, A, B], dy)
    for mg in ("triton", "cublas", "auto"):
        with knobs.patch(main_gemm=mg):
            print(f"K={K} N={N} main_gemm={mg:6s} host ours {host(ours_step):.3f} ms  wall ours "
                  f"{triton.testing.do_bench(ours_step, rep=100, return_mode='median'):.3f}  host base {host(base_step):.3f}  wall base "
                  f"{triton.testing.do_bench(base_step, rep=100, return_mode='median'):.3f}", flush=True)
    print("main GEMM choices:", {k[2:6]: v[0] for k, v in CHOICES["main GEMM"].items()}, "plans:", len(lora_gemm._PLANS))
