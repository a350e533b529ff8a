"""`python -m unsloth_compile.bench sparse24`: the 2:4 sparse frozen base against the dense one
at the Llama layer shapes, forward + backward (CUDA only).

    python -m unsloth_compile.bench sparse24                     # M = 8192, r = 16, bf16, both layouts
    python -m unsloth_compile.bench sparse24 --tokens 4096 --layouts cusparselt --out /tmp/sp

Rows per layer (the kernel benchmark's LAYERS), each fwd+bwd as autograd runs it (gradients
of x, and of the adapters for LoRA rows), GPU time from CUDA-graph replay and eager wall time,
both medians in ms:
    base                 F.linear(x, W): X W^T, dY W on cuBLAS (the denominator of every ratio)
    base-2:4-<layout>    torch.ops.unsloth.sparse24_linear on W's compressed copies
    ours-fp32            torch.ops.unsloth.lora_linear, dense base, fp32 adapters (PEFT's)
    ours-2:4-<layout>    torch.ops.unsloth.lora_linear_sparse24, fp32 adapters
    ours-2:4-<layout>-bf16   the same with bf16 adapters
    gemm-fwd / gemm-bwd  the two base products alone, dense vs each layout; with cuSPARSELt
                         also its default algorithm (`-alg0`, no search)
    gemm-*-cslt-<operand>  torch._cslt_sparse_mm alone, its algorithm searched, on other operand
                         layouts: the dense operand X^T (dY^T) as a transposed view or made
                         contiguous, the result Y^T (N x M) or Y (transpose_result); which layout
                         the sparse product is fast in, apart from what the op does around it
Each sparse row also carries its relative error against impl="reference" (the dense masked
weight). Writes sparse24.json and sparse24.md under --out (default docs/bench).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

from ..kernels import knobs, sparse24
from ..sparsity.mask import transposable_mask
from .kernel import DEFAULT_LAYERS, LAYERS
from .layer_args import layer_parser, parse_layer_args
from .output import layer_table, write_layer_results
from .timing import timed_row

LAYOUTS = ("cusparselt", "cutlass")


SCALE = 2.0


def _inputs(M, K, N, r, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(N, K, device="cuda", dtype=dtype, generator=g) / K ** 0.5
    W = W * transposable_mask(W.abs())
    x = torch.randn(M, K, device="cuda", dtype=dtype, generator=g).requires_grad_()
    A = (torch.randn(r, K, device="cuda", generator=g) / K ** 0.5).requires_grad_()
    B = (torch.randn(N, r, device="cuda", generator=g) / r ** 0.5).requires_grad_()
    dy = torch.randn(M, N, device="cuda", dtype=dtype, generator=g)
    return W, x, A, B, dy


def _step(forward, inputs, dy):
    def run():
        return torch.autograd.grad(forward(), inputs, dy)
    return run


def _variants(W, x, A, B, dy, layouts):
    """name -> (step, check): check() is the relative error against the reference, or None."""
    A16, B16 = (t.detach().to(torch.bfloat16).requires_grad_() for t in (A, B))
    out = {
        "base": (_step(lambda: torch.nn.functional.linear(x, W), [x], dy), None),
        "ours-fp32": (_step(lambda: torch.ops.unsloth.lora_linear(x, W, None, A, B, None, None, None, SCALE, None,
                                                                  False, x.dtype, "auto")[0], [x, A, B], dy), None),
    }
    for layout in layouts:
        c = sparse24.compress(W, layout)

        def lora(A_, B_, impl="auto", c=c, layout=layout):
            return torch.ops.unsloth.lora_linear_sparse24(x, W, c, layout, None, A_, B_, None, None, None, SCALE,
                                                          None, x.dtype, impl)[0]

        def check(A_, B_, lora=lora):
            got = _step(lambda: lora(A_, B_), [x, A_, B_], dy)()
            ref = _step(lambda: lora(A_, B_, "reference"), [x, A_, B_], dy)()
            return {n: ((g.double() - e.double()).norm() / e.double().norm()).item()
                    for n, g, e in zip(("dx", "dA", "dB"), got, ref)}

        out[f"base-2:4-{layout}"] = (_step(lambda c=c, layout=layout: torch.ops.unsloth.sparse24_linear(
            x, W, c, layout, None, "auto"), [x], dy), None)
        out[f"ours-2:4-{layout}"] = (_step(lambda lora=lora: lora(A, B), [x, A, B], dy),
                                     lambda check=check: check(A, B))
        out[f"ours-2:4-{layout}-bf16"] = (_step(lambda lora=lora: lora(A16, B16), [x, A16, B16], dy),
                                          lambda check=check: check(A16, B16))
        xd = x.detach()
        out[f"gemm-fwd-2:4-{layout}"] = (lambda c=c, layout=layout: sparse24.base_forward(xd, W, c, layout), None)
        out[f"gemm-bwd-2:4-{layout}"] = (lambda c=c, layout=layout: sparse24.base_grad_input(dy, W, c, layout), None)
        if layout == "cusparselt":  # the same products with cuSPARSELt's default algorithm (no search)
            def alg0(fn, c=c):
                with knobs.patch(sparse24_search=False):
                    return fn(c)
            out["gemm-fwd-2:4-cusparselt-alg0"] = (
                lambda alg0=alg0: alg0(lambda c: sparse24.base_forward(xd, W, c, "cusparselt")), None)
            out["gemm-bwd-2:4-cusparselt-alg0"] = (
                lambda alg0=alg0: alg0(lambda c: sparse24.base_grad_input(dy, W, c, "cusparselt")), None)
            out.update(_cslt_operand_layouts(c, xd, dy))  # and the bare products on other operand layouts
    xd = x.detach()
    out["gemm-fwd-dense"] = (lambda: xd @ W.t(), None)
    out["gemm-bwd-dense"] = (lambda: dy @ W, None)
    return out


def _cslt_operand_layouts(compressed_pair, xd, dy):
    """The bare cuSPARSELt product S D for S = W (forward, D from X) and S = W^T (backward, D
    from dY), `compressed_pair` their cuSPARSELt copies (sparse24.compress), on each
    dense-operand layout, with the algorithm cuSPARSELt's search picks."""
    out = {}
    for kind, compressed, rows in zip(("fwd", "bwd"), compressed_pair, (xd, dy)):
        operands = {"viewT": rows.t(), "contigT": rows.t().contiguous()}
        for operand_name, dense in operands.items():
            for transpose_result in (False, True):
                try:
                    alg = int(torch._cslt_sparse_mm_search(compressed, dense, transpose_result=transpose_result))
                except RuntimeError as error:  # the row then times cuSPARSELt's default
                    print(f"search failed ({kind}, {operand_name}, {transpose_result}): {error}", flush=True)
                    alg = 0
                name = f"gemm-{kind}-cslt-{operand_name}-{'Y' if transpose_result else 'YT'}"
                out[name] = (lambda c=compressed, d=dense, t=transpose_result, a=alg:
                             torch._cslt_sparse_mm(c, d, transpose_result=t, alg_id=a), None)
    return out


