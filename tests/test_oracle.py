"""Oracle coverage: hand-worked and brute-force cases, labels against transformers' eager attention, and
the runner's per-sample coverage against a brute-force computation from transformers' attention."""

from __future__ import annotations

import json
from dataclasses import replace as dataclass_replace

import numpy as np
import pytest
import torch
from conftest import build_hf_model, save_hf_model

import lkv_jax
from lkv_jax.evaluation import EvalConfig, EvalSample, EvalTask, PressSpec, run_eval
from lkv_jax.evaluation.oracle import coverage, evidence_recall, kept_mask, response_labels, slots_to_positions
from lkv_jax.evaluation.runner import cell_path
from lkv_jax.inference import prepare_prompt
from lkv_jax.padding import pad_left, pad_right


def test_coverage_by_hand():
    # one KV head shared by two query heads (G = 2), four positions
    label = np.array([[[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]] * 2)  # [layers 2, N 2, P 4]
    kept = [np.array([[False, True, False, True]]), np.array([[True, False, False, False]])]
    # layer 0 keeps {1, 3}: head 0 covers 0.2 + 0.4, head 1 covers 0.5 -> mean 0.55
    # layer 1 keeps {0} plus the always-kept {3}: head 0 0.1 + 0.4, head 1 0.5 -> 0.5
    always = np.array([False, False, False, True])
    np.testing.assert_allclose(coverage(label, kept), [0.55, 0.175])
    np.testing.assert_allclose(coverage(label, kept, always), [0.55, 0.5])
    np.testing.assert_allclose(coverage(label, [np.ones((1, 4), bool)] * 2), [1.0, 1.0])


def test_coverage_equals_brute_force():
    rng = np.random.RandomState(0)
    L, N, K, P = 3, 6, 2, 11
    label = rng.rand(L, N, P)
    label /= label.sum(-1, keepdims=True)
    kept = rng.rand(L, K, P) < 0.4
    brute = np.zeros(L)
    for l in range(L):
        total = 0.0
        for n in range(N):
            k = n // (N // K)
            total += sum(label[l, n, p] for p in range(P) if kept[l, k, p])
        brute[l] = total / N
    np.testing.assert_allclose(coverage(label, kept), brute, rtol=1e-12)
    with pytest.raises(ValueError, match="does not fit"):
        coverage(label, rng.rand(L, 4, P) < 0.5)


def test_kept_mask():
    m = kept_mask(np.array([[0, 3, -1], [1, 2, 4]]), 5)
    np.testing.assert_array_equal(m, [[1, 0, 0, 1, 0], [0, 1, 1, 0, 1]])
    with pytest.raises(ValueError, match="outside"):
        kept_mask(np.array([[5]]), 5)


def hf_label(hf, prompt: np.ndarray, response: list[int]) -> np.ndarray:
    """Brute force from transformers' eager attention on [prompt; response]: per layer and head, the
    mean over response rows of the attention on prompt columns, renormalised. float64 [L, N, T]."""
    ids = torch.tensor(np.concatenate([prompt, response])[None], dtype=torch.long)
    with torch.no_grad():
        att = hf(ids, output_attentions=True).attentions
    T = len(prompt)
    out = np.stack([a[0, :, T:, :T].double().numpy().mean(1) for a in att])
    return out / out.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = build_hf_model("llama")
    path = save_hf_model(hf, tmp_path_factory.mktemp("model") / "llama")
    return hf, lkv_jax.load_hf(path, dtype="float32")


def test_response_labels_match_transformers_attention(tiny):
    hf, model = tiny
    rng = np.random.RandomState(1)
    prompts = [rng.randint(4, 128, size=n) for n in (13, 29)]
    responses = [[5, 9, 17], [40, 41, 42, 43, 44]]
    ids, mask = pad_left(prompts)
    prompt = prepare_prompt(ids, mask, 16, model.config.vocab_size)
    r_ids, r_mask = pad_right(responses, 8)
    labels = slots_to_positions(response_labels(model, prompt, r_ids, r_mask), np.asarray(prompt.valid))
    for lab, p, r in zip(labels, prompts, responses, strict=True):
        np.testing.assert_allclose(lab, hf_label(hf, p, r), atol=2e-5)


@pytest.mark.parametrize("mode", ["query-aware", "question-agnostic"])
def test_runner_coverage_equals_brute_force(tiny, tmp_path, mode):
    hf, model = tiny
    rng = np.random.RandomState(2)
    samples = tuple(EvalSample(id=f"s{i}", context_ids=rng.randint(4, 128, size=n),
                               question_ids=rng.randint(4, 128, size=3), answers=("",))
                    for i, n in enumerate((20, 33)))
    task = EvalTask("t", samples, 5, score=lambda p, s: 0.0, decode=lambda ids: " ".join(map(str, ids)),
                    eos_token_ids=(2,))
    budget, n_sink = 8, 2
    cfg = EvalConfig(presses=(PressSpec.parse(f"streamingllm:n_sink={n_sink}"),), budgets=(budget, 1000),
                     batch_size=2, mode=mode, measure_overhead=False)
    run_eval(model, [task], cfg, tmp_path, progress=False)
    full = json.loads(cell_path(tmp_path, "fullkv", "full", "t").read_text())
    small = json.loads(cell_path(tmp_path, f"streamingllm:n_sink={n_sink}", f"budget={budget}", "t").read_text())
    large = json.loads(cell_path(tmp_path, f"streamingllm:n_sink={n_sink}", "budget=1000", "t").read_text())
    for s, rf, rs, rl in zip(samples, full["samples"], small["samples"], large["samples"], strict=True):
        label = hf_label(hf, s.prompt_ids, rf["generated_ids"])
        n_comp = len(s.context_ids) if mode == "question-agnostic" else len(s.prompt_ids)
        # StreamingLLM keeps the n_sink first and the budget - n_sink last compressed positions; the
        # question (agnostic mode) is appended afterwards and always present
        kept = np.zeros(len(s.prompt_ids), bool)
        kept[:n_sink] = True
        kept[n_comp - (budget - n_sink):] = True
        brute = label[:, :, kept].sum(-1).mean(-1)
        np.testing.assert_allclose(rs["oracle_coverage"], brute, atol=3e-5)
        np.testing.assert_allclose(rl["oracle_coverage"], 1.0, atol=1e-5)  # budget >= prompt: everything kept
    assert small["oracle"]["coverage_per_layer"] == pytest.approx(
        np.mean([r["oracle_coverage"] for r in small["samples"]], axis=0).tolist())


def test_evidence_recall_by_hand():
    # layer 0: KV head 1 keeps 2 of the 3 evidence positions {1, 2, 4}; layer 1: head 0 keeps all of them
    kept = [np.array([[1, 0, 0, 1, 0], [0, 1, 1, 0, 0]], bool), np.array([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0]], bool)]
    np.testing.assert_allclose(evidence_recall(kept, np.array([1, 2, 4])), [2 / 3, 1.0])
    with pytest.raises(ValueError, match="no evidence"):
        evidence_recall(kept, np.array([], int))


