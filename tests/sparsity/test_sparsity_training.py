"""options sparsity="2:4" under compile (CPU: aot_eager, the dense masked reference): a pruned
PEFT Llama trains as eager, sites counted and reported, refusals with their reasons; GPU tests
(marked) run the CUDA sparse GEMMs against the dense masked reference in bf16."""

from __future__ import annotations

import pytest
import torch

from helpers import batch_for, peft_wrap, tiny_causal_lm, train_and_compare
from unsloth_compile import sparsity
from unsloth_compile.kernels import knobs, sparse24
from unsloth_compile.report import collect_reports
from unsloth_compile.sparsity.mask import sparsity_problem, transposable_mask


def _llama64(dtype=torch.float32, layers=2, **lora):
    """A tiny Llama whose projections all fit the 2:4 GEMMs (multiples of 64)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                         vocab_size=96, num_hidden_layers=layers)
    return peft_wrap(tf.LlamaForCausalLM(cfg).to(dtype), **lora)


def _counters(model, options, batch):
    """The report of one compiled forward + backward, and its loss."""
    with collect_reports() as report:
        out = torch.compile(model, backend="unsloth", options=options)(**batch)
        out.loss.backward()
    report.loss = out.loss.detach()
    return report


@pytest.mark.parametrize("dropout,layers", [(0.0, 2), (0.1, 1)])
def test_pruned_llama_trains_as_eager_with_sparsity(dropout, layers):
    model = _llama64(layers=layers, lora_dropout=dropout)
    pruned = sparsity.prune(model)
    sites = 7 * layers
    assert len(pruned.converted) == sites
    cmp = train_and_compare(model, lambda step: batch_for("llama", seed=step),
                            options={"inner": "aot_eager", "sparsity": "2:4"}, steps=2)
    counters = cmp.report.counters
    assert counters["sparse24_linear.fused"] == sites and counters["lora_linear.fused"] == sites
    assert counters["sparse24_linear.refused"] == 0
    for site in cmp.report.fused:
        if site.pattern == "lora_linear":
            assert site.details["sparsity"] == "2:4" and "base 2:4 sparse" in site.reason
    if dropout:
        assert all(s.details.get("dropout_as_mask") for s in cmp.report.fused if s.pattern == "lora_linear")
    # the frozen bases stay 2:4 and unchanged by training
    for _, layer in sparsity.lora_base_layers(model):
        assert sparsity_problem(layer.base_layer.weight) is None


def test_pruned_bases_inside_checkpointed_layers():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                         vocab_size=96, num_hidden_layers=1)
    model = tf.LlamaForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft_wrap(model)
    sparsity.prune(model)
    model.train()
    cmp = train_and_compare(model, lambda step: batch_for("llama", seed=step),
                            options={"inner": "aot_eager", "sparsity": "2:4"}, steps=2)
    assert cmp.report.counters["sparse24_linear.fused"] == 7


def test_the_compiled_graph_calls_the_sparse_op():
    model = _llama64(layers=1)
    sparsity.prune(model)
    graphs = []

    def capture(gm, example_inputs):
        from unsloth_compile import Config, Report, fuse_lora_linears

        fuse_lora_linears(gm, Config(sparsity="2:4"), Report())
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=capture)(**batch_for("llama"))
    code = graphs[0].code
    assert code.count("unsloth.lora_linear_sparse24.default") == 7
    assert "unsloth.sparse24_linear" not in code and "lora_linear.default" not in code


def test_pruned_bases_run_dense_without_the_option():
    model = _llama64(layers=1)
    sparsity.prune(model)
    report = _counters(model, {"inner": "aot_eager"}, batch_for("llama"))
    assert report.counters["sparse24_linear.dense"] == 7 and report.counters["sparse24_linear.fused"] == 0
    assert report.counters["lora_linear.fused"] == 7
    assert all("dense GEMM" in s.reason for s in report.fused if s.pattern == "lora_linear")


def test_sites_without_a_pruned_base_are_refused_with_the_reason():
    model = peft_wrap(tiny_causal_lm("llama"))  # k/v and the MLP are not multiples of 64
    pruning = sparsity.prune(model)
    assert len(pruning.converted) == 4
    report = _counters(model, {"inner": "aot_eager", "sparsity": "2:4"}, batch_for("llama"))
    assert report.counters["sparse24_linear.fused"] == 4
    assert report.counters["sparse24_linear.refused"] == 10
    assert report.counters["lora_linear.fused"] == 14  # refused for sparsity, still fused dense
    refused = [s for s in report.fused if "sparsity_refused" in s.details]
    assert {s.module.split(".")[-1] for s in refused} == {"k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
    assert all("not 2:4-pruned" in s.details["sparsity_refused"] for s in refused)


def test_a_dtype_the_sparse_gemms_do_not_take_is_refused():
    model = _llama64(dtype=torch.float64, layers=1)
    sparsity.prune(model)
    batch = batch_for("llama")
    report = _counters(model, {"inner": "aot_eager", "sparsity": "2:4"}, batch)
    assert report.counters["sparse24_linear.refused"] == 7 and report.counters["sparse24_linear.fused"] == 0
    reason = next(s.details["sparsity_refused"] for s in report.fused if "sparsity_refused" in s.details)
    assert "computes in float64" in reason


def test_autocast_bf16_on_a_pruned_fp32_model():
    model = _llama64(layers=1)
    sparsity.prune(model)
    batch = batch_for("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(**batch).loss
        report = _counters(model, {"inner": "aot_eager", "sparsity": "2:4"}, batch)
    assert report.counters["sparse24_linear.fused"] == 7
    assert all("autocast" in s.reason for s in report.fused if s.pattern == "lora_linear")
    torch.testing.assert_close(report.loss.float(), eager.float(), rtol=2e-2, atol=2e-2)


def test_eager_sparse24_model_equals_its_reverted_dense_model():
    model = _llama64(layers=1)
    sparsity.prune(model)
    batch = batch_for("llama")
    with torch.no_grad():
        sparse_logits = model(**batch).logits
        assert sparsity.revert(model) == 7
        dense_logits = model(**batch).logits
    torch.testing.assert_close(sparse_logits, dense_logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------- GPU


def _cuda_pruned(n, k, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=g)
    return w * transposable_mask(w.abs())


def _layouts():
    """The layouts this GPU runs, as sparse24.layout_problem decides each one when it is asked for."""
    layouts = []
    for wanted in (sparse24.CUSPARSELT, sparse24.CUTLASS):
        with knobs.patch(sparse24_gemm=wanted):
            layout, _ = sparse24.layout_problem(torch.device("cuda"))
        if layout is not None:
            layouts.append(layout)
    assert layouts, "no 2:4 layout runs on this GPU"
    return layouts


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 256, 128), (77, 512, 256), (1, 128, 64), (0, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_sparse_gemms_match_the_dense_masked_weight(shape, dtype):
    m, n, k = shape
    w = _cuda_pruned(n, k, dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    dy = torch.randn(m, n, device="cuda", dtype=dtype)
    for layout in _layouts():
        compressed = sparse24.compress(w, layout)
        y = sparse24.base_forward(x, w, compressed, layout)
        dx = sparse24.base_grad_input(dy, w, compressed, layout)
        assert y.is_contiguous() and dx.is_contiguous() and y.dtype == dx.dtype == dtype
        assert y.shape == (m, n) and dx.shape == (m, k)
        if m == 0:
            continue
        # no further from float64 than cuBLAS on the same dense masked weight, within 1 bf16 ulp
        for got, dense, exact in ((y, x @ w.t(), x.double() @ w.double().t()),
                                  (dx, dy @ w, dy.double() @ w.double())):
            err, err_dense = (got.double() - exact).abs().max().item(), (dense.double() - exact).abs().max().item()
            assert err <= 2 * err_dense + 1e-2, (layout, err, err_dense)


@pytest.mark.gpu
def test_cuda_lora_linear_sparse24_matches_the_reference():
    w = _cuda_pruned(256, 512)
    x = torch.randn(4, 33, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    A = (torch.randn(16, 512, device="cuda") * 0.05).requires_grad_()
    B = (torch.randn(256, 16, device="cuda") * 0.05).requires_grad_()
    for layout in _layouts():
        compressed = sparse24.compress(w, layout)
        results = {}
        for impl in ("auto", "reference"):
            out = torch.ops.unsloth.lora_linear_sparse24(x, w, compressed, layout, None, A, B, None, None, None,
                                                         2.0, None, torch.bfloat16, impl)[0]
            results[impl] = [out, *torch.autograd.grad(out, [x, A, B], torch.ones_like(out))]
        for name, got, ref in zip(("out", "dx", "dA", "dB"), results["auto"], results["reference"]):
            rel = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
            assert rel < 1e-2, (layout, name, rel)


@pytest.mark.gpu
def test_cuda_sparse24_module_compresses_and_trains_compiled():
    model = _llama64(layers=1).to("cuda", torch.bfloat16)
    sparsity.prune(model)
    base = sparsity.lora_base_layers(model)[0][1].base_layer
    assert base.layout in (sparse24.CUSPARSELT, sparse24.CUTLASS), base.dense_reason
    batch = {k: v.cuda() for k, v in batch_for("llama", batch=2, seq=32).items()}
    eager = model(**batch).loss
    report = _counters(model, {"inner": "aot_eager", "sparsity": "2:4"}, batch)
    assert report.counters["sparse24_linear.fused"] == 7
    compiled = torch.compile(model, backend="unsloth", options={"sparsity": "2:4"})(**batch).loss
    torch.testing.assert_close(compiled.float(), eager.float(), rtol=2e-2, atol=2e-2)
