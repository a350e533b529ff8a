"""What the passes decided, site by site (returned by `unsloth_compile.explain`, explain.py).

Every pass appends one `Site` per candidate it looked at (fused or refused, with the reason)
and bumps named counters; the backend logs each graph's report on the `unsloth_compile`
logger and keeps the reports of the graphs it compiled so that `explain` can return them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
from typing import Iterator

log = logging.getLogger("unsloth_compile")


@dataclasses.dataclass
class Site:
    module: str  # module path, from the FX node's nn_module_stack
    pattern: str  # "lora_linear", ...
    decision: str  # "fused" or "refused"
    reason: str  # why it was refused, or what the fused form includes
    details: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Report:
    sites: list[Site] = dataclasses.field(default_factory=list)
    counters: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    graphs: int = 0

    def add(self, site: Site) -> None:
        self.sites.append(site)
        self.counters[f"{site.pattern}.{site.decision}"] += 1

    def merge(self, other: "Report") -> None:
        self.sites.extend(other.sites)
        self.counters.update(other.counters)
        self.graphs += other.graphs

    @property
    def fused(self) -> list[Site]:
        return [s for s in self.sites if s.decision == "fused"]

    @property
    def refused(self) -> list[Site]:
        return [s for s in self.sites if s.decision == "refused"]

    def refusal_reasons(self) -> collections.Counter:
        return collections.Counter(s.reason for s in self.refused)

    def __str__(self) -> str:
        lines = [f"unsloth_compile report: {self.graphs} graph(s), "
                 f"{len(self.fused)} fused, {len(self.refused)} refused"]
        width = max([len(s.module) for s in self.sites] + [6])
        for s in self.sites:
            lines.append(f"  {s.module:<{width}}  {s.pattern:<12} {s.decision:<8} {s.reason}")
        if self.counters:
            lines.append("  counters: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counters.items())))
        return "\n".join(lines)

    def print(self) -> None:
        print(self)


# Reports of graphs compiled while a `collect_reports()` block is open (explain() uses it).
_collectors: list[Report] = []


def publish(report: Report, log_it: bool = True) -> None:
    """Called by the backend once per compiled graph (log_it: the `report` option)."""
    for collector in _collectors:
        collector.merge(report)
    if report.sites and log_it:
        log.info("%s", report)


@contextlib.contextmanager
def collect_reports() -> Iterator[Report]:
    report = Report()
    _collectors.append(report)
    try:
        yield report
    finally:
        _collectors.remove(report)