def run(args) -> list[dict]:
    rows = []
    for layer in args.layers.split(","):
        K, N = LAYERS[layer]
        W, x, A, B, dy = _inputs(args.tokens, K, N, args.rank)
        for name, (step, check) in _variants(W, x, A, B, dy, args.layouts.split(",")).items():
            check_step = None if check is None else (lambda _step, check=check: check())  # check builds its own
            rows.append(timed_row({"layer": layer, "M": args.tokens, "K": K, "N": N, "r": args.rank, "variant": name},
                                  lambda step=step: step, check_step, "rel_err_vs_reference"))
    for row in rows:  # ratios to the dense row of the same kind (GPU time)
        kind = row["variant"].split("-2:4")[0].split("-cslt")[0].removesuffix("-dense").removesuffix("-fp32")
        denominator = {"base": "base", "ours": "base", "gemm-fwd": "gemm-fwd-dense", "gemm-bwd": "gemm-bwd-dense"}
        ref = next((r for r in rows if r["layer"] == row["layer"] and r["variant"] == denominator.get(kind, "base")),
                   None)
        if "gpu_ms" in row and ref is not None and "gpu_ms" in ref:
            row["time_vs_dense"] = row["gpu_ms"] / ref["gpu_ms"]
        lora = next((r for r in rows if r["layer"] == row["layer"] and r["variant"] == "ours-fp32"), None)
        if kind == "ours" and "gpu_ms" in row and lora is not None and "gpu_ms" in lora:
            row["time_vs_dense_lora"] = row["gpu_ms"] / lora["gpu_ms"]
    return rows


def render(rows: list[dict], env: dict) -> str:
    nan = float("nan")
    cells = []
    for r in rows:
        err = r.get("error") or ", ".join(f"{k} {v:.1e}" for k, v in r.get("rel_err_vs_reference", {}).items())
        cells.append([r["layer"], r["variant"], f"{r.get('gpu_ms', nan):.3f}", f"{r.get('ms', nan):.3f}",
                      f"{r.get('time_vs_dense', nan):.2f}", f"{r.get('time_vs_dense_lora', nan):.2f}", err])
    return layer_table(
        "2:4 sparse base vs dense", "python -m unsloth_compile.bench sparse24", env,
        "GPU time from CUDA-graph replay, fwd+bwd, median ms; `time_vs_dense` < 1 is faster "
        "(base / ours rows against `base`, gemm rows against the dense product).",
        ["layer", "variant", "gpu ms", "eager ms", "time vs dense", "vs dense LoRA op", "rel err vs reference"],
        cells)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = layer_parser("python -m unsloth_compile.bench sparse24", __doc__, DEFAULT_LAYERS)
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of {', '.join(LAYOUTS)}")
    p.add_argument("--out", default="docs/bench", help="folder for sparse24.json and sparse24.md")
    return parse_layer_args(p, argv, {"--layouts": LAYOUTS})


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench sparse24: needs a CUDA device (the 2:4 GEMMs and their timings are CUDA only)")
        return 1
    import unsloth_compile  # noqa: F401  registers torch.ops.unsloth.*
    from .variants import environment

    env = {**environment(torch.device("cuda")), "tokens": args.tokens, "rank": args.rank,
           "argv": list(argv or [])}
    rows = run(args)
    return write_layer_results(Path(args.out), "sparse24", env, rows, render(rows, env))
