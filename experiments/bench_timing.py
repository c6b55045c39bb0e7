"""Timing shared by the benchmark scripts: one warm-up run (compilation), then timed runs blocked on their
JAX results, reduced to the median (the typical run) or the minimum (the run least disturbed by other
processes); or several functions timed round-robin so that load from other processes hits them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def time_runs(fn: Callable, repeats: int, *, reduce: Callable = statistics.median,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """reduce([seconds of fn()] * repeats) after one untimed warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = clock()
        jax.block_until_ready(fn())
        times.append(clock() - t0)
    return reduce(times)


def best_interleaved(fns: dict[str, Callable], repeats: int, *,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Best-of-`repeats` seconds of each function, runs interleaved round-robin after one warm-up each."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            jax.block_until_ready(fn())
            best[k] = min(best[k], clock() - t0)
    return best
