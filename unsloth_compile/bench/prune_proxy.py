"""`python -m unsloth_compile.bench prune-proxy`: the cheap proxy for a 2:4 pruning
configuration, before any fine-tuning (seconds to minutes on CPU, against ~10 minutes per seed
for `bench accuracy`): prune the bench's MiniLM-L6 + LoRA classifier (seed 0) on the seed's
first training batches, then report the mean calibration output error of the bases (masked ->
as written) and the relative error, against the dense model, of the final hidden states (real
tokens) and of the [CLS] vector on 16 held-out training batches (the last ones of the 300-step
order, never used for calibration).

    python -m unsloth_compile.bench prune-proxy --calibration 32 sparsegpt-ls,padding=ignore wanda-ls,sequential=model

A configuration is METHOD[-ls][,sequential=model|layer][,padding=ignore][,layers=REGEX], METHOD
one of unsloth_compile.sparsity.prune's methods (magnitude, wanda, sparsegpt).
"""

from __future__ import annotations

import argparse
import copy
import re
import time
from typing import Optional

import torch

from .. import sparsity
from . import tasks


def parse_configuration(text: str) -> tuple[str, dict, object]:
    """METHOD[-ls][,sequential=model|layer][,padding=ignore][,layers=REGEX] -> (method, prune kwargs, select)."""
    method, *options = text.split(",")
    options = dict(o.split("=", 1) for o in options)
    kwargs = {"reconstruct": method.endswith("-ls"), "ignore_padding": options.pop("padding", "include") == "ignore"}
    if options.get("sequential", "off") != "off":
        kwargs.update(sequential=True, target=options.pop("sequential"))
    options.pop("sequential", None)
    select = None
    if "layers" in options:
        pattern = re.compile(options.pop("layers"))

        def select(path, module):
            return path.endswith(".base_layer") and pattern.search(path) is not None
    if options:
        raise ValueError(f"{text}: unknown options {sorted(options)}; valid: sequential=model|layer, "
                         "padding=ignore, layers=REGEX")
    return method.removesuffix("-ls"), kwargs, select


def held_out_outputs(model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states of the real tokens, and the [CLS] vectors."""
    hidden, cls = [], []
    with torch.no_grad():
        for batch in batches:
            last = model(**batch, output_hidden_states=True).hidden_states[-1]
            hidden.append(last[batch["attention_mask"].bool()])
            cls.append(last[:, 0])
    return torch.cat(hidden), torch.cat(cls)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unsloth_compile.bench prune-proxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configurations", nargs="+", metavar="CONFIGURATION")
    p.add_argument("--calibration", type=int, default=8, help="calibration batches (the bench's default: 8)")
    p.add_argument("--held-out", type=int, default=16, help="held-out batches (the last of the 300-step order)")
    p.add_argument("--max-train", type=int, default=None, help="first N training rows only (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(list(argv or []))
    try:
        configurations = [(text, *parse_configuration(text)) for text in args.configurations]
    except ValueError as error:
        p.error(str(error))
    if args.calibration < 1 or args.held_out < 1:
        p.error(f"--calibration and --held-out must be >= 1 (got {args.calibration}, {args.held_out})")
    if args.calibration + args.held_out > 300:
        p.error(f"--calibration + --held-out must be at most the 300 batches of the order, got "
                f"{args.calibration + args.held_out}")
    data = tasks.load_sections(tasks.load_tokenizer())
    data.train = data.train.head(args.max_train)
    order = tasks.batch_order(len(data.train), 300, 32, args.seed)

    def batches(rows):
        return [{"input_ids": data.train.input_ids[i], "attention_mask": data.train.attention_mask[i]} for i in rows]
    calibration, held = batches(order[:args.calibration]), batches(order[-args.held_out:])
    dense = tasks.build_lora_classifier(len(data.label_names), args.seed, torch.device("cpu"), torch.float32).eval()
    want_hidden, want_cls = held_out_outputs(dense, held)
    for text, method, kwargs, select in configurations:
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = sparsity.prune(model, method, calibration=calibration, select=select, convert=False, **kwargs)
        seconds = time.perf_counter() - start
        hidden, cls = held_out_outputs(model, held)
        errors = list(report.output_error.values())
        calib = (f"{sum(e[0] for e in errors) / len(errors):.4f} -> {sum(e[1] for e in errors) / len(errors):.4f}"
                 if errors else "-")
        print(f"{text}: {len(report.energy)} bases, {args.calibration} calibration batches, {seconds:.0f} s; "
              f"calibration output error {calib}; held-out hidden error "
              f"{float((hidden - want_hidden).norm() / want_hidden.norm()):.4f}, "
              f"[CLS] error {float((cls - want_cls).norm() / want_cls.norm()):.4f}", flush=True)
    return 0
