"""passes/attention.py: SDPA masks that would push a compiled attention off the fused kernels.

Each rewrite is checked three ways: numerics (output and gradients) against eager, the
report's counters, and the rewritten graph itself (the SDPA call's mask after the pass).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unsloth_compile import Config, Report
from unsloth_compile.backend import inductor_patches
from unsloth_compile.passes.attention import keep_attention_fused
from unsloth_compile.passes.attention import SDPA_TARGETS, is_all_true

from helpers import batch_for, dynamo_graphs, peft_wrap, tiny_causal_lm, train_and_compare


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
        if self.mask_kind == "positions_nonnegative":  # transformers 5.17's BERT mask without attention_mask
            q_idx = torch.arange(s, device=x.device)[None, None, :, None]
            return (q_idx >= 0).expand(b, -1, s, s)
        if self.mask_kind == "dense":
            return torch.rand(b, 1, s, s, generator=None, device=x.device) > 0.3
        if self.mask_kind.startswith(("causal", "shifted")):  # as transformers' sdpa_mask builds it
            q_idx = torch.arange(s, device=x.device)[None, None, :, None]
            kv_idx = torch.arange(s, device=x.device)[None, None, None, :]
            causal = (kv_idx <= q_idx + (1 if self.mask_kind == "shifted" else 0)).expand(b, -1, -1, s)
            if self.mask_kind == "causal_additive":
                return torch.where(causal, 0.0, torch.finfo(x.dtype).min).to(x.dtype)
            if self.mask_kind == "causal_padding":  # a padding mask read from the input
                return causal & (x[..., 0] > -0.5)[:, None, None, :]
            return causal
        return None

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(x), dropout_p=self.dropout)
        return out.transpose(1, 2).reshape(b, s, d)


def _captured_graph(model, *args):
    """Dynamo's graph of `model(*args)`, as the backend receives it."""
    (gm,) = dynamo_graphs(model, *args)
    return gm


def _sdpa_masks(gm):
    return [n.kwargs.get("attn_mask") for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]


def _compare(model, x, param_atol=1e-6, **options):
    """Compiled against eager: outputs, input gradient and each parameter's gradient (that one
    within param_atol: a sum over the batch, which a rewrite may order differently)."""
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
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=param_atol)
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


@pytest.mark.parametrize("dynamic", [False, True])
def test_positions_tested_against_zero_are_an_all_true_mask(dynamic):
    """`arange(s) >= 0`, broadcast along the keys: masks nothing at any size, so it is dropped
    (not made dense, which would keep the call off the kernels that take no mask)."""
    torch._dynamo.reset()
    model = Attention("positions_nonnegative")
    gm = _dynamic_graph(model, torch.randn(3, 7, 16)) if dynamic else _captured_graph(model, torch.randn(3, 7, 16))
    report = Report()
    keep_attention_fused(gm, Config(), report)
    assert _sdpa_masks(gm) == [None] and report.counters["attention.mask_dropped"] == 1
    report = _compare(model, torch.randn(2, 9, 16))
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


@pytest.mark.parametrize("kind", ["causal", "causal_additive"])
def test_causal_mask_from_positions_becomes_is_causal(kind):
    model, x = Attention(kind), torch.randn(3, 7, 16)
    gm = _captured_graph(model, x)
    assert _sdpa_masks(gm)[0] is not None
    report = Report()
    keep_attention_fused(gm, Config(), report)
    (sdpa,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]
    assert sdpa.kwargs.get("attn_mask") is None and sdpa.kwargs["is_causal"] is True
    assert report.counters["attention.mask_causal"] == 1
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.arange]  # chain erased
    report = _compare(model, x)
    assert report.counters["attention.mask_causal"] == 1


@pytest.mark.parametrize("kind", ["shifted", "causal_padding"])
def test_mask_that_is_not_purely_causal_is_kept(kind):
    """A constant mask one diagonal off SDPA's causal one, and a causal mask with padding read
    from the input (never evaluated at compile time), stay as they are."""
    model, x = Attention(kind), torch.randn(3, 7, 16)
    x[1, 5, 0] = -1.0  # one padded key in the second row
    gm = _captured_graph(model, x)
    report = Report()
    keep_attention_fused(gm, Config(), report)
    assert not report.counters["attention.mask_causal"] and report.counters["attention.kept"] == 1
    assert _sdpa_masks(gm)[0] is not None
    _compare(model, x)


