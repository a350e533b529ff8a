"""Real-task accuracy: LoRA fine-tune the pretrained MiniLM-L6 on Debian package sections under
each variant and several seeds; test macro-F1 and accuracy, mean and spread.

    python -m unsloth_compile.bench accuracy                       # defaults: 3 seeds
    python -m unsloth_compile.bench accuracy --steps 5 --seeds 1 --max-train 256   # CI

For a given seed every variant starts from the same weights (head, LoRA A) and sees the same
batches in the same order, so per-seed differences are the variant's doing. DESIGN.md's target:
every lossless option within 0.3 macro-F1 points of PEFT eager; lossy options report their drop.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from . import output, tasks
from .variants import (MemoryMeter, Variant, environment, resolve_device, resolve_inner, run_isolated,
                       select_variants)

TOLERANCE_POINTS = 0.3


def default_variants(inner: str, device: torch.device) -> list[Variant]:
    variants = [Variant("peft-eager", "eager", role="peft-eager"),
                Variant("peft+unsloth", "unsloth", {"inner": inner}, role="unsloth")]
    if device.type == "cuda":  # the Triton kernels vs the plain-torch reference ops, same graphs
        variants.append(Variant("unsloth-reference", "unsloth", {"inner": inner, "kernels": "reference"}))
    return variants


def run_one(variant: Variant, data: tasks.SectionsData, seed: int, args, device: torch.device,
            dtype: torch.dtype) -> dict:
    from ..report import collect_reports

    meter = MemoryMeter(device)
    model = tasks.build_lora_classifier(len(data.label_names), seed, device, dtype, rank=args.rank)
    if variant.options.get("fuse_cross_entropy") is True:  # as bench e2e: the variant asks for the fused head
        from ..training_outputs import loss_only

        loss_only(model)  # training returns no logits, so the CE pass fuses the classifier; evaluation still gets them
    start = time.perf_counter()
    with collect_reports() as report:
        trained = tasks.train_classifier(model, variant, data.train, args.steps, args.batch_size, args.lr, seed,
                                         device, memory=meter)
    train_s = time.perf_counter() - start
    step = trained.steady_step_time(warmup=min(3, args.steps - 1))
    result = {"seed": seed, "test": tasks.evaluate(model, data.test, device),
              "valid": tasks.evaluate(model, data.valid, device), "loss_final": trained.losses[-1],
              "losses": trained.losses, "train_s": train_s, "samples_per_s": args.batch_size / step,
              "peak_mem_bytes": meter.peak_bytes(), "mem_kind": meter.kind}
    if variant.kind == "unsloth":
        result["fusion"] = {"fused": len(report.fused), "refused": len(report.refused),
                            "refusal_reasons": dict(report.refusal_reasons())}
    return result


def _spread(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarise(variants: list[Variant], runs: list[dict]) -> list[dict]:
    """Per variant: spread of test macro-F1/accuracy over seeds and the difference to PEFT eager
    (of the means, and paired by seed), with the verdict against the 0.3-point tolerance."""
    def ok_runs(name: str) -> list[dict]:
        return [r for r in runs if r["variant"]["name"] == name and r["status"] == "ok"]

    base = next((v for v in variants if v.role == "peft-eager"), None)
    base_by_seed = {r["seed"]: r for r in ok_runs(base.name)} if base else {}
    summary = []
    for v in variants:
        mine = ok_runs(v.name)
        entry = {"variant": v.to_json(), "seeds_ok": len(mine),
                 "seeds_failed": sum(1 for r in runs if r["variant"]["name"] == v.name and r["status"] != "ok"),
                 "macro_f1": _spread([100 * r["test"]["macro_f1"] for r in mine]),
                 "accuracy": _spread([100 * r["test"]["accuracy"] for r in mine]),
                 "samples_per_s": _spread([r["samples_per_s"] for r in mine])}
        paired = [100 * (r["test"]["macro_f1"] - base_by_seed[r["seed"]]["test"]["macro_f1"])
                  for r in mine if r["seed"] in base_by_seed]
        entry["delta_f1_points"] = (entry["macro_f1"]["mean"] - 100 * statistics.fmean(
            [b["test"]["macro_f1"] for b in base_by_seed.values()])) if mine and base_by_seed else None
        entry["paired_delta_f1_points"] = _spread(paired)
        entry["verdict"] = _verdict(v, entry)
        summary.append(entry)
    return summary


def _verdict(v: Variant, entry: dict) -> str:
    if v.role == "peft-eager":
        return "baseline"
    if entry["seeds_ok"] == 0:
        return "failed"
    if entry["delta_f1_points"] is None:
        return "n/a: PEFT eager baseline failed"
    if v.lossy:
        return f"lossy: drop {-entry['delta_f1_points']:.2f} points (reported, no tolerance)"
    within = abs(entry["delta_f1_points"]) <= TOLERANCE_POINTS
    return f"{'met' if within else 'NOT met'}: |delta| <= {TOLERANCE_POINTS} points"


def render_markdown(data: dict) -> str:
    a = data["args"]
    lines = output.header_lines(f"accuracy: MiniLM-L6 + LoRA on Debian package sections, {data['env']['device']}",
                                data["env"])
    lines += [f"- data: train {data['sizes']['train']} / valid {data['sizes']['valid']} / test {data['sizes']['test']} "
              f"rows, {len(data['label_names'])} sections; max length {tasks.MAX_LENGTH}",
              f"- model: pretrained MiniLM-L6 from {data['model_path']}",
              f"- LoRA r={a['rank']} alpha={2 * a['rank']} on {', '.join(tasks.LORA_TARGETS)}, classifier trainable; "
              f"{a['steps']} steps of batch {a['batch_size']}, AdamW lr {a['lr']}, dtype {data['dtype']}; "
              f"seeds {data['seeds']}",
              "- test macro-F1 and accuracy in points: mean ± std over seeds [min, max]; delta = mean minus PEFT "
              "eager's mean; paired = per-seed difference, mean ± std", ""]

    def spread(s: dict) -> str:
        if s["mean"] is None:
            return "-"
        return f"{s['mean']:.2f} ± {s['std']:.2f} [{s['min']:.2f}, {s['max']:.2f}]"

    rows = []
    for e in data["summary"]:
        p = e["paired_delta_f1_points"]
        errors = sorted({output.first_line(r["error"]) for r in data["runs"] if r["variant"]["name"] == e["variant"]["name"]
                         and r["status"] != "ok"})
        rows.append([e["variant"]["name"], e["variant"]["description"], f"{e['seeds_ok']}/{e['seeds_ok'] + e['seeds_failed']}",
                     spread(e["macro_f1"]), spread(e["accuracy"]), output.fmt(e["delta_f1_points"], "+.2f"),
                     "-" if p["mean"] is None else f"{output.fmt(p['mean'], '+.2f')} ± {p['std']:.2f}",
                     output.fmt(e["samples_per_s"]["mean"], ",.0f"), e["verdict"], "; ".join(errors)])
    lines.append(output.markdown_table(
        ["variant", "what", "seeds ok", "test macro-F1", "test accuracy", "delta F1", "paired delta F1",
         "train samples/s", "verdict", "error"], rows))
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=600, help="training steps per run (default 600, ~2 epochs)")
    p.add_argument("--seeds", default="3", help="a count (3 -> seeds 0,1,2) or a comma list of seeds")
    p.add_argument("--max-train", type=int, help="use only the first N training rows (CI)")
    p.add_argument("--max-eval", type=int, help="evaluate on only the first N valid/test rows (CI)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="base weights; auto: bf16 on CUDA (adapters stay fp32, PEFT's default), fp32 on CPU")
    p.add_argument("--inner", default="auto", choices=["auto", "inductor", "aot_eager", "eager"],
                   help="the unsloth backend's inner compiler; auto: inductor on CUDA, aot_eager on CPU")
    p.add_argument("--variants", help="comma list of default variants to run (default: all)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KIND[:k=v,...]",
                   help="an extra variant, e.g. nofold=unsloth:fold_residual=false (repeatable)")
    p.add_argument("--data-dir", default=str(tasks.DATA_DIR))
    p.add_argument("--out", default="docs/bench", help="output folder (accuracy.json, accuracy.md)")


def parse_seeds(text: str) -> list[int]:
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    return list(range(int(text)))


def run(args) -> dict:
    device = resolve_device(args.device)
    inner = resolve_inner(args.inner, device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    seeds = parse_seeds(args.seeds)
    variants = select_variants(default_variants(inner, device), args.variants, args.variant, inner)
    floors = [v.name for v in variants if v.kind == "floor"]
    if floors:  # a speed yardstick (nothing but the norms trains), not a way to fine-tune
        raise SystemExit(f"accuracy: variant(s) {floors} of kind 'floor' train only the norms; "
                         "they are for bench e2e and bench profile")
    try:
        data = tasks.load_sections(tasks.load_tokenizer(), Path(args.data_dir))
    except tasks.ModelPackageMissing as error:
        raise SystemExit(f"accuracy: {error}") from None
    data.train = data.train.head(args.max_train)
    data.valid, data.test = data.valid.head(args.max_eval), data.test.head(args.max_eval)
    env = environment(device)
    result = {"bench": "accuracy", "env": env, "args": vars(args), "model_path": tasks.minilm_path(), "dtype": str(dtype), "inner": inner,
              "seeds": seeds, "label_names": data.label_names,
              "sizes": {k: len(getattr(data, k)) for k in ("train", "valid", "test")}, "runs": [], "summary": []}
    out = Path(args.out)
    print(f"accuracy on {env['device']}: {len(variants)} variants x {len(seeds)} seeds, {args.steps} steps each")
    for seed in seeds:
        for variant in variants:
            run = run_isolated(lambda: run_one(variant, data, seed, args, device, dtype), device)
            run.setdefault("seed", seed)
            run["variant"] = variant.to_json()
            result["runs"].append(run)
            line = (f"test macro-F1 {100 * run['test']['macro_f1']:.2f}, acc {100 * run['test']['accuracy']:.2f}, "
                    f"{run['samples_per_s']:,.0f} samples/s" if run["status"] == "ok" else f"FAILED: {run['error']}")
            print(f"  seed {seed} {variant.name:<20} {line}", flush=True)
            result["summary"] = summarise(variants, result["runs"])
            output.write_json(out / "accuracy.json", result)
            (out / "accuracy.md").write_text(render_markdown(result))
    print()
    print(render_markdown(result))
    print(f"wrote {out / 'accuracy.json'}, {out / 'accuracy.md'}")
    return result
