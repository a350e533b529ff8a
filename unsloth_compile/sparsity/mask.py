"""2:4 masks of a weight (N, K): which entries a pruned frozen base keeps.

Transposable mask (what unsloth_compile.sparsity.prune uses): the weight is cut into 4 x 4
tiles and each tile keeps one of the 90 patterns with exactly 2 entries in every row and every
column, the one with the largest kept score. Every group of 4 consecutive entries along K of a
row then holds 2 (W is 2:4 for X W^T) and so does every group along N of a column (W^T is 2:4
for backward's dY W). The 90 patterns are enumerated once; the choice per tile is one batched
matmul (tiles x 16 scores times 16 x 90 patterns) and an argmax, whose ties go to the first
pattern in a fixed order: the same weight gives the same mask on every call.

Row mask (for comparison only): the 2 largest of each group of 4 along K, the best a 2:4 mask
can keep; it says nothing of W^T. The transposable mask keeps at most as much.
"""

from __future__ import annotations

import functools
import itertools
from typing import Optional

import torch
from torch import Tensor

from ..errors import UnslothCompileError

# Tiles scored per matmul: bounds the (tiles, 90) fp32 score buffer to ~24 MiB per chunk.
_TILES_PER_CHUNK = 1 << 16


@functools.lru_cache(maxsize=None)
def _patterns_cpu() -> Tensor:
    """(90, 16) fp32 0/1: the 4 x 4 patterns with 2 ones per row and per column, row-major,
    in lexicographic order of their rows' choices."""
    row_choices = [c for c in itertools.product((0, 1), repeat=4) if sum(c) == 2]  # 6 of them
    found = []
    for rows_ in itertools.product(row_choices, repeat=4):
        tile = torch.tensor(rows_, dtype=torch.float32)
        if bool((tile.sum(0) == 2).all()):
            found.append(tile.reshape(16))
    return torch.stack(found)


def tile_patterns(device: torch.device | str = "cpu") -> Tensor:
    return _patterns_cpu().to(device)


def _tiles(t: Tensor) -> Tensor:
    """(N, K) -> (N/4 * K/4, 16): each 4 x 4 tile's entries, row-major."""
    n, k = t.shape
    return t.reshape(n // 4, 4, k // 4, 4).permute(0, 2, 1, 3).reshape(-1, 16)


def _untile(tiles: Tensor, n: int, k: int) -> Tensor:
    return tiles.reshape(n // 4, k // 4, 4, 4).permute(0, 2, 1, 3).reshape(n, k)


def transposable_mask(score: Tensor) -> Tensor:
    """bool (N, K) mask keeping, in every 4 x 4 tile, the 2-per-row-and-column pattern of
    largest total score (score >= 0, e.g. |W| or Wanda's |W| * ||x_col||). N, K multiples of 4."""
    n, k = score.shape
    if n % 4 or k % 4:
        raise UnslothCompileError("unsloth_compile.sparsity: a 4 x 4 tile mask needs both dimensions multiples of 4, "
                                  f"got {n} x {k}; leave this layer out (select=) or use a 1 x 4 (row-wise 2:4) mask")
    tiles = _tiles(score.detach().float())
    patterns = tile_patterns(score.device)
    chosen = torch.empty(tiles.shape[0], dtype=torch.long, device=score.device)
    for start in range(0, tiles.shape[0], _TILES_PER_CHUNK):
        block = tiles[start:start + _TILES_PER_CHUNK]
        chosen[start:start + block.shape[0]] = (block @ patterns.t()).argmax(dim=1)
    return _untile(patterns[chosen].bool(), n, k)


def row_mask(score: Tensor) -> Tensor:
    """bool (N, K) mask keeping the 2 largest scores of every group of 4 along K."""
    n, k = score.shape
    groups = score.detach().float().reshape(n, k // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(2, dim=2).indices, True)
    return keep.reshape(n, k)


def _first_violation(nonzero: Tensor) -> Optional[tuple[int, int, int]]:
    """(row, first column of the group, count) of the first group of 4 along the last dim with
    more than 2 nonzeros, or None."""
    counts = nonzero.reshape(nonzero.shape[0], -1, 4).sum(-1)
    bad = (counts > 2).nonzero()
    if bad.numel() == 0:
        return None
    r, g = bad[0].tolist()
    return r, 4 * g, int(counts[r, g])


def sparsity_problem(weight: Tensor) -> Optional[str]:
    """Why an (N, K) weight is not 2:4 both along K (rows of W) and along N (rows of W^T), or
    None. Groups with fewer than 2 nonzeros are fine (the kernels store explicit zeros)."""
    n, k = weight.shape
    if n % 4 or k % 4:
        return f"shape {n} x {k} is not made of 4 x 4 tiles"
    nonzero = weight.detach() != 0
    for name, t in (("W", nonzero), ("W^T", nonzero.t())):
        found = _first_violation(t)
        if found is not None:
            r, c, count = found
            return (f"not 2:4: {name} row {r} has {count} nonzeros in columns {c}..{c + 3} "
                    f"(prune it with unsloth_compile.sparsity.prune)")
    return None


def kept_energy(weight: Tensor, mask: Tensor) -> float:
    """sum of kept w^2 / sum of w^2 (1.0 for an all-zero weight)."""
    w2 = weight.detach().double().pow(2)
    total = w2.sum()
    return 1.0 if total == 0 else float((w2 * mask).sum() / total)
