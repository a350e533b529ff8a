"""The NF4 format (unsloth_compile/nf4/format.py): codes, statistics and dequantisation against
a float64 reading of the definition, the pack layout, refusals, and (when bitsandbytes imports)
bit-for-bit agreement with bitsandbytes."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from unsloth_compile.errors import UnslothCompileError
from unsloth_compile.nf4 import (ABSMAX_BLOCK, ABSMAX_CODE, BLOCK, NF4_CODE, NF4Weight, absmax, dequantize_nf4,
                                 from_bnb, quantize_nf4)

# N odd, K = 64 and 192, N*K/64 blocks not a multiple of 256 (and more than one second-level block)
SHAPES = [(1, 64), (7, 64), (5, 192), (33, 192), (257, 128), (3, 8256)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes is not importable")


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # rows of different scales, so that the absmax statistics spread
    scales = torch.rand(shape[0], 1, generator=g) * 3 + 0.05
    return (torch.randn(shape, generator=g) * scales).to(dtype)


def _nibbles(packed):
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()


def _dequantize_float64(q: NF4Weight) -> torch.Tensor:
    """W' in float64 straight from the definition, no intermediate rounding."""
    N, K = q.shape
    blocks = N * K // BLOCK
    second = q.absmax_scale.double().repeat_interleave(ABSMAX_BLOCK)[:blocks]
    block_absmax = ABSMAX_CODE.double()[q.absmax_codes.long()] * second + q.absmax_offset.double()
    return (NF4_CODE.double()[_nibbles(q.packed)].view(blocks, BLOCK) * block_absmax[:, None]).view(N, K)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_layout_and_sizes(shape, dtype):
    q = quantize_nf4(_weight(shape, dtype))
    N, K = shape
    blocks = N * K // BLOCK
    assert q.shape == shape and q.dtype == dtype
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (N * K // 2,)
    assert q.absmax_codes.dtype == torch.uint8 and q.absmax_codes.shape == (blocks,)
    assert q.absmax_scale.dtype == torch.float32 and q.absmax_scale.shape == (math.ceil(blocks / ABSMAX_BLOCK),)
    assert q.absmax_offset.dtype == torch.float32 and q.absmax_offset.dim() == 0
    assert q.nbytes() == N * K // 2 + blocks + 4 * math.ceil(blocks / ABSMAX_BLOCK) + 4


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_codes_are_the_nearest_levels(shape, dtype):
    """Every 4-bit code is the NF4 level nearest W / absmax (float64, exact block absmax), and every
    absmax code the ABSMAX_CODE level nearest (absmax - offset) / second-level absmax."""
    w = _weight(shape, dtype)
    q = quantize_nf4(w)
    blocks = w.double().reshape(-1, BLOCK)
    block_absmax = blocks.abs().amax(1)
    scaled = blocks / block_absmax[:, None]
    distance = (scaled.reshape(-1, 1) - NF4_CODE.double()).abs()
    chosen = distance.gather(1, _nibbles(q.packed)[:, None])[:, 0]
    assert (chosen <= distance.min(1).values + 1e-6).all()

    assert torch.allclose(q.absmax_offset.double(), block_absmax.mean(), rtol=1e-6)
    centred = block_absmax - q.absmax_offset.double()
    padded = torch.nn.functional.pad(centred, (0, -centred.numel() % ABSMAX_BLOCK)).view(-1, ABSMAX_BLOCK)
    assert torch.allclose(q.absmax_scale.double(), padded.abs().amax(1), rtol=1e-6)
    second = q.absmax_scale.double().repeat_interleave(ABSMAX_BLOCK)[:centred.numel()]
    ratio = (centred / second.clamp(min=1e-30)).clamp(-1, 1)
    distance = (ratio[:, None] - ABSMAX_CODE.double()).abs()
    chosen = distance.gather(1, q.absmax_codes.long()[:, None])[:, 0]
    assert (chosen <= distance.min(1).values + 1e-6).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_against_float64_definition(shape, dtype):
    q = quantize_nf4(_weight(shape, dtype, seed=1))
    exact = _dequantize_float64(q)
    fp32 = dequantize_nf4(q, torch.float32)
    # Three float32 roundings (product, sum, product) against none: each within half an ulp of
    # its own result, the sum's relative to the larger of its terms.
    N, K = q.shape
    blocks = N * K // BLOCK
    decoded = ABSMAX_CODE.double()[q.absmax_codes.long()] * q.absmax_scale.double().repeat_interleave(
        ABSMAX_BLOCK)[:blocks]
    eps = 2.0**-24
    absmax_bound = eps * (2 * decoded.abs() + q.absmax_offset.double().abs())
    assert ((absmax(q).double() - (decoded + q.absmax_offset.double())).abs() <= absmax_bound).all()
    levels = NF4_CODE.double()[_nibbles(q.packed)].view(blocks, BLOCK).abs()
    bound = (levels * absmax_bound[:, None] * (1 + eps)).view(N, K) + eps * exact.abs()
    assert ((fp32.double() - exact).abs() <= bound).all(), ((fp32.double() - exact).abs() - bound).max()
    # in the dense dtype: the float32 result rounded once
    native = dequantize_nf4(q)
    assert native.dtype == dtype and native.shape == shape
    assert torch.equal(native, fp32.to(dtype))


@pytest.mark.parametrize("shape", SHAPES)
def test_quantisation_error_is_bounded(shape):
    """|W - W'| <= half the widest NF4 gap times the block absmax, plus the absmax's own error."""
    w = _weight(shape, torch.float32, seed=2)
    q = quantize_nf4(w)
    error = (dequantize_nf4(q).double() - w.double()).view(-1, BLOCK)
    block_absmax = w.double().view(-1, BLOCK).abs().amax(1)
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max().item() / 2
    absmax_error = (absmax(q).double() - block_absmax).abs()
    assert (error.abs().amax(1) <= half_gap * block_absmax + absmax_error + 1e-6).all()
    # the absmax itself is within half a step of its 8-bit code (at most 1/2 x the widest gap)
    widest = (ABSMAX_CODE[1:] - ABSMAX_CODE[:-1]).max().item()
    second = q.absmax_scale.double().repeat_interleave(ABSMAX_BLOCK)[:block_absmax.numel()]
    assert (absmax_error <= widest / 2 * second + 1e-6).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_requantising_the_dequantised_weight_gives_the_same_codes(shape):
    q = quantize_nf4(_weight(shape, torch.float32, seed=3))
    again = quantize_nf4(dequantize_nf4(q, torch.float32))
    assert torch.equal(again.packed, q.packed)


def test_pack_layout_nibble_order():
    """Element 2i in the high nibble of byte i, 2i+1 in the low one, row-major over (N, K)."""
    N, K = 3, 128
    levels = torch.arange(N * K) % 16
    w = NF4_CODE[levels].view(N, K).clone()
    w.view(-1, BLOCK)[:, 0] = 1.0  # absmax exactly 1 in every block: W / absmax is a level itself
    levels.view(-1, BLOCK)[:, 0] = 15
    q = quantize_nf4(w)
    expected = (levels[0::2] << 4) | levels[1::2]
    assert torch.equal(q.packed.long(), expected)
    # every absmax is 1: the offset is 1 and the second level codes zeros, so W' is W exactly
    assert (absmax(q) == 1.0).all()
    assert torch.equal(dequantize_nf4(q), w)


def test_zero_block_dequantises_to_zero():
    w = _weight((4, 128), torch.float32)
    w[1, 64:] = 0
    out = dequantize_nf4(quantize_nf4(w))
    assert (out[1, 64:] == 0).all()


@pytest.mark.parametrize("shape, rule", [
    ((64,), "2-D"), ((2, 3, 64), "2-D"), ((0, 64), "2-D"), ((4, 0), "2-D"),
    ((4, 96), "multiple of 64"), ((4, 32), "multiple of 64"), ((5, 100), "multiple of 64"),
])
def test_refuses_shapes(shape, rule):
    with pytest.raises(UnslothCompileError) as error:
        quantize_nf4(torch.randn(shape))
    message = str(error.value)
    assert rule in message and str(tuple(shape)) in message and "dense" in message


def test_refuses_non_float():
    with pytest.raises(UnslothCompileError, match="float32, bfloat16 or float16"):
        quantize_nf4(torch.ones(4, 64, dtype=torch.int8))
    with pytest.raises(UnslothCompileError, match="float32, bfloat16 or float16"):
        quantize_nf4(torch.ones(4, 64, dtype=torch.float64))


def test_from_bnb_refuses_what_is_not_bitsandbytes_nf4():
    with pytest.raises(UnslothCompileError, match="no quant_state"):
        from_bnb(torch.nn.Parameter(torch.randn(4, 64)))


# --------------------------------------------------------------------------------------------
# bitsandbytes
# --------------------------------------------------------------------------------------------

def _bnb():
    import bitsandbytes
    import bitsandbytes.functional

    return bitsandbytes


@needs_bnb
def test_code_tables_are_bitsandbytes():
    functional = _bnb().functional
    assert torch.equal(NF4_CODE, functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(ABSMAX_CODE, functional.create_dynamic_map(signed=True))


@needs_bnb
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_for_bit_with_bitsandbytes(shape, dtype):
    functional = _bnb().functional
    w = _weight(shape, dtype, seed=4)
    packed, state = functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = quantize_nf4(w)
    assert torch.equal(q.packed, packed.reshape(-1))
    assert torch.equal(q.absmax_offset, state.offset)
    assert torch.equal(q.absmax_scale, state.state2.absmax)
    # The absmax codes: bitsandbytes' torch kernel of quantize_blockwise (the nearest level, as
    # its CUDA kernel picks) bit for bit ...
    centred = w.float().view(-1, BLOCK).abs().amax(1) - state.offset
    reference_kernel = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    codes, scale = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
        reference_kernel, centred, ABSMAX_CODE, ABSMAX_BLOCK)
    if centred.abs().max() > 0:  # one block only: every centred absmax is 0 and any level of 0 will do
        assert torch.equal(q.absmax_codes, codes)
        assert torch.equal(q.absmax_scale, scale)
    # ... and its CPU library, whose search misses the nearest level by one for a few values
    # close to the midpoint between two, within one level everywhere.
    differ = q.absmax_codes.long() - state.absmax.long()
    if centred.abs().max() > 0:
        assert differ.abs().max() <= 1 and (differ != 0).float().mean() < 0.02

    # dequantising bitsandbytes' own state: bit for bit in every dtype
    ours = dequantize_nf4(_from_state(packed, state, shape, dtype))
    theirs = functional.dequantize_4bit(packed, state, quant_type="nf4")
    assert theirs.dtype == ours.dtype == dtype
    assert torch.equal(ours, theirs)
    for out_dtype in DTYPES:
        state.dtype = out_dtype
        assert torch.equal(dequantize_nf4(_from_state(packed, state, shape, dtype), out_dtype),
                           functional.dequantize_4bit(packed, state, quant_type="nf4"))


def _from_state(packed, state, shape, dtype):
    return NF4Weight(packed=packed.reshape(-1), absmax_codes=state.absmax, absmax_scale=state.state2.absmax,
                     absmax_offset=state.offset, shape=shape, dtype=dtype)


def _linear4bit(shape, dtype, bias=True, **kwargs):
    bnb = _bnb()
    N, K = shape
    dense = torch.nn.Linear(K, N, bias=bias).to(dtype)
    torch.nn.init.normal_(dense.weight, std=0.5)
    options = dict(compress_statistics=True, quant_type="nf4", blocksize=64)
    options.update(kwargs)
    layer = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=dtype, compress_statistics=options["compress_statistics"],
                              quant_type=options["quant_type"])
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False,
                                     compress_statistics=options["compress_statistics"],
                                     quant_type=options["quant_type"], blocksize=options["blocksize"])
    if bias:
        layer.bias = torch.nn.Parameter(dense.bias.data.clone())
    layer.weight = layer.weight._quantize("cpu")
    return layer, dense