def test_transformers_llama_causal_masks_become_is_causal_under_tracing(monkeypatch):
    """transformers with torch < 2.14 (the GPU image: 5.17 on 2.11) never skips the causal mask
    under compile (is_exporting() reads True there); simulated here. Every attention call then
    gets is_causal=True back, and training matches eager."""
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "is_torchdynamo_exporting", lambda: True)
    model = peft_wrap(tiny_causal_lm("llama"))
    ids = batch_for("llama", seed=0)
    gm = _captured_graph(model, ids["input_ids"])
    masks = _sdpa_masks(gm)
    assert len(masks) == 2 and all(m is not None for m in masks)  # what the pass meets
    report = train_and_compare(model, lambda step: batch_for("llama", seed=step), options={"inner": "aot_eager"},
                               steps=2).report
    assert report.counters["attention.mask_causal"] == 2 and not report.counters["attention.kept"]


def _dynamic_graph(model, *args):
    """Dynamo's graph of `model(*args)` compiled with symbolic sizes (dynamic=True)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=backend, dynamic=True)(*args)
    (gm,) = graphs
    return gm


@pytest.mark.parametrize("kind,rewritten", [("causal", True), ("shifted", False), ("causal_padding", False)])
def test_causal_mask_with_symbolic_lengths_is_rewritten_on_its_structure(kind, rewritten):
    """A dynamic graph's mask cannot be evaluated: transformers' arange comparison is
    rewritten on its structure, a shifted or padded one is kept; numerics at two lengths."""
    torch._dynamo.reset()
    model = Attention(kind)
    gm = _dynamic_graph(model, torch.randn(3, 7, 16))
    value = _sdpa_masks(gm)[0].meta["example_value"]
    assert not isinstance(value.shape[-1], int)  # symbolic: the evaluation path cannot run
    report = Report()
    keep_attention_fused(gm, Config(), report)
    assert report.counters["attention.mask_causal"] == int(rewritten)
    for seq in (7, 12):
        torch._dynamo.reset()
        x = torch.randn(2, seq, 16)
        eager_x, compiled_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected = model(eager_x)
        expected.square().sum().backward()
        from unsloth_compile.report import collect_reports

        with collect_reports() as got_report:
            got = torch.compile(model, backend="unsloth", dynamic=True, options={"inner": "aot_eager"})(compiled_x)
        got.square().sum().backward()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled_x.grad, eager_x.grad, rtol=1e-5, atol=1e-6)
        # Dynamo may compile the frame more than once (a float attribute specialised): every
        # compiled graph rewritten, or none
        causal, kept = got_report.counters["attention.mask_causal"], got_report.counters["attention.kept"]
        assert (causal >= 1 and not kept) if rewritten else (kept >= 1 and not causal)


def test_transformers_llama_with_symbolic_lengths_gets_is_causal(monkeypatch):
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "is_torchdynamo_exporting", lambda: True)
    torch._dynamo.reset()
    model = peft_wrap(tiny_causal_lm("llama"))
    gm = _dynamic_graph(model, batch_for("llama", seed=0)["input_ids"])
    report = Report()
    keep_attention_fused(gm, Config(), report)
    assert report.counters["attention.mask_causal"] == 2 and not report.counters["attention.kept"]
    assert all(n.kwargs.get("is_causal") is True
               for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS)


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

    model = peft_wrap(tiny_causal_lm("bert"), target_modules=["query", "key", "value", "dense"])
    model.base_model.model.config.attention_probs_dropout_prob = 0.0
    report = train_and_compare(model, lambda step: batch_for("bert", seed=step), options={"inner": "aot_eager"},
                               steps=2).report
    # transformers >= 5.24 passes no mask when none is given (nothing to report); 5.17 builds an
    # all-True one under tracing, which the pass drops: either way no call keeps a bad mask
    assert not [s for s in report.sites if s.pattern == "attention" and s.decision == "kept"]


def test_inductor_patches_for_modes_and_the_cudagraphs_option():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from unsloth_compile.report import Report

    shape_env = ShapeEnv()
    with FakeTensorMode(shape_env=shape_env):
        on_cuda = [torch.empty(4, 8, device="cuda"), torch.empty(8, 8, device="cuda")]
        on_cpu = [torch.empty(4, 8)]
        rows = shape_env.create_unbacked_symint()
        dynamic = [torch.empty(rows, 8, device="cuda")]
    graphs_on = {"triton.cudagraphs": True}
    # the default: CUDA graphs for static CUDA graphs only, each decision counted with its reason
    report = Report()
    assert inductor_patches(Config(), on_cuda, report) == graphs_on
    assert inductor_patches(Config(), on_cpu, report) == {}
    assert inductor_patches(Config(), dynamic, report) == {}
    assert inductor_patches(Config(), [*on_cuda, rows], report) == {}  # a SymInt input
    assert inductor_patches(Config(compress_activations="lowrank"), on_cuda, report) == {}
    assert report.counters == {"cudagraphs.on": 1, "cudagraphs.off (no CUDA inputs)": 1,
                               "cudagraphs.off (dynamic shapes)": 2,
                               "cudagraphs.off (compress_activations='lowrank' draws its projection on the host "
                               "each step)": 1}
    # explicit choices win over the shapes; never the skip-dynamic setting (it partitioned the
    # graph around the LoRA ops on torch 2.11)
    assert inductor_patches(Config(cudagraphs=True), dynamic) == graphs_on
    assert inductor_patches(Config(cudagraphs=False), on_cuda) == {}
    # the modes are torch's own table, whatever it holds in this torch version
    from torch._inductor import list_mode_options

    for mode in ("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        assert inductor_patches(Config(mode=mode, cudagraphs=True), on_cuda) == list_mode_options(mode)
        assert inductor_patches(Config(mode=mode), on_cpu) == list_mode_options(mode)
    assert inductor_patches(Config(mode="reduce-overhead"))["triton.cudagraphs"] is True
    assert "triton.cudagraphs" not in inductor_patches(Config(mode="max-autotune-no-cudagraphs"))
    with pytest.raises(ValueError, match="must be None, True or False"):
        Config(cudagraphs="yes")


def test_keep_outputs_across_replays_copies_only_cuda_scalars(monkeypatch):
    """The 0-d outputs of a CUDA-graph replay are copies; the rest pass through, in the
    caller's calling convention. (CPU: the CUDA test is swapped for 'any 0-d tensor'.)"""
    from unsloth_compile import backend

    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    loss, logits = torch.tensor(2.5), torch.randn(3, 4)

    def compiled(*args):
        return (loss, logits, len(args))

    out = backend.keep_outputs_across_replays(compiled)(1, 2)
    assert isinstance(out, tuple) and out[0] is not loss and torch.equal(out[0], loss)
    assert out[1] is logits and out[2] == 2

    def boxed(args):
        assert isinstance(args, list)
        return [loss, logits]

    boxed._boxed_call = True
    wrapped = backend.keep_outputs_across_replays(boxed)
    assert wrapped._boxed_call is True
    out = wrapped([1])
    assert isinstance(out, list) and out[0] is not loss and out[1] is logits


