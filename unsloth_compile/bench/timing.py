"""GPU timing of one fwd+bwd call, shared by the layer benchmarks: eager wall time (host code
included) and CUDA-graph replay time (the kernels alone); `timed_row` times one variant into its
result row."""

from __future__ import annotations

import json
import traceback
from typing import Callable, Optional

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


def timed_row(row: dict, make_step: Callable[[], Callable[[], object]],
              check: Optional[Callable[[Callable[[], object]], dict]] = None, check_key: str = "",
              skip: tuple[type[BaseException], ...] = ()) -> dict:
    """`row` with the GPU (graph_ms) and eager (eager_ms) times of the step `make_step()` builds
    and, given `check`, `row[check_key] = check(step)`; printed as a JSON line once done.

    A failure is written into the row instead of raised, so that one variant failing loses no
    other: an exception of a type in `skip` as row["skipped"] (a variant that cannot run here,
    such as a missing optional package), any other as row["error"] with its traceback printed."""
    try:
        step = make_step()
        row["gpu_ms"] = graph_ms(step)
        row["ms"] = eager_ms(step)
        if check is not None:
            row[check_key] = check(step)
    except skip as error:
        row["skipped"] = f"{type(error).__name__}: {error}"
    except Exception as error:  # noqa: BLE001  recorded in the row, the run goes on
        row["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    print(json.dumps(row), flush=True)
    return row
