"""SparseGPT-style mask selection for a transposable 2:4 mask: the Optimal Brain Surgeon sweep
over the input columns, choosing each 4 x 4 tile's pattern by OBS saliency on the weights as
the sweep has updated them (prune(..., method="sparsegpt")).

With H = X^T X + lam I (damped as in reconstruct.py) and W the (N, K) weight, the columns
are visited left to right. Removing entry w_ij while the columns j.. are still free costs
w_ij^2 / [H_R^-1]_jj in output error (R = {j, ..., K-1}), and the remaining free entries of row
i absorb it by w_iR -= w_ij [H_R^-1]_j,R / [H_R^-1]_jj. At each group of 4 columns the tile
pattern (2 per row and per column, mask.transposable_mask) is the one of largest kept
saliency w^2 / [H_R^-1]_jj^2, on the weights the earlier columns' removals have updated;
Wanda's |w| * ||x_j|| is the same score without the updates and with H diagonal.

[H_R^-1] for every R at once is the upper Cholesky factor U of H^-1 (row j of U is row j of
H_R^-1 over sqrt of its diagonal), as in SparseGPT; updates to later column blocks are applied
lazily, one matmul per block of BLOCK columns. Cost: one K x K inverse and Cholesky, and K
rank-1 updates of (N, BLOCK), in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .mask import transposable_mask
from .reconstruct import damped
from ..errors import UnslothCompileError

# Columns per lazy update (a multiple of 4, the tile width); SparseGPT's default.
BLOCK = 128


def inverse_cholesky(gram: Tensor) -> Tensor:
    """U, upper triangular, with U^T U = (H + lam I)^-1 (float64, lam = damping(H))."""
    inv = torch.cholesky_inverse(torch.linalg.cholesky(damped(gram)))
    return torch.linalg.cholesky(inv, upper=True)


def obs_prune(weight: Tensor, gram: Tensor, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """(mask, pruned weight): the transposable 2:4 mask the OBS sweep chooses for `weight` (N,
    K) on H = `gram` (K, K), and the weight with the sweep's compensating updates, zero off the
    mask, in float64 on the gram's device. Deterministic."""
    n, k = weight.shape
    if n % 4 or k % 4:
        raise UnslothCompileError("unsloth_compile.sparsity: a 4 x 4 tile mask needs both dimensions multiples of 4, "
                                  f"got {n} x {k}; leave this layer out (select=) or use a 1 x 4 (row-wise 2:4) mask")
    if block % 4:
        raise UnslothCompileError(f"unsloth_compile.sparsity: block={block} must be a multiple of 4 (the tile width); "
                                  "choose a multiple of 4 such as 128")
    w = weight.detach().to(gram.device, torch.float64).clone()
    u = inverse_cholesky(gram)
    mask = torch.zeros(n, k, dtype=torch.bool, device=gram.device)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb, ub = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
        errors = torch.zeros_like(wb)
        for j in range(b1 - b0):
            if j % 4 == 0:
                d = ub.diagonal()[j:j + 4]
                mask[:, b0 + j:b0 + j + 4] = transposable_mask(wb[:, j:j + 4].pow(2) / d.pow(2))
            kept = wb[:, j] * mask[:, b0 + j]
            err = (wb[:, j] - kept) / ub[j, j]
            wb[:, j:] -= err[:, None] * ub[j, j:][None, :]
            wb[:, j] = kept  # what the update gives, without its rounding
            errors[:, j] = err
        w[:, b0:b1] = wb
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    return mask, w
