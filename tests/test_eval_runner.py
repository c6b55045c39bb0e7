"""The evaluation runner end to end on a tiny random model: cells, table, plots, resume, both modes, CLI."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import build_hf_model, save_hf_model

import lkv_jax
from lkv_jax.evaluation import EvalConfig, EvalSample, EvalTask, PressSpec, run_eval, write_report
from lkv_jax.evaluation import runner as runner_mod
from lkv_jax.inference import prefill_pure
from lkv_jax.presses import registry
from lkv_jax.presses.base import BasePress, Scored, register_press

EOS = 2
MAX_NEW = 6


@register_press
@dataclasses.dataclass(frozen=True)
class KeepFirstPress(BasePress):
    """Test press: keeps the earliest prompt tokens (score = -position)."""

    def prefill_and_score(self, model, prompt_ids, valid, positions, chunk):
        cache, logits = prefill_pure(model, prompt_ids, valid, positions, chunk=chunk, capacity=prompt_ids.shape[1])
        scores = tuple(-p.astype(jnp.float32) for p in cache.positions)
        protected = tuple(jnp.zeros_like(p, bool) for p in cache.positions)
        return Scored(cache=cache, logits=logits, scores=scores, protected=protected)


@pytest.fixture
def keepfirst(monkeypatch):
    monkeypatch.setitem(registry.PRESSES, "keepfirst", KeepFirstPress)


def hf_greedy(hf, ids: np.ndarray, max_new: int = MAX_NEW) -> list[int]:
    """transformers' greedy generation of one unpadded prompt, cut after the first EOS (kept)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids[None], dtype=torch.long), max_new_tokens=max_new, do_sample=False,
                          eos_token_id=EOS, pad_token_id=0)[0, len(ids):].tolist()
    return out[: out.index(EOS) + 1] if EOS in out else out


def decode(ids) -> str:
    return " ".join(str(int(i)) for i in ids)


def make_task(hf, n: int = 4, seed: int = 0, name: str = "toy") -> EvalTask:
    """Random prompts of different lengths; the reference answer is transformers' own greedy output, so
    FullKV must score 100 and every score is exact match against an independent implementation."""
    rng = np.random.RandomState(seed)
    samples = []
    for i in range(n):
        ctx = rng.randint(4, 128, size=int(rng.randint(24, 50)))
        q = rng.randint(4, 128, size=4)
        ref = hf_greedy(hf, np.concatenate([ctx, q]))
        samples.append(EvalSample(id=f"{name}{i}", context_ids=ctx, question_ids=q,
                                  answers=(decode([t for t in ref if t != EOS]),)))
    return EvalTask(name, tuple(samples), MAX_NEW, score=lambda p, s: float(p == s.answers[0]), decode=decode,
                    eos_token_ids=(EOS,))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = build_hf_model("llama")
    path = save_hf_model(hf, tmp_path_factory.mktemp("model") / "llama")
    return hf, lkv_jax.load_hf(path, dtype="float32"), path


