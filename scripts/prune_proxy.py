"""The cheap proxy for a 2:4 pruning configuration, before any fine-tuning (seconds to minutes
on CPU, against ~10 minutes per seed for `bench accuracy`): prune the bench's MiniLM-L6 + LoRA
classifier (seed 0) on the seed's first training batches, then report the mean calibration
output error of the bases (masked -> as written) and the relative error, against the dense
model, of the final hidden states (real tokens) and of the [CLS] vector on 16 held-out
training batches (the last ones of the 300-step order, never used for calibration).

    python scripts/prune_proxy.py --calibration 32 sparsegpt-ls,padding=ignore wanda-ls,sequential=model

A configuration is METHOD[-ls][,sequential=model|layer][,padding=ignore][,layers=REGEX].
"""

from __future__ import annotations

import argparse
import copy
import re
import time

import torch

from unsloth_compile import sparsity
from unsloth_compile.bench import tasks


def parse_configuration(text: str) -> tuple[str, dict, object]:
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
        raise SystemExit(f"{text}: unknown options {sorted(options)}")
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configurations", nargs="+")
    p.add_argument("--calibration", type=int, default=8, help="calibration batches (the bench's default: 8)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    data = tasks.load_sections(tasks.load_tokenizer())
    order = tasks.batch_order(len(data.train), 300, 32, args.seed)

    def batches(rows):
        return [{"input_ids": data.train.input_ids[i], "attention_mask": data.train.attention_mask[i]} for i in rows]
    calibration, held = batches(order[:args.calibration]), batches(order[-16:])
    dense = tasks.build_lora_classifier(len(data.label_names), args.seed, torch.device("cpu"), torch.float32).eval()
    want_hidden, want_cls = held_out_outputs(dense, held)
    for text in args.configurations:
        method, kwargs, select = parse_configuration(text)
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


if __name__ == "__main__":
    main()
