"""Least-squares reconstruction of a pruned weight: once the mask is chosen, refit the kept
entries of each output row so that the pruned layer reproduces the dense layer's output on
calibration inputs (the fixed-mask step of SparseGPT / OBS). The mask is not changed: pruned
entries stay exactly zero, so a transposable 2:4 mask stays 2:4 in both orientations.

With X the calibration inputs (tokens x K), H = X^T X (float64) and W0 the dense weight, row i
with kept set S_i becomes

    w_i[S_i] = argmin ||X (w_i - w0_i)||^2 + lam ||w_i - w0_i||^2   (w_i zero off S_i)
             = solve(H[S_i, S_i] + lam I,  (H w0_i)[S_i] + lam w0_i[S_i])

lam = DAMPING * mean(diag(H)). The ridge term pulls towards the dense weight, not towards zero,
as SparseGPT's damped Hessian does: a feature the calibration never excites keeps its weight
instead of being zeroed, and a singular H (fewer tokens than features) still solves.

Sequential pruning (sparsity.prune(..., sequential=True)) fits the layer to a target output Y
that its pruned-model inputs X~ do not give exactly: the dense model's output X W0^T at that
layer. With H = X~^T X~ and B = X~^T Y (K x N), min ||X~ w_i - y_i||^2 + lam ||w_i - w0_i||^2 is
the same problem as above around the dense refit w*_i = (H + lam I)^-1 (B_i + lam w0_i)
(`dense_refit`): reconstruct(w*, mask, H) solves it on the kept set, since
(H + lam I) w*_i = B_i + lam w0_i is its right-hand side.

Cost: H is K x K float64 per layer (MiniLM's FFN down projection, K = 1536: 18 MiB), and one
Cholesky of size K/2 per output row, batched.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UnslothCompileError

# lam / mean(diag(H)): SparseGPT's default percdamp.
DAMPING = 0.01
# Gathered (rows, s, s) float64 systems per batched solve: bounds that buffer to ~256 MiB.
_SYSTEM_BYTES_PER_CHUNK = 1 << 28


def damping(gram: Tensor) -> float:
    """lam for H: DAMPING of its mean diagonal (1.0 when the calibration inputs are all zero)."""
    mean_diag = float(gram.diagonal().mean())
    return DAMPING * mean_diag if mean_diag > 0 else 1.0


def damped(gram: Tensor) -> Tensor:
    """H + lam I in float64, lam = damping(H): the system every refit and the OBS sweep solve."""
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    return gram.double() + damping(gram) * eye


def kept_indices(mask: Tensor) -> Tensor:
    """(N, s) long: the kept columns of each row, ascending; every row must keep s of them."""
    counts = mask.sum(1)
    if not bool((counts == counts[0]).all()):
        raise UnslothCompileError("unsloth_compile.sparsity: least-squares reconstruction needs the same number of "
                                  "kept entries in every row, which this mask does not have; pass a 2:4 mask, or "
                                  "reconstruct=False")
    return mask.nonzero()[:, 1].reshape(mask.shape[0], -1)  # nonzero() is row-major


def reconstruct(weight: Tensor, mask: Tensor, gram: Tensor) -> Tensor:
    """The masked weight (N, K) whose kept entries minimise the damped output error above, in
    the weight's dtype and device, zero off the mask. `gram`: H = X^T X, (K, K)."""
    n, k = weight.shape
    w0 = weight.detach().to(gram.device, torch.float64)
    idx = kept_indices(mask.to(gram.device))
    s = idx.shape[1]
    lam = damping(gram)
    # right-hand side (H + lam I) w0_i restricted to S_i, all rows at once: H is symmetric
    rhs = (w0 @ gram + lam * w0).gather(1, idx)
    eye = torch.eye(s, dtype=torch.float64, device=gram.device)
    kept = torch.empty(n, s, dtype=torch.float64, device=gram.device)
    rows_per_chunk = max(1, _SYSTEM_BYTES_PER_CHUNK // (8 * s * s))
    for start in range(0, n, rows_per_chunk):
        rows = idx[start:start + rows_per_chunk]
        systems = gram[rows[:, :, None], rows[:, None, :]] + lam * eye  # (C, s, s), SPD
        factor = torch.linalg.cholesky(systems)
        kept[start:start + rows.shape[0]] = torch.cholesky_solve(rhs[start:start + rows.shape[0], :, None],
                                                                 factor).squeeze(-1)
    out = torch.zeros(n, k, dtype=torch.float64, device=gram.device)
    out.scatter_(1, idx, kept)
    return out.to(weight.device, weight.dtype)


def relative_output_error(weight: Tensor, dense: Tensor, gram: Tensor) -> float:
    """||X (W - W0)^T||_F / ||X W0^T||_F on the calibration inputs, from H alone:
    ||X D^T||_F^2 = sum((D H) * D). 0.0 when both are zero, inf when only the dense one is."""
    w0 = dense.detach().to(gram.device, torch.float64)
    diff = weight.detach().to(gram.device, torch.float64) - w0
    num = float(((diff @ gram) * diff).sum().clamp_min(0))
    den = float(((w0 @ gram) * w0).sum().clamp_min(0))
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return (num / den) ** 0.5


def dense_refit(dense: Tensor, gram: Tensor, cross: Tensor) -> Tensor:
    """w* (N, K) float64: the dense weight minimising ||X~ w_i - y_i||^2 + lam ||w_i - w0_i||^2,
    H = `gram` = X~^T X~, `cross` = X~^T Y (K, N), lam = damping(H)."""
    w0 = dense.detach().to(gram.device, torch.float64)
    return torch.cholesky_solve(cross + damping(gram) * w0.t(), torch.linalg.cholesky(damped(gram))).t()


def relative_error_to(weight: Tensor, gram: Tensor, cross: Tensor, target_energy: float) -> float:
    """||X~ W^T - Y||_F / ||Y||_F from H = X~^T X~, B = X~^T Y and ||Y||_F^2 alone:
    tr(W H W^T) - 2 tr(W B) + ||Y||^2. 0.0 when both are zero, inf when only Y is."""
    w = weight.detach().to(gram.device, torch.float64)
    num = max(float(((w @ gram) * w).sum() - 2 * (w * cross.t()).sum() + target_energy), 0.0)
    if target_energy <= 0:
        return 0.0 if num == 0 else float("inf")
    return (num / target_energy) ** 0.5
