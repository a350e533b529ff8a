"""GPU timing of one fwd+bwd call, shared by the layer benchmarks: eager wall time (host code
included) and CUDA-graph replay time (the kernels alone)."""

from __future__ import annotations

from typing import Callable

import torch


def eager_ms(fn: Callable[[], object]) -> float:
    """Wall time of one call as an eager user runs it: host code included (median, ms)."""
    import triton.testing

    fn()  # warm-up: compilation, autotuning, cuBLAS handles
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms(fn: Callable[[], object], replays: int = 20) -> float:
    """GPU time of one call: `fn` captured once in a CUDA graph, replays timed (median, ms).

    The replay launches the recorded kernels with no Python, dispatcher or autotuner on the
    host, so this compares the kernels themselves; eager_ms adds the host code, which decides
    the result whenever it is slower than the GPU work (small layers)."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(replays):
            fn()
    torch.cuda.synchronize()
    try:
        return triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median") / replays
    finally:
        del graph
