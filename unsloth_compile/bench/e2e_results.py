"""`bench e2e`'s results: ratios to PEFT eager, each preset's thresholds checked on them (kept in
the JSON), the markdown table (one shape for full fixed-length rows, one for length distributions
and packed batches) and the files written (JSON, markdown, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from . import output
from .cards import card_for


def by_role(results: list[dict], role: str) -> Optional[dict]:
    for r in results:
        if r["variant"]["role"] == role and r["status"] == "ok":
            return r
    return None


def add_ratios(results: list[dict]) -> None:
    base = by_role(results, "peft-eager")
    for r in results:
        ok = base is not None and r["status"] == "ok"
        r["throughput_vs_peft_eager"] = r["throughput"] / base["throughput"] if ok else None
        # wall times compare only where the work is the same: as many real tokens in as many steps
        same_work = ok and (r["real_tokens_total"], r["steps_run"]) == (base["real_tokens_total"], base["steps_run"])
        r["wall_vs_peft_eager"] = r["wall_s_all_steps"] / base["wall_s_all_steps"] if same_work else None
        # step by step where every step had the same batch size: the slowest after the warm-up
        same_steps = ok and r["real_tokens_per_step"] == base["real_tokens_per_step"]
        r["worst_step_vs_peft_eager"] = max(
            (a / b for a, b in zip(r["step_times_s"], base["step_times_s"])), default=None) if same_steps else None
        # CPU RSS deltas are sampled and allocator-dependent: no ratio is drawn from them
        mem_ok = ok and r["mem_kind"] == "cuda_max_allocated" and r["peak_mem_bytes"] and base["peak_mem_bytes"]
        r["peak_mem_vs_peft_eager"] = r["peak_mem_bytes"] / base["peak_mem_bytes"] if mem_ok else None


def check_targets(preset, results: list[dict], device) -> list[dict]:
    """Each of `preset.targets` measured on this run's results (a `Preset` of e2e.py)."""
    checks = []
    for t in preset.targets:
        num, den = by_role(results, t.variant), by_role(results, t.baseline)
        entry = {"target": t.description, "required": f"{t.op} {t.threshold:.3g}", "measured": None,
                 "variant": num and num["variant"]["name"], "baseline": den and den["variant"]["name"]}
        if num is None or den is None:
            entry["verdict"] = "n/a: a variant it needs failed or was not run"
        elif t.metric == "peak_mem" and device.type != "cuda":
            entry["verdict"] = "n/a: CPU RSS is not a peak-memory measurement"
        elif t.metric == "worst_step" and num["worst_step_vs_peft_eager"] is None:
            entry["verdict"] = "n/a: the variants' steps did not see batches of the same sizes"
        else:
            if t.metric == "worst_step":  # a ratio already, taken step by step against PEFT eager
                entry["measured"] = num["worst_step_vs_peft_eager"]
            else:
                key = {"throughput": "throughput", "peak_mem": "peak_mem_bytes", "wall": "wall_s_all_steps"}[t.metric]
                entry["measured"] = num[key] / den[key]
            met = entry["measured"] >= t.threshold if t.op == ">=" else entry["measured"] <= t.threshold
            entry["verdict"] = "met" if met else "NOT met"
            if device.type != "cuda":
                entry["verdict"] += " (CPU run: not a claim)"
        checks.append(entry)
    return checks


def _floor_lines(results: list[dict]) -> list[str]:
    """With a `floor` variant in the run: each LoRA variant's step time above it, i.e. what
    the adapters cost on top of the frozen model's own forward and dX backward."""
    floor = next((r for r in results if r["variant"]["kind"] == "floor" and r["status"] == "ok"), None)
    if floor is None:
        return []
    rows = [[r["variant"]["name"], output.fmt(1e3 * r["step_time_s"], ".1f"),
             output.fmt(1e3 * (r["step_time_s"] - floor["step_time_s"]), ".1f"),
             output.fmt(r["step_time_s"] / floor["step_time_s"], ".2f", "x")]
            for r in results if r["status"] == "ok" and r["variant"]["kind"] not in ("floor", "full")]
    return ["", f"## Above the floor ({floor['variant']['name']}: {1e3 * floor['step_time_s']:.1f} ms, the frozen "
            "model's forward and dX backward with no adapter, norms trained)", "",
            output.markdown_table(["variant", "step ms", "ms above the floor", "x the floor"], rows)]


def _compiles(r: dict) -> str:
    c = r.get("compiles")
    if not c:
        return "-"
    return f"{c['dynamo_graphs']}" + ("" if c["backend_graphs"] is None else f" / {c['backend_graphs']}")


