"""The roofline of one training step, kernel family by kernel family: the time each family took
(bench/kernel_families.py sorts the kernels), the FLOPs and bytes its work needs by formula, what
that achieved, and how far it is from the card's roofline.

The work of one step of a Llama-shaped LoRA model, T = batch x seq tokens, e the bytes of an
activation (2 in bf16), p of an adapter weight (4: PEFT keeps them in fp32), for each of the
L layers unless said:

    linears            FLOPs 4 T K N per frozen linear (forward and input gradient: bench/flops.py);
                       bytes e (2 K N + 2 T K + 2 T N): X, W, Y forward; dY, W, dX backward
    lm_head            the same with K = d, N = V
    lora               FLOPs 6 r T (K + N) per adapted linear; bytes e T (2 K + N + 6 r) + 3 p r (K + N):
                       X for H = X A^T and again for dA, dY once for G and dB, H and G written and
                       read back; A and B read twice, their gradients written
    attention_forward  FLOPs 2 T S h d_h (causal half of QK^T and PV); bytes e T d_h (2 h + 2 h_kv)
                       + 4 T h: Q, K, V read, O written, the fp32 log-sum-exp written
    attention_backward FLOPs twice the forward (flash kernels also recompute QK^T: not counted);
                       bytes e T d_h (4 h + 4 h_kv) + 4 T h: Q, K, V, O, dO read, dQ, dK, dV written
    norms              2 L + 1 RMSNorms, bytes 5 e T d each: x read, y written; dy, x read, dx written
    rope               bytes 4 e T d_h (h + h_kv): q, k read and written forward, their gradients backward
    swiglu             bytes 8 e T I: gate, up read, h written; dh, gate, up read, dgate, dup written
    cross_entropy      bytes 3 e T V: the logits read forward, read again and their gradient written
    embedding          bytes 2 e T d: the gathered rows read and written
    optimizer          AdamW, bytes 7 x the trainable parameters' bytes: p, g, m, v read; p, m, v written

Each is the least traffic its work needs as separate kernels (each operand read once, each
result written once), so a family's roofline time is max(FLOPs / peak, bytes / bandwidth). The
elementwise families' FLOPs (a few per element) are not counted: they are bound by memory.
Casts, copies and the elementwise kernels not told apart have no formula: what they move
depends on the graph, so their row has a time and no roofline.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, Optional, Sequence

from pathlib import Path

from . import output
from .cards import Card, card_for
from .flops import DecoderShapes, flops_per_token, mfu, training_of
from .kernel_families import KERNEL_FAMILIES, OTHER, KernelFamily, kernel_family


@dataclasses.dataclass(frozen=True)
class Work:
    """What one kind of work needs in one step: FLOPs (None: not counted) and bytes."""

    flops: Optional[float]
    bytes: float


def step_work(shapes: DecoderShapes, batch: int, seq: int, lora_targets: Sequence[str], rank: int,
              optimizer_bytes: float, training: str = "lora", act_bytes: int = 2,
              adapter_bytes: int = 4) -> dict[str, Work]:
    """The module docstring's work items for one step; `optimizer_bytes` = 7 x the trainable
    parameters' bytes (`adamw_bytes`). `training` as bench/flops.py's (full fine-tuning adds
    the weight gradients' FLOPs and bytes to the linears and the head)."""
    t, e, p = batch * seq, act_bytes, adapter_bytes
    d, layers = shapes.hidden, shapes.layers
    h, kv, dh = shapes.heads, shapes.kv_heads, shapes.head_dim
    count = flops_per_token(shapes, seq, lora_targets, rank, training)
    projections = shapes.projections().values()
    full = training == "full"

    def gemm_bytes(k: int, n: int) -> float:  # forward and input gradient (+ the weight gradient)
        return e * (2 * k * n + 2 * t * k + 2 * t * n + (t * k + t * n + k * n if full else 0))

    layer_kn = sum(k * n for k, n in projections)
    weight_gradients = 2 * t * layer_kn * layers if full else 0  # the head's apart
    adapted = [(k, n) for name, (k, n) in shapes.projections().items() if name in lora_targets]
    lora_bytes = sum(e * t * (2 * k + n + 6 * rank) + 3 * p * rank * (k + n) for k, n in adapted) * layers
    attention_forward = 2 * t * seq * h * dh * layers
    return {
        "linears": Work(t * count.linears + weight_gradients, layers * sum(gemm_bytes(k, n) for k, n in projections)),
        "lm_head": Work(t * count.lm_head + (2 * t * d * shapes.vocab if full else 0), gemm_bytes(d, shapes.vocab)),
        "lora": Work(t * count.lora, lora_bytes if training == "lora" else 0.0),
        "attention_forward": Work(attention_forward, layers * (e * t * dh * (2 * h + 2 * kv) + 4 * t * h)),
        "attention_backward": Work(2 * attention_forward, layers * (e * t * dh * (4 * h + 4 * kv) + 4 * t * h)),
        "norms": Work(None, (2 * layers + 1) * 5 * e * t * d),
        "rope": Work(None, layers * 4 * e * t * dh * (h + kv)),
        "swiglu": Work(None, layers * 8 * e * t * shapes.intermediate),
        "cross_entropy": Work(None, 3 * e * t * shapes.vocab),
        "embedding": Work(None, 2 * e * t * d),
        "optimizer": Work(None, float(optimizer_bytes)),
    }


def adamw_bytes(parameters: Iterable) -> int:
    """7 x the bytes of the trainable parameters (AdamW: p, g, m, v read; p, m, v written)."""
    return 7 * sum(q.numel() * q.element_size() for q in parameters if q.requires_grad)


def _family_row(family: KernelFamily, us: float, calls: int, names: list, steps: int, seen_kernels: bool,
                work: dict[str, Work], card: Optional[Card]) -> dict:
    ms = us / 1e3 / steps if seen_kernels else None
    counted = [work[w] for w in family.work]
    flop_terms = [w.flops for w in counted if w.flops is not None]
    flops = sum(flop_terms) if flop_terms else None
    nbytes = sum(w.bytes for w in counted) if counted else None
    row = {"family": family.name, "work": list(family.work),
           "kernels_per_step": calls / steps if seen_kernels else None,
           "ms_per_step": ms, "gflop": flops and flops / 1e9, "gbytes": nbytes and nbytes / 1e9,
           "achieved_tflops": flops / (ms / 1e3) / 1e12 if flops and ms else None,
           "achieved_gbs": nbytes / (ms / 1e3) / 1e9 if nbytes and ms else None,
           "roofline_ms": None, "x_roofline": None, "gap_ms": None, "bound": None,
           "top_kernels": [name[:160] for name, _ in names]}
    if card is not None and (flops or nbytes):
        compute_s, memory_s = (flops or 0) / card.peak_flops, (nbytes or 0) / card.bandwidth_bytes
        row["roofline_ms"] = 1e3 * max(compute_s, memory_s)
        row["bound"] = "compute" if compute_s >= memory_s else "memory"
        if ms:
            row["x_roofline"] = ms / row["roofline_ms"]
            row["gap_ms"] = ms - row["roofline_ms"]
    return row


def roofline(events: Iterable[tuple[str, float]], steps: int, work: dict[str, Work], card: Optional[Card],
             idle_ms: Optional[float] = None, top: int = 3) -> dict:
    """The table from (kernel name, duration us) events over `steps` steps: one row per kernel
    family (every family, in a fixed order, whether or not a kernel matched it), then GPU idle.
    Without any event (a CPU run) the rows keep their formulas and have no time."""
    us, calls = collections.Counter(), collections.Counter()
    by_name: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for name, duration in events:
        family = kernel_family(name).name
        us[family] += duration
        calls[family] += 1
        by_name[family][name] += duration
    seen = bool(calls)
    rows = [_family_row(f, us[f.name], calls[f.name], by_name[f.name].most_common(top), steps, seen, work, card)
            for f in (*KERNEL_FAMILIES, OTHER)]
    rows.append({**dict.fromkeys(rows[0]), "family": "GPU idle", "work": [], "top_kernels": [],
                 "ms_per_step": idle_ms if seen else None})
    gpu_ms = sum(r["ms_per_step"] for r in rows[:-1]) if seen else None
    for r in rows:  # of the kernels' time: GPU idle is not a share of it
        r["share"] = r["ms_per_step"] / gpu_ms if gpu_ms and r["family"] != "GPU idle" else None
    bounded = [r["roofline_ms"] for r in rows if r.get("roofline_ms") is not None]
    return {"rows": rows, "steps": steps, "card": card and card.to_json(),
            "gpu_ms": gpu_ms, "roofline_ms": sum(bounded) if bounded else None}


def step_roofline(preset, variant_kind: str, model, act_dtype, kernels: Sequence[tuple[str, float, float]],
                  steps: int, wall_ms: float, idle_ms: Optional[float], device_name: str) -> dict:
    """A profiled variant's roofline (`preset`: a `bench e2e` Preset of a causal LM; `kernels`:
    (name, start us, end us) over `steps` steps), its work items, and its MFU over the wall time."""
    shapes = DecoderShapes.from_config(preset.config)
    training = training_of(variant_kind)
    adapters = [q for name, q in model.named_parameters() if q.requires_grad and "lora_" in name]
    work = step_work(shapes, preset.batch, preset.seq, preset.lora_targets, preset.rank,
                     adamw_bytes(model.parameters()), training, act_bytes=act_dtype.itemsize,
                     adapter_bytes=adapters[0].element_size() if adapters else 4)
    card = card_for(device_name)
    table = roofline(((name, end - start) for name, start, end in kernels), steps, work, card, idle_ms)
    count = flops_per_token(shapes, preset.seq, preset.lora_targets, preset.rank, training)
    tokens_per_s = preset.batch * preset.seq / (wall_ms / 1e3) if wall_ms else None
    return {"roofline": table, "work": {k: dataclasses.asdict(w) for k, w in work.items()},
            **mfu(count.total, tokens_per_s, card)}


def write_roofline(profile_data: dict, preset, stem: Path) -> list[str]:
    """The roofline JSON and markdown of a `bench profile` run (`profile_data`: its data, whose
    results carry `step_roofline`'s fields), written as stem.json and stem.md."""
    keys = ("variant", "status", "error", "wall_ms", "roofline", "work", "flops_per_token", "achieved_tflops", "mfu",
            "mfu_note")
    card = card_for(profile_data["env"]["device"])
    data = {"bench": "roofline", "preset": preset.name, "batch": preset.batch, "seq": preset.seq,
            "dtype": profile_data["dtype"], "steps": profile_data["steps"], "warmup": profile_data["warmup"],
            "env": profile_data["env"], "card": card and card.to_json(),
            "results": [{k: r[k] for k in keys if k in r} for r in profile_data["results"]]}
    output.write_json(stem.with_suffix(".json"), data)
    stem.with_suffix(".md").write_text(render_markdown(data))
    return [str(stem.with_suffix(".json")), str(stem.with_suffix(".md"))]


def family_descriptions() -> list[list[str]]:
    """(family, what it matches, the work it is measured against) for the page under the tables."""
    return [[f.name, f.matches, ", ".join(f.work) or "no formula"] for f in (*KERNEL_FAMILIES, OTHER)]


_HEADERS = ["family", "kernels/step", "ms/step", "share of kernel time", "GFLOP", "GB", "TFLOPS", "GB/s",
            "roofline ms", "x roofline", "gap ms", "bound"]


def _num(value: Optional[float]) -> str:
    """A figure to three significant digits, thousands grouped (GFLOP and GB span 1e-4 to 1e5)."""
    if value is None:
        return "-"
    return output.fmt(value, ",.0f") if abs(value) >= 100 else output.fmt(value, ".3g")


def table_rows(table: dict) -> list[list[str]]:
    return [[r["family"], output.fmt(r.get("kernels_per_step"), ".0f"), output.fmt(r["ms_per_step"], ".2f"),
             output.fmt(r.get("share") and 100 * r["share"], ".1f", "%"), _num(r.get("gflop")), _num(r.get("gbytes")),
             _num(r.get("achieved_tflops")), _num(r.get("achieved_gbs")), output.fmt(r.get("roofline_ms"), ".2f"),
             output.fmt(r.get("x_roofline"), ".2f", "x"), output.fmt(r.get("gap_ms"), ".2f"), r.get("bound") or "-"]
            for r in table["rows"]]


def render_markdown(data: dict) -> str:
    """The roofline page of a `bench profile` run (`data`: the run's roofline JSON)."""
    card = data["card"]
    lines = output.header_lines(f"roofline: {data['preset']} on {data['env']['device']}", data["env"])
    lines += [f"- {data['steps']} profiled steps after {data['warmup']} warm-up steps; per-step means; "
              f"batch {data['batch']} x {data['seq']}, dtype {data['dtype']}",
              "- " + (f"roofline: {card['name']}, {card['bf16_tflops']:g} TFLOPS dense bf16, "
                      f"{card['bandwidth_tbs']:g} TB/s; a family's roofline time is max(FLOPs / peak, bytes / "
                      "bandwidth), its distance the measured time over it (x roofline) and the time above it (gap)"
                      if card else "roofline: n/a (no known peak for this device); the formulas' FLOPs and bytes "
                                   "are given alone"),
              "- FLOPs and bytes by formula from the model's shapes and the batch (bench/roofline.py; "
              "docs/benchmarks.md#how-mfu-is-counted), not measured", ""]
    for r in data["results"]:
        name = r["variant"]["name"]
        if r["status"] != "ok":
            lines += [f"## {name}: FAILED: {output.first_line(r.get('error', ''))}", ""]
            continue
        table = r["roofline"]
        lines += [f"## {name}", "", output.markdown_table(_HEADERS, table_rows(table)), ""]
        summary = [f"step wall {r['wall_ms']:.1f} ms"]
        if table["gpu_ms"] is not None:
            summary.append(f"kernels {table['gpu_ms']:.1f} ms")
        if table["roofline_ms"] is not None:
            summary.append(f"the families with a formula at their roofline: {table['roofline_ms']:.1f} ms")
        if r.get("achieved_tflops") is not None:
            summary.append(f"{r['achieved_tflops']:.0f} TFLOPS by the LoRA FLOP count over the wall time"
                           + (f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""))
        lines += ["- " + "; ".join(summary), ""]
    lines += ["## Families", "", output.markdown_table(["family", "kernels", "measured against"],
                                                          family_descriptions())]
    return "\n".join(lines) + "\n"