def test_runner_end_to_end_writes_cells_table_plots_and_resumes(tiny, tmp_path, keepfirst, monkeypatch):
    hf, model, _ = tiny
    task = make_task(hf)
    cfg = EvalConfig(presses=(PressSpec.parse("streamingllm:n_sink=2"), PressSpec.parse("keepfirst")),
                     budgets=(8, 16), batch_size=2, oracle=False, timing_repeats=1)
    cells = run_eval(model, [task], cfg, tmp_path, progress=False)
    assert len(cells) == 1 + 2 * 2
    files = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "cells").rglob("*.json"))
    assert files == ["cells/fullkv/full/toy.json", "cells/keepfirst/budget=16/toy.json",
                     "cells/keepfirst/budget=8/toy.json", "cells/streamingllm_n_sink=2/budget=16/toy.json",
                     "cells/streamingllm_n_sink=2/budget=8/toy.json"]

    full = json.loads((tmp_path / "cells/fullkv/full/toy.json").read_text())
    # FullKV generation equals transformers' greedy output token for token (batched, left-padded)
    for rec, s in zip(full["samples"], task.samples, strict=True):
        assert rec["generated_ids"] == hf_greedy(hf, s.prompt_ids)
    assert full["score"] == 100.0
    for c in cells:
        js = json.loads(runner_mod.cell_path(tmp_path, c["press"], c["setting"], "toy").read_text())
        assert js["complete"] and js["n_samples"] == 4
        assert [r["id"] for r in js["samples"]] == ["toy0", "toy1", "toy2", "toy3"]
        for r in js["samples"]:
            assert r["score"] == float(r["prediction"] == r["answers"][0])
        assert js["score"] == pytest.approx(100 * np.mean([r["score"] for r in js["samples"]]))
        if c["press"] != "fullkv":
            tm = js["timing"]
            assert tm["overhead_ms"] == pytest.approx(tm["compress_ms"] - tm["prefill_ms"])

    paths = write_report(tmp_path)
    table = paths["table"].read_text()
    for c in cells:  # every cell's score appears in its row of the table
        row = next(line for line in table.splitlines() if line.startswith(f"| {c['press']} |"))
        assert f"{c['score']:.1f}" in row
    assert "## Score: toy" in table and "## Eviction overhead" in table
    for key in ("scores_plot", "overhead_plot"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # with a reference press: intervals of every row, and paired differences equal to the score differences
    paths = write_report(tmp_path, reference="keepfirst")
    summary = json.loads(paths["summary"].read_text())
    assert "95% bootstrap interval" in paths["table"].read_text()
    score = {(c["press"], c["budget"]): c["score"] for c in cells}
    for b in (8, 16):
        d = summary["paired_difference"]["streamingllm:n_sink=2"][str(b)]
        assert d["mean"] == pytest.approx(score[("keepfirst", b)] - score[("streamingllm:n_sink=2", b)])
        assert d["lo"] <= d["mean"] <= d["hi"]
        i = summary["score_interval"]["keepfirst"][str(b)]
        assert i["mean"] == pytest.approx(score[("keepfirst", b)]) and i["lo"] <= i["mean"] <= i["hi"]
    assert summary["paired_difference"]["reference"] == "keepfirst"
    with pytest.raises(ValueError, match="reference press 'tova' is not in this run"):
        write_report(tmp_path, reference="tova")

    # resume: a second call finds every cell complete and runs no batch at all
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "cells").rglob("*.json")}

    def boom(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(runner_mod, "_run_batch", boom)
    again = run_eval(model, [task], cfg, tmp_path, progress=False)
    assert [c["score"] for c in again] == [c["score"] for c in cells]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    # cells written before a change of the results version are recomputed
    monkeypatch.setattr(runner_mod, "RESULTS_VERSION", runner_mod.RESULTS_VERSION + 1)
    with pytest.raises(AssertionError, match="recomputed"):
        run_eval(model, [task], cfg, tmp_path, progress=False)
    monkeypatch.setattr(runner_mod, "RESULTS_VERSION", runner_mod.RESULTS_VERSION - 1)
    # other inputs under the same task name (another seed) are not mistaken for the finished cells
    with pytest.raises(AssertionError, match="recomputed"):
        run_eval(model, [make_task(hf, seed=5)], cfg, tmp_path, progress=False)
    # nor are the cells of another model (same shapes, other weights)
    other = build_hf_model("llama", seed=1)
    other_model = lkv_jax.load_hf(save_hf_model(other, tmp_path / "other"), dtype="float32")
    assert runner_mod.model_fingerprint(other_model) != runner_mod.model_fingerprint(model)
    reloaded = lkv_jax.load_hf(tiny[2], dtype="float32")
    assert runner_mod.model_fingerprint(reloaded) == runner_mod.model_fingerprint(model)
    with pytest.raises(AssertionError, match="recomputed"):
        run_eval(other_model, [task], cfg, tmp_path, progress=False)
    # a smaller grid into the same folder reads its cells back; the report shows that grid only
    sub = EvalConfig(presses=(PressSpec.parse("keepfirst"),), budgets=(8,), batch_size=2, oracle=False)
    run_eval(model, [task], sub, tmp_path, progress=False)
    table = write_report(tmp_path)["table"].read_text()
    assert "| keepfirst |" in table and "| fullkv |" in table
    assert "streamingllm" not in table and "budget 16" not in table


def test_interrupted_task_keeps_the_cells_it_finished(tiny, tmp_path, keepfirst, monkeypatch):
    """Cells are computed batch-major; one whose last batch is done is on disk before the next cell runs,
    so a run killed in the middle of a task resumes with only the unfinished cells."""
    hf, model, _ = tiny
    task = make_task(hf)  # 4 samples, batches of 2: two batches per cell
    cfg = EvalConfig(presses=(PressSpec.parse("streamingllm:n_sink=2"), PressSpec.parse("keepfirst")),
                     budgets=(8, 16), batch_size=2, oracle=False, measure_overhead=False)
    real_run_batch = runner_mod._run_batch
    calls = []

    def killed_at_the_third_cell_of_the_last_batch(*a, **k):
        calls.append(k["prompt"].ids.shape)
        if len(calls) == 5 + 3:  # 5 cells x batch 1, then 2 cells of batch 2 finish, the 3rd is killed
            raise KeyboardInterrupt
        return real_run_batch(*a, **k)

    monkeypatch.setattr(runner_mod, "_run_batch", killed_at_the_third_cell_of_the_last_batch)
    with pytest.raises(KeyboardInterrupt):
        run_eval(model, [task], cfg, tmp_path, progress=False)
    written = [json.loads(p.read_text()) for p in (tmp_path / "cells").rglob("*.json")]
    kept = [c for c in written if c.get("complete")]
    assert len(kept) == 2 and all(c["n_samples"] == 4 for c in kept)

    calls.clear()
    monkeypatch.setattr(runner_mod, "_run_batch", lambda *a, **k: (calls.append(1), real_run_batch(*a, **k))[1])
    cells = run_eval(model, [task], cfg, tmp_path, progress=False)
    assert len(calls) == (5 - 2) * 2  # only the three unfinished cells, each over both batches
    reference = run_eval(model, [task], cfg, tmp_path / "uninterrupted", progress=False)
    assert [(c["press"], c["setting"], c["score"]) for c in cells] == \
        [(c["press"], c["setting"], c["score"]) for c in reference]


def test_question_agnostic_full_cache_matches_query_aware_reference(tiny, tmp_path):
    # compress the context, append the question on the cache, generate: with the full cache this is
    # exactly transformers' generation from context + question
    hf, model, _ = tiny
    task = make_task(hf, n=3, seed=1, name="agn")
    # a press that cannot exist at a budget (more sinks than the budget) is skipped, the grid goes on
    cfg = EvalConfig(presses=(PressSpec.parse("streamingllm:n_sink=2000"), PressSpec.parse("streamingllm")),
                     budgets=(1000,), batch_size=2, mode="question-agnostic", oracle=False, measure_overhead=False)
    cells = run_eval(model, [task], cfg, tmp_path, progress=False)
    assert [c["press"] for c in cells] == ["fullkv", "streamingllm"]
    assert not (tmp_path / "cells" / "streamingllm_n_sink=2000").exists()
    for c in cells:  # FullKV and a budget above every prompt: both keep everything
        js = json.loads(runner_mod.cell_path(tmp_path, c["press"], c["setting"], "agn").read_text())
        assert js["mode"] == "question-agnostic"
        for rec, s in zip(js["samples"], task.samples, strict=True):
            assert rec["generated_ids"] == hf_greedy(hf, s.prompt_ids)
        assert js["score"] == 100.0


def test_config_and_press_spec_errors():
    spec = PressSpec.parse("snapkv:window_size=8:kernel_size=3:pooling='max'")
    assert spec.name == "snapkv" and dict(spec.kwargs) == {"window_size": 8, "kernel_size": 3, "pooling": "max"}
    with pytest.raises(ValueError, match="key=value"):
        PressSpec.parse("snapkv:8")
    with pytest.raises(ValueError, match="budgets or ratios"):
        EvalConfig(presses=(spec,), budgets=(8,), ratios=(0.5,))
    with pytest.raises(ValueError, match="distinct"):
        EvalConfig(presses=(spec, spec), budgets=(8,))
    with pytest.raises(ValueError, match="adapter"):
        PressSpec.parse("lookaheadkv").build(runner_mod.Setting("budget", 8))
    # the grid skips a cell by the error's type: a budget below the entries a press always keeps
    from lkv_jax.errors import BudgetError

    budget = runner_mod.Setting("budget", 8)
    with pytest.raises(BudgetError, match="press streamingllm:n_sink=20 at budget=8"):
        PressSpec.parse("streamingllm:n_sink=20").build(budget)
    notes = []
    bar = type("Bar", (), {"write": lambda self, text: notes.append(text)})()
    assert not runner_mod._buildable(PressSpec.parse("streamingllm:n_sink=20"), budget, None, bar)
    assert len(notes) == 1 and notes[0].startswith("lkv eval: skipping press streamingllm:n_sink=20")
    for other in ("snapkv:window_size=0", "lookaheadkv", "nosuchpress"):  # any other error stops the run
        with pytest.raises(ValueError):
            runner_mod._buildable(PressSpec.parse(other), budget, None, bar)
    assert len(notes) == 1
    # LookaheadKV cells are keyed on the adapter's weights too (retraining recomputes them)
    import jax

    from lkv_jax.config import ModelConfig
    from lkv_jax.lookahead import init_adapter

    mc = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=8)
    a, b = (init_adapter(mc, jax.random.key(k), n_lookahead=2) for k in (0, 1))
    assert runner_mod.adapter_fingerprint(a) == runner_mod.adapter_fingerprint(a)
    assert runner_mod.adapter_fingerprint(a) != runner_mod.adapter_fingerprint(b)