def test_keep_outputs_across_replays_around_real_inductor_training(monkeypatch):
    """The wrapper around what compile_fx really returns, called as Dynamo calls it (a real
    Inductor compile on CPU, where the graphs decision is forced on), over gradient
    accumulation: a gradient kept across a forward is replaced by a copy once (the pool's
    would be overwritten on CUDA), later backwards add into the copy; all as eager."""
    from unsloth_compile import backend

    monkeypatch.setattr(backend, "cudagraphs_decision", lambda cfg, inputs, gm=None, **kwargs: (True, "forced on for the test"))
    wrapped = []
    real_wrapper = backend.keep_outputs_across_replays
    monkeypatch.setattr(backend, "keep_outputs_across_replays", lambda fn: wrapped.append(fn) or real_wrapper(fn))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    xs = [torch.randn(5, 8) for _ in range(3)]
    compiled = torch.compile(model, backend="unsloth", options={"inner": "inductor"})
    first_grads, losses = None, []
    for i, x in enumerate(xs):
        loss = compiled(x).square().mean()
        if i == 1:  # the forward after the first backward moved the kept gradients
            assert all(p.grad is not g for p, g in zip(model.parameters(), first_grads))
        loss.backward()
        losses.append(loss.detach())
        if i == 0:
            first_grads = [p.grad for p in model.parameters()]
    assert wrapped, "the wrapper was not applied"
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    expected = [model(x).square().mean() for x in xs]
    for loss in expected:
        loss.backward()
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected).detach())
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize("kernel", ["flash", "efficient", "cudnn"])
def test_attention_kernel_preference_trains_like_eager(kernel):
    """attention_kernel: every SDPA call is rewritten to try that kernel first and reported;
    on CPU, where only some kernels exist, torch's next choice runs and training matches eager."""
    model = peft_wrap(tiny_causal_lm("llama"))
    report = train_and_compare(model, lambda step: batch_for("llama", seed=step),
                               options={"inner": "aot_eager", "attention_kernel": kernel}, steps=2).report
    sites = [s for s in report.sites if s.pattern == "attention"]
    assert len(sites) == 2 and all(s.decision == "rewritten" and kernel in s.reason for s in sites)
    assert report.counters[f"attention.prefer_{kernel}"] == 2


