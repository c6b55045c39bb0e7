"""How sure a table's scores are: bootstrap intervals over the evaluation samples.

With a few dozen samples per task one answer moves a task score by several points, so a table of means
alone invites reading noise as a ranking. Both functions resample the samples *within each task*
(stratified: every replicate keeps each task's sample count) and average over tasks as the table does:

- `score_interval`: the average score of one press at one setting, with a percentile interval;
- `paired_difference`: press A minus press B on the same samples (the pairing removes the variance of
  how hard each sample is), with a percentile interval and the share of replicates where A > B.

Inputs are per-task lists of per-sample scores in [0, 1] (what the evaluation cells store); outputs are on
the table's 0-100 scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _interval(per_task: Mapping[str, Sequence[float]], level: float, n_boot: int,
              seed: int) -> tuple[dict[str, float], np.ndarray]:
    """The average over tasks of the per-task mean scores and its bootstrap percentile interval, {"mean", "lo",
    "hi"} x 100, and the [n_boot] bootstrap averages (x 100) of samples resampled within each task."""
    if not per_task:
        raise ValueError("no task to average over")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    means, total = [], np.zeros(n_boot)
    for task, scores in per_task.items():
        a = np.asarray(scores, np.float64)
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"task {task!r}: expected a non-empty list of per-sample scores, got shape {a.shape}")
        means.append(a.mean())
        total += a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(axis=1)
    boots = 100.0 * total / len(per_task)
    alpha = (1.0 - level) / 2.0
    return {"mean": 100.0 * float(np.mean(means)), "lo": float(np.quantile(boots, alpha)),
            "hi": float(np.quantile(boots, 1.0 - alpha))}, boots


def score_interval(per_task: Mapping[str, Sequence[float]], *, level: float = 0.95, n_boot: int = 2000,
                   seed: int = 0) -> dict[str, float]:
    """Average over tasks of the mean per-sample score, and its bootstrap percentile interval.

    per_task: {task: per-sample scores in [0, 1]}. Returns {"mean", "lo", "hi"} on the 0-100 scale.
    """
    return _interval(per_task, level, n_boot, seed)[0]


def paired_difference(a: Mapping[str, Mapping[str, float]], b: Mapping[str, Mapping[str, float]], *,
                      level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Average score of A minus that of B on the same samples, with a paired bootstrap interval.

    a, b: {task: {sample id: score in [0, 1]}}, the same tasks and sample ids in both (an error otherwise:
    an unpaired comparison would silently mix different samples). Returns {"mean", "lo", "hi", "p_better"}:
    the difference on the 0-100 scale, its percentile interval, and the share of bootstrap replicates in
    which A scores above B.
    """
    if set(a) != set(b):
        raise ValueError(f"the two presses were scored on different tasks: {sorted(a)} vs {sorted(b)}")
    diffs = {}
    for task in a:
        if set(a[task]) != set(b[task]):
            raise ValueError(f"task {task!r}: the two presses were scored on different samples")
        ids = sorted(a[task])
        diffs[task] = np.asarray([a[task][i] for i in ids], np.float64) - np.asarray([b[task][i] for i in ids])
    interval, boots = _interval(diffs, level, n_boot, seed)
    return {**interval, "p_better": float(np.mean(boots > 0.0))}
