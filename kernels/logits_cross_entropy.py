"""Cross-entropy on logits the model keeps (returns), upcast in registers: the loss of
transformers' `F.cross_entropy(logits.float().view(-1, V), target)` without fp32 logits.

    lse[i]  = log sum_j exp(x[i, j])                (fp32, x read in its own dtype)
    loss[i] = lse[i] - x[i, t_i]                    0 where t_i == ignore_index
    loss    = sum_i loss[i] / count  ("mean": count = rows not ignored; "sum": count = 1)
    dx[i,j] = g / count * (exp(x[i, j] - lse[i]) - [j == t_i])     0 on ignored rows

Why: eager (and aot_eager) saves the upcast logits' log-softmax for backward in fp32 (rows x V x
4 bytes: 4.2 GB for the llama-1b preset's 8192 x 128256) and its gradient is fp32 again. Here
backward keeps the logits in their own dtype (2 bytes an element in bf16: 2.1 GB there) and the
rows' lse (4 bytes a row), and writes the gradient once, in the logits' dtype (what the upcast's
backward produces); no fp32 rows x V tensor exists in forward or backward. Inductor (torch
2.11) already does as much: one online-softmax reduction per direction, and the same step time
and peak memory with and without this op (docs/bench/design-choices.md#memory-options; docs/options.md,
cross_entropy_on_logits).

One Triton program per row: forward streams the row once (online max and sum of exponentials),
backward streams it once more and writes the gradient row. Bytes: forward 2 V per row (bf16),
backward 2 V read + 2 V written; FLOPs: a few per element. Memory-bound.

`reference_forward` / `reference_backward` (plain torch, fp32, chunked over rows) are the CPU
path and the tests' oracle; they match F.cross_entropy on the fp32 logits.
Nothing of the project is imported here but launch_plan.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl

from .launch_plan import launch
from ..errors import UnslothCompileError

REDUCTIONS = ("mean", "sum")
MAX_BLOCK_V = 4096  # columns per tile of a row (8 KB of bf16); a 128k vocabulary is 32 tiles
_REFERENCE_CHUNK_ELEMENTS = 2**24  # fp32 elements per chunk of rows in the reference (64 MiB)


@triton.jit
def _forward_kernel(
    # pointers
    x_ptr, target_ptr, lse_ptr, loss_ptr,
    # sizes
    V, ignore_index,
    # strides
    stride_xr,
    # meta-parameters
    BLOCK_V: tl.constexpr,
):
    """lse[row] and loss[row] (0 for an ignored row) of one row of x."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xr
    offs = tl.arange(0, BLOCK_V)
    running_max = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, x)
        # lanes still at -inf (no value yet) add nothing; exp(-inf - -inf) would be NaN
        scale = tl.where(new_max == float("-inf"), 0.0, tl.exp(running_max - new_max))
        running_sum = running_sum * scale + tl.where(new_max == float("-inf"), 0.0, tl.exp(x - new_max))
        running_max = new_max
    row_max = tl.max(running_max, axis=0)
    total = tl.sum(running_sum * tl.exp(running_max - row_max), axis=0)
    lse = row_max + tl.log(total)
    tl.store(lse_ptr + row, lse)
    target = tl.load(target_ptr + row)
    ignored = target == ignore_index
    # clamped: an out-of-range label (an error in eager) must not read outside the row
    safe_target = tl.minimum(tl.maximum(tl.where(ignored, 0, target), 0), V - 1)
    x_target = tl.load(x_row + safe_target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - x_target))