def test_evidence_positions_are_the_answer_records():
    from lkv_jax.data.synthetic import generate_samples
    from lkv_jax.data.vocab import builtin_vocab
    from lkv_jax.evaluation.tasks import synthetic_task

    v = builtin_vocab()
    for name in ("niah_single", "niah_multikey", "tag_list", "vt"):
        raw = generate_samples(name, 3, 300, seed=4)
        task = synthetic_task(name, n_samples=3, length=300, seed=4, vocab=v)
        for s, e in zip(raw, task.samples, strict=True):
            words = v.decode(e.context_ids[e.extra["evidence_positions"]]).split()
            # exactly the records holding a reference, in context order
            want = [w for _, text in s.needles if any(f" {r} " in f" {text} " for r in s.references)
                    for w in text.split()]
            assert words == want and len(words) > 0
            if name == "niah_multikey":  # the asked record only, not the distractors
                assert len(words) == len(s.needles[0][1].split())
            # the distractors: every other record, in context order (none beside a single needle)
            others = [w for _, text in s.needles if not any(f" {r} " in f" {text} " for r in s.references)
                      for w in text.split()]
            assert v.decode(e.context_ids[e.extra["distractor_positions"]]).split() == others
            assert not set(e.extra["distractor_positions"]) & set(e.extra["evidence_positions"])
            assert len(others) == {"niah_single": 0, "niah_multikey": 3 * len(words)}.get(name, len(others))
            if name in ("tag_list", "vt"):
                assert len(others) > 0  # other tags' items, the other chain


