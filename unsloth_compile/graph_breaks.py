"""LoRA layers that ran outside every compiled graph, and the graph breaks that put them there.

The backend only sees the graphs Dynamo hands it. A LoRA layer in a frame Dynamo gave up on
(a graph break inside a checkpointed layer, a loop, a context manager) runs eagerly and never
reaches a graph; one split by a graph break reaches two graphs in pieces that are not a LoRA
pattern. Either way it is not fused, and only the model says it was there. So the summary
compares the LoRA layers the model holds (`lora_layers`) with the sites its graphs brought,
and names the graph breaks Dynamo recorded meanwhile (`BreakLog`: Dynamo's list of graph-break
reasons, each with the user stack where it happened, kept for `torch._dynamo.explain`).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from typing import Iterable, Optional

import torch

_SHOWN = 3  # breaks named in a message


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules holding both a `lora_A` and a `lora_B` (PEFT's LoRA layers, hand-written LoRA),
    by path; nothing below such a module is looked at."""
    found: dict[str, torch.nn.Module] = {}
    inside: Optional[str] = None  # named_modules walks depth first: a layer's modules follow it
    for path, module in model.named_modules(remove_duplicate=True):
        if inside is not None and (inside == "" or path.startswith(inside + ".")):
            continue
        if hasattr(module, "lora_A") and hasattr(module, "lora_B"):
            found[path] = module
            inside = path
    return found


def traced_module() -> Optional[torch.nn.Module]:
    """The module whose method Dynamo is compiling (`self` of the traced frame), when the
    backend runs inside a Dynamo compile; None elsewhere or when Dynamo's layout differs."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        candidate = tx.f_locals.get("self")
    except Exception:  # not inside Dynamo, or another torch version's internals
        return None
    return candidate if isinstance(candidate, torch.nn.Module) else None


def running_model() -> Optional[torch.nn.Module]:
    """The model being run while a graph compiles: of the traced frame's module and the
    outermost module whose method is on the Python stack (a graph break may leave the compiled
    frame deep inside the model: an embedding's forward, a decoder layer), the one holding the
    most LoRA layers; None when neither is a module."""
    outermost = None
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(candidate, torch.nn.Module):
            outermost = getattr(candidate, "_orig_mod", candidate)  # torch.compile's wrapper: the model in it
        frame = frame.f_back
    candidates = [m for m in (traced_module(), outermost) if m is not None]
    if not candidates:
        return None
    return max(candidates, key=lambda m: len(lora_layers(m)))


@dataclasses.dataclass(frozen=True)
class GraphBreak:
    reason: str  # Dynamo's first line ("HOP: Unsafe side effect")
    location: str  # file:line where tracing stopped
    hint: str  # Dynamo's first hint, "" if none
    stack_files: tuple[str, ...]  # files of the user stack, outermost first

    @property
    def in_higher_order_op(self) -> bool:
        """A break inside a checkpointed region (or another higher-order op): Dynamo then runs
        the whole region, every LoRA layer in it included, eagerly."""
        return self.reason.startswith("HOP") or "higher order" in self.reason.lower()

    def describe(self) -> str:
        return f"'{self.reason}' at {self.location}"


def _short(path: str) -> str:
    """A path without the site-packages / working directory prefix."""
    marker = f"site-packages{os.sep}"
    if marker in path:
        return path.split(marker, 1)[1]
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return path
    return relative if not relative.startswith("..") else path


def _from_dynamo(record) -> GraphBreak:
    lines = [line.strip() for line in str(record.reason).splitlines() if line.strip()]
    hint = next((line[len("Hint:"):].strip() for line in lines if line.startswith("Hint:")), "")
    stack = list(getattr(record, "user_stack", None) or [])
    location = f"{_short(stack[-1].filename)}:{stack[-1].lineno}" if stack else "<unknown location>"
    return GraphBreak(lines[0] if lines else "graph break", location, hint,
                      tuple(frame.filename for frame in stack))


class BreakLog:
    """Reads the graph breaks Dynamo recorded since the last `take`. Dynamo's list empties on
    `torch._dynamo.reset()` and fills again: the last record read tells whether it still is
    the list that was read."""

    def __init__(self) -> None:
        records = self._records()
        self._seen = len(records)
        self._last = records[-1] if records else None

    @staticmethod
    def _records() -> list:
        try:
            from torch._dynamo.utils import graph_break_reasons
        except ImportError:
            return []
        return graph_break_reasons

    def take(self) -> list[GraphBreak]:
        records = self._records()
        if self._seen and (len(records) < self._seen or records[self._seen - 1] is not self._last):
            self._seen = 0  # Dynamo was reset since
        new = records[self._seen:]
        self._seen = len(records)
        self._last = records[-1] if records else None
        return [_from_dynamo(r) for r in new]


def _source_file(module: torch.nn.Module) -> Optional[str]:
    try:
        return inspect.getsourcefile(type(module).forward)
    except (TypeError, OSError):
        return None


def ranked(breaks: Iterable[GraphBreak], layers: Iterable[torch.nn.Module]) -> list[GraphBreak]:
    """Distinct breaks, those most likely to have cost LoRA layers first: inside a
    higher-order op (a checkpointed layer), then in a LoRA layer's own forward, then the rest
    in the order they happened."""
    lora_files = {f for f in map(_source_file, layers) if f}
    distinct = list({(b.reason, b.location): b for b in breaks}.values())

    def rank(b: GraphBreak) -> int:
        if b.in_higher_order_op:
            return 0
        return 1 if lora_files.intersection(b.stack_files) else 2

    return sorted(distinct, key=rank)


def outside_message(missing: list[str], total: int, breaks: list[GraphBreak]) -> str:
    """The warning for LoRA layers the model holds that no compiled graph fused."""
    example = ", ".join(missing[:2]) + (", ..." if len(missing) > 2 else "")
    head = (f"unsloth_compile: {len(missing)} of the model's {total} LoRA layers ran outside every compiled "
            f"graph (in eager code, or split by a graph break) and were not fused ({example})")
    if not breaks:  # summary.py asks only when no LoRA linear reached a graph at all
        return (f"unsloth_compile: none of the model's {total} LoRA layers reached a compiled graph, nothing was "
                f"fused ({example}), and Dynamo recorded no graph break: they were not called, or ran in code "
                f"Dynamo does not trace (torch.compiler.disable, a skipped file). TORCH_LOGS=graph_breaks,recompiles "
                f"shows what Dynamo did; unsloth_compile.explain(model, **batch) lists every site (option "
                f"summary=False silences this)")
    named = "; ".join(b.describe() for b in breaks[:_SHOWN])
    more = f" (and {len(breaks) - _SHOWN} more)" if len(breaks) > _SHOWN else ""
    top = breaks[0]
    where = ("It is inside a checkpointed layer (or another higher-order op), which Dynamo then runs eagerly "
             "as a whole." if top.in_higher_order_op else
             "There Dynamo ends a graph, or runs the whole frame around it eagerly.")
    way_out = f"Dynamo's hint: {top.hint} " if top.hint else ""
    first = "The first" if len(breaks) > 1 else "It"
    where = where.replace("It is", f"{first} is", 1) if top.in_higher_order_op else where
    return (f"{head}. Graph break{'s' if len(breaks) > 1 else ''}: {named}{more}. {where} "
            f"Way out: remove the graph break from the model's forward (or compile with fullgraph=True to get "
            f"it as an error with its stack). {way_out}TORCH_LOGS=graph_breaks lists every break "
            f"(option summary=False silences this)")