def test_prefer_functions_set_the_backend_priority(monkeypatch):
    """prefer_*: SDPA runs with the preferred backend first in torch's priority list (read
    inside the call), and the functions pickle by name (Inductor's caches)."""
    import pickle

    from torch.nn.attention import SDPBackend

    from unsloth_compile.passes import attention

    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch._C._get_sdp_priority_order()[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q = torch.randn(1, 2, 5, 8)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        out = attention.PREFERRED[name](q, q, q, is_causal=True)
        torch.testing.assert_close(out, real(q, q, q, is_causal=True))
        assert seen[-1] == int(backend)
        assert pickle.loads(pickle.dumps(attention.PREFERRED[name])) is attention.PREFERRED[name]


# ----------------------------------------------------------------------------- grouped-query attention


class RepeatedKV(torch.nn.Module):
    """SDPA on k and v repeated to the query heads: `order` "grouped" as transformers' repeat_kv
    (query head j reads kv head j // n, what enable_gqa computes), "tiled" the other way round
    (head j reads kv head j % h_kv: not GQA, must be left alone)."""

    def __init__(self, order: str = "grouped", heads: int = 6, kv_heads: int = 2, head_dim: int = 8):
        super().__init__()
        self.order, self.heads, self.kv_heads, self.head_dim = order, heads, kv_heads, head_dim
        self.q = torch.nn.Linear(16, heads * head_dim)
        self.kv = torch.nn.Linear(16, 2 * kv_heads * head_dim)

    def repeat(self, x):
        b, h, s, d = x.shape
        n = self.heads // h
        if self.order == "grouped":
            return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)
        return x[:, None, :, :, :].expand(b, n, h, s, d).reshape(b, n * h, s, d)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, self.repeat(k), self.repeat(v), is_causal=True)
        return out.transpose(1, 2).reshape(b, s, -1)


def _sdpa_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]


def test_repeated_kv_becomes_enable_gqa_and_keeps_the_values():
    torch.manual_seed(0)
    model, x = RepeatedKV("grouped"), torch.randn(3, 11, 16)
    gm = _captured_graph(model, x)
    report = Report()
    keep_attention_fused(gm, Config(attention_gqa=True), report)
    (call,) = _sdpa_calls(gm)
    assert call.kwargs["enable_gqa"] is True and report.counters["attention.gqa"] == 1
    assert [tuple(a.meta["example_value"].shape) for a in call.args[1:3]] == [(3, 2, 11, 8)] * 2
    assert not [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "expand"]  # repeats erased
    # enable_gqa sums a group's k/v gradients inside SDPA's backward, the repeat in expand's:
    # another order of fp32 sums (measured: one element of 512 off by 3.7e-6, torch 2.13 CPU)
    report = _compare(model, x, param_atol=1e-5, attention_gqa=True)
    assert report.counters["attention.gqa"] == 1


def test_tiled_repeat_is_not_gqa_and_option_off_leaves_the_repeat():
    torch.manual_seed(0)
    for model, options in ((RepeatedKV("tiled"), {"attention_gqa": True}), (RepeatedKV("grouped"), {"attention_gqa": False})):
        x = torch.randn(2, 5, 16)
        gm = _captured_graph(model, x)
        report = Report()
        keep_attention_fused(gm, Config(**options), report)
        assert "enable_gqa" not in _sdpa_calls(gm)[0].kwargs and not report.counters["attention.gqa"]
        _compare(model, x, **options)


