"""Timing shared by the benchmark scripts: one warm-up run (compilation), then timed runs blocked on their
JAX results, reduced to the median (the typical run) or the minimum (the run least disturbed by other
processes); or several functions timed round-robin so that load from other processes hits them alike.
Also: a `jax.profiler` trace of the measured calls (the benchmarks' --profile DIR) and the seconds per HLO
op read back from it."""

from __future__ import annotations

import gzip
import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

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


def profile_calls(fns: dict[str, Callable], directory) -> Path:
    """One more call of each function under a single `jax.profiler` trace written to `directory`.

    Each call sits in a TraceAnnotation named by its key. Call it after the timed runs: the functions are
    compiled by then and the tracer's overhead stays out of the timings. Open the trace in TensorBoard's
    profile plugin (the .xplane.pb) or at ui.perfetto.dev (perfetto_trace.json.gz)."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(directory), create_perfetto_trace=True):
        for name, fn in fns.items():
            with jax.profiler.TraceAnnotation(name):
                jax.block_until_ready(fn())
    return directory


_CONTAINER = re.compile(r"(while|conditional|call)(\.\d+)?$")  # their bodies' own ops are timed


def hlo_op_seconds(directory) -> dict[tuple[str, str], tuple[float, int]]:
    """(seconds, executions) per (HLO module, HLO instruction) in the newest trace under `directory`
    (`profile_calls`), seconds summed over the executions and over threads. Loops, calls and conditionals
    are left out, as the ops of their bodies are counted themselves."""
    traces = sorted(Path(directory).glob("plugins/profile/*/perfetto_trace.json.gz"))
    if not traces:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {directory}/plugins/profile")
    with gzip.open(traces[-1]) as f:
        events = json.load(f)["traceEvents"]
    ops: dict[tuple[str, str], tuple[float, int]] = {}
    for e in events:
        args = e.get("args", {})
        if e.get("ph") == "X" and "hlo_module" in args and not _CONTAINER.match(e["name"]):
            key = (args["hlo_module"], args.get("hlo_op", e["name"]))
            s, n = ops.get(key, (0.0, 0))
            ops[key] = (s + e["dur"] * 1e-6, n + 1)
    return ops
