"""What does the fp8 GEMM's low-rank epilogue cost, and how its operands are read? The package's
kernel (kernels/fp8_gemm.py `fp8_lora_gemm`, autotuned as shipped) at the kernel benchmark's
Llama shapes (M = 8192, r = 16), in the two forms the fp8 LoRA op calls it:

    forward : X_q W_q^T diag(w_s) + s H B^T    H (M, r) fp32 (the adapter dtype), B^T (r, N)
    backward: G_q W_q^T             + s G A      G (M, r) bf16, A (r, K) fp32

Variants: the low-rank tiles loaded before the main loop ("prefetch", the default for r <= 64)
or after it; in the forward, B^T read as the (r, N) view of the (N, r) parameter (stride r
along N) instead of a contiguous bf16 copy. torch._scaled_mm alone (no low-rank term, no
epilogue) is timed beside them as the floor.

    python scripts/probe_fp8_epilogue.py [--out DIR] [--tiles | --store]

--tiles: instead, each candidate tile of the kernel alone (the autotuner given one
configuration), prefetch on, one program per tile or persistent. --store: the first four
candidate tiles alone, the persistent ones each with the output tile stored by tl.store
(through registers, masked) and by a TMA descriptor (the kernel's default for them). The run
that chose the default (docs/bench/probe-fp8-gemm-2026-12-01-s12.log) also timed one program
per tile with a TMA store: 12-17% slower, since each program waits for its store to finish.

GPU time per call (CUDA-graph replay, bench.kernel._bench_graph); prints one line per variant
and writes probe_fp8_epilogue.json. Not a test, not part of the package.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from unsloth_compile.bench.kernel import DEFAULT_LAYERS, LAYERS, TOKENS, _bench_graph
from unsloth_compile.kernels.fp8 import quantize_rowwise, transposed_codes
from unsloth_compile.kernels import fp8_gemm
from unsloth_compile.kernels.fp8_gemm import fp8_lora_gemm

RANK = 16
# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, persistent), as kernels/fp8_gemm.py's _TILES. The
# session that wrote this also tried persistent tiles with the tile and K loops flattened
# (tl.range(flatten=True)): 4-46x the time forward, 1.15-1.5x backward (H200, Triton 3.6,
# docs/bench/probe-fp8-tiles-2026-12-01.log); the kernel no longer takes that flag.
CANDIDATE_TILES = [(128, 256, 128, 3, 8, False), (128, 256, 128, 3, 8, True), (256, 128, 128, 3, 8, False),
                   (256, 128, 128, 3, 8, True), (128, 128, 128, 4, 8, True),
                   # K blocks of 256 (half the loop iterations, two stages in 192 KB), twelfth session
                   (128, 256, 256, 2, 8, False), (128, 256, 256, 2, 8, True)]


def one_tile(tile):
    """The kernel's autotuner with this configuration alone."""
    fp8_gemm._TILES = [tile]
    fp8_gemm._tuned.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--tiles", action="store_true", help="time each candidate tile alone")
    parser.add_argument("--store", action="store_true",
                        help="time the shipped tiles with the output stored by tl.store and by a TMA descriptor")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    results = []
    M = TOKENS
    for name in DEFAULT_LAYERS:
        K, N = LAYERS[name]
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K ** -0.5
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        A = torch.randn(RANK, K, device="cuda") * K ** -0.5
        B = torch.randn(N, RANK, device="cuda") * 0.01
        x_codes, x_dequant = quantize_rowwise(x)
        w_codes, w_dequant = quantize_rowwise(w)
        g_codes, g_dequant = quantize_rowwise(dy, w_dequant.reshape(-1))
        w_t = transposed_codes(w_codes)
        h = (x.float() @ A.t())
        g = (dy.float() @ B).bfloat16()
        forms = {
            "forward": dict(a_codes=x_codes, a_dequant=x_dequant, b_codes=w_codes, b_dequant=w_dequant, u=h,
                            out=torch.empty(M, N, device="cuda", dtype=torch.bfloat16)),
            "backward": dict(a_codes=g_codes, a_dequant=g_dequant, b_codes=w_t, b_dequant=None, u=g, v=A,
                             out=torch.empty(M, K, device="cuda", dtype=torch.bfloat16)),
        }
        v_copy = B.t().contiguous().bfloat16()
        for form, p in forms.items():
            floor = _bench_graph(lambda: torch._scaled_mm(
                p["a_codes"], p["b_codes"].t(), scale_a=p["a_dequant"],
                scale_b=(p["b_dequant"].reshape(1, -1) if p["b_dequant"] is not None
                         else torch.ones(1, p["b_codes"].shape[0], device="cuda")),
                out_dtype=torch.bfloat16))
            if args.store:
                variants = {f"{tile} {label}": dict(tile=tile, tma_store=flag) for tile in CANDIDATE_TILES[:4]
                            for label, flag in (("tl.store", False), ("TMA store", None)) if tile[5] or not flag}
            elif args.tiles:
                variants = {str(tile): dict(tile=tile) for tile in CANDIDATE_TILES}
            else:
                variants = {"prefetch": dict(prefetch=True), "after the main loop": dict(prefetch=False)}
                if form == "forward":
                    variants = {f"{k}, B^T contiguous bf16": dict(v, v=v_copy) for k, v in variants.items()}
                    variants["prefetch, B^T strided fp32 view"] = dict(prefetch=True, v=B.t())
            if form == "forward" and (args.tiles or args.store):
                p = dict(p, v=B.t())
            for label, extra in variants.items():
                extra = dict(extra)
                if "tile" in extra:
                    one_tile(extra.pop("tile"))
                call = dict(p, **extra)
                try:
                    ms = _bench_graph(lambda: fp8_lora_gemm(scale=2.0, **call))
                except Exception as exc:  # a tile that does not compile here: say so, go on
                    print(f"{name:18s} {form:8s} {label:40s} {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                    continue
                results.append(dict(layer=name, form=form, variant=label, us=ms * 1e3, scaled_mm_us=floor * 1e3))
                print(f"{name:18s} {form:8s} {label:40s} {ms * 1e3:8.1f} us  ({ms / floor:.3f}x _scaled_mm alone, "
                      f"{floor * 1e3:.1f} us)", flush=True)
        del x, w, dy
        torch.cuda.empty_cache()
    name = "probe_fp8_store.json" if args.store else "probe_fp8_tiles.json" if args.tiles else "probe_fp8_epilogue.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, M=M, rank=RANK,
                       results=results), f, indent=1)


if __name__ == "__main__":
    main()
