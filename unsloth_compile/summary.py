"""The one line a user sees without configuring logging: what the backend fused.

    unsloth_compile: fused 14/14 LoRA linears (1 graph)

The backend compiles graph by graph (graph breaks, recompiles; the backward graph is compiled
by AOTAutograd, not by us), so the line is written when a compiled graph brings sites that
were not summarised yet, with running totals over the graphs of the same model; a recompile of
the same sites (new shapes, a rank change, eval mode) says nothing. Where nothing was fused a
`UserWarning` gives the main reason. The full per-site table stays at INFO on the
`unsloth_compile` logger (option `report`); option `summary=False` silences this.

A `SummaryLedger` holds the totals of one model: `unsloth_compile.compile(model)` gives each
model its own. Plain `torch.compile(model, backend="unsloth")` cannot tell the backend which
model a graph belongs to, so its graphs share one process-wide ledger, restarted when a graph
of new frozen weights has site paths already summarised (another model of the same
structure, a benchmark's second variant say).
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import warnings
from typing import Any, Optional, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .report import Report, Site

PATTERN = "lora_linear"  # passes/lora_linear.py's Site.pattern (not imported: backend loads passes lazily)

log = logging.getLogger("unsloth_compile.summary")

class _StderrUnlessConfigured(logging.Handler):
    """Writes to stderr only when no other handler would get the record, i.e. logging was never
    configured: Python would otherwise drop an INFO record (its last-resort handler prints
    WARNING and above). With logging configured the record goes through the user's handlers
    alone (pytest's caplog included), so nothing is printed twice."""

    def emit(self, record: logging.LogRecord) -> None:
        logger: Optional[logging.Logger] = log
        while logger is not None:
            if any(h is not self for h in logger.handlers):
                return
            logger = logger.parent if logger.propagate else None
        try:
            sys.stderr.write(self.format(record) + "\n")  # sys.stderr now, not at import: capsys sees it
        except Exception:
            self.handleError(record)


log.setLevel(logging.INFO)  # visible although the root logger's level is WARNING
log.addHandler(_StderrUnlessConfigured())


class SummaryLedger:
    """What has been summarised for one model: its LoRA sites by module path, how many graphs
    brought sites, and the frozen parameters of its graphs (weakly held). Other passes' sites
    (attention, ...) are left to the full report: the line says what the backend is for."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.sites: dict[str, Site] = {}
        self.graphs = 0
        self.warned_empty = False
        self.frozen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def note_graph(self, report: Report, example_inputs: Sequence[Any]) -> Optional[tuple[int, str]]:
        """Record one compiled graph's report; (level, message) when there is something new to
        say, None otherwise."""
        frozen = [t for t in example_inputs if isinstance(t, torch.nn.Parameter) and not t.requires_grad]
        sites = {s.module: s for s in report.sites if s.pattern == PATTERN}
        same_model = any(t in self.frozen for t in frozen)
        if frozen and not same_model and sites.keys() & self.sites.keys():
            self.clear()  # another model with the same module paths: its own totals
        for t in frozen:
            self.frozen[t] = True
        new = sites.keys() - self.sites.keys()
        self.sites.update(sites)
        if new:
            self.graphs += 1
            return self.message()
        if not self.sites and not self.warned_empty:
            self.warned_empty = True
            return logging.WARNING, (
                "unsloth_compile: no LoRA linear found in the compiled graph, nothing was fused: the "
                "backend rewrites LoRA linears (base(x) + scale * B(A(x)) with a frozen base weight); "
                "is the adapter attached (peft.get_peft_model)? (option summary=False silences this)")
        return None

    def message(self) -> tuple[int, str]:
        fused = sum(s.decision == "fused" for s in self.sites.values())
        graphs = f"{self.graphs} graph{'s' if self.graphs != 1 else ''}"
        head = f"unsloth_compile: fused {fused}/{len(self.sites)} LoRA linears ({graphs})"
        refused = [s for s in self.sites.values() if s.decision != "fused"]
        if not refused:
            return logging.INFO, head
        reason, n = collections.Counter(s.reason for s in refused).most_common(1)[0]
        main = f"main reason ({n} of {len(refused)} refused): {reason}"
        if fused == 0:
            return logging.WARNING, f"{head}; {main}. unsloth_compile.explain(model, **batch) lists every site"
        return logging.INFO, f"{head}; {main}"


_process_ledger = SummaryLedger()


def summarize(report: Report, example_inputs: Sequence[Any], ledger: Optional[SummaryLedger] = None) -> None:
    """Called by the backend once per compiled graph when option `summary` is on."""
    said = (ledger if ledger is not None else _process_ledger).note_graph(report, example_inputs)
    if said is None:
        return
    level, message = said
    if level >= logging.WARNING:
        # warnings, not the logger: shown by default, filterable, and what tests and users catch
        warnings.warn(message, UserWarning, stacklevel=_caller_stacklevel())
    else:
        log.info("%s", message)


_OWN_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules[__package__]))


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside torch and this package: the line that called
    the compiled model (user code, or the model code a graph break returned to)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_OWN_DIRS):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2


def reset() -> None:
    """Forget what the process-wide ledger has summarised (tests; a fresh start)."""
    _process_ledger.clear()
