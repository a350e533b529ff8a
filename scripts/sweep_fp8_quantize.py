"""GPU sweep of the fp8 rowwise quantisation (kernels/fp8_quantize.py): achieved bandwidth of
quantize_rows per launch configuration (rows per program, warps), with and without the fold of
the weight's scales (fp32 or bf16), against a torch bf16 -> e4m3 cast and a bf16 copy.

    python scripts/sweep_fp8_quantize.py [--out DIR] [--widths C ...] [--fused]

--fused also times a prototype kept here because it lost: the forward's X quantisation and
H = X A^T from one read of X (BLOCK_M rows per program, amax and the product in a first sweep
over the columns, the codes in a second that re-reads the rows from L2), against the two
kernels apart (quantize_rows + lowrank_thin.rows_times_thin). On the H200 (2026-12-01) its best
tile took 27 / 58 us at 8192 x 2048 / 4096 against 25 / 47 us apart: the row reductions in the
dot's register layout and the second sweep cost more than the X read they save.

Every configuration's codes and dequant are checked bit for bit against the default's before
it is timed. Times are GPU time (CUDA-graph replay, bench.kernel._bench_graph); bandwidth counts
3 bytes per element (2 read, 1 written). Prints one line per configuration, the best per
(width, fold), and writes sweep_fp8_quantize.json under --out. Not a test, not part of the
package.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl

from unsloth_compile.bench.kernel import _bench_graph
from unsloth_compile.kernels.fp8_quantize import MAX_ONE_TILE, _row_scale, quantize_rows
from unsloth_compile.kernels.lowrank_thin import rows_times_thin


@triton.jit
def _quantize_rows_thin_kernel(
    # pointers
    x_ptr, w_ptr, codes_ptr, dequant_ptr, out_ptr,
    # sizes
    M, C, R,
    # strides
    stride_xm, stride_xc, stride_wc, stride_wr, stride_cm, stride_om, stride_or,
    # meta-parameters
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """For BLOCK_M rows of x: out = x[rows] @ w and the rows' codes and dequant, in two sweeps
    over the rows' columns: the first reads x from memory for the product and each row's amax,
    the second reads the same tiles again (from L2: BLOCK_M x C elements per program, a few
    hundred KB) and writes the codes."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    nan = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs_c
        ok = m_ok[:, None] & (cols < C)[None, :]
        x = tl.load(x_rows + cols[None, :] * stride_xc, mask=ok, other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wc + offs_r[None, :] * stride_wr,
                    mask=(cols < C)[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
        t = x.to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(t), axis=1))
        nan = nan | tl.max((t != t).to(tl.int32), axis=1)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or,
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])
    scale = _row_scale(amax, nan)
    tl.store(dequant_ptr + offs_m, tl.math.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), scale), mask=m_ok)
    codes_rows = codes_ptr + offs_m.to(tl.int64)[:, None] * stride_cm
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs_c
        ok = m_ok[:, None] & (cols < C)[None, :]
        t = tl.load(x_rows + cols[None, :] * stride_xc, mask=ok, other=0.0).to(tl.float32)
        q = tl.clamp(t * scale[:, None], -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
        tl.store(codes_rows + cols[None, :], q.to(tl.float8e4nv), mask=ok)


def quantize_rows_thin(x, w, out_dtype, tile):
    """(codes, dequant, x @ w) of x (M, C) and w (C, r), one read of x; tile (BLOCK_M, BLOCK_C, warps, stages)."""
    M, C = x.shape
    R = w.shape[1]
    codes = torch.empty((M, C), dtype=torch.float8_e4m3fn, device=x.device)
    dequant = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    out = torch.empty((M, R), dtype=out_dtype, device=x.device)
    bm, bc, warps, stages = tile
    _quantize_rows_thin_kernel[(triton.cdiv(M, bm),)](
        x, w, codes, dequant, out, M, C, R, x.stride(0), x.stride(1), w.stride(0), w.stride(1), codes.stride(0),
        out.stride(0), out.stride(1), DOT_PRECISION="tf32", BLOCK_M=bm, BLOCK_C=bc,
        BLOCK_R=max(16, triton.next_power_of_2(R)), num_warps=warps, num_stages=stages)
    return codes, dequant, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--widths", type=int, nargs="*", default=[512, 2048, 4096, 8192, 14336])
    parser.add_argument("--fused", action="store_true", help="also time the fused quantisation + H prototype")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    results = []

    def record(kind, C, name, ms, nbytes, ok=True):
        tbps = nbytes / (ms * 1e-3) / 1e12
        results.append(dict(kind=kind, C=C, name=name, us=ms * 1e3, tbps=tbps, ok=ok))
        print(f"{kind:10s} {C:6d} {name:40s} {ms * 1e3:8.1f} us {tbps:5.2f} TB/s{'' if ok else '  MISMATCH'}",
              flush=True)

    M = 8192
    for C in args.widths:
        x = torch.randn(M, C, device="cuda", dtype=torch.bfloat16)
        fold = torch.exp2(torch.randint(-4, 4, (C,), device="cuda").float())
        nbytes = 3 * M * C
        record("ref", C, "torch bf16->e4m3 cast", _bench_graph(lambda: x.to(torch.float8_e4m3fn)), nbytes)
        record("ref", C, "torch bf16 copy", _bench_graph(lambda: x.clone()), 4 * M * C)
        block = triton.next_power_of_2(C)
        for kind, col_scale in (("quant", None), ("fold fp32", fold), ("fold bf16", fold.bfloat16())):
            want_codes, want_dq = quantize_rows(x, None if col_scale is None else fold)
            record(kind, C, "default", _bench_graph(lambda: quantize_rows(x, col_scale)), nbytes)
            if C > MAX_ONE_TILE:
                continue
            for rows in (1, 2, 4, 8):
                for warps in (4, 8, 16):
                    if rows * block > 32768 or rows * block < warps * 32 * 2:
                        continue
                    config = (rows, warps)
                    try:
                        codes, dq = quantize_rows(x, col_scale, config=config)
                        ok = (torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))
                              and torch.equal(dq, want_dq))
                        record(kind, C, f"rows {rows} warps {warps}",
                               _bench_graph(lambda: quantize_rows(x, col_scale, config=config)), nbytes, ok)
                    except Exception as exc:  # a configuration that does not compile: say so, go on
                        print(f"{kind} {C} {config}: {type(exc).__name__}: {str(exc)[:120]}")
        if args.fused:
            a_t = (torch.randn(16, C, device="cuda") * C ** -0.5).t()  # lora_A (r, K) fp32, as PEFT keeps it
            want_codes, want_dq = quantize_rows(x)
            want_h = rows_times_thin(x, a_t, torch.float32)
            record("fwd", C, "apart: quantize_rows + rows_times_thin",
                   _bench_graph(lambda: (quantize_rows(x), rows_times_thin(x, a_t, torch.float32))), 5 * M * C)
            for tile in [(bm, bc, w, s) for bm in (16, 32, 64) for bc in (128, 256) for w in (4, 8) for s in (2, 3)]:
                codes, dq, h = quantize_rows_thin(x, a_t, torch.float32, tile)
                ok = (torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8)) and torch.equal(dq, want_dq)
                      and torch.allclose(h, want_h, rtol=1e-3, atol=1e-3 * want_h.abs().max().item()))
                record("fwd", C, f"fused {tile}", _bench_graph(lambda: quantize_rows_thin(x, a_t, torch.float32, tile)),
                       3 * M * C, ok)
        del x
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "sweep_fp8_quantize.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       M=M, results=results), f, indent=1)
    print("best per (kind, width):")
    for key in sorted({(r["kind"], r["C"]) for r in results}):
        rows = [r for r in results if (r["kind"], r["C"]) == key and r["ok"]]
        best = min(rows, key=lambda r: r["us"])
        default = next((r for r in rows if r["name"] == "default"), best)
        print(f"  {key[0]:10s} {key[1]:6d} {best['name']:40s} {best['us']:8.1f} us {best['tbps']:5.2f} TB/s"
              f"  (default {default['us']:.1f} us)")


if __name__ == "__main__":
    main()