def test_transformers_llama_repeat_kv_under_tracing_gets_enable_gqa(monkeypatch):
    """The GPU image's graph (transformers 5.17 on torch 2.11: a causal mask built under tracing,
    so transformers repeats k and v instead of passing enable_gqa): the mask becomes is_causal,
    then k and v go in at their 2 heads; training matches eager."""
    import transformers.masking_utils as masking

    monkeypatch.setattr(masking, "is_torchdynamo_exporting", lambda: True)
    model = peft_wrap(tiny_causal_lm("llama"))
    ids = batch_for("llama", seed=0)
    gm = _captured_graph(model, ids["input_ids"])
    assert all("enable_gqa" not in c.kwargs or not c.kwargs["enable_gqa"] for c in _sdpa_calls(gm))
    result = train_and_compare(model, lambda step: batch_for("llama", seed=step),
                               options={"inner": "aot_eager", "attention_gqa": True}, steps=2)
    counters = result.report.counters
    assert counters["attention.mask_causal"] == 2 and counters["attention.gqa"] == 2 and not counters["attention.kept"]


def test_gqa_is_kept_on_cuda_outside_the_gqa_kernels_range():
    """On CUDA, fp32 (or head_dim > 256) with enable_gqa would leave the fused kernels (the
    efficient kernel refuses grouped heads): the repeat stays, reported. The query's example
    value is replaced by a fake CUDA tensor (no GPU needed)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from unsloth_compile.passes.attention import check_gqa

    torch.manual_seed(0)
    gm = _captured_graph(RepeatedKV("grouped"), torch.randn(2, 5, 16))
    (call,) = _sdpa_calls(gm)
    assert check_gqa(call) == ((call.args[1].args[0].args[0].args[0], call.args[2].args[0].args[0].args[0]), None)
    mode = FakeTensorMode()
    for dtype, head_dim, ok in ((torch.float32, 8, False), (torch.bfloat16, 8, True), (torch.float16, 256, True),
                                (torch.bfloat16, 320, False)):
        call.args[0].meta["example_value"] = FakeTensor(
            mode, torch.empty(2, 6, 5, head_dim, dtype=dtype, device="meta"), torch.device("cuda"))
        kv, reason = check_gqa(call)
        assert (kv is not None) == ok and (reason is None) == ok, (dtype, head_dim, reason)
        assert ok or "outside the GQA kernels' range" in reason


def _packed_test(step: int):
    def build(x):
        n = x.shape[-1]
        positions = torch.arange(0, n * step, step).unsqueeze(0).expand(2, -1)
        steps = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1)
        counts = (steps != 1).cumsum(-1)
        return x + (counts[:, :, None] == counts[:, None, :])
    return build


def test_the_packed_sequence_test_is_all_true_only_on_positions_that_count_up_by_one():
    """transformers' packed-sequence test (`find_packed_sequence_indices`) on positions from an
    arange: True everywhere by construction with step 1 (attention.is_all_true), not with step 2."""
    import operator

    from unsloth_compile.passes.attention import is_all_true
    from helpers import dynamo_graphs

    for step, expected in ((1, True), (2, False)):
        (gm,) = dynamo_graphs(_packed_test(step), torch.zeros(2, 6, 6))
        (test,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.eq]
        assert is_all_true(test) is expected, step


def test_a_dead_mask_chain_read_twice_is_erased_once():
    """erase_dead_chain on a mask whose producers form a diamond (one node read by two others)
    erases each node once, without torch.fx's 'already erased' warning."""
    import warnings

    from torch.fx import symbolic_trace

    from unsloth_compile.passes.attention import erase_dead_chain

    def diamond(x):
        positions = torch.arange(x.shape[0])
        causal = positions[:, None] <= positions[None, :]
        mask = causal & causal.logical_not().logical_not()  # `causal` read by the mask and by its other branch
        return x, mask

    gm = symbolic_trace(diamond)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    mask = output.args[0][1]
    output.args = ((output.args[0][0],),)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        erase_dead_chain(gm, mask)
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "output"]
