"""torchao's NF4Tensor (torchao's nf4 weight-only quantisation, torchtune's QLoRA bases) against
the NF4 format (unsloth_compile/nf4/format.py): where the two agree (the packing, the 4-bit codes
but for values on a level midpoint's rounding), where they cannot (torchao's level table and its
linear 8-bit absmax codes), `from_torchao`'s shared codes and its bound against torchao's own
dequantisation, and the take-over of a model whose frozen linears hold NF4Tensors. Skipped
without torchao."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")
try:
    from torchao.quantization import to_nf4
except ImportError:  # older torchao releases keep it in torchao.dtypes
    from torchao.dtypes import to_nf4

from unsloth_compile import nf4  # noqa: E402
from unsloth_compile.dense_linear import lora_base_layers  # noqa: E402
from unsloth_compile.errors import UnslothCompileError  # noqa: E402
from unsloth_compile.report import collect_reports  # noqa: E402

from helpers import (assert_same_training, peft_wrap, train_steps as run_steps,  # noqa: E402
                     train_taking_over_four_bit_bases)
from test_nf4_training import AOT  # noqa: E402

# torchao double-quantises the absmax in groups of 256 blocks with no short group: N*K a multiple of 16384
SHAPES = [(256, 64), (64, 512), (96, 1024), (2, 8192)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.rand(shape[0], 1, generator=g) * 3 + 0.05  # rows of different scales: the absmax spread
    return (torch.randn(shape, generator=g) * scales).to(dtype)


def _nibbles(packed):
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()


def _sqnr(reference, x):
    reference, x = reference.double(), x.double()
    return (10 * torch.log10(reference.pow(2).sum() / (reference - x).pow(2).sum())).item()


def _torchao_absmax(t):
    """float64 [N*K/64]: each block's absmax as torchao's dequantisation uses it."""
    return t.dequantize_scalers(t.quantized_scalers, t.quantization_factor, t.scaler_block_size).double()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_4bit_codes_agree_but_on_a_midpoint(shape, dtype):
    """Same packing and the same nearest-level rule; torchao divides by the absmax in the weight's
    dtype against 4-decimal levels, this format multiplies by its reciprocal in float32 against
    bitsandbytes' levels, so a value within that rounding of a midpoint between two levels may
    take either: the codes that differ are neighbours, on a midpoint, and rare."""
    w = _weight(shape, dtype)
    t, q = to_nf4(w), nf4.quantize_nf4(w)
    theirs, ours = _nibbles(t.quantized_data), _nibbles(q.packed)
    differ = theirs != ours
    assert differ.float().mean() < 0.01
    assert ((theirs - ours)[differ].abs() == 1).all()
    ratio = (w.double().view(-1, 64) / w.double().view(-1, 64).abs().amax(1, keepdim=True)).view(-1)[differ]
    midpoint = (nf4.NF4_CODE.double()[theirs[differ]] + nf4.NF4_CODE.double()[ours[differ]]) / 2
    tolerance = 1e-4 + 4 * torch.finfo(dtype).eps  # the 4-decimal levels, then the division's rounding
    assert ((ratio - midpoint).abs() <= tolerance).all(), (ratio - midpoint).abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_tables_and_the_absmax_codes_differ_as_documented(dtype):
    """torchao's levels are NF4_CODE rounded to 4 decimals (then to the weight's dtype), and its
    absmax codes are linear int8 steps around the mean, not the dynamic map: no bit-for-bit
    agreement of the statistics is possible; each format's absmax lies within half its own step."""
    w = _weight((64, 512), dtype, seed=1)
    t, q = to_nf4(w), nf4.quantize_nf4(w)
    assert (t.nf4.double() - nf4.NF4_CODE.double()).abs().max() <= 5e-5 + torch.finfo(dtype).eps
    assert t.quantized_scalers.dtype == torch.int8 and q.absmax_codes.dtype == torch.uint8
    exact = w.double().view(-1, 64).abs().amax(1)
    centred = exact - exact.mean()
    groups = centred.view(-1, 256).abs().amax(1).repeat_interleave(256)
    eps = torch.finfo(dtype).eps
    # torchao: round(x * 128 / max) clamped to [-128, 127]: within half a step (max / 256) but at
    # the group's top, which codes 128 and is clamped to 127 (a whole step); the mean, the scale
    # and the decoding rounded in the weight's dtype
    error = (_torchao_absmax(t) - exact).abs()
    assert (error <= groups / 128 + 4 * eps * (exact + exact.mean())).all()
    widest = (nf4.ABSMAX_CODE[1:] - nf4.ABSMAX_CODE[:-1]).max().item()
    assert ((nf4.absmax(q).double() - exact).abs() <= widest / 2 * groups + 1e-6).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_from_torchao_shares_the_codes_and_stays_within_the_absmax_recoding(shape, dtype):
    w = _weight(shape, dtype, seed=2)
    t = to_nf4(w)
    q = nf4.from_torchao(t)
    assert q.shape == shape and q.dtype == dtype
    assert q.packed.untyped_storage().data_ptr() == t.quantized_data.untyped_storage().data_ptr()
    assert q.absmax_codes.numel() == shape[0] * shape[1] // 64
    # torchao's dequantised weight, quantised in this format, has torchao's codes: sharing them is
    # quantising what torchao computes
    assert torch.equal(nf4.quantize_nf4(t.get_original_weight()).packed, t.quantized_data)
    # each absmax moves by at most half a step of the dynamic map, of its group's range
    theirs_absmax = _torchao_absmax(t)
    centred = theirs_absmax - theirs_absmax.float().mean().double()
    groups = centred.view(-1, 256).abs().amax(1).repeat_interleave(256)
    widest = (nf4.ABSMAX_CODE[1:] - nf4.ABSMAX_CODE[:-1]).max().item()
    moved = (nf4.absmax(q).double() - theirs_absmax).abs()
    assert (moved <= widest / 2 * groups + 1e-6).all()
    # the weight: the level tables' difference and the absmax's move, plus each side's rounding
    codes = _nibbles(t.quantized_data)
    level_gap = (nf4.NF4_CODE.double() - t.nf4.double()).abs()[codes].view(-1, 64)
    bound = (level_gap * theirs_absmax[:, None] + nf4.NF4_CODE.double().abs()[codes].view(-1, 64) * moved[:, None])
    theirs, ours = t.get_original_weight().double(), nf4.dequantize_nf4(q).double()
    bound = bound.view(shape) + 4 * torch.finfo(dtype).eps * theirs.abs() + 1e-30
    assert ((ours - theirs).abs() <= bound).all(), ((ours - theirs).abs() - bound).max()
    # as close to the dense weight as torchao's own dequantisation, within 0.1 dB
    assert _sqnr(w, nf4.dequantize_nf4(q)) >= _sqnr(w, t.get_original_weight()) - 0.1


