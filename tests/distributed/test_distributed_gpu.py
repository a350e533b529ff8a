"""DDP over the compiled model and FSDP2 with the frozen base replicated, on 2 GPUs (NCCL), with
and without CUDA graphs: the steps that `bench dist` times with graphs (compile_ddp's and
shard_lora_model(frozen="replicate")'s defaults) must train what the same wrapper trains
without them.

GPU only, at least 2 GPUs. Two processes (tests/distributed_cases.py, `--worker-cuda`) each run
the tiny PEFT Llama in fp32 through compile_ddp on Inductor, first without CUDA graphs, then
with them, on the shared schedule (two plain steps, then one accumulated over two micro-batches
under no_sync). The two runs execute the same kernels, so they agree to fp32 rounding; both are
held to one eager process on the concatenated batch at a tolerance for the Triton kernels' TF32.
"""

from __future__ import annotations

import pytest
import torch

from distributed_cases import RANK_STEPS, STEPS, launch, reference

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

WORLD = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not torch.cuda.is_available() or torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} CUDA GPUs")
    try:
        return launch(WORLD, tmp_path_factory.mktemp("dist-gpu"), cuda=True)
    except RuntimeError as error:
        pytest.fail(str(error))


def _close(actual: dict, expected: dict, rtol: float, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for name in expected:
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(actual[name].float(), expected[name].float(), rtol=rtol, atol=rtol * scale + 1e-8,
                                   msg=lambda m, name=name: f"{what}, {name}: {m}")


def test_ddp_with_cuda_graphs_trains_what_ddp_without_them_trains(runs):
    ref = reference(WORLD)
    for rank, run in enumerate(runs):
        plain, graphs = run["ddp-cuda"], run["ddp-cuda-graphs"]
        assert graphs["counters"].get("cudagraphs.on", 0) >= 1, graphs["counters"]
        assert not any(k.startswith("cudagraphs.off") for k in graphs["counters"]), graphs["counters"]
        assert plain["counters"].get("lora_linear.fused", 0) == graphs["counters"].get("lora_linear.fused", 0) > 0
        assert len(graphs["losses"]) == len(STEPS)
        torch.testing.assert_close(torch.tensor(graphs["losses"]), torch.tensor(plain["losses"]), rtol=1e-5, atol=1e-6)
        for step in range(len(STEPS)):  # the accumulated step last: both micro-batches' gradients summed
            _close(graphs["grads"][step], plain["grads"][step], 1e-4, f"rank {rank} step {step}: graphs vs none")
            _close(graphs["grads"][step], ref["grads"][step], 2e-2, f"rank {rank} step {step}: graphs vs eager")
        _close(graphs["params"], plain["params"], 1e-4, f"rank {rank}: parameters after training")
    for name, value in runs[0]["ddp-cuda-graphs"]["params"].items():  # the ranks stayed in sync
        assert torch.equal(value, runs[1]["ddp-cuda-graphs"]["params"][name]), name


def test_fsdp2_with_the_base_replicated_replays_cuda_graphs_and_trains_what_it_trains_without(runs):
    ref = reference(WORLD)
    for rank, run in enumerate(runs):
        plain, graphs = run["fsdp-cuda"], run["fsdp-cuda-graphs"]
        assert graphs["counters"].get("cudagraphs.on", 0) >= 1, graphs["counters"]  # shard_lora_model's default
        assert not any(k.startswith("cudagraphs.on") for k in plain["counters"]), plain["counters"]
        assert plain["counters"].get("lora_linear.fused", 0) == graphs["counters"].get("lora_linear.fused", 0) > 0
        # recorded while warming up, then replayed: FSDP2's unsharded adapters come back at the
        # addresses the graphs were recorded with (a move would re-record at every step)
        assert graphs["recordings_per_step"][-2:] == [0, 0], graphs["recordings_per_step"]
        assert plain["recordings_per_step"] == [0, 0, 0, 0], plain["recordings_per_step"]
        torch.testing.assert_close(torch.tensor(graphs["losses"]), torch.tensor(plain["losses"]), rtol=1e-5, atol=1e-6)
        for step in range(len(STEPS)):
            _close(graphs["grads"][step], plain["grads"][step], 1e-4, f"rank {rank} step {step}: graphs vs none")
            _close(graphs["grads"][step], ref["grads"][step], 2e-2, f"rank {rank} step {step}: graphs vs eager")
        _close(graphs["params"], plain["params"], 1e-4, f"rank {rank}: parameters after training")
    for name, value in runs[0]["fsdp-cuda-graphs"]["params"].items():
        assert torch.equal(value, runs[1]["fsdp-cuda-graphs"]["params"][name]), name


def test_fsdp2_rank_change_with_cuda_graphs_trains_as_one_eager_process(runs):
    """ShardedRankController on 2 GPUs with the replicated base's CUDA graphs: the rebuilt model
    (new blocks, recorded anew) takes the grow and trains on, close to one eager process grown
    with rank 0's seed (the Triton kernels' TF32 tolerance), the ranks identical. The reference
    runs on CUDA: the grow's new rows come from the CUDA generator there, as in the workers."""
    ref = reference(WORLD, device=torch.device("cuda", 0))
    n = len(STEPS) + len(RANK_STEPS)
    for rank, run in enumerate(runs):
        r = run["fsdp-cuda-rank"]
        assert r["counters"].get("cudagraphs.on", 0) >= 2, r["counters"]  # before and after the rebuild
        torch.testing.assert_close(torch.tensor(r["losses"][:n]), torch.tensor(ref["losses"][:n]), rtol=2e-2, atol=1e-4)
        for step in range(n):
            _close(r["grads"][step], ref["grads"][step], 2e-2, f"rank {rank} step {step}: vs eager")
        _close(r["params"], ref["params"], 2e-2, f"rank {rank}: parameters after the rank change")
    for name, value in runs[0]["fsdp-cuda-rank"]["params"].items():
        assert torch.equal(value, runs[1]["fsdp-cuda-rank"]["params"][name]), name
