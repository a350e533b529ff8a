"""`python -m unsloth_compile.bench kernel`: one LoRA linear, forward + backward, against the
frozen base linear alone (cuBLAS `X W^T` forward, `dY W` backward), at Llama layer shapes.

Variants, all timed as fwd+bwd (autograd, gradients of x and of the adapters) in one run:
    base          F.linear(x, W), W frozen: the floor, every ratio is time / base time
    peft-fp32     PEFT's eager LoRA with fp32 adapters (its default on a bf16 base)
    peft-bf16     the same with bf16 adapters
    inductor      peft-fp32 under torch.compile (Inductor)
    ours-fp32     torch.ops.unsloth.lora_linear (impl="triton"), fp32 adapters
    ours-bf16     the same with bf16 adapters
    ours-bf16-triton / ours-bf16-cublas
                  ours-bf16 with every GEMM forced to Triton (main GEMM with the low-rank term in
                  its epilogue, kernels/lora/lowrank_thin.py for H, G, dA, dB) or to cuBLAS (the
                  composition out = s H B^T; out += X W^T); ours-* pick per problem by timing
    unsloth       peft-fp32 under torch.compile(backend="unsloth"): the op inside an AOTAutograd
                  graph, as users run it (no eager autograd wrapper around the op)
    base-fp8      the frozen base alone with W stored in fp8 (torch.ops.unsloth.fp8_linear:
                  X and dY quantised by rows per call, both GEMMs torch._scaled_mm)
    ours-fp8 / ours-fp8-bf16
                  torch.ops.unsloth.lora_linear_fp8, W stored in fp8, fp32 / bf16 adapters
                  (rows carry weight_bytes: the stored base, 2 N K in bf16, N K + 4 N in fp8)
    ours-fp8-triton / ours-fp8-cublas
                  ours-fp8 with both fp8 GEMMs forced to the Triton FP8 GEMM with the LoRA term
                  in its epilogue (kernels/fp8/fp8_gemm.py) or to torch._scaled_mm plus a rank-r
                  addmm of the term; ours-fp8 takes the Triton one wherever it runs
Plus a breakdown of ours (r=16, fp32 adapters): each kernel of forward and backward alone,
and the Triton GEMM with no low-rank term against cuBLAS.

Writes kernel.json and kernel.md (card, date, versions) under --out (default docs/bench).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

from ..kernels import knobs
from .output import first_line
from .timing import eager_ms, graph_ms
from ..errors import UnslothCompileError

# (K, N) of each layer: K in-features, N out-features
LAYERS = {
    "llama-8b.attn.q": (4096, 4096),
    "llama-8b.mlp.up": (4096, 14336),
    "llama-8b.mlp.down": (14336, 4096),
    "llama-1b.mlp.up": (2048, 8192),
    # the llama-1b preset's other projections (small sites: the overheads weigh more)
    "llama-1b.attn.q": (2048, 2048),
    "llama-1b.attn.k": (2048, 512),
    "llama-1b.mlp.down": (8192, 2048),
}
DEFAULT_LAYERS = list(LAYERS)[:4]  # the four headline shapes; the others on request (--layers)
RANKS = (8, 16, 64)
TOKENS = 8192
VARIANTS = ("base", "peft-fp32", "peft-bf16", "inductor", "ours-fp32", "ours-bf16", "ours-bf16-triton",
            "ours-bf16-cublas", "unsloth", "base-fp8", "ours-fp8", "ours-fp8-bf16", "ours-fp8-triton",
            "ours-fp8-cublas")
SCALE = 2.0  # lora_alpha / r; its value does not change the cost


def _peft_lora(x, W, A, B, scale):
    """PEFT's LoraLayer.forward: base, adapter on x cast to the adapter dtype, cast back."""
    result = torch.nn.functional.linear(x, W)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(x.to(A.dtype), A), B)
    return (result + lora * scale).to(x.dtype)


def _ours(x, W, A, B, scale):
    return torch.ops.unsloth.lora_linear(x, W, None, A, B, None, None, None, scale, None, False,
                                         x.dtype, "triton")[0]


