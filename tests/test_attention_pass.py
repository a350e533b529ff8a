"""passes/attention.py: SDPA masks that would push a compiled attention off the fused kernels.

Each rewrite is checked three ways: numerics (output and gradients) against eager, the
report's counters, and the rewritten graph itself (the SDPA call's mask after the pass).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unsloth_compile import Config, Report
from unsloth_compile.backend import inductor_patches
from unsloth_compile.passes import keep_attention_fused
from unsloth_compile.passes.attention import SDPA_TARGETS, is_all_true

from helpers import peft_wrap, tiny_causal_lm


class Attention(torch.nn.Module):
    """q/k/v projections and SDPA with a mask built inside the model, as transformers does
    under tracing. `mask_kind`: "all_true" (new_ones + expand + &), "broadcast" (a per-query
    keep mask expanded along the keys: stride 0 in the last dimension), "dense" (a random
    bool mask), "none"."""

    def __init__(self, mask_kind: str, heads: int = 2, dim: int = 16, dropout: float = 0.0):
        super().__init__()
        self.mask_kind, self.heads, self.dropout = mask_kind, heads, dropout
        self.qkv = torch.nn.Linear(dim, 3 * dim)

    def mask(self, x: torch.Tensor):
        b, s, _ = x.shape
        if self.mask_kind == "all_true":
            ones = x.new_ones((b, s), dtype=torch.bool)
            return (ones[:, None, None, :].expand(b, 1, s, s) & x.new_ones((s, s), dtype=torch.bool))
        if self.mask_kind == "broadcast":
            keep_query = (x[..., 0] > -0.5)  # data-dependent values, one per (batch, query)
            return keep_query[:, None, :, None].expand(b, 1, s, s)
        if self.mask_kind == "dense":
            return torch.rand(b, 1, s, s, generator=None, device=x.device) > 0.3
        return None

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(x), dropout_p=self.dropout)
        return out.transpose(1, 2).reshape(b, s, d)


def _captured_graph(model, *args):
    """Dynamo's graph of `model(*args)`, as the backend receives it."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=backend)(*args)
    assert len(graphs) == 1
    return graphs[0]


def _sdpa_masks(gm):
    return [n.kwargs.get("attn_mask") for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]


def _compare(model, x, **options):
    eager_x, compiled_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = model(eager_x)
    expected.square().sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    from unsloth_compile.report import collect_reports

    with collect_reports() as report:
        got = torch.compile(model, backend="unsloth", options={"inner": "aot_eager", **options})(compiled_x)
    got.square().sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_x.grad, eager_x.grad, rtol=1e-5, atol=1e-6)
    for p, g in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    return report


def test_all_true_mask_is_dropped():
    model, x = Attention("all_true"), torch.randn(3, 7, 16)
    gm = _captured_graph(model, x)
    mask = _sdpa_masks(gm)[0]
    assert mask is not None and is_all_true(mask)
    report = Report()
    keep_attention_fused(gm, Config(), report)
    assert _sdpa_masks(gm) == [None]
    assert report.counters["attention.mask_dropped"] == 1 and report.counters["attention.rewritten"] == 1
    # the mask's producers went with it: nothing builds a bool tensor any more
    assert not [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "new_ones"]
    report = _compare(model, x)
    assert report.counters["attention.mask_dropped"] == 1


def test_mask_broadcast_along_keys_is_made_dense():
    model, x = Attention("broadcast"), torch.randn(3, 7, 16)
    gm = _captured_graph(model, x)
    before = _sdpa_masks(gm)[0].meta["example_value"]
    assert before.stride(-1) == 0  # what the fused CUDA kernels refuse
    report = Report()
    keep_attention_fused(gm, Config(), report)
    after = _sdpa_masks(gm)[0].meta["example_value"]
    assert after.stride(-1) == 1 and after.shape == (3, 1, 7, 7) and after.is_contiguous()
    assert report.counters["attention.mask_densified"] == 1
    report = _compare(model, x)
    assert report.counters["attention.mask_densified"] == 1


def test_broadcast_batch_dimension_stays_size_one():
    class Model(torch.nn.Module):
        def forward(self, q, keep):
            b, h, s, _ = q.shape
            mask = keep[None, None, :, None].expand(b, h, s, s)  # stride 0 in batch, heads and keys
            return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    q, keep = torch.randn(2, 3, 5, 4), torch.tensor([True, False, True, True, True])
    gm = _captured_graph(Model(), q, keep)
    keep_attention_fused(gm, Config(), Report())
    after = _sdpa_masks(gm)[0].meta["example_value"]
    assert after.shape == (1, 1, 5, 5) and after.stride(-1) == 1
    torch.testing.assert_close(gm(q, keep)[0] if isinstance(gm(q, keep), tuple) else gm(q, keep), Model()(q, keep))


def test_dense_mask_is_kept_and_reported_absent_mask_is_silent():
    model, x = Attention("dense"), torch.randn(2, 5, 16)
    gm = _captured_graph(model, x)
    report = Report()
    keep_attention_fused(gm, Config(), report)
    assert report.counters["attention.kept"] == 1 and not report.counters["attention.rewritten"]
    assert "dense along its last dimension" in report.sites[0].reason
    gm = _captured_graph(Attention("none"), x)
    report = Report()
    keep_attention_fused(gm, Config(), report)
    assert report.sites == [] and not report.counters


def test_option_off_leaves_the_mask():
    model, x = Attention("all_true"), torch.randn(2, 5, 16)
    report = _compare(model, x, attention=False)
    assert not any(s.pattern == "attention" for s in report.sites)


def test_all_true_mask_with_dropout_keeps_the_random_stream():
    """Dropping the mask removes no random op: same seed, same dropout draw, same output."""
    model, x = Attention("all_true", dropout=0.3), torch.randn(2, 6, 16)
    torch.manual_seed(1)
    expected = model(x)
    compiled = torch.compile(model, backend="unsloth", options={"inner": "aot_eager"})
    torch.manual_seed(1)
    got = compiled(x)
    torch.testing.assert_close(got, expected)


def test_peft_bert_training_matches_eager_with_attention_pass():
    """A real transformers BERT with LoRA: every SDPA call reported, training matches eager."""
    from helpers import batch_for, train_and_compare

    model = peft_wrap(tiny_causal_lm("bert"), target_modules=["query", "key", "value", "dense"])
    model.base_model.model.config.attention_probs_dropout_prob = 0.0
    report = train_and_compare(model, lambda step: batch_for("bert", seed=step), options={"inner": "aot_eager"},
                               steps=2).report
    # transformers >= 5.24 passes no mask when none is given (nothing to report); 5.17 builds an
    # all-True one under tracing, which the pass drops: either way no call keeps a bad mask
    assert not [s for s in report.sites if s.pattern == "attention" and s.decision == "kept"]


def test_inductor_patches_for_modes_and_the_cudagraphs_option():
    assert inductor_patches(Config()) == {}
    assert inductor_patches(Config(cudagraphs=True)) == {"triton.cudagraphs": True,
                                                          "triton.cudagraph_skip_dynamic_graphs": True}
    # the modes are torch's own table, whatever it holds in this torch version
    from torch._inductor import list_mode_options

    for mode in ("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        assert inductor_patches(Config(mode=mode, cudagraphs=True)) == list_mode_options(mode)
    assert inductor_patches(Config(mode="reduce-overhead"))["triton.cudagraphs"] is True
    assert "triton.cudagraphs" not in inductor_patches(Config(mode="max-autotune-no-cudagraphs"))
