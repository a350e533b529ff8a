"""`unsloth_compile.explain(model, *args, **kwargs)`: compile once and return the report.

Its own module because it needs the backend, and the backend needs `report`: keeping it in
report.py made the two import each other.
"""

from __future__ import annotations

from typing import Any

import torch

from .backend import unsloth
from .config import CompressMode, Config
from .report import Report, collect_reports


def explain(model: torch.nn.Module, *args: Any, options: dict | None = None, verbose: bool = False,
            **kwargs: Any) -> Report:
    """Compile `model` with the unsloth backend on these inputs and return the report.

    Runs one forward pass (no backward) with the graph executed after our passes by AOTAutograd
    without Inductor (`inner="aot_eager"`), under a forked RNG so that dropout draws do not
    shift the caller's random stream. `options` are the backend's options (the one-line
    summary is off unless `summary=True`).

    aot_eager, not eager: what the backend does at AOTAutograd's forward/backward partition
    (the FFN products recomputed by default, compressed saves) happens only there, and a
    report without it would not be the report of a real compile. Plain eager only where
    nothing of that is on (`recompute_ffn_products=False`, no compression), or when asked.
    """
    options = dict(options or {})
    # the options as the backend would read them, with a partition: do they act there?
    partitioned = Config.from_options({**options, "inner": "aot_eager"})
    at_partition = partitioned.compress_activations is not CompressMode.NONE or partitioned.recomputes_ffn_products
    options.setdefault("inner", "aot_eager" if at_partition else "eager")
    options.setdefault("summary", False)  # the caller gets the whole report

    def backend(gm, example_inputs):
        return unsloth(gm, example_inputs, options=options)

    compiled = torch.compile(model, backend=backend)
    devices = [a.device for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"]
    with collect_reports() as report, torch.random.fork_rng(devices=devices):
        compiled(*args, **kwargs)
    if verbose:
        report.print()
    return report