def _forced_knobs(variant: str) -> dict:
    """The kernel knobs a variant runs under (kernels/knobs.py): ours-bf16-triton / -cublas
    force every GEMM of ours to that side; the others change nothing."""
    if variant in ("ours-bf16-triton", "ours-bf16-cublas"):
        side = variant.rsplit("-", 1)[1]
        return {"main_gemm": side, "thin": side}
    if variant in ("ours-fp8-triton", "ours-fp8-cublas"):  # the fp8 GEMM only; thin GEMMs as ours-fp8
        return {"main_gemm": variant.rsplit("-", 1)[1]}
    return {}


def _step(forward, inputs, dy):
    def run():
        out = forward()
        return torch.autograd.grad(out, inputs, dy)
    return run


def _make_variant(name, x, W, A32, B32, dy):
    A16, B16 = (t.detach().to(torch.bfloat16).requires_grad_() for t in (A32, B32))
    if name == "base":
        return _step(lambda: torch.nn.functional.linear(x, W), [x], dy)
    if name == "peft-fp32":
        return _step(lambda: _peft_lora(x, W, A32, B32, SCALE), [x, A32, B32], dy)
    if name == "peft-bf16":
        return _step(lambda: _peft_lora(x, W, A16, B16, SCALE), [x, A16, B16], dy)
    if name == "inductor":
        torch._dynamo.reset()  # a fresh compile per shape (no recompile limit, no dynamic shapes)
        compiled = torch.compile(_peft_lora, dynamic=False)
        return _step(lambda: compiled(x, W, A32, B32, SCALE), [x, A32, B32], dy)
    if name == "unsloth":
        torch._dynamo.reset()
        compiled = torch.compile(_peft_lora, backend="unsloth", dynamic=False)
        return _step(lambda: compiled(x, W, A32, B32, SCALE), [x, A32, B32], dy)
    if name == "ours-fp32":
        return _step(lambda: _ours(x, W, A32, B32, SCALE), [x, A32, B32], dy)
    if name == "ours-bf16":
        return _step(lambda: _ours(x, W, A16, B16, SCALE), [x, A16, B16], dy)
    if name in ("ours-bf16-triton", "ours-bf16-cublas"):  # ours-bf16, run under _forced_knobs(name)
        return _make_variant("ours-bf16", x, W, A32, B32, dy)
    if name in ("ours-fp8-triton", "ours-fp8-cublas"):  # ours-fp8, run under _forced_knobs(name)
        return _make_variant("ours-fp8", x, W, A32, B32, dy)
    if name.endswith(("fp8", "fp8-bf16")):
        from ..kernels.fp8.fp8 import quantize_weight

        Wq, ws = quantize_weight(W)  # once, as unsloth_compile.fp8.convert stores it
        A_, B_ = (A32, B32) if name == "ours-fp8" else (A16, B16)
        if name == "base-fp8":
            return _step(lambda: torch.ops.unsloth.fp8_linear(x, Wq, ws, None, "auto"), [x], dy)
        return _step(lambda: torch.ops.unsloth.lora_linear_fp8(x, Wq, ws, None, A_, B_, None, None, None, SCALE,
                                                                None, x.dtype, "auto")[0], [x, A_, B_], dy)
    raise UnslothCompileError(f"unsloth_compile.bench: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


def _inputs(M, K, N, r, device):
    g = torch.Generator(device=device).manual_seed(M + K + N + r)
    x = torch.randn(M, K, device=device, generator=g, dtype=torch.bfloat16).requires_grad_()
    W = (torch.randn(N, K, device=device, generator=g) * K ** -0.5).to(torch.bfloat16)
    A = (torch.randn(r, K, device=device, generator=g) * K ** -0.5).requires_grad_()
    B = (torch.randn(N, r, device=device, generator=g) * 0.01).requires_grad_()  # never zeros
    dy = torch.randn(M, N, device=device, generator=g, dtype=torch.bfloat16)
    return x, W, A, B, dy


def _rel_err_vs_reference(x, W, A, B, dy, adapter_dtype) -> dict:
    """Relative error (norm) of ours against impl="reference" for out, dx, dA, dB: a check
    that the autotuned configurations compute the right thing at the benchmarked shape."""
    results = {}
    for impl in ("triton", "reference"):
        A_, B_ = (t.detach().to(adapter_dtype).requires_grad_() for t in (A, B))
        x_ = x.detach().requires_grad_()
        out = torch.ops.unsloth.lora_linear(x_, W, None, A_, B_, None, None, None, SCALE, None,
                                            False, x.dtype, impl)[0]
        results[impl] = [out.detach(), *torch.autograd.grad(out, [x_, A_, B_], dy)]
    return {name: ((o.double() - r.double()).norm() / r.double().norm()).item()
            for name, o, r in zip(("out", "dx", "dA", "dB"), results["triton"], results["reference"])}


def _rel_err_fp8_vs_emulation(x, W, A, B, dy, name) -> dict:
    """ours-fp8 (with the fp8 GEMM the knobs in force pick: Triton where it runs, or torch._scaled_mm)
    against impl="reference" (kernels/fp8/fp8.py's emulation: the same quantisation, fp32 GEMMs),
    and its out / dx against float64 as SQNR in dB."""
    from ..kernels.fp8.fp8 import quantize_weight

    Wq, ws = quantize_weight(W)
    adapter = torch.bfloat16 if name == "ours-fp8-bf16" else torch.float32
    results = {}
    for impl in ("auto", "reference"):
        A_, B_ = (t.detach().to(adapter).requires_grad_() for t in (A, B))
        x_ = x.detach().requires_grad_()
        out = torch.ops.unsloth.lora_linear_fp8(x_, Wq, ws, None, A_, B_, None, None, None, SCALE, None,
                                                x.dtype, impl)[0]
        results[impl] = [out.detach(), *torch.autograd.grad(out, [x_, A_, B_], dy)]
    errors = {n: ((o.double() - r.double()).norm() / r.double().norm()).item()
              for n, o, r in zip(("out", "dx", "dA", "dB"), results["auto"], results["reference"])}
    x64, W64, A64, B64 = (t.detach().double() for t in (x, W, A.to(adapter), B.to(adapter)))
    want = {"out": x64 @ W64.t() + SCALE * (x64 @ A64.t()) @ B64.t(),
            "dx": dy.double() @ W64 + SCALE * (dy.double() @ B64) @ A64}
    for key, got in (("out", results["auto"][0]), ("dx", results["auto"][1])):
        errors[f"sqnr_{key}_db"] = (20 * torch.log10(want[key].norm() / (got.double() - want[key]).norm())).item()
    return errors


def run_case(layer: str, M: int, r: int, variants, device) -> list[dict]:
    K, N = LAYERS[layer]
    x, W, A, B, dy = _inputs(M, K, N, r, device)
    rows, base_ms, base_gpu_ms = [], None, None
    for name in variants:
        row = {"layer": layer, "M": M, "K": K, "N": N, "r": r, "variant": name}
        try:
            with knobs.patch(**_forced_knobs(name)):
                _measure_variant(row, name, x, W, A, B, dy)
        except Exception as error:  # one failing variant must not hide the others
            row["error"] = f"{type(error).__name__}: {error}"[:300]
            traceback.print_exc()
        if name == "base":
            base_ms, base_gpu_ms = row.get("ms"), row.get("gpu_ms")
        if base_ms and row.get("ms"):
            row["ratio"] = row["ms"] / base_ms
        if base_gpu_ms and row.get("gpu_ms"):
            row["gpu_ratio"] = row["gpu_ms"] / base_gpu_ms
        rows.append(row)
    flops = 2 * 2 * M * N * K  # base fwd + dX
    nan = float("nan")
    print(f"{layer:20s} r={r:3d}  base {base_gpu_ms or nan:.3f} ms GPU "
          f"({flops / (base_gpu_ms or nan) / 1e9:.0f} TFLOP/s), {base_ms or nan:.3f} ms eager  " +
          "  ".join(f"{w['variant']} {w.get('gpu_ratio', nan):.3f}/{w.get('ratio', nan):.3f}"
                    for w in rows[1:]), flush=True)
    return rows


def _measure_variant(row: dict, name: str, x, W, A, B, dy) -> None:
    """row += the variant's check against the reference, weight bytes, eager and GPU times."""
    if name.startswith("ours"):
        adapter = torch.float32 if name == "ours-fp32" else torch.bfloat16
        row["rel_err_vs_reference"] = _rel_err_vs_reference(x, W, A, B, dy, adapter)
    K, N = W.shape[1], W.shape[0]
    if "fp8" in name:
        row["weight_bytes"] = N * K + 4 * N  # e4m3 codes + fp32 row scales
        if name.startswith("ours"):
            row["rel_err_vs_reference"] = _rel_err_fp8_vs_emulation(x, W, A, B, dy, name)
    elif name == "base":
        row["weight_bytes"] = W.numel() * W.element_size()
    step = _make_variant(name, x, W, A, B, dy)
    row["ms"] = eager_ms(step)
    row["gpu_ms"] = graph_ms(step)


def breakdown(layer: str, M: int, r: int, device) -> list[dict]:
    """Each piece of ours alone (fp32 adapters), to see where the time over the base goes."""
    from ..kernels.lora import lora_gemm as gemm
    from ..kernels.lora import lora_linear_triton as lt

    K, N = LAYERS[layer]
    x, W, A, B, dy = (t.detach() for t in _inputs(M, K, N, r, device))
    H = lt._mm(x, A.t(), x.dtype, A.dtype)
    G = lt._mm(dy, B, dy.dtype, B.dtype)
    y = torch.empty(M, N, device=device, dtype=x.dtype)
    dx = torch.empty(M, K, device=device, dtype=x.dtype)
    no_r = H[:, :0]
    H16, G16 = H.to(x.dtype), G.to(x.dtype)  # the composition takes every operand in x's dtype
    Bt16, A16 = B.t().to(x.dtype), A.to(x.dtype)
    pieces = {
        "cublas fwd X W^T": lambda: torch.mm(x, W.t()),
        "cublas bwd dY W": lambda: torch.mm(dy, W),
        "triton fwd GEMM, no low-rank": lambda: gemm.launch_lora_gemm(x, W.t(), no_r, B.t()[:0], y, SCALE, None),
        "triton bwd GEMM, no low-rank": lambda: gemm.launch_lora_gemm(dy, W, no_r, A[:0], dx, SCALE, None),
        "triton fwd GEMM + s H B^T": lambda: gemm.launch_lora_gemm(x, W.t(), H, B.t(), y, SCALE, None),
        "triton bwd GEMM + s G A": lambda: gemm.launch_lora_gemm(dy, W, G, A, dx, SCALE, None),
        "cublas fwd: out = s H B^T; out += X W^T": lambda: lt._cublas_lora_gemm(x, W.t(), H16, Bt16, y, SCALE, None),
        "cublas bwd: dx = s G A; dx += dY W": lambda: lt._cublas_lora_gemm(dy, W, G16, A16, dx, SCALE, None),
        "triton H = X A^T": lambda: lt.rows_times_thin(x, A.t(), A.dtype),
        "triton G = dY B": lambda: lt.rows_times_thin(dy, B, dy.dtype),
        "triton dB = s dY^T H": lambda: lt.thin_t_times_rows(H, dy, SCALE, None, B.dtype, rank_first=False),
        "triton dA = s G^T X": lambda: lt.thin_t_times_rows(G, x, SCALE, None, A.dtype, rank_first=True),
        "triton G and dB, one pass over dY": lambda: lt.rows_thin_pair(dy, B, H, SCALE, None, dy.dtype, B.dtype),
        "cublas H = X A^T": lambda: lt._mm(x, A.t(), x.dtype, A.dtype),
        "cublas G = dY B": lambda: lt._mm(dy, B, dy.dtype, B.dtype),
        "cublas dB = dY^T H": lambda: lt._mm(dy.t(), H, dy.dtype, B.dtype),
        "cublas dA = G^T X": lambda: lt._mm(G.t(), x, x.dtype, A.dtype),
    }
    for name in [n for n in pieces if n.startswith("triton") and "GEMM" in n]:
        pieces[name.replace("triton", "triton-ptr")] = pieces[name]  # timed with the pointer main loop
    rows = []
    for name, fn in pieces.items():
        try:
            with knobs.patch(**({"main_loop": "pointer"} if name.startswith("triton-ptr") else {})):
                rows.append({"layer": layer, "M": M, "r": r, "piece": name, "ms": eager_ms(fn),
                             "gpu_ms": graph_ms(fn)})
        except Exception as error:
            rows.append({"layer": layer, "M": M, "r": r, "piece": name, "error": f"{type(error).__name__}: {error}"[:300]})
        print(f"  {layer:20s} {name:40s} {rows[-1].get('ms', float('nan')):.4f} ms eager, "
              f"{rows[-1].get('gpu_ms', float('nan')):.4f} ms GPU", flush=True)
    return rows


def profile_host(layer: str, M: int, r: int, device, steps: int = 20) -> dict:
    """Host time to enqueue one fwd+bwd step against its wall time (host >= wall means the
    step is CPU-bound), and a cProfile of ours: where its Python time goes."""
    import cProfile
    import io
    import pstats

    K, N = LAYERS[layer]
    x, W, A, B, dy = _inputs(M, K, N, r, device)
    report = {"layer": layer, "M": M, "r": r, "host_ms": {}, "wall_ms": {}}
    for name in ("base", "peft-bf16", "ours-fp32", "ours-bf16"):
        step = _make_variant(name, x, W, A, B, dy)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        report["host_ms"][name] = (t1 - t0) / steps * 1e3
        report["wall_ms"][name] = (t2 - t0) / steps * 1e3
        print(f"  host {layer} r={r} {name:10s} enqueue {report['host_ms'][name]:.3f} ms/step, "
              f"wall {report['wall_ms'][name]:.3f} ms/step", flush=True)
    step = _make_variant("ours-fp32", x, W, A, B, dy)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    report["cprofile_ours_fp32"] = text.getvalue()
    print(text.getvalue()[-6000:], flush=True)
    return report


def choices_made() -> dict:
    """What ours chose by timing so far (per problem: main GEMM Triton or cuBLAS, thin GEMMs,
    TMA or pointer main loop) and the tile configuration of every Triton GEMM plan."""
    from ..kernels.lora import lora_gemm as gemm
    from ..kernels.timed_choice import CHOICES

    made = {kind: [{"problem": repr(key), "chosen": chosen, "ms": times} for key, (chosen, times) in table.items()]
            for kind, table in CHOICES.items()}
    made["gemm plans"] = [{"problem": repr(key), "tma": plan.tma, "config": plan.config}
                          for key, plan in gemm._PLANS.items()]
    return made


def environment(device) -> dict:
    from .variants import environment as common_environment

    return {**common_environment(device), "tokens": TOKENS}


def _cell(row: Optional[dict], key: str) -> str:
    """A ratio, or why there is none: the first line of the variant's error."""
    if row is not None and row.get(key) is not None:
        return f"{row[key]:.3f}"
    if row is not None and row.get("error"):
        return "failed: " + first_line(row["error"], 120).replace("|", "\\|")
    return "failed"


def render_markdown(data: dict) -> str:
    env = data["environment"]
    v = env["versions"]
    lines = ["# LoRA linear kernel: fwd+bwd time / frozen base linear", "",
             f"- card: {env['device']}", f"- date: {env['date']}",
             f"- versions: torch {v['torch']}, triton {v['triton']}, python {v['python']}",
             f"- M = {env['tokens']} tokens, bf16 activations and weights; cells are time / base time "
             "(<= 1.10 is the target for ours at r=16)",
             f"- command: `python -m unsloth_compile.bench kernel {' '.join(data['argv'])}`", ""]
    variants = [w for w in data["variants"] if w != "base"]
    by_case: dict = {}
    for row in data["results"]:
        by_case.setdefault((row["layer"], row["r"]), {})[row["variant"]] = row
    for title, ms_key, ratio_key in (
            ("GPU time: fwd+bwd captured in a CUDA graph, replayed (no host code)", "gpu_ms", "gpu_ratio"),
            ("Eager wall time: fwd+bwd called from Python, host code included", "ms", "ratio")):
        lines += [f"## {title}", "",
                  "| layer | K | N | r | base ms | " + " | ".join(variants) + " |",
                  "|" + "---|" * (5 + len(variants))]
        for (layer, r), rows in by_case.items():
            base = rows.get("base", {})
            cells = [_cell(rows.get(w), ratio_key) for w in variants]
            lines.append(f"| {layer} | {base.get('K')} | {base.get('N')} | {r} | "
                         + (f"{base[ms_key]:.3f}" if ms_key in base else _cell(base, ms_key)) + " | "
                         + " | ".join(cells) + " |")
        lines.append("")
    if data.get("breakdown"):
        lines += ["", "## Breakdown of ours (fp32 adapters): each piece alone", "",
                  "GPU ms: 20 calls in one CUDA graph, per call (no launch gaps); eager ms: one call "
                  "timed alone by do_bench (launch and L2-flush write-back included, ~10 us more).", "",
                  "| layer | r | piece | GPU ms | eager ms |", "|---|---|---|---|---|"]
        for row in data["breakdown"]:
            if "ms" not in row:
                lines.append(f"| {row['layer']} | {row['r']} | {row['piece']} | "
                         f"failed: {first_line(row.get('error', ''), 120)} | |")
                continue
            gpu = f"{row['gpu_ms']:.4f}" if "gpu_ms" in row else "-"
            lines.append(f"| {row['layer']} | {row['r']} | {row['piece']} | {gpu} | {row['ms']:.4f} |")
    checks = [row for row in data["results"] if "rel_err_vs_reference" in row]
    if checks:
        lines += ["", "## Ours against impl=\"reference\" (relative error, norm)", "",
                  "| layer | r | variant | out | dx | dA | dB |", "|---|---|---|---|---|---|---|"]
        for row in checks:
            e = row["rel_err_vs_reference"]
            lines.append(f"| {row['layer']} | {row['r']} | {row['variant']} | "
                         + " | ".join(f"{e[k]:.2e}" for k in ("out", "dx", "dA", "dB")) + " |")
    if data.get("profile"):
        prof = data["profile"]
        lines += ["", f"## Host time per fwd+bwd step ({prof['layer']}, r={prof['r']})", "",
                  "| variant | enqueue ms/step | wall ms/step |", "|---|---|---|"]
        lines += [f"| {k} | {prof['host_ms'][k]:.3f} | {prof['wall_ms'][k]:.3f} |" for k in prof["host_ms"]]
    errors = [row for row in data["results"] if "error" in row]
    if errors:
        lines += ["", "## Failures", ""] + [f"- {e['layer']} r={e['r']} {e['variant']}: {e['error']}" for e in errors]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unsloth_compile.bench kernel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/bench", help="folder for kernel.json and kernel.md")
    parser.add_argument("--layers", nargs="*", default=DEFAULT_LAYERS, choices=list(LAYERS))
    parser.add_argument("--ranks", nargs="*", type=int, default=list(RANKS))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--tokens", type=int, default=TOKENS, help="M, rows of x")
    parser.add_argument("--breakdown-layers", nargs="*", default=DEFAULT_LAYERS, choices=list(LAYERS),
                        help="layers for the per-kernel breakdown (none: skip it)")
    parser.add_argument("--profile", action="store_true", help="host-overhead profile (llama-8b.attn.q, r=16)")
    args = parser.parse_args(list(argv or []))
    if not torch.cuda.is_available():
        print("bench kernel: needs a CUDA device (performance is only claimed from a GPU run)")
        return 1
    import unsloth_compile  # noqa: F401  registers torch.ops.unsloth.*

    device = torch.device("cuda")
    variants = ["base"] + [v for v in args.variants if v != "base"]
    data = {"environment": environment(device), "argv": list(argv or []), "variants": variants,
            "results": [], "breakdown": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write():  # after every case: a run cut short still leaves its results
        data["choices"] = choices_made()
        (out / "kernel.json").write_text(json.dumps(data, indent=2) + "\n")
        (out / "kernel.md").write_text(render_markdown(data))

    for layer in args.layers:
        for r in args.ranks:
            data["results"] += run_case(layer, args.tokens, r, variants, device)
            write()
    for layer in args.breakdown_layers:
        data["breakdown"] += breakdown(layer, args.tokens, 16, device)
        write()
    if args.profile:
        data["profile"] = profile_host("llama-8b.attn.q", args.tokens, 16, device)
        write()
    print(render_markdown(data))
    failed = [f"{row['layer']} r={row['r']} {row.get('variant') or row.get('piece')}: {first_line(row['error'])}"
              for row in data["results"] + data["breakdown"] if "error" in row]
    if failed:  # the table says which; the exit status tells a script that something did not run
        print(f"bench kernel: {len(failed)} failed:\n  " + "\n  ".join(failed))
        return 1
    return 0
