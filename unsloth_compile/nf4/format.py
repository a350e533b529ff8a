"""The QLoRA 4-bit format: NF4 codes in blocks of 64, absmax double-quantised in blocks of 256.

Bit-compatible with bitsandbytes' `Linear4bit` (quant_type="nf4", blocksize 64,
compress_statistics=True), so that a model loaded with `BitsAndBytesConfig(load_in_4bit=True)`
is read as it is (`from_bnb`, no copy, no re-quantisation), and `quantize_nf4` of a dense weight
gives the codes and statistics bitsandbytes would.

A weight W (N, K), read row-major as one sequence of N*K values, is cut in blocks of BLOCK = 64
consecutive values (K is a multiple of 64, so every block lies inside one row):

    absmax[b]  = max |W in block b|                                  float32, N*K/64 of them
    code[i]    = index of the NF4_CODE value nearest W[i] / absmax[b]  4 bits; two per byte, the
                                                                      even element in the high nibble
    offset     = mean(absmax)                                        float32
    absmax[b] - offset, in blocks of ABSMAX_BLOCK = 256 blocks: an 8-bit index into ABSMAX_CODE
                 (a signed dynamic map) times that block's max |absmax - offset| (absmax_scale)

and dequantised as

    absmax'[b] = float32(ABSMAX_CODE[absmax_codes[b]] * absmax_scale[b // 256]) + offset
    W'[i]      = dtype(float32(NF4_CODE[code[i]] * absmax'[i // 64]))

each product and sum rounded to float32 on its own, in this order, as bitsandbytes does.
Storage: N*K/2 bytes of codes + N*K/64 bytes of absmax codes + 4 bytes per 16384 weights and
one float: 4.127 bits per weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..errors import UnslothCompileError

BLOCK = 64
ABSMAX_BLOCK = 256

# The NormalFloat4 levels (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1],
# with an exact zero; as float32, in code order.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=torch.float32)


def _signed_dynamic_map() -> Tensor:
    """The signed dynamic 8-bit map (Dettmers 2015, "8-bit approximations"): for each decimal
    exponent e = -6..0, 2**(e+6) levels spread evenly over [0.1, 1] * 10**e (the means of
    neighbouring linspace points), both signs, plus 0 and 1; 256 sorted float32 values.
    Every step in float32 (the linspace, its means, the product with the power of ten), as
    bitsandbytes builds its table: other roundings move some levels by an ulp."""
    values = [0.0, 1.0]
    for exponent in range(7):
        edges = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0 * 10.0 ** (exponent - 6)
        values += means.tolist() + (-means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


ABSMAX_CODE = _signed_dynamic_map()


def _midpoints(code: Tensor) -> Tensor:
    """Decision boundaries between neighbouring levels of a sorted code (float32 means): a value
    on a boundary goes to the lower level."""
    return (code[:-1] + code[1:]) / 2


@dataclass(frozen=True, eq=False)
class NF4Weight:
    """A frozen weight W (N, K) in the QLoRA format (see the module docstring); every tensor on
    the weight's device."""

    packed: Tensor         # uint8 [N*K//2]: W row-major, element 2i in the high nibble of byte i
    absmax_codes: Tensor   # uint8 [N*K//64]: block b's absmax minus absmax_offset, coded with ABSMAX_CODE
    absmax_scale: Tensor   # float32 [ceil((N*K//64)/256)]: the second-level absmax per 256 blocks
    absmax_offset: Tensor  # float32 0-d: the mean absmax subtracted before the second level
    shape: tuple[int, int]  # (N, K)
    dtype: torch.dtype     # the dense weight's dtype

    def nbytes(self) -> int:
        """Bytes of the four tensors together."""
        return sum(t.numel() * t.element_size()
                   for t in (self.packed, self.absmax_codes, self.absmax_scale, self.absmax_offset))


def _check_shape(where: str, shape, dtype: Optional[torch.dtype] = None) -> tuple[int, int]:
    """(N, K), or an UnslothCompileError naming the shape, the rule and the way out."""
    if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        raise UnslothCompileError(
            f"unsloth_compile.nf4.{where}: weight of shape {tuple(shape)}: NF4 quantises a non-empty 2-D "
            "(out_features, in_features) linear weight; keep this layer dense")
    if shape[1] % BLOCK:
        raise UnslothCompileError(
            f"unsloth_compile.nf4.{where}: weight of shape {tuple(shape)}: in_features (K = {shape[1]}) must be a "
            f"multiple of {BLOCK}, so that every {BLOCK}-element NF4 block lies inside one row; keep this layer "
            "dense (it is left unquantised), or pad its input features to a multiple of 64")
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UnslothCompileError(
            f"unsloth_compile.nf4.{where}: weight of dtype {dtype}: NF4 quantises float32, bfloat16 or float16 "
            "weights; cast the layer to one of them first, or keep it dense")
    return int(shape[0]), int(shape[1])


