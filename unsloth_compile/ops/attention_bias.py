"""`torch.ops.unsloth.attention_bias(mask, dtype, alignment)`: an SDPA attention mask as the
additive bias SDPA's CUDA kernels take (a bool mask: 0 where True, -inf where False, in `dtype`,
as SDPA converts it itself; a float mask: cast), stored with every stride but the last a
multiple of `alignment` elements (the last dimension padded in storage, not in shape).

Why: Inductor hands an attention bias to the CUDA kernels only with strides aligned to 8
elements (`sdpa_constraint` in torch/_inductor/lowering.py). With a symbolic sequence length L
it cannot prove that a (b, 1, L, L) bias's stride L is aligned, so it guards on `L % 8` and
compiles the graph twice, once for each answer (a whole second compile of the model). This op's
fake implementation states the padded strides, `alignment * (floor(L / alignment) + 1)`: aligned
at every L, so one graph serves every length. The row is always padded, by a whole `alignment`
where L is already a multiple of it: with `ceil(L / alignment)` the stride equals L exactly at
those lengths, so a contiguity check on the bias (PyTorch's `check_contiguous_sizes_strides`)
guards on `L % alignment` and compiles a third graph; a stride never equal to L is never
contiguous, at any L, and needs no such guard.
"""

from __future__ import annotations

import torch
from torch import Tensor


def padded_strides(size, alignment: int) -> list:
    """Contiguous strides of `size` with its last dimension padded to the next multiple of
    `alignment` strictly above it."""
    padded = (size[-1] // alignment + 1) * alignment
    strides, step = [1], padded
    for extent in reversed(size[1:-1]):
        strides.append(step)
        step = step * extent
    if len(size) > 1:
        strides.append(step)
    return list(reversed(strides))


def _empty_aligned(mask: Tensor, dtype: torch.dtype, alignment: int) -> Tensor:
    return torch.empty_strided(mask.shape, padded_strides(mask.shape, alignment), dtype=dtype, device=mask.device)


@torch.library.custom_op("unsloth::attention_bias", mutates_args=())
def attention_bias(mask: Tensor, dtype: torch.dtype, alignment: int) -> Tensor:
    out = _empty_aligned(mask, dtype, alignment)
    if mask.dtype == torch.bool:
        out.copy_(torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf")))
    else:
        out.copy_(mask)
    return out


@attention_bias.register_fake
def _(mask, dtype, alignment):
    return _empty_aligned(mask, dtype, alignment)


def _backward(ctx, grad):
    # a bool mask has no gradient; a float bias's gradient passes through the cast
    return (grad.to(ctx.input_dtype) if ctx.input_dtype.is_floating_point else None), None, None


def _setup_context(ctx, inputs, output):
    ctx.input_dtype = inputs[0].dtype


attention_bias.register_autograd(_backward, setup_context=_setup_context)
