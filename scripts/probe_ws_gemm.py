"""Does Triton warp-specialise a persistent TMA GEMM on this GPU, and how close does it get to
cuBLAS? The question behind kernels/lora_gemm.py's main loop (kernel_notes.md): the fused LoRA
GEMM can only meet its target if the Triton main product runs at cuBLAS speed.

    python scripts/probe_ws_gemm.py [--out DIR]

Times, at the Llama shapes of the kernel benchmark (M = 8192, bf16), C = A B^T by cuBLAS and
by one persistent TMA kernel with and without `warp_specialize` over a few tiles; prints
TFLOP/s and the ratio to cuBLAS, writes probe_ws_gemm.json. Not a test, not part of the package.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

from unsloth_compile.bench.kernel import DEFAULT_LAYERS, LAYERS, TOKENS  # the benchmark's shapes


@triton.jit
def _tile_of(tile_id, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    # grouped order: GROUP_M row tiles share each column tile while it is in L2
    per_group = GROUP_M * tiles_n
    first_m = (tile_id // per_group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (tile_id % per_group) % rows_in_group, (tile_id % per_group) // rows_in_group


@triton.jit
def _persistent_gemm_kernel(a_desc, b_desc, c_desc, M, N, K,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(tl.program_id(0), tiles_m * tiles_n, PROGRAMS, flatten=False,
                            warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_of(tile_id, tiles_m, tiles_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_steps):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(a, tl.trans(b), acc)
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(tl.bfloat16))


def persistent_gemm(a, b, c, cfg, ws):
    bm, bn, bk, stages, warps = cfg
    M, K = a.shape
    N = b.shape[0]
    programs = torch.cuda.get_device_properties(a.device).multi_processor_count
    _persistent_gemm_kernel[(programs,)](
        TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b, [bn, bk]),
        TensorDescriptor.from_tensor(c, [bm, bn]), M, N, K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=8, PROGRAMS=programs, WARP_SPECIALIZE=ws, num_stages=stages, num_warps=warps)
    return c


CONFIGS = [(128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (128, 128, 64, 4, 8), (128, 128, 64, 5, 4),
           (256, 128, 64, 3, 8), (128, 256, 128, 2, 8)]
# (M, N, K) of X W^T at the kernel benchmark's four default layers (its LAYERS give (K, N))
SHAPES = [(TOKENS, N, K) for K, N in (LAYERS[layer] for layer in DEFAULT_LAYERS)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for M, N, K in SHAPES:
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        ref = a @ b.t()
        flops = 2 * M * N * K
        base_ms = do_bench(lambda: torch.mm(a, b.t(), out=c), rep=200)
        print(f"M={M} N={N} K={K} cuBLAS {base_ms * 1e3:.1f} us {flops / base_ms / 1e9:.0f} TFLOP/s", flush=True)
        rows.append(dict(M=M, N=N, K=K, variant="cublas", us=base_ms * 1e3, ratio=1.0))
        for cfg in CONFIGS:
            for ws in (False, True):
                name = f"persistent{' ws' if ws else ''} {cfg}"
                try:
                    out = persistent_gemm(a, b, c, cfg, ws)
                    err = float((out.float() - ref.float()).norm() / ref.float().norm())
                    ms = do_bench(lambda: persistent_gemm(a, b, c, cfg, ws), rep=200)
                    rows.append(dict(M=M, N=N, K=K, variant=name, us=ms * 1e3, ratio=ms / base_ms, err=err))
                    print(f"  {name:40s} {ms * 1e3:8.1f} us {flops / ms / 1e9:5.0f} TFLOP/s "
                          f"{ms / base_ms:6.3f}x cuBLAS err {err:.1e}", flush=True)
                except Exception as error:  # noqa: BLE001  a probe keeps going
                    print(f"  {name:40s} failed: {type(error).__name__}: {str(error)[:160]}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_ws_gemm.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
