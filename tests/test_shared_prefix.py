"""Sharing one prefill among presses: every press compressing from a `shared_prefix` of the batch keeps
the same entries as its own full `compress` (the reference), with the same scores and cache up to float
rounding; the evaluation runner prefills each batch once for its whole grid and scores as without."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import build_hf_model, save_hf_model

import lkv_jax
import lkv_jax.evaluation.runner as runner_mod
from lkv_jax.compression import compress_prompt, shared_prefix
from lkv_jax.evaluation import EvalConfig, EvalSample, EvalTask, PressSpec, run_eval
from lkv_jax.inference import prepare_prompt
from lkv_jax.lookahead import init_adapter
from lkv_jax.presses import make_press


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return lkv_jax.load_hf(save_hf_model(build_hf_model("llama"), tmp_path_factory.mktemp("m") / "llama"))


@pytest.fixture(scope="module")
def prompt():
    rs = np.random.RandomState(3)
    ids = np.zeros((2, 80), np.int32)
    mask = np.zeros((2, 80), np.int32)
    ids[0], mask[0] = rs.randint(3, 128, 80), 1
    ids[1, 21:], mask[1, 21:] = rs.randint(3, 128, 59), 1  # a left-padded row
    return prepare_prompt(ids, mask, 32, 128)


PRESSES = [
    ("snapkv", {"window_size": 8}), ("snapkv", {"window_size": 24}), ("pyramidkv", {"window_size": 8}),
    ("snapkv-paper", {"window_size": 8}), ("tova", {}), ("knorm", {}), ("streamingllm", {}), ("random", {}),
    ("laq", {"window_size": 8}), ("observed-attention", {}), ("expected-attention", {}),
    ("adakv-snapkv", {"window_size": 8}), ("speckv", {"draft_model": "self", "window_size": 8}),
    ("lookaheadkv", {}),
]


@pytest.mark.parametrize("name,kwargs", PRESSES, ids=[f"{n}{'-' + str(k) if k else ''}" for n, k in PRESSES])
def test_compress_from_a_shared_prefix_equals_compress(model, prompt, name, kwargs):
    if name == "lookaheadkv":
        kwargs = {"adapter": init_adapter(model.config, jax.random.key(0), n_lookahead=4, rank=2)}
    press = make_press(name, budget=30, **kwargs)
    ref = compress_prompt(model, prompt, press)
    # a tail shorter than SnapKV's 24-token window: the window is recomputed, still the same result
    out = compress_prompt(model, prompt, press, prefix=shared_prefix(model, prompt, 16))
    for a, b in zip(ref.kept_positions, out.kept_positions, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(ref.scores, out.scores, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    for a, b in zip(ref.cache.keys + ref.cache.values, out.cache.keys + out.cache.values, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ref.cache.next_position), np.asarray(out.cache.next_position))
    np.testing.assert_allclose(np.asarray(ref.logits), np.asarray(out.logits), rtol=1e-4, atol=1e-4)


def test_a_prefix_of_another_batch_is_refused(model, prompt):
    other = prepare_prompt(np.ones((3, 80), np.int32), None, 32, 128)
    with pytest.raises(ValueError, match="not one of this 2 x 96 prompt batch"):
        compress_prompt(model, prompt, make_press("knorm", budget=8), prefix=shared_prefix(model, other, 16))
    with pytest.raises(ValueError, match="tail must lie in"):
        shared_prefix(model, prompt, 96)


def test_runner_prefills_each_batch_once_for_the_whole_grid(model, tmp_path, monkeypatch):
    rs = np.random.RandomState(0)
    samples = tuple(EvalSample(id=f"s{i}", context_ids=rs.randint(4, 128, 90 + 7 * i),
                               question_ids=rs.randint(4, 128, 4), answers=("x",)) for i in range(4))
    task = EvalTask("toy", samples, 4, score=lambda p, s: float(len(p) % 2), decode=lambda ids: " ".join(map(str, ids)))
    specs = tuple(PressSpec.parse(p) for p in ("snapkv:window_size=8", "tova", "knorm", "streamingllm:n_sink=2"))
    calls = []
    real = runner_mod.shared_prefix
    monkeypatch.setattr(runner_mod, "shared_prefix", lambda *a, **k: calls.append(1) or real(*a, **k))
    common = dict(presses=specs, budgets=(16, 40), batch_size=2, oracle=False, measure_overhead=False)
    shared = run_eval(model, [task], EvalConfig(**common), tmp_path / "shared", progress=False)
    assert len(calls) == 2  # two batches of two samples, eight press cells each
    alone = run_eval(model, [task], EvalConfig(**common, share_prefill=False), tmp_path / "alone", progress=False)
    assert len(calls) == 2
    assert [c["press"] for c in shared] == [c["press"] for c in alone]
    for a, b in zip(shared, alone, strict=True):
        assert [r["generated_ids"] for r in a["samples"]] == [r["generated_ids"] for r in b["samples"]]
    cell = runner_mod.cell_path(tmp_path / "shared", "tova", "budget=16", "toy")
    assert json.loads(cell.read_text())["complete"]
