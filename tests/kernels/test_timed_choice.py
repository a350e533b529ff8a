"""kernels/timed_choice.py: the per-problem choice between equivalent candidates by timing."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")
from unsloth_compile.kernels import timed_choice  # noqa: E402


@pytest.fixture
def isolated_choices():
    """timed_choice.CHOICES as it was before the test: the choice tests add made-up problems."""
    saved = {kind: dict(table) for kind, table in timed_choice.CHOICES.items()}
    yield timed_choice.CHOICES
    for kind, table in saved.items():
        timed_choice.CHOICES[kind].clear()
        timed_choice.CHOICES[kind].update(table)


def test_fastest_times_each_candidate_once_per_problem_and_logs(caplog, isolated_choices):
    """The per-problem choice (TMA/pointer, Triton/cuBLAS): fastest wins, first listed on a
    tie, timing only on a problem's first call, a log line naming the winner."""
    timings = {"slow": 2.0, "fast": 1.0, "tie_a": 1.0, "tie_b": 1.0}
    timed = []

    def timer(fn):
        timed.append(fn())
        return timings[timed[-1]]

    with caplog.at_level("INFO", logger="unsloth_compile.kernels"):
        pick = timed_choice.fastest("main GEMM", ("test", 1), {"slow": lambda: "slow", "fast": lambda: "fast"}, timer)
    assert pick == "fast" and timed == ["slow", "fast"]
    assert "main GEMM" in caplog.text and "fast" in caplog.text
    assert timed_choice.fastest("main GEMM", ("test", 1), {"slow": lambda: "slow", "fast": lambda: "fast"}, timer) == "fast"
    assert timed == ["slow", "fast"], "timed again for a problem already decided"
    assert timed_choice.fastest("thin GEMM", ("test", 2), {"tie_a": lambda: "tie_a", "tie_b": lambda: "tie_b"}, timer) == "tie_a"
    assert isolated_choices["main GEMM"][("test", 1)] == ("fast", {"slow": 2.0, "fast": 1.0})


def test_fastest_leaves_out_a_failing_candidate_with_a_warning(caplog, isolated_choices):
    """A candidate that raises (a kernel out of resources at some shape) is not chosen, is
    logged as a warning naming the error; when every candidate fails the error propagates."""
    def broken():
        raise RuntimeError("out of resource: shared memory")

    with caplog.at_level("INFO", logger="unsloth_compile.kernels"):
        pick = timed_choice.fastest("thin GEMM", ("test", 3), {"triton": broken, "cublas": lambda: None},
                            timer=lambda fn: (fn(), 1.0)[1])
    assert pick == "cublas"
    assert "WARNING" in caplog.text and "out of resource" in caplog.text and "'triton'" in caplog.text
    assert isolated_choices["thin GEMM"][("test", 3)][1]["triton"] == float("inf")
    with pytest.raises(RuntimeError, match="out of resource"):
        timed_choice.fastest("thin GEMM", ("test", 4), {"triton": broken}, timer=lambda fn: (fn(), 1.0)[1])


def test_row_buckets_reuse_a_tuned_neighbour(monkeypatch):
    """Batches whose length changes every step: a new power of two of M within 4x of a bucket
    already tuned reuses it (no new timing or autotuning); a far one is tuned on its own."""
    monkeypatch.setattr(timed_choice, "ROW_BUCKETS", {})
    assert timed_choice.rows_bucket(7000) == 8192  # the first: its own
    assert timed_choice.rows_bucket(3000) == 8192  # 4096: within 4x
    assert timed_choice.rows_bucket(1500) == 8192  # 2048: within 4x of 8192
    assert timed_choice.rows_bucket(900) == 1024  # 8x from 8192: tuned on its own
    assert timed_choice.rows_bucket(600) == 1024
    assert timed_choice.rows_bucket(20000) == 8192  # 32768: within 4x
    assert timed_choice.rows_bucket(1) == 1
    assert timed_choice.rows_bucket(3500) == 8192  # fixed once seen
    assert {timed_choice.rows_bucket(m) for m in range(1025, 8193, 7)} == {8192}
