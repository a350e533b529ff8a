"""Which frozen dense layers fp8/, nf4/ and sparsity/ can convert, and the reason given for the
others (`unsloth_compile.fp8.unsupported`, `unsloth_compile.sparsity.unsupported`,
`unsloth_compile.nf4.unsupported`); the walk that swaps them (`swap_layers`) and what it counts
as freed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from unsloth_compile import fp8, nf4, sparsity
from unsloth_compile.dense_linear import count_converted, swap_layers
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


def test_nf4_refuses_in_the_same_words_along_k_alone():
    assert "Embedding is not a linear layer" in nf4.unsupported(_frozen(nn.Embedding(64, 64)))
    assert "trainable (NF4 storage is for frozen bases)" in nf4.unsupported(nn.Linear(64, 64))
    assert "dtype is torch.float8_e4m3fn" in nf4.unsupported(_frozen(nn.Linear(64, 64), torch.float8_e4m3fn))
    assert "K (in_features)=96 is not a multiple of 64" in nf4.unsupported(_frozen(nn.Linear(96, 64)))
    assert nf4.unsupported(_frozen(Conv1D(40, 64))) is None  # N need not be aligned: the blocks run along K


class _Report:
    def __init__(self):
        self.converted, self.refused, self.shared, self.dense_bytes = [], {}, {}, 0


def test_swap_layers_converts_refuses_passes_over_and_counts_only_what_it_frees():
    model = nn.ModuleDict({"a": nn.Linear(32, 16), "tied": nn.Linear(32, 16), "odd": nn.Linear(24, 16),
                           "done": fp8.Fp8Linear.from_dense(_frozen(nn.Linear(32, 16))), "emb": nn.Embedding(16, 32)})
    model.requires_grad_(False)
    model["tied"].weight = model["emb"].weight
    report, seen = _Report(), []

    def record(layer):
        seen.append((layer.path, type(layer.dense).__name__, type(layer.stored).__name__))
        assert model[layer.path] is layer.stored  # swapped before it is recorded
        count_converted(report, layer)

    swap_layers(model, lambda path, m: path in ("a", "tied", "odd", "done"), fp8.Fp8Linear, fp8.unsupported,
                fp8.Fp8Linear.from_dense, report.refused, record)
    assert seen == [("a", "Linear", "Fp8Linear"), ("tied", "Linear", "Fp8Linear")]
    assert list(report.refused) == ["odd"] and "24" in report.refused["odd"]
    assert report.converted == ["a", "tied"] and report.shared == {"tied": "emb.weight"}
    assert report.dense_bytes == 16 * 32 * 4  # layer a's fp32 weight; the tied one stays with the embedding
    assert type(model["odd"]) is nn.Linear and isinstance(model["done"], fp8.Fp8Linear)
