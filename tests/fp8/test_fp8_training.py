"""Float8 frozen base, conversion and compile (unsloth_compile/fp8/, passes/lora/fp8_linear.py):
the bf16/fp32 copies freed and the bytes saved reported, from_dense / to_dense, refusals with
reasons, the pass's two modes (stored, per call) matching eager fp8, a tiny PEFT Llama trained
compiled in fp8 against fp32, and GPU checks of the torch._scaled_mm path (marked gpu)."""

from __future__ import annotations

import copy
import gc
import itertools
import weakref

import pytest
import torch
from torch import nn

import unsloth_compile
from unsloth_compile import fp8
from unsloth_compile.errors import UnslothCompileError
from unsloth_compile.kernels.fp8 import fp8 as fp8_kernels
from unsloth_compile.report import collect_reports

from helpers import (LoraMLP, assert_compiled_matches_eager_under_bf16_autocast, batch_for, peft_wrap, tiny_causal_lm,
                     train_and_compare)

AOT = {"inner": "aot_eager", "summary": False}


def _weights_of_bases(model):
    return [layer.base_layer.weight for _, layer in fp8.lora_base_layers(model)]


def test_convert_frees_the_dense_weights_and_reports_the_bytes_saved():
    model = peft_wrap(tiny_causal_lm("llama"))
    dense = _weights_of_bases(model)
    shapes = [w.shape for w in dense]
    refs = [weakref.ref(w) for w in dense]
    del dense
    report = fp8.convert(model)
    gc.collect()
    assert len(report.converted) == 14 and not report.refused
    assert all(r() is None for r in refs), "a converted base weight is still alive"
    assert report.dense_bytes == sum(4 * n * k for n, k in shapes)  # fp32 model
    assert report.fp8_bytes == sum(n * k + 4 * n for n, k in shapes)
    assert "MiB saved" in str(report)
    layers = [layer.base_layer for _, layer in fp8.lora_base_layers(model)]
    assert all(isinstance(m, fp8.Fp8Linear) for m in layers)
    assert not any(name.endswith("base_layer.weight") for name, _ in model.named_parameters())
    model.to(torch.bfloat16)  # casts floating buffers, but not the codes or the scales
    assert all(m.weight_fp8.dtype == torch.float8_e4m3fn and m.weight_scale.dtype == torch.float32 for m in layers)
    assert all(m.dense_dtype == torch.bfloat16 for m in layers)
    assert fp8.revert(model) == 14
    assert all(isinstance(layer.base_layer, nn.Linear) for _, layer in fp8.lora_base_layers(model))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_from_dense_to_dense_round_trip(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        dense = nn.Linear(32, 48).requires_grad_(False)
        weight_nk = dense.weight
    else:
        from transformers.pytorch_utils import Conv1D

        dense = Conv1D(48, 32).requires_grad_(False)  # weight stored (in, out) = (32, 48)
        dense.weight.copy_(torch.randn(32, 48, generator=g))
        weight_nk = dense.weight.t()
    converted = fp8.Fp8Linear.from_dense(dense)
    assert converted.weight_fp8.shape == (48, 32) and converted.weight_scale.shape == (48,)
    x = torch.randn(3, 5, 32, generator=g)
    back = converted.to_dense()
    assert type(back) is type(dense) and not fp8.dense_weight(back).requires_grad
    # to_dense holds the values the codes stand for; converting it again keeps those values
    torch.testing.assert_close(fp8.dense_weight(back), converted.dequantized_weight(), rtol=0, atol=0)
    again = fp8.Fp8Linear.from_dense(back)
    torch.testing.assert_close(again.dequantized_weight(), converted.dequantized_weight(), rtol=0, atol=0)
    assert sqnr_db(fp8.dense_weight(back), weight_nk) > 25
    # eager forward: the fp8 op, against the dense layer within fp8's error
    out, want = converted(x), dense(x)
    assert out.shape == want.shape and sqnr_db(out, want) > 25


def sqnr_db(got, want):
    return (20 * torch.log10(want.double().norm() / (got.double() - want.double()).norm())).item()


def test_convert_refuses_unaligned_trainable_and_non_linear_layers():
    model = nn.ModuleDict({"a": nn.Linear(32, 100), "b": nn.Linear(100, 32), "c": nn.Linear(32, 48),
                           "d": nn.Linear(32, 32), "e": nn.Embedding(10, 32)})
    model.requires_grad_(False)
    model["d"].weight.requires_grad_(True)
    report = fp8.convert(model, select=lambda path, m: path in ("a", "b", "c", "d", "e"))
    assert report.converted == ["c"]
    assert "N (out_features)=100" in report.refused["a"] and "K (in_features)=100" in report.refused["b"]
    assert "trainable" in report.refused["d"] and "not a linear" in report.refused["e"]
    assert isinstance(model["c"], fp8.Fp8Linear) and isinstance(model["a"], nn.Linear)


# 48 -> 100 and 100 -> 32: 100 is not a multiple of the alignment the fp8 GEMM needs, so convert
# leaves those two layers dense.
UNALIGNED_SIZES = (32, 48, 100, 32)


def test_the_pass_fuses_stored_and_refuses_unaligned_per_call_sites_with_the_reason():
    """48 -> 100 and 100 -> 32 cannot run the fp8 GEMM: convert leaves them dense, the pass
    under precision="fp8" fuses them with the dense op and says why; 32 -> 48 is stored in
    fp8. The compiled model trains as the eager converted model does."""
    torch.manual_seed(0)
    model = LoraMLP(UNALIGNED_SIZES)
    report = fp8.convert(model)
    assert report.converted == ["layers.0.base_layer"] and len(report.refused) == 2
    x = torch.randn(3, 7, 32)
    result = train_and_compare(model, lambda step: (x + step,), options={**AOT, "precision": "fp8"}, steps=2)
    counters = result.report.counters
    assert counters["lora_linear.fused"] == 3 and counters["fp8_linear.stored"] == 1
    assert counters["fp8_linear.refused"] == 2 and counters["fp8_linear.per_call"] == 0
    sites = {s.module: s for s in result.report.sites}
    assert "base in fp8 (stored)" in sites["layers.0"].reason
    assert "fp8 refused: the base stays float32: N (out_features)=100" in sites["layers.1"].reason
    assert sites["layers.2"].details["fp8_refused"].endswith("which the fp8 GEMM (torch._scaled_mm) needs")


def test_stored_bases_under_autocast_fuse_and_match_eager():
    """An fp32 model with fp8 bases under bf16 autocast: Fp8Linear casts x as nn.Linear would,
    the pass peels that cast so the adapters match, and the op computes in bf16 as eager."""
    torch.manual_seed(0)
    model = LoraMLP(sizes=(32, 48, 64, 32))
    fp8.convert(model)
    report = assert_compiled_matches_eager_under_bf16_autocast(model, torch.randn(3, 7, 32), AOT)
    assert report.counters["fp8_linear.stored"] == 3
    assert all("autocast (computes in bfloat16), base in fp8 (stored)" in s.reason for s in report.sites)


def test_converted_model_compiled_trains_as_eager_fp8():
    """Every LoRA linear fused with its stored fp8 base; losses, every LoRA gradient and the
    parameters after 2 AdamW steps as the eager converted model (both run the same emulated
    fp8 base; dropout 0.1 as a mask with the same draws). Tolerance 1e-3 / 1e-4 rather than
    fp32's 1e-4 / 1e-5: a last-bit difference upstream (AOTAutograd's decompositions of the
    norms) can flip one fp8 rounding, a 1/16 step of one code (by step 3: 1.6e-4 in a LoRA
    gradient)."""
    torch.manual_seed(0)
    model = peft_wrap(tiny_causal_lm("llama"), lora_dropout=0.1)
    fp8.convert(model)
    result = train_and_compare(model, lambda step: batch_for("llama", seed=step), options=AOT, steps=2,
                               rtol=1e-3, atol=1e-4)
    counters = result.report.counters
    assert counters["lora_linear.fused"] == 14 and counters["fp8_linear.stored"] == 14
    assert counters["lora_linear.refused"] == 0
    sites = [s for s in result.report.sites if s.pattern == "lora_linear"]
    assert all(s.details["precision"] == "fp8" and "dropout as mask" in s.reason for s in sites)


def test_per_call_mode_on_a_dense_conv1d_model_equals_the_stored_model():
    """precision="fp8" on an unconverted GPT-2 (Conv1D bases, weight stored (in, out))
    quantises each base weight inside the op on each call: the same codes as convert stores,
    so the compiled dense model trains as the eager converted one."""
    torch.manual_seed(0)
    dense = peft_wrap(tiny_causal_lm("gpt2"))
    stored = copy.deepcopy(dense)
    assert len(fp8.convert(stored).converted) == 8
    with collect_reports() as report:
        per_call = torch.compile(dense, backend="unsloth", options={**AOT, "precision": "fp8"})
        for step in range(2):
            batch = batch_for("gpt2", seed=step)
            losses = []
            for m in (per_call, stored):
                torch.manual_seed(step)  # GPT-2's own dropouts: the same draws
                losses.append(m(**batch).loss)
                losses[-1].backward()
            torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    assert report.counters["fp8_linear.per_call"] == 8 and report.counters["lora_linear.fused"] == 8
    assert all("Conv1D, base in fp8 (quantised per call)" in s.reason for s in report.sites
               if s.pattern == "lora_linear")
    grads = [[p.grad for p in m.parameters() if p.requires_grad] for m in (dense, stored)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_fp8_training_loss_stays_close_to_fp32():
    """20 AdamW steps of a tiny PEFT Llama on a fixed batch: unsloth_compile.compile(model,
    precision="fp8") (converts in place) against eager fp32 from the same init. Measured here:
    loss 4.594 -> 3.971 in fp8, 3.970 in fp32 (0.04% apart at the end, at most 0.6% at any
    step; 30 steps: 3.846 vs 3.834). Bounds: learns (below 0.9x the first loss), within 2.5%
    of fp32 at every step."""
    torch.manual_seed(0)
    reference = peft_wrap(tiny_causal_lm("llama"), lora_dropout=0.0, r=8)
    model = copy.deepcopy(reference)
    unsloth_compile.compile(model, precision="fp8", **AOT)
    assert sum(isinstance(m, fp8.Fp8Linear) for m in model.modules()) == 14
    curves = []
    batch = batch_for("llama", batch=4, seq=16)
    with collect_reports() as report:
        for m in (reference, model):
            opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-2)
            curve = []
            for _ in range(20):
                loss = m(**batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                curve.append(loss.item())
            curves.append(curve)
    assert report.counters["fp8_linear.stored"] == 14
    fp32, fp8_curve = curves
    assert fp8_curve[-1] < 0.9 * fp8_curve[0], f"fp8 training did not learn: {fp8_curve}"
    for step, (a, b) in enumerate(zip(fp8_curve, fp32)):
        assert abs(a - b) <= 0.025 * b, (step, a, b)


def test_precision_option_is_validated():
    assert unsloth_compile.Config.from_options({"precision": "fp8"}).precision.value == "fp8"
    with pytest.raises(ValueError, match="precision='int4' is not valid; choose one of 'default', 'fp8'"):
        unsloth_compile.Config.from_options({"precision": "int4"})


# ----------------------------------------------------------------------------- GPU


def _cuda_fp8():
    if not torch.cuda.is_available():
        return False
    return fp8_kernels.scaled_mm_problem(torch.device("cuda")) is None


needs_fp8_gpu = pytest.mark.skipif(not _cuda_fp8(), reason="needs a CUDA GPU of capability >= 8.9")


@pytest.mark.gpu
@needs_fp8_gpu
def test_gpu_quantisation_is_bitwise_the_cpu_emulation():
    """The Triton rowwise kernel (kernels/fp8/fp8_quantize.py) against the torch reference on CPU:
    the same codes and scales bit for bit, also with the weight-scale fold of backward's dY, on
    awkward widths (rows held whole, rows read twice in tiles with a ragged last one: 20000) and
    rows of zeros, NaN, inf; several rows per program (257 rows: a ragged last program) and the
    fold's scales in bf16."""
    from unsloth_compile.kernels.fp8.fp8_quantize import MAX_ONE_TILE, quantize_rows

    for C in (4096, 14336, 5000, 24, 20000):
        x = torch.randn(257, C, dtype=torch.bfloat16) * torch.logspace(-4, 4, 257).reshape(-1, 1).bfloat16()
        x[3] = 0
        x[5, 9] = float("nan")
        x[7, C - 1] = float("-inf")
        col_scale = torch.exp2(torch.randint(-6, 6, (C,)).float())
        configs = [None, (2, 4), (4, 8)] if C <= MAX_ONE_TILE else [None]
        for fold, config in itertools.product((None, col_scale, col_scale.bfloat16()), configs):
            codes, dequant = quantize_rows(x.cuda(), None if fold is None else fold.cuda(), config=config)
            want_codes, want_dequant = fp8_kernels.quantize_rowwise(x, None if fold is None else fold.float())
            nan_rows = want_dequant.isnan().reshape(-1)
            assert nan_rows.tolist() == dequant.isnan().reshape(-1).cpu().tolist()
            assert codes.float().isnan().cpu().equal(want_codes.float().isnan())  # NaN codes: any NaN pattern
            finite = ~want_codes.float().isnan()
            assert torch.equal(codes.cpu().view(torch.uint8)[finite], want_codes.view(torch.uint8)[finite]), (C, config)
            assert torch.equal(dequant.cpu()[~nan_rows], want_dequant[~nan_rows])


@pytest.mark.gpu
@needs_fp8_gpu
@pytest.mark.parametrize("K,N", [(4096, 4096), (2048, 8192), (14336, 4096)])
def test_gpu_scaled_mm_op_against_the_emulation_and_float64(K, N):
    g = torch.Generator(device="cuda").manual_seed(0)
    M, r = 1024, 16
    x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
    w = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).bfloat16()
    codes, scales = fp8_kernels.quantize_weight(w)
    A = (torch.randn(r, K, device="cuda", generator=g) * K ** -0.5).requires_grad_()
    B = (torch.randn(N, r, device="cuda", generator=g) * 0.01).requires_grad_()
    dy = torch.randn(M, N, device="cuda", generator=g, dtype=torch.bfloat16)
    results = {}
    for impl in ("auto", "reference"):
        xi = x.detach().requires_grad_()
        out, _ = torch.ops.unsloth.lora_linear_fp8(xi, codes, scales, None, A, B, None, None, None, 2.0, None,
                                                   torch.bfloat16, impl)
        results[impl] = [out, *torch.autograd.grad(out, [xi, A, B], dy)]
    for name, got, want in zip(("out", "dx", "dA", "dB"), results["auto"], results["reference"]):
        rel = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert rel < 1e-2, f"{name}: relative error {rel:.2e} of torch._scaled_mm against the emulation"
    want_out = x.double() @ w.double().t() + 2.0 * (x.double() @ A.double().t()) @ B.double().t()
    want_dx = dy.double() @ w.double() + 2.0 * (dy.double() @ B.double()) @ A.double()
    for got, want in ((results["auto"][0], want_out), (results["auto"][1], want_dx)):
        assert 20 * torch.log10(want.norm() / (got.double() - want).norm()) >= 25


@pytest.mark.gpu
@needs_fp8_gpu
def test_gpu_convert_frees_the_reported_bytes_and_trains_compiled():
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = peft_wrap(tiny_causal_lm("llama", dtype=torch.bfloat16), r=8)
    gc.collect()
    before = torch.cuda.memory_allocated()
    report = fp8.convert(model)
    gc.collect()
    freed = before - torch.cuda.memory_allocated()
    assert freed >= 0.9 * report.saved_bytes, (freed, report.saved_bytes)
    batch = {k: v.cuda() for k, v in batch_for("llama").items()}
    eager = model(**batch).loss
    with collect_reports() as result:
        compiled = torch.compile(model, backend="unsloth", options={"inner": "inductor", "summary": False})
        loss = compiled(**batch).loss
        loss.backward()
    assert result.counters["fp8_linear.stored"] == 14
    torch.testing.assert_close(loss.float(), eager.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or _cuda_fp8(), reason="needs a CUDA GPU below capability 8.9")
def test_gpu_below_8_9_refuses_fp8_with_the_way_out():
    with torch.device("cuda"):
        model = peft_wrap(tiny_causal_lm("llama", dtype=torch.bfloat16))
    with pytest.raises(UnslothCompileError, match="compute capability 8.9"):
        fp8.convert(model)


def _tied_lora_llama():
    """A tiny PEFT Llama whose lm_head shares the input embedding's weight (as Llama-3.2-1B)."""
    model = peft_wrap(tiny_causal_lm("llama"))
    inner = model.get_base_model()
    inner.lm_head.weight = inner.model.embed_tokens.weight
    return model


def test_fp8_layers_all_stores_the_lm_head_too_and_counts_a_tied_weight_as_kept():
    """convert with frozen_linears (what precision="fp8", fp8_layers="all" converts): the 14 LoRA
    bases and the lm_head, not the adapters; the lm_head's weight is tied to the embedding, so
    it is reported shared and no bytes are counted saved for it (the embedding keeps it); the
    compiled model (lm_head as a standalone fp8_linear) trains as the eager converted one."""
    torch.manual_seed(0)
    model = _tied_lora_llama()
    inner = model.get_base_model()
    bases = _weights_of_bases(model)
    report = fp8.convert(model, select=fp8.frozen_linears)
    assert len(report.converted) == 15 and "base_model.model.lm_head" in report.converted
    assert not any("lora_" in path for path in report.converted)
    assert report.shared == {"base_model.model.lm_head": "base_model.model.model.embed_tokens.weight"}
    assert report.dense_bytes == sum(4 * w.numel() for w in bases)  # the lm_head's not among them
    vocab, hidden = inner.model.embed_tokens.weight.shape
    assert report.fp8_bytes == sum(w.numel() + 4 * w.shape[0] for w in bases) + vocab * hidden + 4 * vocab
    assert "its dense weight stays" in str(report) and isinstance(inner.lm_head, fp8.Fp8Linear)
    result = train_and_compare(model, lambda step: batch_for("llama", seed=step), options=AOT, steps=2,
                               rtol=1e-3, atol=1e-4)
    assert result.report.counters["fp8_linear.stored"] == 14


def test_compile_with_fp8_layers_all_converts_every_frozen_linear_and_checks_the_option():
    import warnings

    model = _tied_lora_llama()
    unsloth_compile.compile(model, precision="fp8", fp8_layers="all", **AOT)
    inner = model.get_base_model()
    assert isinstance(inner.lm_head, fp8.Fp8Linear)
    assert all(isinstance(m, fp8.Fp8Linear) for m in (l.base_layer for _, l in fp8.lora_base_layers(model)))
    model(**batch_for("llama", seed=0)).loss.backward()
    with pytest.raises(ValueError, match="fp8_layers='all' says which layers precision='fp8' stores"):
        unsloth_compile.Config.from_options({"fp8_layers": "all"})
    with pytest.raises(ValueError, match="option fp8_layers='some' is not valid"):
        unsloth_compile.Config.from_options({"precision": "fp8", "fp8_layers": "some"})
    # the backend alone converts nothing: it says so where a dense linear is left in the graph
    dense = peft_wrap(tiny_causal_lm("llama"))
    # A fresh cache: Dynamo's reason for not reusing the first model's dynamic-length entry
    # evaluates that entry's aliasing guard on this model, which has no weight_fp8 (KeyError).
    torch._dynamo.reset()
    compiled = torch.compile(dense, backend="unsloth", options={**AOT, "precision": "fp8", "fp8_layers": "all"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(**batch_for("llama", seed=0))
    assert any("the backend does not convert modules" in str(w.message) for w in caught)


@pytest.mark.gpu
@needs_fp8_gpu
def test_gpu_lm_head_in_fp8_keeps_logits_dx_and_loss_at_the_fp8_bar():
    """A llama-1b-sized lm_head (2048 -> 128256, bf16) stored in fp8 (fp8_layers="all"), on 2048
    tokens with random targets: logits and dX within 25 dB SQNR of float64 (torchao's bar, as for
    the LoRA bases), the cross-entropy within 1% of the bf16 layer's, and the dense layer's own
    error as a yardstick."""
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden, vocab, tokens = 2048, 128256, 2048
    dense = nn.Linear(hidden, vocab, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    dense.weight.copy_(torch.randn(vocab, hidden, device="cuda", generator=g) * hidden ** -0.5)
    head = fp8.Fp8Linear.from_dense(dense)
    h = torch.randn(tokens, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
    target = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    results = {}
    for name, layer in (("fp8", head), ("bf16", dense)):
        x = h.detach().requires_grad_()
        logits = layer(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
        loss.backward()
        results[name] = (logits, x.grad, loss.item())
    want_logits = h.double() @ dense.weight.double().t()
    dlogits = torch.softmax(want_logits, dim=-1)
    dlogits[torch.arange(tokens), target] -= 1
    want_dx = (dlogits / tokens) @ dense.weight.double()
    for name in ("fp8", "bf16"):
        logits, dx, loss = results[name]
        print(name, f"logits {sqnr_db(logits, want_logits):.1f} dB, dX {sqnr_db(dx, want_dx):.1f} dB, loss {loss:.5f}")
    assert sqnr_db(results["fp8"][0], want_logits) >= 25 and sqnr_db(results["fp8"][1], want_dx) >= 25
    assert abs(results["fp8"][2] - results["bf16"][2]) <= 0.01 * results["bf16"][2]
