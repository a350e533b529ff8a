"""The automatic policies of a `RankController`: `LossDecayPolicy` (one rank for every adapter,
moved by the loss) and `ImportancePolicy` (ranks per layer under a budget, `allocate_ranks`).
Each `decide`s from the controller's state (its adapters, bounds, budget and window losses)."""

from __future__ import annotations

import math
import warnings
from typing import Optional, Protocol, Sequence

import torch

from .adapters import LoraAdapter
from ..errors import UnslothCompileError


class RankState(Protocol):
    """What a policy reads of its controller (a RankController)."""

    adapters: list[LoraAdapter]
    window_losses: list[float]
    global_rank: int
    min_rank: int
    max_rank: int
    budget: int


def allocate_ranks(scores: Sequence[float], budget: int, low: Sequence[int], high: Sequence[int]) -> list[int]:
    """Integer ranks proportional to `scores`, each within [low_i, high_i], summing to `budget`
    (clamped to what the bounds allow): water-filling by bisection, then largest remainders."""
    n = len(scores)
    low = [min(lo, hi) for lo, hi in zip(low, high)]
    budget = max(sum(low), min(budget, sum(high)))
    weights = [max(float(s), 0.0) for s in scores]
    if sum(weights) <= 0 or not all(map(math.isfinite, weights)):
        weights = [1.0] * n

    def fill(t: float) -> list[float]:
        return [min(max(t * w, lo), hi) for w, lo, hi in zip(weights, low, high)]

    lo_t, hi_t = 0.0, 1.0
    while sum(fill(hi_t)) < budget and hi_t < 1e30:
        hi_t *= 2
    for _ in range(100):
        mid = (lo_t + hi_t) / 2
        lo_t, hi_t = (mid, hi_t) if sum(fill(mid)) < budget else (lo_t, mid)
    share = fill(hi_t)
    ranks = [int(math.floor(x + 1e-9)) for x in share]
    order = sorted(range(n), key=lambda i: share[i] - ranks[i], reverse=True)
    for i in order:
        if sum(ranks) >= budget:
            break
        if ranks[i] < high[i]:
            ranks[i] += 1
    return ranks


class LossDecayPolicy:
    """After each window: grow every adapter by 2 when the window's mean loss fell below
    threshold x the previous window's, else shrink by 1; within [min_rank, max_rank] and each
    layer's limit."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def decide(self, controller: RankState) -> Optional[int]:
        losses = controller.window_losses
        if len(losses) < 2:
            return None
        r = controller.global_rank
        r = r + 2 if losses[-1] < self.threshold * losses[-2] else r - 1
        return min(max(r, controller.min_rank), controller.max_rank)


class ImportancePolicy:
    """Per-layer ranks under a total budget, proportional to an importance score per rank unit:
    "sensitivity" (AdaLoRA): EMA over steps of sum |w * grad| over A and B, divided by the rank;
    "svd": energy sum(sigma^2) of scale * B A. Sensitivity without gradients falls back to svd."""

    def __init__(self, importance: str, ema: float):
        if importance not in ("sensitivity", "svd"):
            raise UnslothCompileError(f"unsloth_compile.rank: importance={importance!r}; choose 'sensitivity' or 'svd'")
        self.importance, self.ema = importance, ema
        self.scores: dict[int, float] = {}
        self.warned_no_grad = False  # the fallback to singular-value energy is announced once

    def observe(self, adapters: Sequence[LoraAdapter]) -> None:
        if self.importance != "sensitivity":
            return
        with torch.no_grad():
            for a in adapters:
                if a.A.grad is None or a.B.grad is None:
                    continue
                s = float((a.A * a.A.grad).abs().sum() + (a.B * a.B.grad).abs().sum()) / a.rank
                old = self.scores.get(id(a))
                self.scores[id(a)] = s if old is None else self.ema * old + (1 - self.ema) * s

    def _energy(self, a: LoraAdapter) -> float:
        with torch.no_grad():
            return float(torch.linalg.svdvals((a.B.float() @ a.A.float()) * a.scale).square().sum())

    def decide(self, controller: RankState) -> list[int]:
        adapters = controller.adapters
        if self.importance == "sensitivity" and len(self.scores) == len(adapters):
            scores = [self.scores[id(a)] for a in adapters]
        else:
            if self.importance == "sensitivity" and not self.warned_no_grad:
                self.warned_no_grad = True
                warnings.warn("unsloth_compile.rank: importance='sensitivity' saw no gradients (call "
                              "controller.step() before optimizer.zero_grad()); using singular-value energy",
                              stacklevel=3)
            scores = [self._energy(a) for a in adapters]
        return allocate_ranks(scores, controller.budget, [controller.min_rank] * len(adapters),
                              [min(controller.max_rank, a.limit) for a in adapters])