def test_runner_records_evidence_recall(tiny, tmp_path):
    from lkv_jax.data.vocab import builtin_vocab
    from lkv_jax.evaluation.tasks import synthetic_task

    _, model = tiny  # vocabulary 128 < the built-in 448: remap ids into the model's range
    remap = lambda ids: np.asarray(ids) % 128  # noqa: E731
    tasks = []
    for name in ("niah_single", "niah_multikey"):
        task = synthetic_task(name, n_samples=2, length=60, seed=0, vocab=builtin_vocab())
        samples = tuple(dataclass_replace(s, context_ids=remap(s.context_ids), question_ids=remap(s.question_ids))
                        for s in task.samples)
        tasks.append(dataclass_replace(task, samples=samples))
    task, multikey = tasks
    samples = task.samples
    cfg = EvalConfig(presses=(PressSpec.parse("streamingllm:n_sink=1"),), budgets=(8, 1000), batch_size=2,
                     measure_overhead=False, oracle=False)
    run_eval(model, tasks, cfg, tmp_path, progress=False)
    # the distractor records (other keys) by the same measure, by hand; a single needle has none
    cell = json.loads(cell_path(tmp_path, "streamingllm:n_sink=1", "budget=8", multikey.name).read_text())
    for s, r in zip(multikey.samples, cell["samples"], strict=True):
        dis, n = np.asarray(s.extra["distractor_positions"]), len(s.prompt_ids)
        np.testing.assert_allclose(r["distractor_recall"], ((dis < 1) | (dis >= n - 7)).mean())
    assert cell["evidence"]["distractor_mean"] == pytest.approx(
        np.mean([r["distractor_recall"] for r in cell["samples"]]))
    small = json.loads(cell_path(tmp_path, "streamingllm:n_sink=1", "budget=8", task.name).read_text())
    large = json.loads(cell_path(tmp_path, "streamingllm:n_sink=1", "budget=1000", task.name).read_text())
    for s, r in zip(samples, small["samples"], strict=True):
        ev = np.asarray(s.extra["evidence_positions"])
        n = len(s.prompt_ids)  # query-aware: context and question were compressed together
        kept = (ev < 1) | (ev >= n - 7)  # the sink and the last 7 positions
        np.testing.assert_allclose(r["evidence_recall"], kept.mean())
    assert all(r["evidence_recall"] == [1.0, 1.0] for r in large["samples"])
    assert small["evidence"]["recall_mean"] == pytest.approx(np.mean([r["evidence_recall"] for r in small["samples"]]))
    assert "distractor_mean" not in small["evidence"] and "distractor_recall" not in small["samples"][0]
    # the report's table averages the tasks that have distractors only, evidence recall on the same tasks
    from lkv_jax.evaluation.report import load_cells, markdown_report

    text, numbers = markdown_report(load_cells(tmp_path))
    row = numbers["distractor_recall"]["streamingllm:n_sink=1"]["8"]
    assert row == pytest.approx({"evidence": cell["evidence"]["recall_mean"],
                                 "distractor": cell["evidence"]["distractor_mean"]})
    assert "Answer record vs distractors" in text
