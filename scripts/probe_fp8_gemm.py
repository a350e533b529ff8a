"""How close does a Triton FP8 GEMM come to cuBLAS's (torch._scaled_mm), with and without the
bf16 LoRA term in its epilogue? The question behind issue 13's speed targets: `_scaled_mm`
takes no (M, N) addend, so the fp8 LoRA op adds s H B^T in a separate pass over Y
(kernels/fp8.py); only a Triton FP8 GEMM with that term in its epilogue could remove the pass,
and it pays only if its main loop runs near cuBLAS's FP8 rate.

    python scripts/probe_fp8_gemm.py [--out DIR]

Times, at the Llama shapes of the kernel benchmark (M = 8192), Y = X W^T by bf16 cuBLAS, by
`torch._scaled_mm` (e4m3, rowwise scales, bf16 out), and by one TMA Triton kernel (e4m3 operands,
rowwise scales applied to the fp32 accumulator) over a few tiles, persistent or one program
per tile, with and without `+ s U V` (U (M, 16), V (16, N), bf16) in the epilogue, with the K
loop accumulated by the tensor cores or "promoted" (each K block's product from a fresh
accumulator, added in fp32: Hopper's fp8 tensor cores keep fewer bits than fp32 over a long K);
then the backward's questions: torch's transposed copy of W_q, the GEMM reading W_q as stored
((K, N), N contiguous: no copy), and A scaled per row and 128-wide K block (what quantising dY
inside the G/dB pass would need); prints us, TFLOP/s, ratios and the max error against the
codes' exact (float64) product; writes probe_fp8_gemm.json. Not a test, not part of the package.
H200 answers (docs/bench/probe-fp8-gemm-2026-12-01.log), each variant's fastest tile against the
fastest plain one per shape: promotion +39-43%, 1 x 128 blocks +47-53%, W_q as stored 6.8-8.0x
the time; the transposed copy 92-347 us.
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
from unsloth_compile.kernels.lora_epilogue import tile_coords  # the grouped tile order the package's GEMMs use

E4M3 = torch.float8_e4m3fn
RANK = 16


@triton.jit
def _fp8_tile(tile_id, a_desc, b_desc, a_scale_ptr, b_scale_ptr, u_ptr, v_ptr, c_ptr, M, N, K, scale,
              HAS_LORA: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PROMOTE: tl.constexpr, B_MN: tl.constexpr,
              A_BLOCKS: tl.constexpr):
    pid_m, pid_n = tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    for k in range(0, K, BLOCK_K):
        a = a_desc.load([pid_m * BLOCK_M, k])
        if B_MN:  # B stored (K, N), N contiguous: the backward's W_q as stored, no transposed copy
            b = b_desc.load([k, pid_n * BLOCK_N])
        else:
            b = tl.trans(b_desc.load([pid_n * BLOCK_N, k]))
        if A_BLOCKS:  # one scale per row and 128-wide K block of A, applied to each block's product
            block_scale = tl.load(a_scale_ptr + (rows % M) * tl.cdiv(K, BLOCK_K) + k // BLOCK_K)
            acc += tl.dot(a, b) * block_scale[:, None]
        elif PROMOTE:  # each K block's product from a fresh accumulator, added in fp32 (CUDA cores)
            acc += tl.dot(a, b)
        else:  # the tensor cores accumulate the whole K loop (not promoted on Hopper)
            acc = tl.dot(a, b, acc)
    # dequantise: one scale per row of X, one per row of W (column of Y)
    if not A_BLOCKS:
        acc = acc * tl.load(a_scale_ptr + rows, mask=rows < M, other=0.0)[:, None]
    acc = acc * tl.load(b_scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
    if HAS_LORA:  # + s U V, bf16 operands, fp32 accumulation into the same tile
        offs_r = tl.arange(0, R)
        u = tl.load(u_ptr + rows[:, None] * R + offs_r[None, :], mask=rows[:, None] < M, other=0.0)
        v = tl.load(v_ptr + offs_r[:, None] * N + cols[None, :], mask=cols[None, :] < N, other=0.0)
        acc = tl.dot((u.to(tl.float32) * scale).to(tl.bfloat16), v, acc)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(tl.bfloat16), mask=mask)


@triton.jit
def _fp8_gemm_kernel(a_desc, b_desc, a_scale_ptr, b_scale_ptr, u_ptr, v_ptr, c_ptr, M, N, K, scale,
                     HAS_LORA: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr,
                     PROMOTE: tl.constexpr, B_MN: tl.constexpr, A_BLOCKS: tl.constexpr):
    if PERSISTENT:
        tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile_id in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=False):
            _fp8_tile(tile_id, a_desc, b_desc, a_scale_ptr, b_scale_ptr, u_ptr, v_ptr, c_ptr, M, N, K, scale,
                      HAS_LORA, R, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, PROMOTE, B_MN, A_BLOCKS)
    else:
        _fp8_tile(tl.program_id(0), a_desc, b_desc, a_scale_ptr, b_scale_ptr, u_ptr, v_ptr, c_ptr, M, N, K, scale,
                  HAS_LORA, R, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, PROMOTE, B_MN, A_BLOCKS)


def triton_fp8_gemm(a, b, a_scale, b_scale, c, cfg, persistent, lora=None, scale=2.0, promote=False,
                    b_mn=False, a_blocks=False):
    """b (N, K), or (K, N) with b_mn; a_scale (M,), or (M, K / 128) with a_blocks."""
    bm, bn, bk, stages, warps = cfg
    M, K = a.shape
    N = b.shape[1] if b_mn else b.shape[0]
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 4
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    u, v = lora if lora is not None else (c, c)  # unused pointers without the LoRA term
    _fp8_gemm_kernel[(min(sms, tiles) if persistent else tiles,)](
        TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b, [bk, bn] if b_mn else [bn, bk]),
        a_scale, b_scale, u, v, c, M, N, K, scale, HAS_LORA=lora is not None, R=RANK,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, PERSISTENT=persistent, PROMOTE=promote, B_MN=b_mn,
        A_BLOCKS=a_blocks, num_stages=stages,
        num_warps=warps)
    return c


def quantize_blocks(t, block=128):
    """e4m3 codes and fp32 dequantisation scales, one per row and 128-wide column block."""
    R, C = t.shape
    blocks = t.float().reshape(R, C // block, block)
    scale = blocks.abs().amax(dim=2).clamp(min=1e-12) / torch.finfo(E4M3).max
    return (blocks / scale[:, :, None]).to(E4M3).reshape(R, C), scale.contiguous()


def quantize_rows(t):
    """e4m3 codes and fp32 dequantisation scales, one per row (amax / 448)."""
    scale = t.float().abs().amax(dim=1).clamp(min=1e-12) / torch.finfo(E4M3).max
    return (t.float() / scale[:, None]).to(E4M3), scale


CONFIGS = [(128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8)]
# (M, N, K) of X W^T at the kernel benchmark's four default layers (its LAYERS give (K, N))
SHAPES = [(TOKENS, N, K) for K, N in (LAYERS[layer] for layer in DEFAULT_LAYERS)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for M, N, K in SHAPES:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        xq, xs = quantize_rows(x)
        wq, ws = quantize_rows(w)
        u = torch.randn(M, RANK, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(RANK, N, device="cuda", dtype=torch.bfloat16) / 64
        c = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        flops = 2 * M * N * K
        bf16_ms = do_bench(lambda: torch.mm(x, w.t(), out=c), rep=100)

        def scaled():
            return torch._scaled_mm(xq, wq.t(), scale_a=xs[:, None], scale_b=ws[None, :], out_dtype=torch.bfloat16)

        ref = scaled()
        ref_lora = ref.float() + 2.0 * (u.float() @ v.float())
        # what both fp8 GEMMs approximate: the codes' exact product, in float64
        exact = (xq.double() @ wq.double().t()) * xs.double()[:, None] * ws.double()[None, :]
        fp8_ms = do_bench(scaled, rep=100)
        # what the fp8 LoRA op does today after _scaled_mm: the low-rank term as one more pass over Y
        y = scaled()
        add_ms = do_bench(lambda: y.addmm_(u, v, alpha=2.0), rep=100)
        print(f"M={M} N={N} K={K}: bf16 cuBLAS {bf16_ms * 1e3:.1f} us ({flops / bf16_ms / 1e9:.0f} TFLOP/s); "
              f"_scaled_mm {fp8_ms * 1e3:.1f} us ({flops / fp8_ms / 1e9:.0f} TFLOP/s, {fp8_ms / bf16_ms:.3f}x bf16); "
              f"+ the LoRA pass over Y {add_ms * 1e3:.1f} us", flush=True)
        common = dict(M=M, N=N, K=K, bf16_us=bf16_ms * 1e3, scaled_mm_us=fp8_ms * 1e3, lora_pass_us=add_ms * 1e3)
        rows.append(dict(common, variant="_scaled_mm", us=fp8_ms * 1e3, vs_scaled_mm=1.0, vs_bf16=fp8_ms / bf16_ms))
        scaled_err = float((ref.double() - exact).abs().max() / exact.abs().max())
        print(f"  _scaled_mm: max error against the exact product {scaled_err:.1e} of the largest value", flush=True)
        for cfg in CONFIGS:
            for persistent in (False, True):
                for lora, promote in ((None, False), ((u, v), False), (None, True), ((u, v), True)):
                    name = (f"triton {'persistent' if persistent else 'per-tile'} {cfg}{' +LoRA' if lora else ''}"
                            f"{' promoted' if promote else ''}")
                    try:
                        out = triton_fp8_gemm(xq, wq, xs, ws, c, cfg, persistent, lora, promote=promote)
                        want = ref_lora if lora else ref.float()
                        err = float((out.float() - want).norm() / want.norm())
                        exact_err = (None if lora else
                                     float((out.double() - exact).abs().max() / exact.abs().max()))
                        ms = do_bench(lambda: triton_fp8_gemm(xq, wq, xs, ws, c, cfg, persistent, lora,
                                                              promote=promote), rep=100)
                        rows.append(dict(common, variant=name, us=ms * 1e3, vs_scaled_mm=ms / fp8_ms,
                                         vs_bf16=ms / bf16_ms, err=err, max_err_vs_exact=exact_err,
                                         scaled_mm_max_err_vs_exact=scaled_err))
                        print(f"  {name:62s} {ms * 1e3:8.1f} us {flops / ms / 1e9:5.0f} TFLOP/s "
                              f"{ms / fp8_ms:6.3f}x _scaled_mm {ms / bf16_ms:6.3f}x bf16 err {err:.1e}"
                              + ("" if exact_err is None else f" max err vs exact {exact_err:.1e}"), flush=True)
                    except Exception as error:  # noqa: BLE001  a probe keeps going
                        print(f"  {name:52s} failed: {type(error).__name__}: {str(error)[:160]}", flush=True)
        # the backward's questions: W_q read as stored ((K, N) here: N contiguous) instead of a
        # transposed copy, and A scaled per 128-wide K block (dY quantised in one pass with G, dB)
        w_kn = wq.t().contiguous()
        copy_ms = do_bench(lambda: wq.t().contiguous(), rep=100)
        print(f"  the transposed copy of W_q ({N} x {K} e4m3): {copy_ms * 1e3:.1f} us", flush=True)
        rows.append(dict(common, variant="transpose copy of W_q", us=copy_ms * 1e3))
        xq_b, xs_b = quantize_blocks(x)
        exact_b = ((xq_b.double().reshape(M, K // 128, 128) * xs_b.double()[:, :, None]).reshape(M, K)
                   @ wq.double().t()) * ws.double()[None, :]
        for cfg in CONFIGS[:1] + CONFIGS[2:]:
            for persistent in (False, True):
                for b_mn, a_blocks, promote in ((True, False, False), (True, False, True), (False, True, False),
                                                (True, True, False)):
                    name = (f"triton {'persistent' if persistent else 'per-tile'} {cfg}"
                            f"{' B as stored (K, N)' if b_mn else ''}{' A 1x128 blocks' if a_blocks else ''}"
                            f"{' promoted' if promote else ''}")
                    a_, as_, want = (xq_b, xs_b, exact_b) if a_blocks else (xq, xs, exact)
                    b_ = w_kn if b_mn else wq
                    try:
                        out = triton_fp8_gemm(a_, b_, as_, ws, c, cfg, persistent, promote=promote, b_mn=b_mn,
                                              a_blocks=a_blocks)
                        exact_err = float((out.double() - want).abs().max() / want.abs().max())
                        ms = do_bench(lambda: triton_fp8_gemm(a_, b_, as_, ws, c, cfg, persistent, promote=promote,
                                                              b_mn=b_mn, a_blocks=a_blocks), rep=100)
                        rows.append(dict(common, variant=name, us=ms * 1e3, vs_scaled_mm=ms / fp8_ms,
                                         vs_bf16=ms / bf16_ms, max_err_vs_exact=exact_err))
                        print(f"  {name:62s} {ms * 1e3:8.1f} us {flops / ms / 1e9:5.0f} TFLOP/s "
                              f"{ms / fp8_ms:6.3f}x _scaled_mm {ms / bf16_ms:6.3f}x bf16 max err vs exact "
                              f"{exact_err:.1e}", flush=True)
                    except Exception as error:  # noqa: BLE001  a probe keeps going
                        print(f"  {name:52s} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_fp8_gemm.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
