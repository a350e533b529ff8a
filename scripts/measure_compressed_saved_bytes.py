"""Bytes saved for backward by one forward of a small PEFT Llama under each compress_activations
mode (CPU, inner="aot_eager"): what autograd keeps between forward and backward, counted
from its saved tensors (each storage once), against the report's compress_saved counters.

    python scripts/measure_compressed_saved_bytes.py     # CPU, about a minute; writes docs/bench/compress-saved-bytes.md

bf16 base, fp32 adapters (PEFT's default), LoRA r=16 on every linear, lora_dropout 0 and 0.1.
This is a count of saved bytes on CPU, not a GPU peak-memory figure: the llama-1b peak memory
comes from `python -m unsloth_compile.bench e2e --preset llama-1b --variant fp8c=...` on a GPU.
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import time

import peft
import torch
import transformers

import unsloth_compile
from unsloth_compile.report import collect_reports

MODES = ("none", "fp8", "int8", "lowrank")
CONFIG = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=4, vocab_size=1024)
BATCH, SEQ, RANK, K = 2, 512, 16, 128


def build(dropout: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).to(torch.bfloat16)
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout,
                                                       target_modules="all-linear", init_lora_weights=False))
    model.train()
    return model


def saved_bytes(fn) -> tuple[int, collections.Counter, torch.Tensor]:
    storages, dtypes = {}, collections.Counter()

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        dtypes[str(t.dtype).replace("torch.", "")] += t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), dtypes, out


def measure(mode: str, dropout: float, ids: torch.Tensor) -> dict:
    torch._dynamo.reset()
    model = build(dropout)
    if mode == "eager":
        run = model
        report = None
    else:
        run = torch.compile(model, backend="unsloth", options={
            "inner": "aot_eager", "compress_activations": mode, "compress_lowrank_k": K, "summary": False})
    with collect_reports() as report:
        torch.manual_seed(1)
        run(input_ids=ids, labels=ids).loss.backward()  # compiles

    def forward():
        torch.manual_seed(1)
        return run(input_ids=ids, labels=ids).loss
    total, dtypes, loss = saved_bytes(forward)
    sites = [s for s in report.sites if s.pattern == "compress_saved"]
    return {"mode": mode, "dropout": dropout, "saved": total, "dtypes": dtypes, "loss": loss.item(),
            "counters": report.counters, "sites": sites}


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def table(rows: list[dict]) -> list[str]:
    base = {r["dropout"]: r["saved"] for r in rows if r["mode"] == "none"}
    lines = ["| lora_dropout | mode | saved for backward (MiB) | vs none | measured drop (MiB) | report's bytes_saved (MiB) "
             "| sites compressed / refused | loss |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["counters"]
        drop = base[r["dropout"]] - r["saved"]
        lines.append(f"| {r['dropout']} | {r['mode']} | {mib(r['saved'])} | {r['saved'] / base[r['dropout']]:.3f} | "
                     f"{mib(drop) if r['mode'] not in ('eager', 'none') else ''} | "
                     f"{mib(c.get('compress_saved.bytes_saved', 0)) if r['mode'] not in ('eager', 'none') else ''} | "
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/bench/compress-saved-bytes.md")
    args = parser.parse_args()
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    rows = []
    for dropout in (0.0, 0.1):
        for mode in ("eager",) + MODES:
            start = time.perf_counter()
            rows.append(measure(mode, dropout, ids))
            print(f"dropout {dropout} {mode:8s} saved {mib(rows[-1]['saved'])} MiB ({time.perf_counter() - start:.1f} s)")
    env = f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    text = ["# Bytes saved for backward with compress_activations (CPU count, not GPU memory)", "",
            f"`python scripts/measure_compressed_saved_bytes.py` ({time.strftime('%Y-%m-%d')}, CPU, {env}).",
            f"Llama {CONFIG}, bf16 base, fp32 LoRA adapters (PEFT's default), r={RANK} on every linear, "
            f"batch {BATCH} x {SEQ}; `inner=\"aot_eager\"`, lowrank k={K}. Bytes are what autograd keeps between "
            "forward and backward (each storage once, counted by a saved-tensors hook on a second forward), "
            "not a peak: the GPU peak memory of the llama-1b preset is measured by the bench's e2e run.", ""]
    text += table(rows)
    text += ["", "The measured drop equals the report's `compress_saved.bytes_saved` counter (asserted in "
             "tests/test_compress_saved.py on a smaller model). The loss of every mode equals the uncompressed "
             "compiled loss: the forward is unchanged. Saved bytes by dtype (MiB):", "",
             "| lora_dropout | mode | " + " | ".join(sorted({d for r in rows for d in r['dtypes']})) + " |",
             "|---|---|" + "---|" * len({d for r in rows for d in r['dtypes']})]
    dtypes = sorted({d for r in rows for d in r["dtypes"]})
    for r in rows:
        text.append(f"| {r['dropout']} | {r['mode']} | " + " | ".join(mib(r["dtypes"].get(d, 0)) for d in dtypes) + " |")
    text += site_lines(rows)
    text += ["", "## On a GPU (not run yet)", "",
             "Peak memory (allocated and reserved) and tokens/s of the llama-1b preset, in one run:", "",
             "```bash",
             "python -m unsloth_compile.bench e2e --preset llama-1b --variants peft-eager,peft+unsloth \\",
             "  --variant ce=unsloth:fuse_cross_entropy=true \\",
             "  --variant ce+fp8=unsloth:fuse_cross_entropy=true,compress_activations=fp8 \\",
             "  --variant ce+int8=unsloth:fuse_cross_entropy=true,compress_activations=int8 \\",
             "  --variant ce+lowrank=unsloth:fuse_cross_entropy=true,compress_activations=lowrank",
             "python -m pytest -q -m gpu tests/test_compress_saved.py",
             "```", "",
             "Accuracy of each lossy mode on the real task (MiniLM-L6, Debian sections, 3 seeds, macro-F1 against "
             "PEFT eager): `python -m unsloth_compile.bench accuracy --seeds 3 --variant "
             "fp8c=unsloth:compress_activations=fp8 --variant int8c=unsloth:compress_activations=int8 "
             "--variant lowrankc=unsloth:compress_activations=lowrank`."]
    pathlib.Path(args.out).write_text("\n".join(text) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
