"""Fused LM head + cross-entropy, chunked over rows: plain torch, every device.

    loss = CE(steps(hidden @ weight^T + bias), target)      reduction "mean" or "sum", ignore_index

For each chunk of rows: logits_c = linear(h_c, W, b) (the dtype eager's linear gives), then
the elementwise `steps` eager applied between the head and the loss (casts, scaling by a
constant, softcap's div/tanh/mul, in eager's order and dtypes), then in fp32 the logsumexp,
the target logit, the chunk's loss sum, and at once the gradients: d logits = softmax -
one-hot (times 1/count for "mean", zero on ignored rows), back through the steps, then
dh_c = d logits_c @ W and dW += d logits_c^T @ h_c (fp32 accumulator), db += column sums.
Only one chunk of logits exists at a time: the memory is O(chunk_rows x V), never rows x V.
Backward then only scales the stored dh, dW, db by the incoming gradient (the Liger-Kernel
approach: the gradient is computed in forward, where the logits are at hand).

Cost: the same three GEMMs as eager (2 x rows x V x D FLOPs each, the dW one only for a
trainable head) plus O(rows x V) elementwise work, done one chunk at a time. In plain torch
that elementwise work is ~6 passes over the chunk's fp32 logits (cast, logsumexp, exp,
scatter, scale, cast back); the caller may pass `chunk_loss`, which does a chunk's loss and
gradient from its logits in their own dtype, for the steps it can run (casts to fp32 only:
`chunk_loss_applies`); ops/cross_entropy.py passes the Triton cross-entropy of kernels/logits_cross_entropy.py,
two passes over bf16 logits.

This module imports nothing of the project (kernels/ depends on torch only).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..errors import UnslothCompileError

# The elementwise steps the pass may put between the head and the loss, as they run in eager:
#   "mul" / "div": x * value / x / value (a Python constant: logit scaling, softcap's parts)
#   "tanh":        torch.tanh(x) (softcap: tanh(x / c) * c is "div", "tanh", "mul")
#   "to:<dtype>":  x.to(dtype) (the loss's upcast `logits.float()`)
CAST_PREFIX = "to:"
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)}
# Bytes per chunk element the budget is counted in: the fp32 logits of a chunk. The peak is a
# few such tensors (the linear's output, fp32 logits, their softmax/gradient).
_BUDGET_BYTES_PER_ELEMENT = 4


def cast_step(dtype: torch.dtype) -> str:
    return CAST_PREFIX + str(dtype).removeprefix("torch.")


def step_dtype(step: str) -> Optional[torch.dtype]:
    """The dtype a cast step converts to; None for other steps. ValueError for unknown ones."""
    if step.startswith(CAST_PREFIX):
        name = step[len(CAST_PREFIX):]
        if name not in _DTYPES:
            raise UnslothCompileError(f"unsloth_compile.kernels.linear_cross_entropy: cast step {step!r}: dtype not "
                                      f"one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    if step not in ("mul", "div", "tanh"):
        raise UnslothCompileError(f"unsloth_compile.kernels.linear_cross_entropy: unknown step {step!r} (mul, div, "
                                  "tanh, to:<dtype>)")
    return None


def logits_dtype(linear_dtype: torch.dtype, steps: Sequence[str]) -> torch.dtype:
    """The dtype of the logits cross_entropy reads (the last cast, else the linear's): the
    dtype of the loss eager returns."""
    dtype = linear_dtype
    for step in steps:
        dtype = step_dtype(step) or dtype
    return dtype


def chunk_rows_for(vocab: int, budget_bytes: int) -> int:
    """Rows per chunk so that a chunk's fp32 logits fit in `budget_bytes` (at least 1 row)."""
    return max(1, budget_bytes // max(1, vocab * _BUDGET_BYTES_PER_ELEMENT))


def _apply_steps(x: Tensor, steps: Sequence[str], values: Sequence[float]) -> tuple[Tensor, list]:
    """The logits after the steps, and per step what its backward needs: tanh's output, the
    dtype a cast read, else None (only tanh outputs are kept: a chunk-sized tensor each)."""
    kept: list = []
    for step, value in zip(steps, values):
        if step == "mul":
            x, keep = x * value, None
        elif step == "div":
            x, keep = x / value, None
        elif step == "tanh":
            x = torch.tanh(x)
            keep = x
        else:
            x, keep = x.to(step_dtype(step)), x.dtype
        kept.append(keep)
    return x, kept


def _steps_backward(grad: Tensor, steps: Sequence[str], values: Sequence[float], kept: list) -> Tensor:
    """d loss / d z from d loss / d logits, through the steps in reverse (eager's formulas)."""
    for step, value, keep in zip(reversed(steps), reversed(values), reversed(kept)):
        if step == "mul":
            grad = grad * value
        elif step == "div":
            grad = grad / value
        elif step == "tanh":
            grad = torch.ops.aten.tanh_backward(grad, keep)
        else:  # a cast: the gradient goes back to the dtype the step read
            grad = grad.to(keep)
    return grad


# (logits z of a chunk, its targets, ignore_index, grad_scale or None) -> (the chunk's loss sum
# in fp32, d loss / d z in z's dtype (times grad_scale, zero on ignored rows) or None)
ChunkLoss = Callable[[Tensor, Tensor, int, Optional[Tensor]], tuple[Tensor, Optional[Tensor]]]
_CHUNK_LOSS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def chunk_loss_applies(steps: Sequence[str], linear_dtype: torch.dtype) -> bool:
    """Whether a ChunkLoss computes what the steps + cross-entropy compute: no steps, or only
    the loss's upcast to fp32 (which it does in registers), on fp32/bf16/fp16 logits."""
    return linear_dtype in _CHUNK_LOSS_DTYPES and all(step == cast_step(torch.float32) for step in steps)


def _chunk(h_c: Tensor, t_c: Tensor, weight: Tensor, bias: Optional[Tensor], ignore_index: int,
           steps: Sequence[str], values: Sequence[float], grad_scale: Optional[Tensor],
           chunk_loss: Optional[ChunkLoss] = None):
    """(loss sum of the chunk in fp32, d loss / d z of the chunk or None), where z is the
    chunk's linear output; grad_scale None: no gradient wanted."""
    z = torch.nn.functional.linear(h_c, weight, bias)
    if chunk_loss is not None and chunk_loss_applies(steps, z.dtype):
        return chunk_loss(z, t_c, ignore_index, grad_scale)
    x, kept = _apply_steps(z, steps, values)
    del z  # (x may be z itself: no steps)
    # fp32 at least (float64 stays float64: the tests' oracle); x itself when x is already
    # of that dtype, so it is read-only below
    logits = x.to(torch.promote_types(x.dtype, torch.float32))
    lse = torch.logsumexp(logits, dim=1)
    valid = t_c != ignore_index
    safe_t = torch.where(valid, t_c, torch.zeros_like(t_c))
    target_logit = logits.gather(1, safe_t[:, None])[:, 0]
    loss_sum = torch.where(valid, lse - target_logit, torch.zeros_like(lse)).sum()
    if grad_scale is None:
        return loss_sum, None
    grad = (logits - lse[:, None]).exp_()  # softmax (exp in place: one chunk-sized temporary less)
    grad.scatter_add_(1, safe_t[:, None], torch.full_like(grad[:, :1], -1.0))
    # zero on ignored rows; a `where` so that 1/0 (mean over no valid row) never meets them
    row_scale = torch.where(valid, grad_scale, torch.zeros_like(grad_scale))
    grad.mul_(row_scale[:, None])
    grad = grad.to(x.dtype)  # eager's gradient of the logits is in the logits' dtype
    del logits, x
    return loss_sum, _steps_backward(grad, steps, values, kept)


def linear_cross_entropy_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                                 ignore_index: int, reduction: str, steps: Sequence[str],
                                 values: Sequence[float], chunk_rows: int, grad_hidden: bool,
                                 grad_weight: bool, grad_bias: bool, chunk_loss: Optional[ChunkLoss] = None
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, dhidden, dweight, dbias) for an incoming gradient of 1; a gradient not asked
    for is an empty tensor. hidden (..., D), weight (V, D), target (...) of hidden's rows.
    `chunk_loss`: a chunk's loss and gradient from its logits, where chunk_loss_applies."""
    if reduction not in ("mean", "sum"):
        raise UnslothCompileError(f"unsloth_compile.kernels.linear_cross_entropy: reduction {reduction!r} is not "
                                  "'mean' or 'sum'")
    if len(steps) != len(values):
        raise UnslothCompileError(f"unsloth_compile.kernels.linear_cross_entropy: {len(steps)} steps but {len(values)} "
                                  "values; give one value per step")
    dim = hidden.shape[-1]
    h = hidden.reshape(-1, dim)
    t = target.reshape(-1)
    if t.shape[0] != h.shape[0]:
        raise UnslothCompileError(f"unsloth_compile.kernels.linear_cross_entropy: {h.shape[0]} rows of hidden but "
                                  f"{t.shape[0]} targets")
    rows = h.shape[0]
    count = (t != ignore_index).sum()
    wants_grad = grad_hidden or grad_weight or grad_bias
    grad_scale = None
    if wants_grad:
        one = torch.ones((), dtype=torch.promote_types(logits_dtype(hidden.dtype, steps), torch.float32),
                         device=h.device)
        grad_scale = one / count if reduction == "mean" else one
    dh = torch.empty_like(h, memory_format=torch.contiguous_format) if grad_hidden else h.new_empty((0,))
    acc = torch.promote_types(logits_dtype(hidden.dtype, steps), torch.float32)  # accumulators
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if grad_weight else None
    db = torch.zeros(bias.shape, dtype=acc, device=bias.device) if grad_bias else None
    loss = torch.zeros((), dtype=acc, device=h.device)
    step = max(1, int(chunk_rows))
    with torch.autocast(h.device.type, enabled=False):  # the linear in the dtypes eager's ran in
        for start in range(0, rows, step):
            h_c = h[start:start + step]
            loss_c, dz = _chunk(h_c, t[start:start + step], weight, bias, ignore_index, steps, values, grad_scale,
                                chunk_loss)
            loss += loss_c
            if dz is None:
                continue
            if grad_hidden:
                torch.mm(dz, weight.to(dz.dtype), out=dh[start:start + step])
            if grad_weight:
                dw += (dz.t() @ h_c.to(dz.dtype)).to(acc)
            if grad_bias:
                db += dz.to(acc).sum(0)
    if reduction == "mean":
        loss = loss / count
    out_dtype = logits_dtype(hidden.dtype, steps)  # F.linear takes hidden and weight of one dtype
    dh = dh.reshape(hidden.shape) if grad_hidden else dh
    dw = dw.to(weight.dtype) if grad_weight else weight.new_empty((0,))
    db = db.to(bias.dtype) if grad_bias else weight.new_empty((0,))
    return loss.to(out_dtype), dh, dw, db