@needs_bnb
@pytest.mark.parametrize("shape", [(7, 64), (33, 192), (257, 128)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_from_bnb_shares_storage_and_dequantises_as_bitsandbytes(shape, dtype):
    functional = _bnb().functional
    layer, dense = _linear4bit(shape, dtype)
    q = from_bnb(layer.weight)
    assert q.shape == shape and q.dtype == dtype
    assert q.packed.untyped_storage().data_ptr() == layer.weight.data.untyped_storage().data_ptr()
    state = layer.weight.quant_state
    assert q.absmax_codes.untyped_storage().data_ptr() == state.absmax.untyped_storage().data_ptr()
    assert q.absmax_scale.untyped_storage().data_ptr() == state.state2.absmax.untyped_storage().data_ptr()
    assert torch.equal(dequantize_nf4(q), functional.dequantize_4bit(layer.weight.data, state, quant_type="nf4"))
    # the layer's own forward runs on that weight
    x = torch.randn(3, shape[1], dtype=dtype)
    expected = torch.nn.functional.linear(x.float(), dequantize_nf4(q, torch.float32), layer.bias.float())
    assert torch.allclose(layer(x).float(), expected, rtol=0, atol=1e-2 * expected.abs().max().item())
    # and quantize_nf4 of the dense weight gives the same 4-bit codes as the layer holds
    assert torch.equal(quantize_nf4(dense.weight).packed, q.packed)


@needs_bnb
@pytest.mark.parametrize("kwargs, reason", [
    (dict(quant_type="fp4"), "quant_type 'fp4'"),
    (dict(blocksize=128), "blocksize 128"),
    (dict(compress_statistics=False), "double-quantised"),
])
def test_from_bnb_refusals(kwargs, reason):
    layer, _ = _linear4bit((8, 128), torch.float32, **kwargs)
    with pytest.raises(UnslothCompileError, match=reason):
        from_bnb(layer.weight)