def test_from_torchao_refusals():
    with pytest.raises(UnslothCompileError, match="not a torchao NF4Tensor"):
        nf4.from_torchao(torch.randn(4, 64))
    with pytest.raises(UnslothCompileError, match="block_size 128"):
        nf4.from_torchao(to_nf4(torch.randn(128, 256), block_size=128))
    with pytest.raises(UnslothCompileError, match="must be a multiple of 64"):
        nf4.from_torchao(to_nf4(torch.randn(512, 32)))
    linear = nn.Linear(256, 64)
    linear.weight = nn.Parameter(to_nf4(linear.weight.detach()), requires_grad=True)
    assert "trainable" in nf4.unsupported(linear)
    with pytest.raises(UnslothCompileError, match="trainable"):
        nf4.Nf4Linear.from_torchao(linear)


def tiny_llama_for_torchao():
    """A tiny Llama whose every projection holds a multiple of 16384 weights (torchao's rule)."""
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=96, num_hidden_layers=2)
    return tf.LlamaForCausalLM(cfg)


def torchao_lora_model():
    """PEFT LoRA on every projection, each frozen base weight an NF4Tensor as torchao's nf4
    weight-only quantisation (and torchtune's FrozenNF4Linear) stores it."""
    torch.manual_seed(0)
    model = peft_wrap(tiny_llama_for_torchao(), lora_dropout=0.1)
    for _, layer in lora_base_layers(model):
        base = layer.base_layer
        base.weight = nn.Parameter(to_nf4(base.weight.detach()), requires_grad=False)
    return model


