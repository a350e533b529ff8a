"""Masks of dynamic graphs become torch.ops.unsloth.attention_bias: the same attention at every
length, with strides Inductor can prove aligned (no recompile on `L % 8`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import unsloth_compile  # noqa: F401
from unsloth_compile.config import Config
from unsloth_compile.ops.attention_bias import padded_strides
from unsloth_compile.passes.attention_bias import ALIGNMENT, align_attention_masks, strides_known_aligned
from unsloth_compile.report import Report, collect_reports

from helpers import VOCAB, peft_wrap, tiny_causal_lm


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("length", [1, 5, 8, 13])
def test_op_matches_sdpa_with_the_mask(dtype, length):
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, 3, length, 8, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.rand(2, 1, length, length, generator=g) > 0.3
    keep |= torch.eye(length, dtype=torch.bool)  # every row sees something
    mask = keep if dtype == torch.bool else torch.randn(2, 1, length, length, generator=g).to(dtype)
    bias = torch.ops.unsloth.attention_bias(mask, torch.float64, ALIGNMENT)
    assert bias.shape == mask.shape and bias.dtype == torch.float64
    assert all(s % ALIGNMENT == 0 for s, n in zip(bias.stride()[:-1], bias.shape[:-1]) if n > 1), bias.stride()
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(torch.float64)
                                                              if dtype != torch.bool else mask))


def test_float_bias_gradient_passes_through():
    mask = torch.randn(1, 1, 5, 5, requires_grad=True)
    bias = torch.ops.unsloth.attention_bias(mask, torch.float32, ALIGNMENT)
    grad = torch.randn(1, 1, 5, 5)
    (bias * grad).sum().backward()
    torch.testing.assert_close(mask.grad, grad)


def test_padded_strides():
    assert padded_strides((2, 1, 13, 13), 8) == [208, 208, 16, 1]
    # a multiple of the alignment is padded too: a stride equal to the length would make the
    # bias contiguous at those lengths only, and a contiguity check would guard on L % 8
    assert padded_strides((4, 16), 8) == [24, 1]
    assert padded_strides((2, 1, 16, 16), 8) == [384, 384, 24, 1]


def _sdpa_graph(device: str, symbolic: bool):
    """A Dynamo-like graph `sdpa(q, k, v, attn_mask=mask)` whose placeholders carry fake
    (b, h, L, d) / (b, 1, L, L) values on `device`, L symbolic or 13."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    def attend(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask) * 2

    gm = torch.fx.symbolic_trace(attend)
    mode = FakeTensorMode(shape_env=ShapeEnv())
    with mode:
        length = mode.shape_env.create_unbacked_symint() if symbolic else 13
        if symbolic:
            torch._check(length >= 2)
        values = [torch.empty(2, 4, length, 16, device=device, dtype=torch.bfloat16) for _ in range(3)]
        values.append(torch.empty(2, 1, length, length, device=device, dtype=torch.bool))
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), values):
        node.meta["example_value"] = node.meta["val"] = value
    return gm


@pytest.mark.parametrize("device, symbolic, rewritten", [("cuda", True, True), ("cuda", False, False),
                                                          ("cpu", True, False)])
def test_pass_rewrites_symbolic_cuda_masks_only(device, symbolic, rewritten):
    gm = _sdpa_graph(device, symbolic)
    report = Report()
    align_attention_masks(gm, Config(), report)
    biases = [n for n in gm.graph.nodes if n.target is torch.ops.unsloth.attention_bias.default]
    assert len(biases) == report.counters["attention.mask_aligned"] == int(rewritten)
    if rewritten:
        (sdpa,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
        assert sdpa.kwargs["attn_mask"] is biases[0]
        value = biases[0].meta["example_value"]
        assert value.dtype == torch.bfloat16 and strides_known_aligned(value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_padded_lengths_compile_two_graphs_on_cuda():
    """Inductor on CUDA: the first length's static graph, then one dynamic graph for every length,
    L % 8 == 0 or not (without the aligned bias, a third graph guards on L % 8); losses equal eager's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = peft_wrap(tiny_causal_lm("llama")).cuda()
    model = peft_wrap(tiny_causal_lm("llama")).cuda()
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model, backend="unsloth")
    with collect_reports() as report:
        for step, length in enumerate([11, 13, 16, 7, 24]):
            batch = {k: v.cuda() for k, v in _padded_batch(length, step).items()}
            expected = eager(**batch).loss
            loss = compiled(**batch).loss
            torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    assert report.graphs == 2, report.counters
    assert report.counters["attention.mask_aligned"] == 2


def _padded_batch(length, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (3, length), generator=g)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, length - 2:] = 0
    mask[2, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_known_aligned_strides():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv())
    with mode:
        length = mode.shape_env.create_unbacked_symint()
        torch._check(length >= 2)
        plain = torch.empty(2, 1, length, length, dtype=torch.bool)
        aligned = torch.ops.unsloth.attention_bias(plain, torch.float16, ALIGNMENT)
    assert not strides_known_aligned(plain)
    assert strides_known_aligned(aligned)
