"""`torch.ops.unsloth.packed_attention`: causal attention over packed rows, within each sequence.

    unsloth::packed_attention           (q, k, v, position_ids, scale) -> (out, lse, rng, unused)
    unsloth::packed_attention_backward  (grad_out, q, k, v, out, lse, rng, unused, position_ids, scale)
                                        -> (dq, dk, dv)

q is (b, hq, L, d), k and v (b, hkv, L, d) with hq a multiple of hkv (grouped heads read kv
head j // (hq / hkv), as SDPA's `enable_gqa`); position_ids is (b, L) or (1, L) and restarts at
each packed sequence: a sequence starts at each row start and wherever the position does not
step by 1 (transformers' `find_packed_sequence_indices`). Token i attends to token j when both
are in one sequence and j <= i. `out` is (b, hq, L, d), a view of a (b, L, hq, d) buffer, as
SDPA returns it; the other outputs exist for backward.

CUDA, fp16/bf16, head dim <= 256 and a multiple of 8: flash-attention's varlen kernels
(`aten::_flash_attention_forward` with cumulative sequence lengths): every sequence is its own
causal problem and no work is spent across sequences, so a packed row costs what its sequences
cost alone. The sequence boundaries are read on the host, one sync per call: graphs holding
this op do not run as CUDA graphs (backend.cudagraphs_decision). Anything else: the reference,
SDPA with the block-diagonal causal mask (exact; the CPU oracle of the tests).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sequence_starts(position_ids: Tensor, batch: int) -> Tensor:
    """(batch * L,) bool: True where a packed sequence starts in the flattened rows."""
    positions = position_ids.expand(batch, -1)
    step = torch.diff(positions, dim=-1, prepend=positions[:, :1] - 1)
    starts = step != 1
    starts[:, 0] = True
    return starts.reshape(-1)


def block_causal_mask(position_ids: Tensor, batch: int) -> Tensor:
    """(batch, 1, L, L) bool: same sequence and key position <= query position."""
    length = position_ids.shape[-1]
    sequence = sequence_starts(position_ids, batch).view(batch, length).cumsum(-1)
    positions = torch.arange(length, device=position_ids.device)
    same = sequence[:, None, :, None] == sequence[:, None, None, :]
    causal = positions[None, None, None, :] <= positions[None, None, :, None]
    return same & causal


def flash_supports(q: Tensor, k: Tensor, dropout_p: float = 0.0) -> tuple[bool, str]:
    """(the varlen kernels run these inputs, why not)."""
    if q.device.type != "cuda":
        return False, f"{q.device.type} tensors (the varlen kernels are CUDA only)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False, f"{q.dtype} (the varlen kernels take fp16/bf16)"
    d = q.shape[-1]
    if d > 256 or d % 8:
        return False, f"head dim {d} (the varlen kernels take <= 256, a multiple of 8)"
    if q.shape[1] % k.shape[1]:
        return False, f"{q.shape[1]} query heads over {k.shape[1]} kv heads"
    if dropout_p:
        return False, "attention dropout"
    return True, ""


def _reference_forward(q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor, scale: float) -> Tensor:
    mask = block_causal_mask(position_ids, q.shape[0])
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _reference_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor,
                        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Attention's gradients written out (an op's implementation runs below autograd):
    P = softmax(s Q K^T, masked), dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)),
    dQ = s dS K, dK = s dS^T Q; grouped heads sum their kv gradients."""
    b, hkv = k.shape[:2]
    groups = q.shape[1] // hkv
    k_all = k.repeat_interleave(groups, dim=1)
    v_all = v.repeat_interleave(groups, dim=1)
    mask = block_causal_mask(position_ids, b)
    probs = (scale * q @ k_all.transpose(-1, -2)).masked_fill(~mask, float("-inf")).softmax(-1)
    out = probs @ v_all
    grad_v = probs.transpose(-1, -2) @ grad_out
    grad_scores = probs * (grad_out @ v_all.transpose(-1, -2) - (grad_out * out).sum(-1, keepdim=True))
    grad_q = scale * grad_scores @ k_all
    grad_k = scale * grad_scores.transpose(-1, -2) @ q

    def per_kv_head(x: Tensor) -> Tensor:
        return x.unflatten(1, (hkv, groups)).sum(2)
    return grad_q, per_kv_head(grad_k), per_kv_head(grad_v)


