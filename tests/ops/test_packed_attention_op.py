"""torch.ops.unsloth.packed_attention against attention over each packed sequence alone (float64
and the dtype of the test), and its gradients; the GPU cases run the varlen kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import unsloth_compile  # noqa: F401  registers the ops
from unsloth_compile.ops.packed_attention import block_causal_mask, flash_supports

# awkward packings: a 1-token sequence, odd lengths, one sequence filling the row
PACKINGS = [[1, 7, 13, 3], [24], [5, 5, 5, 5, 4], [2, 1, 1, 20]]


def packed_positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths])[None]


def per_sequence_attention(q, k, v, lengths, scale):
    """Each sequence alone, causal, k/v repeated to the query heads: the oracle."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], is_causal=True,
                                                   scale=scale))
        start += n
    return torch.cat(outs, dim=2)


def inputs(lengths, hq=4, hkv=2, d=16, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(1, h, total, d, generator=g, dtype=torch.float64).to(device, dtype)
               for h in (hq, hkv, hkv))
    return q, k, v, packed_positions(lengths).to(device)


@pytest.mark.parametrize("lengths", PACKINGS, ids=str)
@pytest.mark.parametrize("hkv", [4, 2, 1], ids=lambda h: f"hkv{h}")
def test_matches_each_sequence_alone_with_gradients(lengths, hkv):
    q, k, v, positions = inputs(lengths, hkv=hkv)
    scale = 0.3
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.ops.unsloth.packed_attention(*leaves, positions, scale)[0]
    expected_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = per_sequence_attention(*expected_leaves, lengths, scale)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(expected, expected_leaves, grad)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"d{name}: {m}")


def test_gradcheck():
    q, k, v, positions = inputs([3, 1, 4], hq=2, hkv=1, d=4)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda *t: torch.ops.unsloth.packed_attention(*t, positions, 0.5)[0], leaves)


def test_no_attention_across_a_boundary():
    """Changing the first sequence's keys and values leaves the second sequence's output alone."""
    q, k, v, positions = inputs([6, 9], dtype=torch.float32)
    before = torch.ops.unsloth.packed_attention(q, k, v, positions, 0.25)[0]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :6] += 3 * torch.randn_like(k2[:, :, :6])
    v2[:, :, :6] += 3 * torch.randn_like(v2[:, :, :6])
    after = torch.ops.unsloth.packed_attention(q, k2, v2, positions, 0.25)[0]
    torch.testing.assert_close(after[:, :, 6:], before[:, :, 6:])
    assert not torch.allclose(after[:, :, :6], before[:, :, :6])


def test_rows_of_a_batch_are_separate_sequences():
    """(2, L) position_ids counting on across the row boundary: row 2 starts its own sequence."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    positions = torch.arange(10).view(2, 5)
    out = torch.ops.unsloth.packed_attention(q, k, v, positions, 0.4)[0]
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.4)
    torch.testing.assert_close(out, expected)


def test_mask_is_block_diagonal_causal():
    mask = block_causal_mask(packed_positions([2, 3]), 1)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],
                            dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_output_layout_is_sdpa_layout():
    """(b, hq, L, d), a transposed view of (b, L, hq, d): transformers' transpose + contiguous is free."""
    q, k, v, positions = inputs([4, 4], dtype=torch.float32)
    out = torch.ops.unsloth.packed_attention(q, k, v, positions, 0.25)[0]
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()


def test_flash_support_reasons():
    q = torch.randn(1, 4, 8, 16)
    assert flash_supports(q, q) == (False, "cpu tensors (the varlen kernels are CUDA only)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", PACKINGS + [[700, 1, 300, 1047]], ids=lambda x: str(x)[:30])
def test_varlen_kernels_match_float64(dtype, lengths):
    q, k, v, positions = inputs(lengths, hq=8, hkv=2, d=64, dtype=dtype, device="cuda")
    assert flash_supports(q, k)[0]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.ops.unsloth.packed_attention(*leaves, positions, 0.125)[0]
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    exact_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = per_sequence_attention(*exact_leaves, lengths, 0.125)
    want = torch.autograd.grad(exact, exact_leaves, grad.double())
    # the dtype's own SDPA on each sequence alone, for the error budget
    own_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    own = per_sequence_attention(*own_leaves, lengths, 0.125)
    own_grads = torch.autograd.grad(own, own_leaves, grad)
    for name, a, b, ref in zip(["out", "dq", "dk", "dv"], [out, *got], [own, *own_grads], [exact, *want]):
        error = (a.double() - ref).norm() / ref.norm()
        own_error = (b.double() - ref).norm() / ref.norm()
        assert error <= 1.5 * own_error + 1e-4, (name, error.item(), own_error.item())


def test_graphs_with_the_op_never_run_as_cuda_graphs():
    """The op syncs with the host: even cudagraphs=True or mode='reduce-overhead' leaves them off."""
    from unsloth_compile.backend import cudagraphs_decision, inductor_patches
    from unsloth_compile.config import Config

    def attend(q, k, v, positions):
        return torch.ops.unsloth.packed_attention(q, k, v, positions, 0.25)[0] * 2

    q, k, v, positions = inputs([3, 4], dtype=torch.float32)
    gm = torch.fx.symbolic_trace(attend)
    use, why = cudagraphs_decision(Config(cudagraphs=True), [q, k, v, positions], gm)
    assert not use and "packed_attention" in why
    assert not inductor_patches(Config(mode="reduce-overhead"), [q, k, v, positions], None, gm)["triton.cudagraphs"]
    plain = torch.fx.symbolic_trace(lambda x: x * 2)
    assert cudagraphs_decision(Config(cudagraphs=True), [q], plain) == (True, "cudagraphs=True")
