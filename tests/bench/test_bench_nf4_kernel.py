"""`bench nf4-kernel` (CUDA only) up to its arguments, its ratios and its table."""

from __future__ import annotations

import pytest
import torch

from unsloth_compile.bench import nf4_kernel
from unsloth_compile.bench.__main__ import main


def test_arguments():
    for bad in (["--layers", "nope"], ["--variants", "nf4-auto,nope"], ["--tokens", "0"]):
        with pytest.raises(SystemExit):
            nf4_kernel.parse_args(bad)
    args = nf4_kernel.parse_args(["--variants", "lora-bf16,nf4-auto", "--tokens", "64"])
    assert args.layers == "llama-8b.mlp.up,llama-8b.mlp.down" and args.tokens == 64 and args.rank == 16


def test_ratios_and_table():
    rows = [{"layer": "l", "variant": v, "gpu_ms": ms, "ms": ms} for v, ms in
            (("base", 1.0), ("lora-bf16", 1.1), ("nf4-auto", 1.2), ("bnb-dequantize", 2.4))]
    rows.append({"layer": "l", "variant": "nf4-fused", "error": "RuntimeError: out of resources"})
    nf4_kernel.add_ratios(rows)
    auto = rows[2]
    assert auto["vs_bf16_lora"] == pytest.approx(1.2 / 1.1) and auto["bnb_over_this"] == pytest.approx(2.0)
    assert "bnb_over_this" not in rows[3]
    env = {"device": "H100", "date": "today", "versions": {"torch": "2.11", "triton": "3.6"}, "bitsandbytes": "0.50",
           "argv": ["--tokens", "64"]}
    text = nf4_kernel.render(rows, env)
    assert "`python -m unsloth_compile.bench nf4-kernel --tokens 64`" in text
    assert "| l | nf4-auto | 1.200 | 1.200 | 1.20 | 1.09 | 2.00 |" in text
    assert "out of resources" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_needs_cuda(capsys):
    assert main(["nf4-kernel"]) == 1
    assert "needs a CUDA device" in capsys.readouterr().out
