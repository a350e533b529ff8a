"""Option `recompute_ffn_products` (passes/compress/compress_saved.py, `partition_recomputing_ffn_products`):
without any compression, backward recomputes each FFN's product act(gate) * up from the gate
and up instead of saving it. Exact: the same loss and gradients as the default partition, one
M x F tensor less kept per FFN, reported per site and counted."""

from __future__ import annotations

import pytest
import torch

from helpers import batch_for, peft_wrap, saved_for_backward, tiny_causal_lm
from unsloth_compile import Config
from unsloth_compile.report import collect_reports


def _run(recompute: bool, precision: str = "default"):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = peft_wrap(tiny_causal_lm("llama"))
    if precision == "fp8":  # the frozen bases stored in fp8 (emulated on CPU): lora_linear_fp8 sites
        from unsloth_compile import fp8

        assert len(fp8.convert(model).converted) == 14
    if precision == "2:4":  # the frozen bases pruned 2:4: lora_linear_sparse24 sites
        from unsloth_compile import sparsity

        sparsity.prune(model)
    model.train()
    batch = batch_for("llama", batch=3, seq=13)
    options = {"inner": "aot_eager", "recompute_ffn_products": recompute, "summary": False}
    options.update({"precision": precision} if precision != "2:4" else {"sparsity": "2:4"})
    compiled = torch.compile(model, backend="unsloth", options=options)
    with collect_reports() as report:
        loss = compiled(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    saved, _ = saved_for_backward(lambda: compiled(**batch).loss)
    torch._dynamo.reset()
    return loss.detach(), grads, report, saved


@pytest.mark.parametrize("precision", ["default", "fp8", "2:4"])
def test_recomputed_products_give_the_same_gradients_and_save_their_bytes(precision):
    """Also with the bases in fp8 or 2:4: the gate and up then come out of lora_linear_fp8 or
    lora_linear_sparse24, and the product is recomputed as with the dense op (before, it was
    saved: +2 GiB on llama-1b in fp8)."""
    loss0, grads0, report0, saved0 = _run(False, precision)
    loss1, grads1, report1, saved1 = _run(True, precision)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert grads1.keys() == grads0.keys() and any("lora_A" in n for n in grads1)
    for name in grads0:  # the same math, recomputed: fp32 rounding at most
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7, msg=name)
    recomputed = [s for s in report1.sites if s.pattern == "compress_saved" and s.decision == "recomputed"]
    assert sorted(s.module.split("layers.")[1] for s in recomputed) == ["0.mlp", "1.mlp"]
    assert not [s for s in report0.sites if s.pattern == "compress_saved"]
    nothing_compressed = [s for s in report1.sites if s.pattern == "compress_saved" and s.decision == "compressed"]
    assert nothing_compressed == []
    # each FFN product is fp32 [3, 13, 96] here: exactly those bytes are no longer kept
    product_bytes = 2 * 3 * 13 * 96 * 4
    assert report1.counters["compress_saved.recompute_bytes_saved"] == product_bytes
    assert saved0 - saved1 == product_bytes


def test_recompute_default_follows_the_partition_and_true_needs_one():
    assert Config.from_options({"inner": "aot_eager"}).recomputes_ffn_products
    assert Config.from_options({"inner": "inductor"}).recomputes_ffn_products
    assert not Config.from_options({"inner": "eager"}).recomputes_ffn_products  # no partition: nothing to do
    assert not Config.from_options({"inner": "inductor", "recompute_ffn_products": False}).recomputes_ffn_products
    with pytest.raises(ValueError, match="recompute_ffn_products=True needs AOTAutograd"):
        Config.from_options({"recompute_ffn_products": True, "inner": "eager"})


def test_explain_reports_the_recomputed_products_a_real_compile_makes():
    """explain() runs AOTAutograd's partition (aot_eager) unless nothing there is on, so its
    report lists the FFN products the default compile recomputes; with the option off it
    stays plain eager and lists none."""
    import unsloth_compile

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = peft_wrap(tiny_causal_lm("llama"))
    model.train()
    report = unsloth_compile.explain(model, **batch_for("llama", batch=3, seq=13))
    recomputed = [s for s in report.sites if s.pattern == "compress_saved" and s.decision == "recomputed"]
    assert sorted(s.module.split("layers.")[1] for s in recomputed) == ["0.mlp", "1.mlp"]
    assert report.counters["lora_linear.fused"] == 14  # the LoRA sites as before
    torch._dynamo.reset()
    off = unsloth_compile.explain(model, **batch_for("llama", batch=3, seq=13),
                                  options={"recompute_ffn_products": False})
    assert not [s for s in off.sites if s.pattern == "compress_saved"]
    assert off.counters["lora_linear.fused"] == 14
    torch._dynamo.reset()