def _fusion(r: dict) -> str:
    fusion = r.get("fusion")
    return f"{fusion['fused']}/{fusion['refused']}" if fusion else "-"


def _error(r: dict) -> str:
    return "" if r["status"] == "ok" else output.first_line(r.get("error", ""))


def _gib(value: Optional[int]) -> str:
    return output.fmt(value and value / 2**30, ".2f")


def _fixed_table(data: dict, mem_label: str) -> list[str]:
    unit = data["unit"]
    lines = [f"- {data['warmup']} warm-up steps (compilation included, not timed), median of {data['steps']} "
             f"timed steps, each synchronised (the ratios are taken on these); then the same number of steps "
             f"without a per-step synchronise (\"pipelined\": total / steps, the host running ahead); "
             f"loss after {data['warmup'] + 2 * data['steps']} steps; {_COMPILES_NOTE}", ""]
    rows = [[r["variant"]["name"], r["variant"]["description"], r["status"],
             output.fmt(r.get("step_time_s") and 1e3 * r["step_time_s"], ".1f"),
             output.fmt(r.get("throughput"), ",.0f"), output.fmt(r.get("throughput_vs_peft_eager"), ".2f", "x"),
             output.fmt(r.get("pipelined_step_time_s") and 1e3 * r["pipelined_step_time_s"], ".1f"),
             _gib(r.get("peak_mem_bytes")), output.fmt(r.get("peak_mem_vs_peft_eager"), ".2f", "x"),
             _gib(r.get("peak_reserved_bytes")), output.fmt(r.get("loss_final"), ".4f"),
             output.fmt(r.get("warmup_s"), ".1f"), output.fmt(r.get("wall_s_all_steps"), ".1f"), _compiles(r),
             _fusion(r), _error(r)] for r in data["results"]]
    headers = ["variant", "what", "status", "step ms (median)", unit, f"{unit} vs PEFT eager", "pipelined ms/step",
               mem_label, "mem vs PEFT eager", "peak reserved GiB", "final loss", "warm-up s", "synchronised steps s",
               "compiles", "fused/refused sites", "error"]
    if any("flops_per_token" in r for r in data["results"]):  # causal LM presets: after the throughput ratio
        headers[6:6] = ["TFLOPS (LoRA count)", "MFU"]
        for row, r in zip(rows, data["results"]):
            row[6:6] = mfu_cells(r)
    lines.append(output.markdown_table(headers, rows))
    lines += mfu_lines(data)
    return lines


def mfu_cells(r: dict) -> list[str]:
    """The achieved TFLOPS and MFU cells of one result; MFU "n/a" where the card's peak is unknown."""
    tflops = r.get("achieved_tflops")
    if r.get("flops_per_token") is None or tflops is None:
        return ["-", "-" if r["status"] != "ok" else "n/a"]
    mfu = r.get("mfu")
    return [output.fmt(tflops, ".1f" if tflops >= 10 else ".3g"),
            "n/a" if mfu is None else output.fmt(100 * mfu, ".1f", "%")]


def mfu_lines(data: dict) -> list[str]:
    """What the MFU column divides by: the FLOP count per token of each kind of training in the
    table, and the card's peak (or why there is none)."""
    counts = {}
    for r in data["results"]:
        if r.get("flops_per_token") is not None:
            counts.setdefault(r["flops_per_token"], []).append(r["variant"]["name"])
    if not counts:
        return []
    card = card_for(data["env"]["device"])
    peak = (f"MFU = achieved / {card.name}'s dense bf16 peak, {card.bf16_tflops:g} TFLOPS" if card is not None
            else "MFU n/a: no known bf16 peak for this device")
    per_token = "; ".join(f"{flops / 1e9:.4g} GFLOP/token ({', '.join(names)})" for flops, names in counts.items())
    return ["", f"- TFLOPS: FLOPs per token x {data['unit']}, the FLOPs counted as "
                f"docs/benchmarks.md#how-mfu-is-counted says (frozen linears' forward and input gradient, LM head, "
                f"LoRA adapters, causal attention): {per_token}; {peak}"]


_COMPILES_NOTE = ("compiles: graphs Dynamo handed to a backend (each frame, recompiles and graph-break pieces "
                  "included) / graphs the unsloth backend compiled")


