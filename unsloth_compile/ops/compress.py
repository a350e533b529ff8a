"""`torch.ops.unsloth.*` ops that compress tensors saved for backward (option
`compress_activations`), with schema, fake impl and one implementation for every device
(kernels/compress.py, plain torch: it runs on CUDA too).

    compress_rowwise(x, fmt) -> (q, scale)           fmt "fp8" (e4m3) or "int8"
    decompress_rowwise(q, scale, dtype) -> x~
    random_projection(x, k, dtype) -> P (K, k)       a fresh draw per call (private generator)
    range_projection(x, k, dtype) -> Q (K, k)        orthonormal, ~ x's top-k row space (fresh Omega)
    project_rows(x, P, dropout_mask?, dropout_scale) -> Z = x' P
    lora_linear_backward_projected(...) -> (dx, d_lora_x, dA, dB)   dA from Z and P

passes/compress/compress_saved.py and passes/compress/compress_rewrite.py insert them into the forward and backward
graphs AOTAutograd partitioned: they never need autograd themselves (nothing differentiates
through a saved tensor), so they have none.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import UnslothCompileError
from ..kernels import compress as ref

_lib = torch.library.Library("unsloth", "FRAGMENT")
_lib.define("compress_rowwise(Tensor x, str fmt) -> (Tensor, Tensor)")
_lib.define("decompress_rowwise(Tensor q, Tensor scale, ScalarType dtype) -> Tensor")
# nondeterministic_seeded: two calls with the same input differ, so no compiler may merge
# them or recompute one in backward (the partitioner and Inductor read this tag as they do
# for aten's random ops).
_lib.define("random_projection(Tensor x, int k, ScalarType dtype) -> Tensor",
            tags=(torch.Tag.nondeterministic_seeded,))
_lib.define("range_projection(Tensor x, int k, ScalarType dtype) -> Tensor",
            tags=(torch.Tag.nondeterministic_seeded,))
_lib.define("project_rows(Tensor x, Tensor projection, Tensor? dropout_mask=None, "
            "float dropout_scale=1.0, ScalarType? out_dtype=None) -> Tensor")
_lib.define(
    "lora_linear_backward_projected(Tensor grad_out, Tensor x_proj, Tensor projection, "
    "ScalarType x_dtype, Tensor weight, Tensor lora_A, Tensor lora_B, ScalarType? lora_x_dtype, "
    "Tensor lora_hidden, float scale, Tensor? scale_tensor, bool weight_transposed, "
    "ScalarType base_dtype, Tensor? dropout_mask=None, float dropout_scale=1.0) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)

# The seeds of the random projections: a private generator, so the global random stream
# (dropout's draws) is exactly what it is without compression. Reseed with seed_projections.
_seeds = torch.Generator()
_seeds.manual_seed(0x5EED)


def seed_projections(seed: int) -> None:
    """Restart the sequence of random draws of compress_activations="lowrank" (the random
    projections P, the range finder's Omega)."""
    _seeds.manual_seed(seed)


def _check_format(fmt: str) -> torch.dtype:
    if fmt not in ref.ROWWISE_FORMATS:
        raise UnslothCompileError(f"unsloth_compile: unsloth::compress_rowwise: fmt={fmt!r}, expected one of "
                                  f"{sorted(ref.ROWWISE_FORMATS)}")
    return ref.ROWWISE_FORMATS[fmt]


def compress_rowwise(x: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
    _check_format(fmt)
    return ref.rowwise_compress(x, fmt)


@torch.library.register_fake("unsloth::compress_rowwise")
def _(x, fmt):
    code_dtype = _check_format(fmt)
    return x.new_empty(x.shape, dtype=code_dtype), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def decompress_rowwise(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return ref.rowwise_decompress(q, scale, dtype)


@torch.library.register_fake("unsloth::decompress_rowwise")
def _(q, scale, dtype):
    return q.new_empty(q.shape, dtype=dtype)


def random_projection(x: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    seed = int(torch.randint(0, 2**62, (1,), generator=_seeds))
    return ref.random_projection(x.shape[-1], k, seed, x.device, dtype)


@torch.library.register_fake("unsloth::random_projection")
def _(x, k, dtype):
    return x.new_empty((x.shape[-1], k), dtype=dtype)


def range_projection(x: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    seed = int(torch.randint(0, 2**62, (1,), generator=_seeds))
    # QR's Q is column-major; the fake (and Inductor's stride assert) promise row-major
    return ref.range_projection(x, k, seed, dtype).contiguous()


@torch.library.register_fake("unsloth::range_projection")
def _(x, k, dtype):
    return x.new_empty((x.shape[-1], k), dtype=dtype)


def project_rows(x: Tensor, projection: Tensor, dropout_mask: Optional[Tensor] = None,
                 dropout_scale: float = 1.0, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    return ref.project_rows(x, projection, dropout_mask, dropout_scale, out_dtype)


@torch.library.register_fake("unsloth::project_rows")
def _(x, projection, dropout_mask=None, dropout_scale=1.0, out_dtype=None):
    return projection.new_empty((*x.shape[:-1], projection.shape[1]), dtype=out_dtype or projection.dtype)


def lora_linear_backward_projected(grad_out, x_proj, projection, x_dtype, weight, lora_A, lora_B,
                                   lora_x_dtype, lora_hidden, scale, scale_tensor, weight_transposed,
                                   base_dtype, dropout_mask=None, dropout_scale=1.0):
    effective = scale if scale_tensor is None else scale_tensor * scale
    return ref.lora_linear_backward_projected(
        grad_out, x_proj, projection, x_dtype, weight, lora_A, lora_B, lora_x_dtype, lora_hidden,
        effective, weight_transposed, base_dtype, dropout_mask, dropout_scale)


@torch.library.register_fake("unsloth::lora_linear_backward_projected")
def _(grad_out, x_proj, projection, x_dtype, weight, lora_A, lora_B, lora_x_dtype, lora_hidden,
      scale, scale_tensor, weight_transposed, base_dtype, dropout_mask=None, dropout_scale=1.0):
    x_shape = (*x_proj.shape[:-1], lora_A.shape[1])
    d_lora_x = (x_proj.new_empty((0,), dtype=x_dtype) if lora_x_dtype is None
                else x_proj.new_empty(x_shape, dtype=lora_x_dtype))
    return (x_proj.new_empty(x_shape, dtype=x_dtype), d_lora_x, lora_A.new_empty(lora_A.shape),
            lora_B.new_empty(lora_B.shape))


for _name in ("compress_rowwise", "decompress_rowwise", "random_projection", "range_projection", "project_rows",
              "lora_linear_backward_projected"):
    _lib.impl(_name, globals()[_name], "CompositeExplicitAutograd")