def _flat(x: Tensor) -> Tensor:
    """(b, h, L, d) -> (b * L, h, d), the varlen kernels' layout (free for SDPA's usual views)."""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b * length, h, d)


def _cumulative_lengths(position_ids: Tensor, batch: int) -> tuple[Tensor, int]:
    """(int32 cumulative sequence lengths on the device, longest sequence): one host sync."""
    starts = sequence_starts(position_ids, batch).nonzero().flatten().cpu()
    total = batch * position_ids.shape[-1]
    bounds = torch.cat([starts, torch.tensor([total])])
    longest = int((bounds[1:] - bounds[:-1]).max())
    return bounds.to(device=position_ids.device, dtype=torch.int32), longest


def _rng_placeholders(device) -> tuple[Tensor, Tensor]:
    return (torch.empty((2,), dtype=torch.uint64, device=device),
            torch.empty((), dtype=torch.uint64, device=device))


@torch.library.custom_op("unsloth::packed_attention", mutates_args=())
def packed_attention(q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor,
                     scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b, hq, length, d = q.shape
    if not flash_supports(q, k)[0]:
        out = _reference_forward(q, k, v, position_ids, scale)
        out = out.transpose(1, 2).contiguous().transpose(1, 2)  # the layout the fake promises
        lse = q.new_empty((hq, b * length), dtype=torch.float32)  # unused by the reference backward
        return (out, lse, *_rng_placeholders(q.device))
    cu, longest = _cumulative_lengths(position_ids, b)
    out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
        _flat(q), _flat(k), _flat(v), cu, cu, longest, longest, 0.0, True, False, scale=scale)
    return out.view(b, length, hq, d).transpose(1, 2), lse, rng, unused


@packed_attention.register_fake
def _(q, k, v, position_ids, scale):
    b, hq, length, d = q.shape
    out = q.new_empty((b, length, hq, d)).transpose(1, 2)
    return (out, q.new_empty((hq, b * length), dtype=torch.float32), *_rng_placeholders(q.device))


@torch.library.custom_op("unsloth::packed_attention_backward", mutates_args=())
def packed_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              rng: Tensor, unused: Tensor, position_ids: Tensor,
                              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    b, hq, length, d = q.shape
    if not flash_supports(q, k)[0]:
        return _reference_backward(grad_out, q, k, v, position_ids, scale)
    cu, longest = _cumulative_lengths(position_ids, b)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        _flat(grad_out), _flat(q), _flat(k), _flat(v), _flat(out), lse, cu, cu, longest, longest, 0.0, True,
        rng, unused, scale=scale)
    hkv = k.shape[1]
    return (dq.view(b, length, hq, d).transpose(1, 2), dk.view(b, length, hkv, d).transpose(1, 2),
            dv.view(b, length, hkv, d).transpose(1, 2))


@packed_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, rng, unused, position_ids, scale):
    def like(x):
        b, h, length, d = x.shape
        return x.new_empty((b, length, h, d)).transpose(1, 2)
    return like(q), like(k), like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, position_ids, scale = inputs
    out, lse, rng, unused = output
    ctx.save_for_backward(q, k, v, out, lse, rng, unused, position_ids)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse, grad_rng, grad_unused):
    q, k, v, out, lse, rng, unused, position_ids = ctx.saved_tensors
    dq, dk, dv = packed_attention_backward(grad_out, q, k, v, out, lse, rng, unused, position_ids, ctx.scale)
    return dq, dk, dv, None, None


packed_attention.register_autograd(_backward, setup_context=_setup_context)
