"""Cross-entropy on returned logits (kernels/logits_cross_entropy.py, torch.ops.unsloth.
logits_cross_entropy, option cross_entropy_on_logits): the Triton kernels (interpreter, fp32 and
fp16) and the reference against F.cross_entropy on the fp32 logits and a float64 formula,
every gradient, ignored rows, a vocabulary not a multiple of the tile, one row; the rewrite on
a stock transformers Llama (which returns its logits), its refusals, and the bytes it saves."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import unsloth_compile
from unsloth_compile.kernels import logits_cross_entropy as kernel

from helpers import llama_batch_with_prompt, peft_wrap, saved_for_backward, saved_tensors, tiny_causal_lm, train_and_compare

OP = torch.ops.unsloth.logits_cross_entropy


def _inputs(rows, vocab, dtype, seed=0, ignore=(1,)):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=g)
    for i in ignore:
        if i < rows:
            target[i] = -100
    return logits, target


def _float64(logits, target, reduction, ignore_index=-100):
    x = logits.double().requires_grad_()
    loss = F.cross_entropy(x, target, ignore_index=ignore_index, reduction=reduction)
    return loss, torch.autograd.grad(loss, x)[0]


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows,vocab,ignore", [(37, 5003, (1, 5)), (1, 9000, ()), (4, 17, (0, 1, 2, 3)),
                                               (64, 4096, (7,))])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_op_matches_float64_and_eager_fp32(impl, dtype, rows, vocab, ignore, reduction):
    logits, target = _inputs(rows, vocab, dtype, ignore=ignore)
    x = logits.clone().requires_grad_()
    loss = OP(x, target, -100, reduction, impl)
    grad_out = torch.tensor(0.75)
    (grad,) = torch.autograd.grad(loss, x, grad_out)
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.shape == logits.shape
    want_loss, want_grad = _float64(logits, target, reduction)
    if len(ignore) == rows and reduction == "mean":  # every row ignored: 0 / 0, as torch
        assert loss.isnan() and want_loss.isnan()
        return
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    # the gradient in the logits' dtype: within that dtype's rounding of the float64 one
    tol = {torch.float32: 1e-6, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(grad.double(), 0.75 * want_grad, rtol=tol, atol=tol)
    eager = F.cross_entropy(logits.float(), target, ignore_index=-100, reduction=reduction)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
    for i in ignore:
        assert not grad[i].any()


def test_backward_saves_the_logits_and_the_rows_logsumexp_only():
    logits, target = _inputs(32, 1000, torch.float16)
    x = logits.requires_grad_()
    _, saved = saved_tensors(lambda: OP(x, target, -100, "mean", "auto"))
    assert sorted(tuple(t.shape) for t in saved) == [(32,), (32,), (32, 1000)]
    assert [t.dtype for t in saved if t.shape == (32, 1000)] == [torch.float16]  # the logits, not fp32


def test_opcheck():
    logits, target = _inputs(6, 130, torch.float32)
    torch.library.opcheck(OP.default, (logits.requires_grad_(), target, -100, "mean", "reference"))


def test_bad_arguments_are_clear_errors():
    logits, target = _inputs(6, 13, torch.float32)
    with pytest.raises(ValueError, match="reduction 'none'"):
        OP(logits, target, -100, "none", "reference")
    with pytest.raises(ValueError, match=r"logits \(rows, V\) and target \(rows,\)"):
        OP(logits, target[:3], -100, "mean", "reference")


# ----------------------------------------------------------------------------- the rewrite


OPTION = {"inner": "aot_eager", "cross_entropy_on_logits": True}


def test_stock_llama_returning_logits_trains_like_eager_with_the_option():
    model = peft_wrap(tiny_causal_lm("llama").to(torch.float16), target_modules=["q_proj"])  # fp32 adapters
    report = unsloth_compile.explain(model, **llama_batch_with_prompt(0), options={"cross_entropy_on_logits": True})
    (site,) = [s for s in report.sites if s.pattern == "logits_cross_entropy"]
    assert site.decision == "fused" and "float16 logits" in site.reason, str(report)
    torch._dynamo.reset()
    result = train_and_compare(model, llama_batch_with_prompt, options=OPTION, steps=2, rtol=2e-3, atol=2e-3)
    assert result.report.counters["logits_cross_entropy.fused"] >= 1


def test_off_by_default_and_refused_on_fp32_logits():
    model = peft_wrap(tiny_causal_lm("llama"), target_modules=["q_proj"])  # fp32 logits: nothing to save
    report = unsloth_compile.explain(model, **llama_batch_with_prompt(0))
    assert not [s for s in report.sites if s.pattern == "logits_cross_entropy"]
    torch._dynamo.reset()
    report = unsloth_compile.explain(model, **llama_batch_with_prompt(0), options={"cross_entropy_on_logits": True})
    (site,) = [s for s in report.sites if s.pattern == "logits_cross_entropy"]
    assert site.decision == "refused" and "not fp16/bf16" in site.reason, str(report)


def test_saved_bytes_drop_by_half_the_fp32_log_probabilities():
    """What backward keeps, compiled (aot_eager) with and without the option, on a half-precision
    Llama that returns its logits: the fp16 logits (2 bytes an element) instead of the fp32
    log-probabilities (4), i.e. at least rows x V x 2 bytes less."""
    model = peft_wrap(tiny_causal_lm("llama").to(torch.float16), target_modules=["q_proj"])
    batch = llama_batch_with_prompt(0)
    rows, vocab = batch["input_ids"].numel(), model.config.vocab_size

    def saved_bytes(options):
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend="unsloth", options={"inner": "aot_eager", **options})
        compiled(**batch).loss.backward()
        return saved_for_backward(lambda: compiled(**batch).loss)[0]
    without, with_option = saved_bytes({}), saved_bytes({"cross_entropy_on_logits": True})
    assert without - with_option >= rows * vocab * 2 * 0.9, (without, with_option)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cuda_bf16_large_vocabulary_against_float64(reduction):
    logits, target = _inputs(512, 128256, torch.bfloat16, ignore=(3, 300))
    x = logits.cuda().requires_grad_()
    loss = OP(x, target.cuda(), -100, reduction, "auto")
    (grad,) = torch.autograd.grad(loss, x)
    want_loss, want_grad = _float64(logits, target, reduction)
    torch.testing.assert_close(loss.double().cpu(), want_loss, rtol=1e-5, atol=1e-5)
    # bf16 gradient: within bf16 rounding (8 bits of mantissa) of the float64 one
    err = (grad.double().cpu() - want_grad).abs().max() / want_grad.abs().max()
    assert err < 1e-2, err
