"""Which frozen dense layers fp8/ and sparsity/ can convert, and the reason given for the others
(`unsloth_compile.fp8.unsupported`, `unsloth_compile.sparsity.unsupported`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from unsloth_compile import fp8, sparsity
from unsloth_compile.kernels import sparse24
from unsloth_compile.kernels.fp8 import fp8 as fp8_kernels


def _frozen(module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    module.to(dtype).requires_grad_(False)
    return module


CHECKS = {"fp8": (fp8.unsupported, "fp8 storage", fp8_kernels.GEMM_ALIGNMENT),
          "2:4": (sparsity.unsupported, "2:4 pruning", sparse24.SHAPE_MULTIPLE)}


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_frozen_linear_and_conv1d_convert(kind):
    unsupported, _, multiple = CHECKS[kind]
    assert unsupported(_frozen(nn.Linear(2 * multiple, 3 * multiple))) is None
    assert unsupported(_frozen(Conv1D(3 * multiple, 2 * multiple))) is None  # (nf, nx): weight (in, out)


@pytest.mark.parametrize("kind", sorted(CHECKS))
def test_each_refusal_says_why(kind):
    unsupported, storage, multiple = CHECKS[kind]
    assert "Embedding is not a linear layer" in unsupported(_frozen(nn.Embedding(multiple, multiple)))
    trainable = nn.Linear(multiple, multiple).to(torch.bfloat16)
    assert f"trainable ({storage} is for frozen bases)" in unsupported(trainable)
    assert "dtype is torch.float8_e4m3fn" in unsupported(_frozen(nn.Linear(multiple, multiple), torch.float8_e4m3fn))
    odd = unsupported(_frozen(nn.Linear(multiple + 3, multiple)))  # in_features not a multiple
    assert odd is not None and str(multiple + 3) in odd
    odd_conv = unsupported(_frozen(Conv1D(multiple + 5, multiple)))  # out_features not a multiple
    assert odd_conv is not None and str(multiple + 5) in odd_conv


def test_fp8_takes_wider_floats_and_sparsity_no_8_bit_ones():
    e5m2 = _frozen(nn.Linear(32, 32), torch.float8_e5m2)
    assert "dtype is torch.float8_e5m2" in sparsity.unsupported(e5m2)
    assert fp8.unsupported(_frozen(nn.Linear(32, 32), torch.float32)) is None
    assert sparsity.unsupported(_frozen(nn.Linear(64, 128), torch.float16)) is None
