"""The package's choices made by timing: for one problem, which of several equivalent
candidates runs (TMA or pointer main loop, Triton or cuBLAS), measured once on the problem's
first call and then remembered for the process.

    fastest(kind, key, {name: zero-argument callable}) -> name of the fastest
    CHOICES[kind][key] = (chosen, {candidate: median ms})   read by tests, the benchmark and
                                                             for diagnosis

Used by kernels/lora/lora_gemm.py ("main loop") and kernels/lora/lora_linear_triton.py ("main GEMM",
"thin GEMM"). Nothing of the project is imported here.
"""

from __future__ import annotations

import logging

import triton.testing

log = logging.getLogger("unsloth_compile.kernels")

# Every choice made by timing, per kind: {problem key: (chosen, {candidate: median ms})}.
# Keys: "main loop" (TMA vs pointer Triton GEMM), "main GEMM" (Triton vs cuBLAS composition),
# "thin GEMM" (Triton vs cuBLAS for H, G, dA, dB). Read by tests and for diagnosis. (The fp8
# LoRA op's GEMM is not timed: kernels/fp8/fp8.py's `_fp8_gemm` says why.)
CHOICES: dict[str, dict] = {"main loop": {}, "main GEMM": {}, "thin GEMM": {}}


# Power-of-two row buckets seen, each mapped to the bucket whose timings and autotuning it uses.
ROW_BUCKETS: dict[int, int] = {}
# A new bucket within this factor of one already tuned reuses that one's choices.
ROW_BUCKET_REUSE_FACTOR = 4


def rows_bucket(rows: int) -> int:
    """The row count (M) under which a problem of `rows` rows is timed and autotuned.

    Its power of two, unless a bucket already tuned lies within ROW_BUCKET_REUSE_FACTOR of it:
    then that bucket, so that batches whose length changes every step pay the timing and the
    autotuning of each problem once, not once per power of two of M. Which kernel and tile
    win depends on N and K far more than on M once M fills the GPU; a bucket far from every
    tuned one (a single-row call next to full batches) is tuned on its own. Fixed per process
    once seen."""
    own = 1 << max(0, rows - 1).bit_length()
    found = ROW_BUCKETS.get(own)
    if found is None:
        tuned = [b for b in set(ROW_BUCKETS.values())
                 if max(b, own) <= ROW_BUCKET_REUSE_FACTOR * min(b, own)]
        found = min(tuned, key=lambda b: (max(b, own) / min(b, own), -b)) if tuned else own
        ROW_BUCKETS[own] = found
        if found != own:
            log.info("unsloth_compile: problems of %d-%d rows reuse the timings of the %d-row bucket",
                     own // 2 + 1, own, found)
    return found


def _time_ms(fn) -> float:
    # 5 ms warm-up / 25 ms of repeats: medians of the 0.03-3 ms calls here are stable within it.
    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


def fastest(kind: str, key: tuple, candidates: dict, timer=_time_ms) -> str:
    """The name of the fastest of `candidates` (name -> zero-argument callable, all computing
    the same thing) for this problem: timed once, on the problem's first call, then
    remembered; the first listed wins a tie. Logged at INFO, as the first call of a shape
    pays the timing (and any autotuning inside it).

    A candidate that cannot run this problem (a Triton kernel out of shared memory or
    registers at an unusual shape, say) is logged as a WARNING with its error and left out;
    the error is raised only when no candidate runs."""
    table = CHOICES[kind]
    found = table.get(key)
    if found is None:
        times, errors = {}, {}
        for name, fn in candidates.items():
            try:
                times[name] = timer(fn)
            except Exception as error:  # noqa: BLE001  recorded, logged, re-raised if all fail
                errors[name] = error
                log.warning("unsloth_compile: %s for %s: candidate %r failed and is not used: %s: %s",
                            kind, key, name, type(error).__name__, error)
        if not times:
            raise next(iter(errors.values()))
        best = min(times, key=times.get)
        times.update({name: float("inf") for name in errors})
        table[key] = found = (best, times)
        log.info("unsloth_compile: %s for %s: %s (%s)", kind, key, best,
                 ", ".join(f"{name} {ms:.4f} ms" for name, ms in times.items()))
    return found[0]
