"""`python -m unsloth_compile.bench compress-bytes`: bytes saved for backward by one forward of a
small PEFT Llama under each `compress_activations` mode (CPU, `inner="aot_eager"`), counted from
autograd's saved tensors (each storage once), against the report's `compress_saved` counters.

    python -m unsloth_compile.bench compress-bytes      # CPU, about a minute; writes docs/bench/compress-saved-bytes.md

bf16 base, fp32 adapters (PEFT's default), LoRA on every linear, `lora_dropout` 0 and 0.1; the
`eager` rows are PEFT eager. This is a count of saved bytes, not a GPU peak-memory figure: the
llama-1b peak memory comes from `bench e2e --preset llama-1b --variant fp8c=...` on a GPU.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import time
from typing import Optional

import torch

MODES = ("none", "fp8", "int8", "lowrank")


def build(config: dict, rank: int, dropout: float) -> torch.nn.Module:
    import peft
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                                                       target_modules="all-linear", init_lora_weights=False))
    model.train()
    return model


def saved_bytes(fn) -> tuple[int, collections.Counter, torch.Tensor]:
    """(total bytes, bytes by dtype, fn's result) of what autograd saves while fn runs."""
    storages, dtypes = {}, collections.Counter()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in storages:
            storages[ptr] = t.untyped_storage().nbytes()
            dtypes[str(t.dtype).replace("torch.", "")] += storages[ptr]
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), dtypes, out


def measure(model: torch.nn.Module, mode: str, dropout: float, ids: torch.Tensor, lowrank_k: int) -> dict:
    """One row: `mode` is "eager" (PEFT eager) or a compress_activations mode under the backend."""
    from ..report import collect_reports

    torch._dynamo.reset()
    if mode == "eager":
        run = model
    else:
        run = torch.compile(model, backend="unsloth", options={
            "inner": "aot_eager", "compress_activations": mode, "compress_lowrank_k": lowrank_k, "summary": False})
    with collect_reports() as report:
        torch.manual_seed(1)
        run(input_ids=ids, labels=ids).loss.backward()  # compiles

    def forward():
        torch.manual_seed(1)
        return run(input_ids=ids, labels=ids).loss
    total, dtypes, loss = saved_bytes(forward)
    sites = [s for s in report.sites if s.pattern == "compress_saved"]
    return {"mode": mode, "dropout": dropout, "saved": total, "dtypes": dtypes, "loss": loss.item(),
            "counters": dict(report.counters), "sites": sites}


def report_drop(counters: dict) -> int:
    """The bytes compression took off the saved tensors by the report's count (its bytes_saved
    also counts the FFN products recomputed, which the `none` row has too)."""
    return counters.get("compress_saved.bytes_before", 0) - counters.get("compress_saved.bytes_after", 0)


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def table(rows: list[dict]) -> list[str]:
    base = {r["dropout"]: r["saved"] for r in rows if r["mode"] == "none"}
    lines = ["| lora_dropout | mode | saved for backward (MiB) | vs none | measured drop (MiB) | report: before - after (MiB) "
             "| sites compressed / refused | loss |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["counters"]
        ref = base.get(r["dropout"])
        compressed = r["mode"] not in ("eager", "none")
        ratio = f"{r['saved'] / ref:.3f}" if ref else "-"
        lines.append(f"| {r['dropout']} | {r['mode']} | {mib(r['saved'])} | {ratio} | "
                     f"{mib(ref - r['saved']) if compressed and ref else ''} | "
                     f"{mib(report_drop(c)) if compressed else ''} | "
                     f"{c.get('compress_saved.compressed', 0)} / {c.get('compress_saved.refused', 0)} | {r['loss']:.6f} |")
    return lines


def site_lines(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r["mode"] in ("eager", "none") or r["dropout"]:
            continue
        lines += ["", f"`{r['mode']}`, layer 0 (lora_dropout 0):", "",
                  "| module | decision | what |", "|---|---|---|"]
        for s in r["sites"]:
            if "layers.0." in s.module:
                lines.append(f"| `{s.module.split('model.model.')[-1]}` | {s.decision} | {s.reason} |")
    return lines


def render(rows: list[dict], config: dict, args: argparse.Namespace, argv: list[str]) -> str:
    import peft
    import transformers

    env = f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    command = " ".join(["python -m unsloth_compile.bench compress-bytes", *argv])
    text = ["# Bytes saved for backward with compress_activations (CPU count, not GPU memory)", "",
            f"`{command}` ({time.strftime('%Y-%m-%d')}, CPU, {env}).",
            f"Llama {config}, bf16 base, fp32 LoRA adapters (PEFT's default), r={args.rank} on every linear, "
            f"batch {args.batch} x {args.seq}; `inner=\"aot_eager\"`, lowrank k={args.lowrank_k}; `eager` is PEFT "
            "eager. Bytes are what autograd keeps between forward and backward (each storage once, counted by a "
            "saved-tensors hook on a second forward), not a peak: the GPU peak memory of the llama-1b preset is "
            "measured by the bench's e2e run.", ""]
    text += table(rows)
    dtypes = sorted({d for r in rows for d in r["dtypes"]})
    text += ["", "The measured drop equals the report's count, `compress_saved.bytes_before - .bytes_after` "
             "(`.bytes_saved` adds the FFN products recomputed, as in the `none` row). The loss of every mode equals the uncompressed "
             "compiled loss: the forward is unchanged. Saved bytes by dtype (MiB):", "",
             "| lora_dropout | mode | " + " | ".join(dtypes) + " |", "|---|---|" + "---|" * len(dtypes)]
    for r in rows:
        text.append(f"| {r['dropout']} | {r['mode']} | " + " | ".join(mib(r["dtypes"].get(d, 0)) for d in dtypes) + " |")
    text += site_lines(rows)
    return "\n".join(text) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(argv or [])
    parser = argparse.ArgumentParser(prog="python -m unsloth_compile.bench compress-bytes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/bench/compress-saved-bytes.md", help="markdown file to write")
    parser.add_argument("--modes", default="eager," + ",".join(MODES),
                        help="comma list of eager (PEFT eager) and compress_activations modes")
    parser.add_argument("--dropouts", default="0.0,0.1", help="comma list of lora_dropout values")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lowrank-k", type=int, default=128)
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in ("eager",) + MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; valid: eager, {', '.join(MODES)}")
    if "none" not in modes:
        parser.error("--modes must include none: the other rows are compared with it")
    if args.hidden_size % 64:
        parser.error(f"--hidden-size must be a multiple of 64 (8 heads of 8 or more), got {args.hidden_size}")
    import unsloth_compile  # noqa: F401  registers the backend

    config = dict(hidden_size=args.hidden_size, intermediate_size=3 * args.hidden_size, num_hidden_layers=args.layers,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=1024)
    ids = torch.randint(0, config["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    rows = []
    for dropout in (float(d) for d in args.dropouts.split(",")):
        for mode in modes:
            start = time.perf_counter()
            rows.append(measure(build(config, args.rank, dropout), mode, dropout, ids, args.lowrank_k))
            print(f"dropout {dropout} {mode:8s} saved {mib(rows[-1]['saved'])} MiB ({time.perf_counter() - start:.1f} s)")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows, config, args, argv))
    print(f"wrote {out}")
    return 0