@triton.jit
def _backward_kernel(
    # pointers
    x_ptr, target_ptr, lse_ptr, scale_ptr, grad_ptr,
    # sizes
    V, ignore_index,
    # strides
    stride_xr, stride_gr,
    # meta-parameters
    BLOCK_V: tl.constexpr,
):
    """grad[row] = scale * (softmax(x[row]) - onehot(target[row])), zeros for an ignored row;
    scale = g / count, a 0-d fp32 tensor."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xr
    grad_row = grad_ptr + row * stride_gr
    offs = tl.arange(0, BLOCK_V)
    target = tl.load(target_ptr + row)
    ignored = target == ignore_index
    scale = tl.where(ignored, 0.0, tl.load(scale_ptr))
    lse = tl.load(lse_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        ok = cols < V
        x = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
        tl.store(grad_row + cols, (g * scale).to(grad_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- hosts


def _count(target: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """The divisor of the loss: rows not ignored ("mean"), or 1 ("sum"); fp32, on the device."""
    if reduction == "sum":
        return torch.ones((), dtype=torch.float32, device=target.device)
    return (target != ignore_index).sum().to(torch.float32)


def _check(logits: Tensor, target: Tensor, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise UnslothCompileError(f"unsloth_compile.kernels.logits_cross_entropy: reduction {reduction!r}, one of "
                                  f"{REDUCTIONS}")
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise UnslothCompileError("unsloth_compile.kernels.logits_cross_entropy: logits (rows, V) and target (rows,), "
                                  f"got {tuple(logits.shape)} and {tuple(target.shape)}")


def cross_entropy_forward(logits: Tensor, target: Tensor, ignore_index: int, reduction: str) -> tuple[Tensor, Tensor]:
    """(loss (0-d fp32), lse (rows,) fp32) with the Triton kernel (CUDA, or the interpreter)."""
    _check(logits, target, reduction)
    rows, V = logits.shape
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        block_v = min(MAX_BLOCK_V, triton.next_power_of_2(V))
        launch(_forward_kernel, (rows,), x_ptr=logits, target_ptr=target, lse_ptr=lse, loss_ptr=losses, V=V,
               ignore_index=ignore_index, stride_xr=logits.stride(0), BLOCK_V=block_v,
               num_warps=8 if block_v >= 2048 else 4, num_stages=3)
    return losses.sum() / _count(target, ignore_index, reduction), lse


def cross_entropy_backward(grad_loss: Tensor, logits: Tensor, target: Tensor, lse: Tensor, ignore_index: int,
                           reduction: str) -> Tensor:
    """d loss / d logits (rows, V) in the logits' dtype, contiguous."""
    rows, V = logits.shape
    grad = torch.empty((rows, V), dtype=logits.dtype, device=logits.device)
    if rows:
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        scale = (grad_loss.to(torch.float32) / _count(target, ignore_index, reduction)).reshape(())
        block_v = min(MAX_BLOCK_V, triton.next_power_of_2(V))
        launch(_backward_kernel, (rows,), x_ptr=logits, target_ptr=target, lse_ptr=lse, scale_ptr=scale,
               grad_ptr=grad, V=V, ignore_index=ignore_index, stride_xr=logits.stride(0),
               stride_gr=grad.stride(0), BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4, num_stages=3)
    return grad


def _row_chunks(rows: int, V: int):
    step = max(1, _REFERENCE_CHUNK_ELEMENTS // max(V, 1))
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def reference_forward(logits: Tensor, target: Tensor, ignore_index: int, reduction: str) -> tuple[Tensor, Tensor]:
    """Plain torch, chunked over rows (fp32 one chunk at a time): (loss, lse)."""
    _check(logits, target, reduction)
    rows, V = logits.shape
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start, stop in _row_chunks(rows, V):
        x = logits[start:stop].float()
        t = target[start:stop]
        keep = t != ignore_index
        chunk_lse = torch.logsumexp(x, dim=1)
        lse[start:stop] = chunk_lse
        picked = x.gather(1, torch.where(keep, t, 0).unsqueeze(1)).squeeze(1)
        total = total + torch.where(keep, chunk_lse - picked, 0.0).sum()
    return total / _count(target, ignore_index, reduction), lse


def reference_backward(grad_loss: Tensor, logits: Tensor, target: Tensor, lse: Tensor, ignore_index: int,
                       reduction: str) -> Tensor:
    rows, V = logits.shape
    grad = torch.empty((rows, V), dtype=logits.dtype, device=logits.device)
    scale = grad_loss.to(torch.float32) / _count(target, ignore_index, reduction)
    for start, stop in _row_chunks(rows, V):
        x = logits[start:stop].float()
        t = target[start:stop]
        keep = t != ignore_index
        g = torch.exp(x - lse[start:stop].unsqueeze(1))
        g.scatter_add_(1, torch.where(keep, t, 0).unsqueeze(1), -torch.ones_like(g[:, :1]))
        g = g * torch.where(keep, scale, 0.0).unsqueeze(1)
        grad[start:stop] = g.to(logits.dtype)
    return grad
