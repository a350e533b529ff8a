"""Tile sweep of the thin LoRA GEMMs (kernels/lowrank_thin.py) on a GPU: achieved bandwidth
per configuration against a plain read of the same operand and against cuBLAS.

    python scripts/sweep_thin_tiles.py [--out DIR] [--pair-only] [--sizes C ...]

Also times a prototype kept here until it earns a place in kernels/ (rows_times_thin with a
TMA descriptor for X) and the one pass over dY for G = dY B and dB = dY^T H
(rows_thin_pair; docs/bench/sweeps/thin-tiles-do-bench.log timed the prototype of it that
this file held then). Default: every product timed by do_bench (one call, L2 flushed:
~10 us of flush write-back and launch included); --pair-only: rows_thin_pair's tiles in GPU
time (CUDA-graph replay). Prints one line per configuration and writes sweep_thin.json under
--out. Not a test, not part of the package.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from unsloth_compile.bench.kernel import _bench_graph
from unsloth_compile.kernels.lowrank_thin import rows_thin_pair, rows_times_thin, thin_t_times_rows

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton < 3.4
    TensorDescriptor = None


@triton.jit
def _rows_times_thin_tma_kernel(x_desc, w_ptr, out_ptr, M, K, R, stride_wk, stride_wr, stride_om,
                                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = x_desc.load([pid * BLOCK_M, k0])
        w = tl.load(w_ptr + (k0 + offs_k)[:, None] * stride_wk + offs_r[None, :] * stride_wr,
                    mask=((k0 + offs_k) < K)[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(x, w.to(x.dtype), acc)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_r[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & r_ok[None, :])


def rows_times_thin_tma(x, w, tile):
    bm, bk, warps, stages = tile
    M, K = x.shape
    out = torch.empty((M, w.shape[1]), device=x.device, dtype=x.dtype)
    desc = TensorDescriptor.from_tensor(x, [bm, bk])
    _rows_times_thin_tma_kernel[(triton.cdiv(M, bm),)](
        desc, w, out, M, K, w.shape[1], w.stride(0), w.stride(1), out.stride(0),
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=16, num_warps=warps, num_stages=stages)
    return out


ROWS_TILES = [(64, 128, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (16, 256, 4, 4), (64, 256, 8, 3),
              (128, 128, 8, 3), (32, 128, 2, 5), (16, 512, 4, 3), (64, 64, 4, 6), (32, 64, 4, 6)]
TMA_TILES = [(64, 128, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (64, 256, 4, 3), (128, 128, 8, 3), (16, 256, 4, 4)]
T_ROWS_TILES = [((64, 128, 4, 3), 264), ((64, 128, 4, 4), 528), ((128, 128, 8, 3), 264), ((64, 256, 8, 3), 264),
                ((32, 256, 4, 4), 264), ((128, 64, 4, 4), 528), ((64, 64, 4, 4), 528), ((128, 256, 8, 3), 132),
                ((64, 128, 4, 3), 132), ((32, 128, 4, 4), 528)]
PAIR_TILES = [((64, 256, 8, 3), 132), ((64, 256, 8, 3), 264), ((64, 256, 4, 3), 264), ((32, 256, 4, 4), 264),
              ((64, 128, 4, 4), 264), ((64, 128, 4, 4), 528), ((128, 128, 8, 3), 264), ((32, 128, 4, 4), 528),
              ((128, 64, 4, 4), 528), ((64, 64, 4, 4), 528), ((64, 128, 8, 3), 264), ((128, 256, 8, 2), 132),
              # wider column chunks: fewer fp32 partials of G = dY B (chunks x M x r), twelfth session
              ((32, 256, 8, 3), 264), ((32, 512, 8, 3), 264), ((32, 512, 8, 2), 264), ((32, 512, 4, 3), 264),
              ((16, 512, 4, 3), 264), ((64, 512, 8, 2), 264), ((16, 1024, 8, 2), 264), ((32, 512, 8, 3), 528)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--sizes", type=int, nargs="*", default=[2048, 4096, 8192, 14336])
    parser.add_argument("--pair-only", action="store_true",
                        help="only rows_thin_pair's tiles against G and dB apart, as CUDA-graph GPU time")
    args = parser.parse_args()
    torch.manual_seed(0)
    M, R, dt = 8192, 16, torch.bfloat16
    results = []

    def record(product, C, variant, ms, nbytes, err=None):
        row = dict(product=product, wide=C, variant=variant, us=round(ms * 1000, 2),
                   tb_s=round(nbytes / ms / 1e9, 3), err=err)
        results.append(row)
        print(f"{product:10s} C={C:6d} {variant:40s} {row['us']:8.2f} us {row['tb_s']:6.3f} TB/s"
              + ("" if err is None else f" err {err:.2e}"), flush=True)

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))

    if args.pair_only:
        for C in args.sizes:
            dy = torch.randn(M, C, device="cuda", dtype=dt)
            b = torch.randn(C, R, device="cuda", dtype=dt)
            h = torch.randn(M, R, device="cuda", dtype=dt)
            g_ref, db_ref = dy.float() @ b.float(), dy.float().t() @ h.float()
            record("pair", C, "G apart (rows_times_thin)", _bench_graph(lambda: rows_times_thin(dy, b, dt)), dy.numel() * 2)
            record("pair", C, "dB apart (thin_t_times_rows)",
                   _bench_graph(lambda: thin_t_times_rows(h, dy, 1.0, None, torch.float32, False)), dy.numel() * 2)
            record("pair", C, "G cuBLAS", _bench_graph(lambda: dy @ b), dy.numel() * 2)
            record("pair", C, "dB cuBLAS", _bench_graph(lambda: dy.t() @ h), dy.numel() * 2)
            for tile, programs in PAIR_TILES:
                try:
                    fn = lambda: rows_thin_pair(dy, b, h, 1.0, None, dt, torch.float32, tile=tile,  # noqa: E731
                                                target_programs=programs)
                    g, db = fn()
                    record("pair", C, f"one pass {tile} p{programs}", _bench_graph(fn), dy.numel() * 2,
                           max(rel(g, g_ref), rel(db, db_ref)))
                except Exception as error:  # noqa: BLE001
                    print(f"pair {tile} p{programs} failed: {type(error).__name__}: {str(error)[:120]}")
    for C in ([] if args.pair_only else args.sizes):
        x = torch.randn(M, C, device="cuda", dtype=dt)
        a_t = torch.randn(C, R, device="cuda", dtype=dt) / C ** 0.5  # (K, r) view of A^T
        t = torch.randn(M, R, device="cuda", dtype=dt)
        b = torch.randn(C, R, device="cuda", dtype=dt)
        nbytes = x.numel() * 2
        record("read", C, "x.sum()", do_bench(lambda: x.sum()), nbytes)
        y = torch.empty_like(x)
        record("write", C, "out = s H B^T (cuBLAS addmm, K=r)",
               do_bench(lambda: torch.addmm(y, t, b.t(), beta=0, alpha=0.5, out=y)), nbytes)
        ref = x.float() @ a_t.float()
        record("H/G", C, "cuBLAS mm", do_bench(lambda: x @ a_t), nbytes, rel(x @ a_t, ref))
        for tile in ROWS_TILES:
            try:
                out = rows_times_thin(x, a_t, dt, tile=tile)
                record("H/G", C, f"ptr {tile}", do_bench(lambda: rows_times_thin(x, a_t, dt, tile=tile)),
                       nbytes, rel(out, ref))
            except Exception as error:  # noqa: BLE001  a sweep keeps going
                print(f"H/G {tile} failed: {type(error).__name__}: {str(error)[:120]}")
        if TensorDescriptor is not None:
            for tile in TMA_TILES:
                try:
                    out = rows_times_thin_tma(x, a_t, tile)
                    record("H/G", C, f"tma {tile}", do_bench(lambda: rows_times_thin_tma(x, a_t, tile)),
                           nbytes, rel(out, ref))
                except Exception as error:  # noqa: BLE001
                    print(f"H/G tma {tile} failed: {type(error).__name__}: {str(error)[:120]}")
        ref_t = 0.5 * (t.float().t() @ x.float())
        record("dA/dB", C, "cuBLAS mm", do_bench(lambda: t.t() @ x), nbytes)
        for tile, programs in T_ROWS_TILES:
            try:
                fn = lambda: thin_t_times_rows(t, x, 0.5, None, torch.float32, True, tile=tile,  # noqa: E731
                                               target_programs=programs)
                record("dA/dB", C, f"ptr {tile} p{programs}", do_bench(fn), nbytes, rel(fn(), ref_t))
            except Exception as error:  # noqa: BLE001
                print(f"dA/dB {tile} failed: {type(error).__name__}: {str(error)[:120]}")
        # the dY pass: dY (M, C) with B (C, r) and H (M, r): against G and dB separately
        g_ref = x.float() @ b.float()
        db_ref = x.float().t() @ t.float()
        separate = lambda: (rows_times_thin(x, b, dt), thin_t_times_rows(t, x, 1.0, None, torch.float32, False))  # noqa: E731
        record("G+dB", C, "two default kernels", do_bench(separate), 2 * nbytes)
        for tile, programs in PAIR_TILES:
            try:
                fn = lambda: rows_thin_pair(x, b, t, 1.0, None, dt, torch.float32, tile=tile,  # noqa: E731
                                            target_programs=programs)
                g, db = fn()
                record("G+dB", C, f"one pass {tile} p{programs}", do_bench(fn), 2 * nbytes,
                       max(rel(g, g_ref), rel(db, db_ref)))
            except Exception as error:  # noqa: BLE001
                print(f"G+dB {tile} failed: {type(error).__name__}: {str(error)[:120]}")
    meta = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, M=M, r=R,
                note="tb_s: bytes of the wide operand (G+dB: counted twice, as two separate reads would) / time")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep_thin.json"), "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)


if __name__ == "__main__":
    main()
