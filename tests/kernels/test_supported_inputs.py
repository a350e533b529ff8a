"""kernels/lora/supported_inputs.py: the input checks the dense and NF4 LoRA kernels share give the
same reasons through both hosts' `supports`, in the same order (activations, then the base
weight, then adapters and sizes). Runs under the Triton interpreter (fp32/fp16 on CPU)."""

from __future__ import annotations

import pytest
import torch

from unsloth_compile.kernels.launch_args import interpreting
from unsloth_compile.kernels.lora import lora_linear_triton
from unsloth_compile.kernels.lora.supported_inputs import INT32_LIMIT, MAX_RANK, lora_inputs_supported
from unsloth_compile.kernels.nf4 import nf4_lora

pytestmark = pytest.mark.skipif(not interpreting(), reason="CPU tensors reach the kernels only under TRITON_INTERPRET=1")

M, K, N, R = 3, 64, 8, 4


def _both(x, A, B, lora_x=None):
    """(dense reason, NF4 reason) for an (N, K) base of x's dtype."""
    return (lora_linear_triton.supports(x, torch.randn(N, K, dtype=x.dtype), A, B, lora_x)[1],
            nf4_lora.supports(x, A, B, lora_x, N, K)[1])


@pytest.mark.parametrize("change, reason", [
    ("none", ""),
    ("x float64", "activations are torch.float64; the {} take torch.float32, torch.float16"),
    ("A fp16, B fp32", "adapters must be fp32/fp16/bf16 of one dtype, got A torch.float16, B torch.float32"),
    ("rank too large", f"rank {MAX_RANK + 1} outside 1..{MAX_RANK}"),
    ("lora_x shape", "lora_x must be a float tensor of x's shape, got torch.float32 (3, 63)"),
])
def test_shared_reasons(change, reason):
    x, A, B, lora_x = torch.randn(M, K), torch.randn(R, K), torch.randn(N, R), None
    if change == "x float64":
        x = x.double()
    elif change == "A fp16, B fp32":
        A = A.half()
    elif change == "rank too large":
        A, B = torch.randn(MAX_RANK + 1, K), torch.randn(N, MAX_RANK + 1)
    elif change == "lora_x shape":
        lora_x = torch.randn(M, K - 1)
    assert _both(x, A, B, lora_x) == (reason.format("Triton kernels"), reason.format("NF4 kernels"))


def test_the_weight_is_checked_after_the_activations_and_before_the_adapters():
    x, bad_A, B = torch.randn(M, 96), torch.randn(R, 96).half(), torch.randn(N, R)
    dense = lora_linear_triton.supports(x, torch.randn(N, 96).half(), bad_A, B, None)[1]
    assert dense == "base weight must be 2-D and of the activation dtype torch.float32, got torch.float16 (8, 96)"
    assert nf4_lora.supports(x, bad_A, B, None, N, 96)[1] == (
        "weight (8, 96) and input features 96: K must be a positive multiple of 64")
    assert nf4_lora.supports(x.double(), bad_A, B, None, N, 96)[1].startswith("activations are torch.float64")


def test_empty_and_int32_sizes():
    x, A, B = torch.randn(M, K), torch.randn(R, K), torch.randn(N, R)
    taken = lambda: ""  # noqa: E731
    assert lora_inputs_supported(x, A, B, None, weight_numel=0, weight_refusal=taken, kernels="k") == (
        False, "empty K or N")
    rows_times_n = INT32_LIMIT // K + 1  # N such that the weight alone passes 2**31 elements
    assert lora_inputs_supported(x, A, B, None, weight_numel=rows_times_n * K, weight_refusal=taken, kernels="k") == (
        False, "a tensor has 2**31 elements or more (the kernels index in int32)")
    assert lora_inputs_supported(x, A, B, None, weight_numel=N * K, weight_refusal=taken, kernels="k") == (True, "")


def test_off_cuda_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # interpreting() reads it at each call
    x, A, B = torch.randn(M, K), torch.randn(R, K), torch.randn(N, R)
    assert _both(x, A, B) == ("no Triton kernel for cpu tensors (only CUDA)",) * 2