def _quantize_blocks(values: Tensor, code: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """(uint8 index into `code` of each value / its block's absmax, float32 absmax per block)
    for a 1-D float32 tensor, the last block possibly short."""
    n = values.numel()
    blocks = -(-n // block)
    padded = torch.nn.functional.pad(values, (0, blocks * block - n)).view(blocks, block)
    absmax = padded.abs().amax(dim=1)
    # x * (1 / absmax), not x / absmax: the reciprocal first, as bitsandbytes scales.
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    codes = torch.bucketize(scaled, _midpoints(code.to(values.device)), out_int32=True)
    return codes.reshape(-1)[:n].to(torch.uint8), absmax


def quantize_nf4(weight: Tensor) -> NF4Weight:
    """`weight` (N, K) as an NF4Weight, on its device; bitsandbytes' quantize_4bit (nf4, blocksize
    64, compress_statistics=True) value for value. Refuses a weight that is not 2-D, whose K is
    not a multiple of 64 or that is not fp32/bf16/fp16, with the reason."""
    N, K = _check_shape("quantize_nf4", weight.shape, weight.dtype)
    flat = weight.detach().reshape(-1).float()
    codes, absmax = _quantize_blocks(flat, NF4_CODE, BLOCK)
    packed = (codes[0::2] << 4) | codes[1::2]
    absmax_codes, absmax_scale, offset = _double_quantize(absmax)
    return NF4Weight(packed=packed, absmax_codes=absmax_codes, absmax_scale=absmax_scale, absmax_offset=offset,
                     shape=(N, K), dtype=weight.dtype)


def _double_quantize(absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(absmax codes, second-level scales, offset) of the float32 block absmax values: the mean
    subtracted, then 8-bit ABSMAX_CODE indices in blocks of ABSMAX_BLOCK."""
    offset = absmax.mean()
    codes, scale = _quantize_blocks(absmax - offset, ABSMAX_CODE, ABSMAX_BLOCK)
    return codes, scale, offset


def absmax(q: NF4Weight) -> Tensor:
    """float32 [N*K//64]: each block's absmax as bitsandbytes dequantises it (second level
    decoded, then the offset added, each step rounded to float32)."""
    blocks = q.absmax_codes.numel()
    scale = q.absmax_scale.repeat_interleave(ABSMAX_BLOCK)[:blocks]
    decoded = ABSMAX_CODE.to(q.absmax_codes.device)[q.absmax_codes.long()] * scale
    return decoded + q.absmax_offset


def dequantize_nf4(q: NF4Weight, dtype: Optional[torch.dtype] = None) -> Tensor:
    """W' (N, K) in `dtype` (default: the dense weight's): the reference dequantisation, plain
    torch, bitsandbytes' dequantize_4bit bit for bit (float32 products, one rounding to dtype)."""
    N, K = q.shape
    codes = torch.stack([q.packed >> 4, q.packed & 0xF], dim=1).reshape(-1).long()
    values = NF4_CODE.to(q.packed.device)[codes].view(-1, BLOCK) * absmax(q)[:, None]
    return values.reshape(N, K).to(dtype or q.dtype)


def from_bnb(weight_param) -> NF4Weight:
    """A bitsandbytes Params4bit (the weight of a quantised `Linear4bit`) as an NF4Weight
    sharing its storage: no copy, no re-quantisation. Refuses another quant type, block size,
    statistics that are not double-quantised, or a weight not yet quantised, with the reason."""
    where = "unsloth_compile.nf4.from_bnb"
    state = getattr(weight_param, "quant_state", None)
    if state is None:
        raise UnslothCompileError(
            f"{where}: the weight has no quant_state: it is not a quantised bitsandbytes Params4bit (bitsandbytes "
            "quantises one when it is moved to a device); move the model to its device first, or quantise a dense "
            "weight with unsloth_compile.nf4.quantize_nf4")
    if state.quant_type != "nf4":
        raise UnslothCompileError(
            f"{where}: quant_type {state.quant_type!r}: only 'nf4' is read; load the model with "
            "BitsAndBytesConfig(bnb_4bit_quant_type='nf4') or keep this layer as bitsandbytes runs it")
    if state.blocksize != BLOCK:
        raise UnslothCompileError(
            f"{where}: blocksize {state.blocksize}: only {BLOCK} (bitsandbytes' default) is read; quantise with "
            f"blocksize={BLOCK} or keep this layer as bitsandbytes runs it")
    if not state.nested or state.state2.blocksize != ABSMAX_BLOCK:
        raise UnslothCompileError(
            f"{where}: the absmax statistics are not double-quantised in blocks of {ABSMAX_BLOCK}; load the model "
            "with BitsAndBytesConfig(bnb_4bit_use_double_quant=True) (compress_statistics=True), or keep this layer "
            "as bitsandbytes runs it")
    N, K = _check_shape("from_bnb", tuple(state.shape))
    packed = weight_param.data.reshape(-1).view(torch.uint8)
    absmax_codes = state.absmax.reshape(-1)
    absmax_scale = state.state2.absmax.reshape(-1)
    offset = state.offset
    if not isinstance(offset, Tensor):
        offset = torch.tensor(float(offset), dtype=torch.float32, device=packed.device)
    expected = (N * K // 2, N * K // BLOCK, -(-(N * K // BLOCK) // ABSMAX_BLOCK))
    found = (packed.numel(), absmax_codes.numel(), absmax_scale.numel())
    if (found != expected or absmax_codes.dtype != torch.uint8 or absmax_scale.dtype != torch.float32
            or not torch.equal(state.code.float().cpu(), NF4_CODE)
            or not torch.equal(state.state2.code.float().cpu(), ABSMAX_CODE)):
        raise UnslothCompileError(
            f"{where}: the quantisation state of a {(N, K)} weight does not match the NF4 format (sizes {found}, "
            f"expected {expected}; absmax {absmax_codes.dtype}, scale {absmax_scale.dtype}; or other code tables); "
            "keep this layer as bitsandbytes runs it")
    return NF4Weight(packed=packed, absmax_codes=absmax_codes, absmax_scale=absmax_scale,
                     absmax_offset=offset.reshape(()).float(), shape=(N, K), dtype=state.dtype)


def is_torchao_nf4(tensor) -> bool:
    """torchao's NF4Tensor (torchao.quantization / torchao.dtypes.nf4tensor, torchtune's QLoRA
    weights), recognised without importing torchao."""
    return any(cls.__name__ == "NF4Tensor" and cls.__module__.startswith("torchao")
               for cls in type(tensor).__mro__)


# torchao holds the NF4 levels rounded to 4 decimals, in the weight's dtype: one bf16 ulp of the
# largest level's neighbourhood away from NF4_CODE at most. A table further away is another code.
_TORCHAO_LEVELS_ATOL = 2e-3


def check_torchao(tensor) -> tuple[int, int]:
    """(N, K) of a torchao NF4Tensor that `from_torchao` reads, or an UnslothCompileError naming
    what it cannot read (not an NF4Tensor, another block size, another level table, a shape that
    is not 2-D with K a multiple of 64) and the way out."""
    where = "unsloth_compile.nf4.from_torchao"
    if not is_torchao_nf4(tensor):
        raise UnslothCompileError(
            f"{where}: a {type(tensor).__name__} is not a torchao NF4Tensor; quantise a dense weight with "
            "unsloth_compile.nf4.quantize_nf4")
    if tensor.block_size != BLOCK:
        raise UnslothCompileError(
            f"{where}: block_size {tensor.block_size}: only {BLOCK} (torchao's default) is read; quantise with "
            f"to_nf4(weight, block_size={BLOCK}) or keep this layer as torchao runs it")
    N, K = _check_shape("from_torchao", tuple(tensor.shape))
    packed = tensor.quantized_data.reshape(-1)
    levels = tensor.nf4.float().cpu()
    if (packed.dtype != torch.uint8 or packed.numel() != N * K // 2
            or levels.shape != NF4_CODE.shape or (levels - NF4_CODE).abs().max() > _TORCHAO_LEVELS_ATOL):
        raise UnslothCompileError(
            f"{where}: the codes of a {(N, K)} NF4Tensor ({packed.numel()} {packed.dtype} bytes, levels "
            f"{levels.tolist()}) are not {N * K // 2} uint8 bytes of the NF4 levels; keep this layer as torchao "
            "runs it")
    return N, K


@torch.no_grad()
def from_torchao(tensor) -> NF4Weight:
    """A torchao `NF4Tensor` as an NF4Weight, sharing its 4-bit codes (the same packing: element
    2i in the high nibble of byte i). torchao encodes each block's absmax differently (8-bit
    linear codes around the mean in the weight's dtype, not the dynamic map), so the absmax
    values as torchao decodes them are coded again in this format: N*K/64 new bytes, and each
    absmax moves by at most half a step of ABSMAX_CODE (docs/nf4.md#torchao). Refuses what
    `check_torchao` refuses."""
    N, K = check_torchao(tensor)
    # torchao's own decoding of its absmax values (in the weight's dtype), exactly as its
    # dequantisation uses them
    block_absmax = tensor.dequantize_scalers(tensor.quantized_scalers, tensor.quantization_factor,
                                             tensor.scaler_block_size).float().reshape(-1)
    absmax_codes, absmax_scale, offset = _double_quantize(block_absmax)
    return NF4Weight(packed=tensor.quantized_data.reshape(-1), absmax_codes=absmax_codes, absmax_scale=absmax_scale,
                     absmax_offset=offset, shape=(N, K), dtype=tensor.dtype)