def _real_data_table(data: dict, mem_label: str) -> list[str]:
    preset, n = data["preset"], data["warmup"] + data["steps"]
    lines = [f"- lengths `{data['lengths']}`: {data['lengths_description']}",
             f"- padded: {preset['batch']} sequences per batch, right-padded to the batch's longest, attention_mask, "
             f"labels -100 on pads; packed: the same stream of sequences placed first-fit into rows of at most "
             f"{preset['seq']} tokens, {preset['batch']} rows per batch flattened by transformers' "
             f"DataCollatorWithFlattening (position_ids restarting at each sequence, labels -100 at its first "
             f"token, no attention mask)",
             f"- {n} synchronised steps per variant, all in the wall time (compiles included); steady state: the "
             f"last {data['steps']} (after {data['warmup']}): their real (non-pad) tokens / their time, and their "
             f"median step time; the slowest of those steps over PEFT eager's on the same batch; no pipelined "
             f"pass (every batch has its own shape); {_COMPILES_NOTE}", ""]
    rows = [[r["variant"]["name"], r["variant"]["description"], r["status"],
             output.fmt(r.get("steady_real_tokens_per_s"), ",.0f"),
             output.fmt(r.get("throughput_vs_peft_eager"), ".2f", "x"),
             output.fmt(r.get("steady_step_time_s") and 1e3 * r["steady_step_time_s"], ".1f"),
             output.fmt(r.get("worst_step_vs_peft_eager"), ".2f", "x"),
             output.fmt(r.get("wall_s_all_steps"), ".2f"), output.fmt(r.get("wall_vs_peft_eager"), ".2f", "x"),
             output.fmt(r.get("real_tokens_total"), ",d"), _compiles(r), _gib(r.get("peak_mem_bytes")),
             output.fmt(r.get("peak_mem_vs_peft_eager"), ".2f", "x"), output.fmt(r.get("loss_final"), ".4f"),
             _fusion(r), _error(r)] for r in data["results"]]
    lines.append(output.markdown_table(
        ["variant", "what", "status", "real tokens/s (steady)", "vs PEFT eager (padded)", "steady ms/step (median)",
         "slowest steady step vs PEFT eager's", f"wall s, {n} steps", "wall vs PEFT eager", "real tokens", "compiles", mem_label, "mem vs PEFT eager",
         "final loss", "fused/refused sites", "error"], rows))
    return lines


_MASK_WORDS = {True: "yes (all ones)", False: "no", "padding": "yes (padding: each row keeps its first half to all "
                                                          "of its tokens)"}


def render_markdown(data: dict) -> str:
    preset = data["preset"]
    mem_label = {"cuda_max_allocated": "peak mem GiB (CUDA max allocated)",
                 "cpu_rss_delta_sampled": "RSS delta GiB (CPU, sampled, not peak)"}[data["mem_kind"]]
    lines = output.header_lines(f"e2e: {data.get('name', preset['name'])} on {data['env']['device']}", data["env"])
    lines += [f"- model: {preset['note']}; {preset['family']} {preset['config']}",
              f"- batch {preset['batch']} x {preset['seq']}, dtype {data['dtype']}, LoRA r={preset['rank']} "
              f"alpha={preset['alpha']} on {', '.join(preset['lora_targets'])}; AdamW "
              f"({'fused' if data['env']['device_type'] == 'cuda' else 'foreach'})",
              *([f"- attention_mask in the batch: {_MASK_WORDS[data['attention_mask']]}"
                 + (f" (batch spelling: {data['spelling']})" if data.get("spelling") else "")]
                if data.get("attention_mask") is not None else [])]
    if data.get("peak_mem_over"):  # results written before the peaks left the preparation out lack it
        lines.append(f"- peak memory: measured over {data['peak_mem_over']}")
    lines += (_real_data_table if data.get("real_data") else _fixed_table)(data, mem_label)
    lines += _floor_lines(data["results"])
    return "\n".join(lines) + "\n"


def write_outputs(data: dict, out: Path) -> dict:
    stem = out / f"e2e-{data.get('name', data['preset']['name'])}"
    output.write_json(stem.with_suffix(".json"), data)
    stem.with_suffix(".md").write_text(render_markdown(data))
    results = data["results"]
    gib = [r.get("peak_mem_bytes") and r["peak_mem_bytes"] / 2**30 for r in results]
    mem_label = "peak GiB (CUDA)" if data["mem_kind"] == "cuda_max_allocated" else "RSS delta GiB (CPU, not peak)"
    output.bar_chart(stem.with_suffix(".png"), f"{data['preset']['name']} on {data['env']['device']}, {data['env']['date']}",
                     [r["variant"]["name"] for r in results],
                     [(data["unit"], [r.get("throughput") for r in results]), (mem_label, gib)],
                     [r["status"] != "ok" for r in results])
    return {k: str(stem.with_suffix(k)) for k in (".json", ".md", ".png")}
