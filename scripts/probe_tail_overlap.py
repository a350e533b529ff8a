"""Can the fp8 LoRA op's backward hide its memory-bound adapter gradients in the last wave of
its dX GEMM? Probe on one GPU, at the kernel benchmark's Llama shapes (M = 8192, r = 16).

    python scripts/probe_tail_overlap.py [--out DIR]

The backward's dX = G_q W_q (+ s G A in the epilogue) is compute-bound and its tiles do not
divide evenly over the SMs (8B up: 1024 tiles of 128 x 256 on 132 SMs, 7.8 waves, the last one
three quarters full and ~100 us long), while dA = s G^T X (and dB = s dY^T H) only need G and
read memory. Variants, GPU time per call (CUDA-graph replay, bench.kernel._bench_graph):
- "gemm" / "dA" / "dB": each alone;
- "serial": the GEMM, then dA (what the op does now);
- "side": the GEMM launched first on the current stream, dA on a second stream, joined;
- "side, high-priority GEMM": the GEMM on a high-priority stream, dA on the current one;
- the same with dA and dB both on the side stream.
Prints one line per variant and writes probe_tail_overlap.json under --out. Not a test, not
part of the package.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from unsloth_compile.bench.kernel import DEFAULT_LAYERS, LAYERS, TOKENS, _bench_graph
from unsloth_compile.kernels.fp8 import quantize_rowwise, transposed_codes
from unsloth_compile.kernels.fp8_gemm import fp8_lora_gemm
from unsloth_compile.kernels.lowrank_thin import thin_t_times_rows

RANK = 16


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    results = []
    M = TOKENS
    side = torch.cuda.Stream()
    high = torch.cuda.Stream(priority=-1)
    for name in DEFAULT_LAYERS:
        K, N = LAYERS[name]
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        A = torch.randn(RANK, K, device="cuda") * K ** -0.5
        B = torch.randn(N, RANK, device="cuda") * 0.01
        w_codes, w_dequant = quantize_rowwise(w)
        g_codes, g_dequant = quantize_rowwise(dy, w_dequant.reshape(-1))
        w_t = transposed_codes(w_codes)
        g = (dy.float() @ B).bfloat16()
        h = (x.float() @ A.t()).bfloat16()
        dx = torch.empty(M, K, device="cuda", dtype=torch.bfloat16)

        def gemm():
            fp8_lora_gemm(g_codes, g_dequant, w_t, None, g, A, dx, 2.0)

        def da():
            return thin_t_times_rows(g, x, 2.0, None, torch.float32, rank_first=True)

        def db():
            return thin_t_times_rows(h, dy, 2.0, None, torch.float32, rank_first=False)

        def serial(extra):
            def run():
                gemm()
                for fn in extra:
                    fn()
            return run

        def on_side(extra, high_priority):
            def run():
                cur = torch.cuda.current_stream()
                first, second = (high, cur) if high_priority else (cur, side)
                for s in (first, second):
                    if s is not cur:
                        s.wait_stream(cur)
                with torch.cuda.stream(first):
                    gemm()
                with torch.cuda.stream(second):
                    for fn in extra:
                        fn()
                for s in (first, second):
                    if s is not cur:
                        cur.wait_stream(s)
            return run

        variants = {"gemm": gemm, "dA": da, "dB": db}
        for label, extra in (("dA", [da]), ("dA+dB", [da, db])):
            variants[f"serial: gemm, {label}"] = serial(extra)
            variants[f"side: {label} beside gemm"] = on_side(extra, False)
            variants[f"side: {label} beside high-priority gemm"] = on_side(extra, True)
        for label, fn in variants.items():
            try:
                ms = _bench_graph(fn)
            except Exception as exc:  # a variant that cannot be captured: say so, go on
                print(f"{name:18s} {label:45s} {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                continue
            results.append(dict(layer=name, variant=label, us=ms * 1e3))
            print(f"{name:18s} {label:45s} {ms * 1e3:8.1f} us", flush=True)
        del x, w, dy
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "probe_tail_overlap.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, M=M, rank=RANK,
                       results=results), f, indent=1)


if __name__ == "__main__":
    main()
