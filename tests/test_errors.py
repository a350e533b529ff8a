"""Bad input anywhere in the package raises UnslothCompileError (a ValueError) whose message
starts with `unsloth_compile`, names the bad value and says the way out."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unsloth_compile
from unsloth_compile import UnslothCompileError
from unsloth_compile.config import Config


class _LoRA(nn.Module):
    """The smallest module RankController accepts: lora_A / lora_B Parameters and a float scale."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(16, 16)
        self.lora_A = nn.Parameter(torch.randn(4, 16))
        self.lora_B = nn.Parameter(torch.randn(16, 4))
        self.scale = 2.0


def _rank_model() -> nn.Module:
    return nn.Sequential(_LoRA())


def _bad_inputs():
    from unsloth_compile import distributed, rank, sparsity
    from unsloth_compile.distributed import pipeline
    from unsloth_compile.distributed import tensor_parallel as parallel
    from unsloth_compile.kernels.fp8 import fp8 as fp8_kernels
    from unsloth_compile.kernels import knobs

    linear = nn.Linear(8, 8)
    codes_scale = torch.rand(8, 1)
    return {
        # (call, a text the message must contain: the bad value as given)
        "compile: unknown option": (lambda: unsloth_compile.compile(linear, bogus_knob=1), "'bogus_knob'"),
        "compile: bad enum value": (lambda: unsloth_compile.compile(linear, precision="fp9"), "'fp9'"),
        "compile: bad mode": (lambda: unsloth_compile.compile(linear, mode="turbo"), "'turbo'"),
        "compile: not a module": (lambda: unsloth_compile.compile(lambda x: x), "function"),
        "compile: option twice": (lambda: unsloth_compile.compile(linear, {"fuse_lora": True}, fuse_lora=True),
                                  "'fuse_lora'"),
        "config: bool option": (lambda: Config.from_options({"fuse_lora": "yes"}), "'yes'"),
        "config: positive int": (lambda: Config.from_options({"compress_lowrank_k": -3}), "-3"),
        "config: cudagraphs": (lambda: Config.from_options({"cudagraphs": "on"}), "'on'"),
        "config: fp8_layers without fp8": (lambda: Config.from_options({"fp8_layers": "all"}), "precision='default'"),
        "config: eager with compression": (
            lambda: Config.from_options({"inner": "eager", "compress_activations": "fp8"}), "'fp8'"),
        "distributed: frozen": (lambda: distributed.shard_lora_model(linear, frozen="both"), "'both'"),
        "distributed: gradient_compression": (
            lambda: distributed.compile_ddp(linear, gradient_compression="int3"), "'int3'"),
        "distributed: no_sync on a plain module": (lambda: distributed.no_sync(linear).__enter__(), "Linear"),
        "distributed: block": (lambda: distributed.find_blocks(linear, ["layers.99"]), "'layers.99'"),
        "parallel: regather without sequence_parallel": (
            lambda: parallel.lora_tp_plan(linear, regather_in_backward=True), "regather_in_backward=True"),
        "pipeline: stages": (lambda: pipeline.split_layers(2, 5), "5 stages"),
        "pipeline: schedule": (lambda: pipeline.pipeline_schedule(None, 4, schedule="zigzag"), "'zigzag'"),
        "pipeline: microbatches": (lambda: pipeline.pipeline_schedule(None, 0), "n_microbatches=0"),
        "rank: policy": (lambda: rank.RankController(_rank_model(), policy="random"), "'random'"),
        "rank: bounds": (lambda: rank.RankController(_rank_model(), min_rank=8, init_rank=4), "8, 4, 16"),
        "rank: importance": (lambda: rank.RankController(_rank_model(), policy="importance", importance="grad"),
                             "'grad'"),
        "rank: module name": (lambda: rank.RankController(_rank_model(), modules=["nope.*"]), "'nope.*'"),
        "rank: no LoRA layer": (lambda: rank.find_lora_adapters(nn.Sequential(linear)), "no LoRA layer"),
        "rank: not a LoRA layer": (lambda: rank.find_lora_adapters(nn.Sequential(linear), ["0"]), "Linear"),
        "sparsity: method": (lambda: sparsity.prune(linear, method="random"), "'random'"),
        "sparsity: target without sequential": (lambda: sparsity.prune(linear, target="layer"), "'layer'"),
        "fp8: stored weight dtype": (lambda: fp8_kernels.stored_or_quantized(torch.randn(8, 8), codes_scale),
                                     "torch.float32"),
        "kernels: knob name": (lambda: knobs.patch(warp_speed=9).__enter__(), "warp_speed"),
    }


CASES = _bad_inputs()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_unsloth_compile_error(case):
    call, named = CASES[case]
    with pytest.raises(UnslothCompileError) as error:
        call()
    message = str(error.value)
    assert message.startswith("unsloth_compile"), message
    assert named in message, message
    assert isinstance(error.value, ValueError)  # `except ValueError` callers keep working


def test_the_error_type_is_exported():
    assert unsloth_compile.UnslothCompileError is UnslothCompileError
    assert "UnslothCompileError" in unsloth_compile.__all__
