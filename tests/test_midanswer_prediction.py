"""experiments/midanswer_prediction.py measures what share of the future attention a press keeps; two facts
that hold whatever the model: a budget at or above the cache's length keeps all of it, and a random kept set
of k out of n positions keeps k / n of it on average (each position is kept with probability k / n)."""

from __future__ import annotations

import jax
import numpy as np

import lkv_jax
from lkv_jax.lookahead import init_adapter
from lkv_jax.tiny_target import ASSET_DIR


def test_full_budget_keeps_everything_and_random_keeps_k_over_n(experiment_script):
    script = experiment_script("midanswer_prediction")
    model = lkv_jax.load_hf(ASSET_DIR, dtype="float32")
    adapter = init_adapter(model.config, jax.random.key(0), n_lookahead=4, rank=2)
    presses = {name: make for name, make in script.build_presses(adapter, window=4).items()
               if name in ("lookaheadkv", "snapkv", "random")}
    rng = np.random.default_rng(0)
    cuts, k, full = (0, 6, 12), 24, 256
    ratios, covs = [], []
    for n_prompt in (90, 110):
        prompt = rng.integers(3, 400, n_prompt)
        answer = rng.integers(3, 400, 20)
        cov = script.sample_coverage(model, presses, prompt, answer, cuts, (k, full), length=128,
                                     response_length=24, tail=8)
        for name in presses:
            for t in cuts:
                np.testing.assert_allclose(cov[name][str(t)][str(full)], 1.0, atol=1e-5)
        for t in cuts:
            covs.append(np.mean(cov["random"][str(t)][str(k)]))
            ratios.append(k / (n_prompt + t))
    # 6 rows x 4 layers x 2 KV heads of draws: the mean lands near k / n (about 0.2 here)
    assert abs(np.mean(covs) - np.mean(ratios)) < 0.05, (covs, ratios)


def test_cuts_past_the_answer_are_marked_unused(experiment_script):
    script = experiment_script("midanswer_prediction")
    seqs, futures, used = script.cut_rows([5, 6, 7], [8, 9, 10], (0, 2, 3, 5))
    assert seqs == [[5, 6, 7], [5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [5, 6, 7, 8, 9]]
    assert futures == [[8, 9, 10], [10], [10], [10]]
    assert used == [True, True, False, False]
