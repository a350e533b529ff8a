"""The lines a user sees without configuring logging: that a model compiles, what the backend
fused, and how long the warm-up took.

    unsloth_compile: compiling PeftModelForCausalLM: the first step is slow while its graphs compile
    unsloth_compile: fused 14/14 LoRA linears (1 graph)
    unsloth_compile: warm-up done in 41.2 s (first step, compiles included): 3 graphs, fused 14/14 LoRA linears

The backend compiles graph by graph (graph breaks, recompiles; the backward graph is compiled
by AOTAutograd, not by us), so the line is written when a compiled graph brings sites that
were not summarised yet, with running totals over the graphs of the same model; a recompile of
the same sites (new shapes, a rank change, eval mode) says nothing. Where nothing was fused a
`UserWarning` gives the main reason. The full per-site table stays at INFO on the
`unsloth_compile` logger (option `report`); option `summary=False` silences this.

The warm-up lines go to the `unsloth_compile.warmup` logger: "compiling" at the first graph of a
model (and "compiling again" at each later compile: new input shapes, another code path),
"done" when the first graph compiled is called again (the second step: the first one's
forward and backward graphs are compiled by then), with the wall time between the two. At that
moment the LoRA layers the model holds (graph_breaks.lora_layers) are compared with the sites
the graphs brought: those no graph fused ran outside every compiled graph, and a `UserWarning`
names the graph breaks Dynamo recorded, where they happened and the way out. "Is the adapter
attached?" is asked only of a model that holds no LoRA layer.

A `SummaryLedger` holds the totals of one model: `unsloth_compile.compile(model)` gives each
model its own. Plain `torch.compile(model, backend="unsloth")` does not tell the backend which
model a graph belongs to, so its graphs share one process-wide ledger, restarted when the model
being run (graph_breaks.running_model: read from the Python stack) is another one, or when a
graph of new frozen weights has site paths already summarised (another model of the same
structure, a benchmark's second variant say).
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import time
import warnings
import weakref
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .graph_breaks import BreakLog, lora_layers, outside_message, ranked
from .report import Report, Site

PATTERN = "lora_linear"  # passes/lora/lora_linear.py's Site.pattern (not imported: backend loads passes lazily)
FRAGMENT = "<fragment after a graph break>"  # passes/lora/lora_leftovers.py's path of a LoRA layer split by a break

log = logging.getLogger("unsloth_compile.summary")
warmup_log = logging.getLogger("unsloth_compile.warmup")


class _StderrUnlessConfigured(logging.Handler):
    """Writes to stderr only when no other handler would get the record, i.e. logging was never
    configured: Python would otherwise drop an INFO record (its last-resort handler prints
    WARNING and above). With logging configured the record goes through the user's handlers
    alone (pytest's caplog included), so nothing is printed twice."""

    def emit(self, record: logging.LogRecord) -> None:
        logger: Optional[logging.Logger] = logging.getLogger(record.name)
        while logger is not None:
            if any(h is not self for h in logger.handlers):
                return
            logger = logger.parent if logger.propagate else None
        try:
            sys.stderr.write(self.format(record) + "\n")  # sys.stderr now, not at import: capsys sees it
        except Exception:
            self.handleError(record)


_handler = _StderrUnlessConfigured()
for _logger in (log, warmup_log):
    _logger.setLevel(logging.INFO)  # visible although the root logger's level is WARNING
    _logger.addHandler(_handler)


class SummaryLedger:
    """What has been summarised for one model: its LoRA sites by module path, how many graphs
    brought sites, and the frozen parameters of its graphs (weakly held). Other passes' sites
    (attention, ...) are left to the full report: the line says what the backend is for.
    Also the model itself (weakly, the traced module holding the most LoRA layers) and the
    warm-up: when it began, and the graphs compiled during it."""

    def __init__(self) -> None:
        self.breaks = BreakLog()  # from here on: breaks before a model's first graph count too
        self.clear()

    def clear(self) -> None:
        self.sites: dict[str, Site] = {}
        self.graphs = 0
        self.warned_empty = False
        self.frozen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.model: Optional[weakref.ref] = None
        self.n_lora = 0
        self.started: Optional[float] = None  # None: warm-up not begun
        self.compiled = 0  # graphs compiled during the warm-up
        self.pending = False  # warm-up under way: watched graphs report their calls
        self.entry: Optional[object] = None  # the first graph compiled: called again = next step
        self.recompiles = 0  # compiles that began after the warm-up

    # -------------------------------------------------------------- warm-up

    def begin_graph(self, root: Optional[torch.nn.Module]) -> Optional[str]:
        """Called before a graph is compiled, with the module Dynamo traced (or None). A
        message when this starts the model's warm-up."""
        model = self.model() if self.model is not None else None
        if root is not None and model is not None and not _related(root, model):
            self.clear()  # another model
            model = None
        if root is not None and (model is None or root is not model):
            n = len(lora_layers(root))
            if model is None or n > self.n_lora:
                self.model, self.n_lora = weakref.ref(root), n
        name = type(root).__name__ if root is not None else "the model"
        if self.started is not None:
            if self.pending:
                self.compiled += 1
                return None
            # After the warm-up: Dynamo compiles again for new input shapes (the first new length
            # makes the graph dynamic) or another code path; bounded by Dynamo's recompile_limit.
            self.recompiles += 1
            self.started, self.pending, self.compiled, self.entry = time.perf_counter(), True, 1, None
            return (f"unsloth_compile: compiling {name} again (compile {self.recompiles} after the warm-up: new "
                    f"input shapes or another code path): this step is slow (a line follows when it is done)")
        self.started, self.pending, self.compiled = time.perf_counter(), True, 1
        return (f"unsloth_compile: compiling {name}: the first step is slow while its graphs compile "
                f"(a line follows when it is done)")

    def watch(self, compiled: Callable) -> Callable:
        """`compiled` reporting its calls while the warm-up lasts."""
        if not self.pending:
            return compiled
        key = object()
        if self.entry is None:
            self.entry = key
        calls = [0]

        def run(*args):
            if self.pending and key is self.entry:
                calls[0] += 1
                if calls[0] == 2:
                    self.finish()
            return compiled(*args)

        if hasattr(compiled, "_boxed_call"):
            run._boxed_call = compiled._boxed_call
        return run

    def layer_count(self, fused_only: bool) -> int:
        """The model's LoRA layers that a compiled graph fused (`fused_only`) or looked at. A graph
        shared by blocks (a region of compile_regions="layers") names its sites by their paths
        inside one block (`self_attn.q_proj`) and decides that site for every block running it,
        so the layers are counted, not the sites; without the model, the sites."""
        sites = [p for p, s in self.sites.items() if s.decision == "fused" or not fused_only]
        model = self.model() if self.model is not None else None
        if model is None:
            return len(sites)
        return max(len(sites), sum(any(_same_module(p, f) for f in sites) for p in lora_layers(model)))

    def finish(self) -> None:
        """The warm-up is over: say how long it took, and warn about LoRA layers no graph fused."""
        self.pending = False
        seconds = time.perf_counter() - (self.started or time.perf_counter())
        fused = self.layer_count(fused_only=True)
        graphs = f"{self.compiled} graph{'s' if self.compiled != 1 else ''}"
        if self.recompiles:
            warmup_log.info("unsloth_compile: compile %d after the warm-up done in %.1f s: %s, fused %d/%d LoRA "
                            "linears", self.recompiles, seconds, graphs, fused, max(len(self.sites), self.n_lora))
            return
        warmup_log.info("unsloth_compile: warm-up done in %.1f s (first step, compiles included): %s, "
                        "fused %d/%d LoRA linears", seconds, graphs, fused, max(len(self.sites), self.n_lora))
        message = self.outside_warning()
        if message is not None:
            warnings.warn(message, UserWarning, stacklevel=_caller_stacklevel())

    def outside_warning(self) -> Optional[str]:
        """The warning for LoRA layers of the model that no compiled graph fused, or for a model
        without any LoRA linear; None when there is nothing to say."""
        model = self.model() if self.model is not None else None
        breaks = self.breaks.take()
        if model is None:
            if self.sites or self.warned_empty:
                return None
            self.warned_empty = True
            return _NO_LORA_IN_GRAPHS + (f" Graph breaks: {'; '.join(b.describe() for b in breaks[:3])}; "
                                         f"TORCH_LOGS=graph_breaks lists them" if breaks else "")
        layers = lora_layers(model)
        if not layers:
            return None  # said at the first graph (begin of note_graph)
        fused = [p for p, s in self.sites.items() if s.decision == "fused"]
        missing = [p for p in layers if not any(_same_module(p, f) for f in fused)]
        refused = [p for p in missing if any(_same_module(p, r) for r in self.sites)]
        outside = [p for p in missing if p not in refused]
        if not outside:
            return None  # every LoRA layer reached a graph; refusals are in the summary line
        if not breaks and self.sites:
            return None  # no graph break to blame: layers this step did not call (another modality, ...)
        self.warned_empty = True
        return outside_message(outside, len(layers), ranked(breaks, [layers[p] for p in outside]))

    # -------------------------------------------------------------- per graph

    def note_graph(self, report: Report, example_inputs: Sequence[Any]) -> Optional[tuple[int, str]]:
        """Record one compiled graph's report; (level, message) when there is something new to
        say, None otherwise."""
        frozen = [t for t in example_inputs if isinstance(t, torch.nn.Parameter) and not t.requires_grad]
        sites = {s.module: s for s in report.sites if s.pattern == PATTERN}
        model = self.model() if self.model is not None else None
        # a region graph of another block of the same model brings frozen weights not seen yet
        same_model = any(t in self.frozen for t in frozen) or (
            model is not None and bool(frozen) and _holds_any(model, frozen))
        if frozen and not same_model and sites.keys() & self.sites.keys():
            model, n_lora, warmup = self.model, self.n_lora, (self.started, self.pending, self.compiled, self.entry)
            self.clear()  # another model with the same module paths: its own totals
            self.model, self.n_lora = model, n_lora
            self.started, self.pending, self.compiled, self.entry = warmup
        for t in frozen:
            self.frozen[t] = True
        new = sites.keys() - self.sites.keys()
        self.sites.update(sites)
        if new:
            self.graphs += 1
            return self.message()
        # A graph without LoRA sites says nothing yet when the model holds LoRA layers (or is
        # unknown): they may come in a later graph, or have run outside every graph, which the
        # end of the warm-up tells (outside_warning).
        if not self.sites and not self.warned_empty and model is not None and self.n_lora == 0:
            self.warned_empty = True
            return logging.WARNING, (
                "unsloth_compile: no LoRA linear found in the compiled graph, nothing was fused: the "
                "backend rewrites LoRA linears (base(x) + scale * B(A(x)) with a frozen base weight), and "
                "the compiled model holds no module with lora_A and lora_B; is the adapter attached "
                "(peft.get_peft_model)? (option summary=False silences this)")
        return None

    def message(self) -> tuple[int, str]:
        fused, seen = self.layer_count(fused_only=True), self.layer_count(fused_only=False)
        graphs = f"{self.graphs} graph{'s' if self.graphs != 1 else ''}"
        head = f"unsloth_compile: fused {fused}/{seen} LoRA linears ({graphs})"
        refused = [s for s in self.sites.values() if s.decision != "fused"]
        if not refused:
            return logging.INFO, head
        reason, n = collections.Counter(s.reason for s in refused).most_common(1)[0]
        main = f"main reason ({n} of {len(refused)} refused): {reason}"
        # LoRA layers split by graph breaks are warned about at the end of the warm-up, with the breaks
        split_only = self.n_lora > 0 and all(s.module == FRAGMENT for s in refused)
        if fused == 0 and not split_only:
            return logging.WARNING, f"{head}; {main}. unsloth_compile.explain(model, **batch) lists every site"
        return logging.INFO, f"{head}; {main}"


_NO_LORA_IN_GRAPHS = (
    "unsloth_compile: no LoRA linear reached a compiled graph, nothing was fused (the traced code was not a "
    "module, so its LoRA layers could not be counted). unsloth_compile.explain(model, **batch) lists every "
    "site (option summary=False silences this).")


def _holds_any(model: torch.nn.Module, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether one of `tensors` is a parameter of `model`."""
    own = {id(p) for p in model.parameters()}
    return any(id(t) in own for t in tensors)


def _related(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """One module is (or holds) the other: frames of one model trace it and its submodules."""
    return a is b or any(m is a for m in b.modules()) or any(m is b for m in a.modules())


def _same_module(path: str, site: str) -> bool:
    """A site's path (relative to the traced frame's module) names the LoRA layer at `path`
    (relative to the model)."""
    return path == site or path.endswith("." + site)


_process_ledger = SummaryLedger()


def ledger_or_process(ledger: Optional[SummaryLedger]) -> SummaryLedger:
    return ledger if ledger is not None else _process_ledger


def begin(root: Optional[torch.nn.Module], ledger: Optional[SummaryLedger] = None) -> None:
    """Called by the backend before it compiles a graph, when option `summary` is on."""
    said = ledger_or_process(ledger).begin_graph(root)
    if said is not None:
        warmup_log.info("%s", said)


def summarize(report: Report, example_inputs: Sequence[Any], ledger: Optional[SummaryLedger] = None) -> None:
    """Called by the backend once per compiled graph when option `summary` is on."""
    said = ledger_or_process(ledger).note_graph(report, example_inputs)
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
