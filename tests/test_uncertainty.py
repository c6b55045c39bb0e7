"""Bootstrap intervals of the evaluation tables against exact enumeration and brute-force checks."""

import itertools

import numpy as np
import pytest

from lkv_jax.evaluation.uncertainty import paired_difference, score_interval


def exact_bootstrap(per_task: dict[str, list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Every equally likely stratified resample (values x 100, weights) by enumeration: tiny inputs only."""
    per_task_means = []
    for scores in per_task.values():
        n = len(scores)
        per_task_means.append([np.mean([scores[i] for i in idx]) for idx in itertools.product(range(n), repeat=n)])
    combos = itertools.product(*per_task_means)
    values = np.array([100.0 * np.mean(c) for c in combos])
    return values, np.full(values.shape, 1.0 / values.size)


def test_score_interval_matches_the_exact_bootstrap_distribution():
    per_task = {"a": [1.0, 0.0, 0.5], "b": [0.0, 0.0, 1.0]}
    values, w = exact_bootstrap(per_task)
    got = score_interval(per_task, n_boot=40_000, seed=1)
    assert got["mean"] == pytest.approx(100 * (0.5 + 1 / 3) / 2)
    # percentile interval of the sampled bootstrap vs the exact distribution's quantiles
    order = np.argsort(values)
    cdf = np.cumsum(w[order])
    exact_lo = values[order][np.searchsorted(cdf, 0.025)]
    exact_hi = values[order][np.searchsorted(cdf, 0.975)]
    assert got["lo"] == pytest.approx(exact_lo, abs=100 / 18 + 1e-9)  # within one grid step of the exact quantile
    assert got["hi"] == pytest.approx(exact_hi, abs=100 / 18 + 1e-9)
    assert got["lo"] <= got["mean"] <= got["hi"]


def test_constant_scores_give_a_point_interval_and_bad_input_is_refused():
    assert score_interval({"t": [1.0] * 5}) == {"mean": 100.0, "lo": 100.0, "hi": 100.0}
    with pytest.raises(ValueError, match="no task"):
        score_interval({})
    with pytest.raises(ValueError, match="non-empty"):
        score_interval({"t": []})
    with pytest.raises(ValueError, match="n_boot"):
        score_interval({"t": [1.0]}, n_boot=0)


def test_paired_difference_p_better_matches_enumeration():
    a = {"t": {"x": 1.0, "y": 1.0, "z": 0.0}}
    b = {"t": {"x": 0.0, "y": 1.0, "z": 1.0}}
    # exact: diffs (1, 0, -1); P(resampled mean > 0) over all 27 resamples
    diffs = [1.0, 0.0, -1.0]
    exact = np.mean([np.mean([diffs[i] for i in idx]) > 0 for idx in itertools.product(range(3), repeat=3)])
    got = paired_difference(a, b, n_boot=40_000, seed=3)
    assert got["mean"] == pytest.approx(0.0)
    assert got["p_better"] == pytest.approx(exact, abs=0.01)


def test_pairing_removes_the_spread_of_sample_difficulty():
    # B scores 0.1 above A on every sample; the samples differ widely in difficulty, so the two unpaired
    # intervals overlap while the paired difference is exact
    rng = np.random.default_rng(0)
    base = rng.uniform(0.0, 0.9, size=30)
    a = {"t": {str(i): float(v) for i, v in enumerate(base)}}
    b = {"t": {str(i): float(v) + 0.1 for i, v in enumerate(base)}}
    ia, ib = score_interval({"t": list(a["t"].values())}), score_interval({"t": list(b["t"].values())})
    assert ia["hi"] > ib["lo"]
    d = paired_difference(b, a)
    assert d["mean"] == pytest.approx(10.0)
    assert d["lo"] == pytest.approx(10.0) and d["hi"] == pytest.approx(10.0) and d["p_better"] == 1.0


def test_paired_difference_refuses_unpaired_samples():
    with pytest.raises(ValueError, match="different tasks"):
        paired_difference({"t": {"x": 1.0}}, {"u": {"x": 1.0}})
    with pytest.raises(ValueError, match="different samples"):
        paired_difference({"t": {"x": 1.0}}, {"t": {"y": 1.0}})
