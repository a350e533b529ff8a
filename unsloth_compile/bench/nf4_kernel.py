"""`python -m unsloth_compile.bench nf4-kernel`: the NF4 (QLoRA) LoRA linear against the bf16
one and against bitsandbytes' dequantise + cuBLAS, forward + backward (CUDA only).

    python -m unsloth_compile.bench nf4-kernel                   # Llama-3.1-8B MLP shapes, M = 8192, r = 16
    python -m unsloth_compile.bench nf4-kernel --tokens 4096 --layers llama-8b.attn.q --out /tmp/nf4

Rows per layer (the kernel benchmark's LAYERS), each one forward and one backward of the LoRA
linear (out and lora_hidden, then dx, dA, dB) with fp32 adapters (PEFT's default) on a bf16
base, GPU time from CUDA-graph replay and eager wall time, medians in ms:
    base              F.linear(x, W) and dY W on cuBLAS, bf16 W
    lora-bf16         the dense LoRA op's host functions (kernels/lora/lora_linear_triton.py), bf16 W:
                      the denominator of `vs_bf16_lora`
    nf4-auto          kernels/nf4/nf4_lora.py, each side the faster of the two below (as the op runs)
    nf4-fused         the GEMMs that decode W in their main loop (knob main_gemm="triton")
    nf4-dequantize    dequantize_nf4_triton to a bf16 buffer, then cuBLAS and the thin LoRA kernels
                      (main_gemm="cublas")
    bnb-dequantize    bitsandbytes' dequantize_4bit + cuBLAS + the LoRA products in torch (what
                      Unsloth and PEFT + bitsandbytes run); only when bitsandbytes imports
NF4 rows carry their relative error (out, dx, dA, dB) against the dense op on the dequantised
weight, and `bnb_over_this` (how many times faster than bnb-dequantize). Writes nf4-kernel.json
and nf4-kernel.md under --out (default docs/bench).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from ..kernels import knobs
from ..kernels.lora.lora_linear_triton import lora_linear_backward, lora_linear_forward
from ..kernels.nf4.nf4_lora import nf4_lora_backward, nf4_lora_forward
from ..nf4 import ABSMAX_CODE, NF4_CODE, dequantize_nf4, quantize_nf4
from .kernel import LAYERS
from .layer_args import layer_parser, parse_layer_args
from .output import layer_table, write_layer_results
from .timing import timed_row

DEFAULT_LAYERS = ["llama-8b.mlp.up", "llama-8b.mlp.down"]
VARIANTS = ("base", "lora-bf16", "nf4-auto", "nf4-fused", "nf4-dequantize", "bnb-dequantize")
SCALE = 2.0


def _inputs(M, K, N, r):
    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) / K ** 0.5
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    A = torch.randn(r, K, device="cuda", generator=g) / K ** 0.5
    B = torch.randn(N, r, device="cuda", generator=g) / r ** 0.5
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, generator=g)
    return W, x, A, B, dy


def _nf4_step(q, x, A, B, dy, main_gemm: str):
    fmt = (q.packed, q.absmax_codes, q.absmax_scale, q.absmax_offset, NF4_CODE.cuda(), ABSMAX_CODE.cuda())
    N, K = q.shape

    def run():
        with knobs.patch(main_gemm=main_gemm):
            out, hidden = nf4_lora_forward(x, *fmt, N, K, None, A, B, None, None, None, SCALE, None, x.dtype)
            dx, _, dA, dB = nf4_lora_backward(dy, x, *fmt, N, K, A, B, None, hidden, SCALE, None)
        return out, dx, dA, dB
    return run


def _dense_step(W, x, A, B, dy):
    def run():
        out, hidden = lora_linear_forward(x, W, None, A, B, None, None, None, SCALE, None, False, x.dtype)
        dx, _, dA, dB = lora_linear_backward(dy, x, W, A, B, None, hidden, SCALE, None, False, W.dtype)
        return out, dx, dA, dB
    return run


def _bnb_step(W, x, A, B, dy):
    """bitsandbytes' NF4 weight dequantised by bitsandbytes in forward and again in backward,
    cuBLAS products, the adapters rounded to bf16 for them (as Unsloth's matmul_lora does)."""
    import bitsandbytes.functional as bnb_f

    packed, state = bnb_f.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")

    def run():
        A16, B16 = A.to(x.dtype), B.to(x.dtype)
        w = bnb_f.dequantize_4bit(packed, state, quant_type="nf4")
        hidden = x @ A16.t()
        out = (x @ w.t()).addmm_(hidden, B16.t(), alpha=SCALE)
        w = bnb_f.dequantize_4bit(packed, state, quant_type="nf4")
        g = dy @ B16
        dx = (dy @ w).addmm_(g, A16, alpha=SCALE)
        dA = (g.t() @ x).float() * SCALE
        dB = (dy.t() @ hidden).float() * SCALE
        return out, dx, dA, dB
    return run


def _rel_err(got, expected) -> dict:
    return {name: ((g.double() - e.double()).norm() / e.double().norm()).item()
            for name, g, e in zip(("out", "dx", "dA", "dB"), got, expected)}


def _variants(W, x, A, B, dy, names):
    q = quantize_nf4(W)
    wanted = {
        "base": lambda: (lambda: (torch.nn.functional.linear(x, W), dy @ W)),
        "lora-bf16": lambda: _dense_step(W, x, A, B, dy),
        "nf4-auto": lambda: _nf4_step(q, x, A, B, dy, "auto"),
        "nf4-fused": lambda: _nf4_step(q, x, A, B, dy, "triton"),
        "nf4-dequantize": lambda: _nf4_step(q, x, A, B, dy, "cublas"),
        "bnb-dequantize": lambda: _bnb_step(W, x, A, B, dy),
    }
    reference = _dense_step(dequantize_nf4(q), x, A, B, dy)
    return {name: (wanted[name], reference if name.startswith(("nf4", "bnb")) else None) for name in names}


def run(args) -> list[dict]:
    rows = []
    for layer in args.layers.split(","):
        K, N = LAYERS[layer]
        W, x, A, B, dy = _inputs(args.tokens, K, N, args.rank)
        for name, (make, reference) in _variants(W, x, A, B, dy, args.variants.split(",")).items():
            check = None if reference is None else (lambda step, reference=reference: _rel_err(step(), reference()))
            rows.append(timed_row({"layer": layer, "M": args.tokens, "K": K, "N": N, "r": args.rank, "variant": name},
                                  make, check, "rel_err_vs_dense_on_dequantised", skip=(ImportError,)))
        del W, x, A, B, dy
        torch.cuda.empty_cache()
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Each timed row's GPU time over the base and bf16 LoRA rows of its layer, and for NF4 rows
    bitsandbytes' time over theirs."""
    def gpu_ms(layer, variant):
        return next((r["gpu_ms"] for r in rows if r["layer"] == layer and r["variant"] == variant and "gpu_ms" in r),
                    None)

    for row in rows:
        if "gpu_ms" not in row:
            continue
        for key, variant in (("vs_bf16_lora", "lora-bf16"), ("vs_base", "base")):
            denominator = gpu_ms(row["layer"], variant)
            if denominator:
                row[key] = row["gpu_ms"] / denominator
        bnb = gpu_ms(row["layer"], "bnb-dequantize")
        if bnb and row["variant"].startswith("nf4"):
            row["bnb_over_this"] = bnb / row["gpu_ms"]


def render(rows: list[dict], env: dict) -> str:
    nan = float("nan")
    cells = []
    for r in rows:
        err = r.get("error") or r.get("skipped") or ", ".join(
            f"{k} {v:.1e}" for k, v in r.get("rel_err_vs_dense_on_dequantised", {}).items())
        cells.append([r["layer"], r["variant"], f"{r.get('gpu_ms', nan):.3f}", f"{r.get('ms', nan):.3f}",
                      f"{r.get('vs_base', nan):.2f}", f"{r.get('vs_bf16_lora', nan):.2f}",
                      f"{r.get('bnb_over_this', nan):.2f}", err])
    return layer_table(
        "NF4 LoRA linear vs bf16 and bitsandbytes", "python -m unsloth_compile.bench nf4-kernel", env,
        "GPU time from CUDA-graph replay, one forward + one backward, median ms; `vs bf16 LoRA` < 1 is faster "
        "than the dense op; `bnb / this` > 1 is faster than bitsandbytes' dequantise + cuBLAS.",
        ["layer", "variant", "gpu ms", "eager ms", "vs base", "vs bf16 LoRA", "bnb / this", "rel err vs dense"],
        cells, versions_extra=f", bitsandbytes {env.get('bitsandbytes')}")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = layer_parser("python -m unsloth_compile.bench nf4-kernel", __doc__, DEFAULT_LAYERS)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--out", default="docs/bench", help="folder for nf4-kernel.json and nf4-kernel.md")
    return parse_layer_args(p, argv, {"--variants": VARIANTS})


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench nf4-kernel: needs a CUDA device (the NF4 kernels and their timings are CUDA only)")
        return 1
    import importlib.metadata as md

    from ..kernels.timed_choice import CHOICES
    from .variants import environment

    try:
        bnb_version = md.version("bitsandbytes")
    except md.PackageNotFoundError:
        bnb_version = None
    env = {**environment(torch.device("cuda")), "tokens": args.tokens, "rank": args.rank,
           "bitsandbytes": bnb_version, "argv": list(argv or [])}
    rows = run(args)
    env["nf4_choices"] = {repr(key): value for key, value in CHOICES["main GEMM"].items()
                          if str(key[0]).startswith("nf4")}
    return write_layer_results(Path(args.out), "nf4-kernel", env, rows, render(rows, env))