def test_cli_synthetic_and_longbench(tmp_path, capsys):
    from lkv_jax.cli import main
    from lkv_jax.data.vocab import builtin_vocab

    vocab = builtin_vocab()
    hf = build_hf_model("llama", vocab_size=len(vocab))
    model_dir = save_hf_model(hf, tmp_path / "model")
    vocab.save(model_dir)
    lb = tmp_path / "lb"
    lb.mkdir()
    words = " ".join(vocab.words[40:80])
    with open(lb / "hotpotqa.jsonl", "w") as f:
        for i in range(2):
            f.write(json.dumps({"input": "key ?", "context": words, "answers": [vocab.words[50 + i]], "length": 40,
                                "dataset": "hotpotqa", "language": "en", "all_classes": None, "_id": f"lb{i}"}) + "\n")
    out = tmp_path / "run"
    rc = main(["eval", "--model", model_dir, "--presses", "streamingllm", "--ratios", "0.5", "--tasks",
               "niah_single,longbench/hotpotqa", "--lengths", "48", "--n-samples", "2", "--batch-size", "2",
               "--longbench-dir", str(lb), "--max-length", "200", "--out", str(out), "--no-progress",
               "--no-overhead", "--reference", "streamingllm"])
    assert rc == 0
    table = (out / "results.md").read_text()
    assert "## streamingllm minus each press" in table and "| fullkv |" in table.split("minus each press")[1]
    capsys.readouterr()
    assert main(["eval", "--model", model_dir, "--presses", "streamingllm", "--ratios", "0.5", "--tasks",
                 "niah_single", "--out", str(tmp_path / "run2"), "--reference", "snapkv"]) == 2
    assert "--reference 'snapkv' must be one of --presses" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()  # refused before any work
    assert "## Score: niah_single-48" in table and "## Score: longbench/hotpotqa" in table
    assert "| press | ratio 0.5 |" in table
    js = json.loads((out / "cells/streamingllm/ratio=0.5/longbench_hotpotqa.json").read_text())
    assert [r["id"] for r in js["samples"]] == ["lb0", "lb1"] and js["samples"][0]["answers"] == [vocab.words[50]]
    assert "oracle" in js and len(js["oracle"]["coverage_per_layer"]) == 2
    assert (out / "scores.png").is_file() and (out / "oracle.png").is_file()


def test_batches_group_by_question_length_when_agnostic():
    rng = np.random.RandomState(0)
    samples = tuple(EvalSample(id=str(i), context_ids=rng.randint(4, 9, size=5 + i), question_ids=np.arange(q),
                               answers=("",)) for i, q in enumerate([2, 3, 2, 3, 3]))
    agn = runner_mod._batches(samples, 4, agnostic=True)
    assert [[s.id for s in b] for b in agn] == [["0", "2"], ["1", "3", "4"]]
    # query-aware batches only sort by prompt length
    assert [[s.id for s in b] for b in runner_mod._batches(samples, 4, agnostic=False)] == [["0", "1", "2", "3"], ["4"]]