def test_a_model_over_torchao_nf4_tensors_is_taken_over_and_trains_as_its_eager_twin(caplog):
    import copy

    model = torchao_lora_model()
    eager, eager_torchao = copy.deepcopy(model), copy.deepcopy(model)
    codes = [layer.base_layer.weight.quantized_data.untyped_storage().data_ptr()
             for _, layer in lora_base_layers(model)]
    twin_report = nf4.convert(eager, select=nf4.stored_four_bit_linears)  # the same Nf4Linear bases, eager
    assert len(twin_report.from_torchao) == 14 and not twin_report.refused
    got = train_taking_over_four_bit_bases(model, AOT, "torchao", codes,
                                           "14 torchao NF4Tensor linear(s) taken over (4-bit codes shared)", caplog,
                                           sites=14)
    assert_same_training(got, run_steps(eager))
    # torchao's own eager model computes with its dequantisation (about 45 dB from this one's):
    # close, not equal; the first step's gradients only (a step on them drifts further)
    want = run_steps(eager_torchao)
    assert_same_training((got[0], got[1][:1]), (want[0], want[1][:1]), rtol=2e-2, atol=2e-3)


def test_plain_torch_compile_refuses_torchao_bases_with_the_way_out():
    """torch.compile(backend="unsloth") cannot swap modules: a site over an NF4Tensor is left as
    it is (torchao's own linear runs it) and the reason says how to take it over."""
    from helpers import batch_for

    model = torchao_lora_model().eval()  # no dropout draws: the same loss as eager, to the rounding
    batch = batch_for("llama", seed=0)
    want = model(**batch).loss
    with collect_reports() as report:
        got = torch.compile(model, backend="unsloth", options=AOT)(**batch).loss
    assert report.counters["lora_linear.refused"] == 14 and report.counters.get("lora_linear.fused", 0) == 0
    reasons = {s.reason for s in report.sites if s.pattern == "lora_linear"}
    assert len(reasons) == 1 and "torchao NF4Tensor" in (reason := reasons.pop())
    assert "nf4.stored_four_bit_linears" in reason
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device, dtype", [
    ("cpu", torch.float16),  # the Triton interpreter (bf16 is not reliable there)
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
])
def test_the_kernels_decode_the_shared_codes_bit_for_bit(device, dtype):
    """The one-pass dequantisation kernel over from_torchao's tensors (torchao's own 4-bit codes)
    equals the format's reference, and so does the taken-over layer's forward."""
    pytest.importorskip("triton")
    from unsloth_compile.kernels.nf4.nf4_dequantize import dequantize_nf4_triton

    N, K = 96, 512
    t = to_nf4(_weight((N, K), dtype, seed=3).to(device))
    layer = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
    layer.weight = nn.Parameter(t, requires_grad=False)
    base = nf4.Nf4Linear.from_torchao(layer)
    q = base.nf4_weight()
    assert q.packed.device.type == device and q.packed.data_ptr() == t.quantized_data.data_ptr()
    tables = (nf4.NF4_CODE.to(device), nf4.ABSMAX_CODE.to(device))
    decoded = dequantize_nf4_triton(q.packed, q.absmax_codes, q.absmax_scale, q.absmax_offset, *tables, N, K, dtype)
    assert torch.equal(decoded, nf4.dequantize_nf4(q))
    x = torch.randn(37, K, generator=torch.Generator().manual_seed(4)).to(device=device, dtype=dtype)
    assert torch.equal(base(x), torch.nn.functional.linear(x, nf4.dequantize_nf4(q)))
