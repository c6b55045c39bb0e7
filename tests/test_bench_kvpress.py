"""experiments/bench_kvpress.py without the kvpress venv: budget <-> compression_ratio, the exported weights
loading in transformers through the worker's own loader, the kept-entry comparison, and exit 2 without a venv."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx

import lkv_jax
from lkv_jax.checkpoint.hf import model_tensors, save_hf
from lkv_jax.models.transformer import Transformer
from lkv_jax.presses import make_press


@pytest.fixture
def bench(experiment_script):
    return experiment_script("bench_kvpress")


@pytest.mark.parametrize("T", [512, 1000, 4096, 4097, 16384, 32768, 12345])
@pytest.mark.parametrize("budget", [1, 64, 100, 128, 256, 333, 511])
def test_ratio_keeps_exactly_the_budget_on_both_sides(bench, T, budget):
    r = bench.ratio_for_budget(budget, T)
    assert 0.0 <= r < 1.0
    assert bench.kvpress_n_kept(T, r) == budget
    # lkv_jax's ratio semantics give the same count, so the two sides keep as many entries
    assert int(make_press("knorm", compression_ratio=r).keep_count(T)) == budget


def test_ratio_edge_cases(bench):
    assert bench.ratio_for_budget(600, 512) == 0.0 and bench.ratio_for_budget(512, 512) == 0.0
    with pytest.raises(ValueError, match="budget"):
        bench.ratio_for_budget(0, 512)
    # the float trap the nudging exists for: 1 - b/T alone keeps one entry too few here
    T, b = 100, 9
    assert bench.kvpress_n_kept(T, 1 - b / T) == b - 1 and bench.kvpress_n_kept(T, bench.ratio_for_budget(b, T)) == b


def test_exported_weights_load_identically_in_transformers(bench, tmp_path):
    cfg = bench.bench_config(n_layers=2, vocab=512)
    model = Transformer(cfg, dtype=np.float32, rngs=nnx.Rngs(0))
    save_hf(model, tmp_path)
    worker = bench_worker(tmp_path)
    hf = worker.model("sdpa")  # the worker's loader refuses missing / unexpected tensors
    sd = hf.state_dict()
    for name, a in model_tensors(model).items():
        np.testing.assert_array_equal(sd[name].numpy(), a, err_msg=name)
    ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (1, 48))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(lkv_jax.forward(model, ids)), ref, atol=2e-5, rtol=1e-4)


def bench_worker(model_dir):
    """The kvpress worker's loader, imported in the test venv (it needs torch and transformers, not kvpress)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "kvpress_worker.py"
    spec = importlib.util.spec_from_file_location("kvpress_worker", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Worker(str(model_dir))


def test_compare_kept_counts_differences_and_tells_near_ties(bench):
    kv_idx = [[[0, 1, 5], [2, 3, 5]]]
    scores = np.array([[0.9, 0.8, 0.1, 0.2, 0.3, 9.0], [0.1, 0.1, 0.9, 0.8, 0.2, 9.0]])
    same = bench.compare_kept("knorm", kv_idx, [scores], [np.array([[0, 1, 5], [2, 3, 5]])], [scores])
    assert same["same"] and same["differing_entries"] == 0 and same["max_score_diff"] == 0.0
    # head 1: lkv_jax keeps 4 instead of 3; kvpress scores them 0.8 vs 0.2, far beyond a 1e-9 rounding difference
    real = bench.compare_kept("knorm", kv_idx, [scores], [np.array([[0, 1, 5], [2, 4, 5]])], [scores + 1e-9])
    assert not real["same"] and real["differing_entries"] == 1 and real["differing_per_layer"] == [1]
    assert not real["tie_explained"]
    tied = scores.copy()
    tied[1, 4] = 0.8 - 1e-9
    tie = bench.compare_kept("knorm", kv_idx, [tied], [np.array([[0, 1, 5], [2, 4, 5]])], [tied + 1e-9])
    assert tie["tie_explained"]


def test_table_marks_skipped_kvpress_rows(bench):
    rows = [dict(press="tova", tokens=4096, kvpress_s=2.0, lkv_jax_s=1.0, kvpress_over_lkv_jax=2.0),
            dict(press="observed-attention", tokens=16384, kvpress_s=None, lkv_jax_s=3.0,
                 kvpress_over_lkv_jax=None, kvpress_skipped="eager attention needs ~18.0 GiB")]
    table = bench.format_table(rows)
    assert "| tova | 4096 | 2000.0 | 1000.0 | 2.00 |" in table
    assert "skipped (eager attention needs ~18.0 GiB)" in table and table.endswith("| 3000.0 | - |")


def test_no_install_without_venv_says_how_and_exits_2(bench, tmp_path, capsys):
    venv = tmp_path / "absent"
    assert bench.main(["--no-install", "--venv", str(venv), "--lengths", "512", "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert f"python3 -m venv {venv}" in err and "torch==2.13.0" in err and "kvpress==0.5.5" in err
    assert err.index("torch==2.13.0") < err.index("kvpress==0.5.5")  # torch first, or pip pulls a CUDA build
    assert not (tmp_path / "o.json").exists()


def test_unknown_press_is_refused_before_anything_runs(bench, tmp_path):
    with pytest.raises(ValueError, match="no kvpress counterpart"):
        bench.run([512], ["lookaheadkv"], venv=tmp_path / "absent", install=False)
