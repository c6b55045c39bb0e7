"""The long-answer summary task: essay passages of the evaluation half sized to the length, and the runner
scoring every press against FullKV's own answer to the same prompt."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import build_hf_model, save_hf_model

import lkv_jax
from lkv_jax.data.essays import load_essays
from lkv_jax.data.longbench_metrics import rouge_l_f
from lkv_jax.data.synthetic import HFPromptEncoder
from lkv_jax.evaluation import EvalConfig, EvalSample, EvalTask, PressSpec, run_eval
from lkv_jax.evaluation.tasks import summary_task


def test_summary_prompts_fit_the_length_and_come_from_the_evaluation_half(bpe_tokenizer_dir):
    enc = HFPromptEncoder(bpe_tokenizer_dir)
    task = summary_task(enc, length=1024, n_samples=3, seed=2, max_new_tokens=100)
    assert task.name == "summary-1024" and task.answers_from_fullkv and task.max_new_tokens == 100
    held_out = "".join("".join(load_essays("eval")).split())
    for s in task.samples:
        n = len(s.prompt_ids)
        assert 1024 * 0.6 < n + 100 <= 1024
        text = enc.tokenizer.decode(s.prompt_ids.tolist(), skip_special_tokens=False)
        assert text.startswith("<|im_start|>user\n")
        assert text.endswith("Summarise the passage above in a few sentences.<|im_end|>\n<|im_start|>assistant\n")
        passage = text.removeprefix("<|im_start|>user\n").split("\n\nSummarise the passage")[0]
        assert "".join(passage.split()) in held_out
    assert [s.prompt_ids.tolist() for s in task.samples] == [
        s.prompt_ids.tolist() for s in summary_task(enc, length=1024, n_samples=3, seed=2, max_new_tokens=100).samples]
    # ROUGE-L against the reference answer the runner fills in
    sample = EvalSample("x", np.ones(3, np.int32), np.ones(1, np.int32), answers=("the cat sat on the mat",))
    assert task.score("the cat sat on the mat", sample) == pytest.approx(1.0)
    assert task.score("a cat sat", sample) == pytest.approx(rouge_l_f("a cat sat", "the cat sat on the mat"))


def test_runner_scores_against_fullkv_answers(tmp_path):
    model = lkv_jax.load_hf(save_hf_model(build_hf_model("llama"), tmp_path / "m"), dtype="float32")
    rs = np.random.RandomState(0)
    samples = tuple(EvalSample(id=f"s{i}", context_ids=rs.randint(4, 128, 40), question_ids=rs.randint(4, 128, 3),
                               answers=()) for i in range(4))
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    task = EvalTask("open", samples, 6, score=lambda p, s: float(p == s.answers[0]), decode=decode,
                    answers_from_fullkv=True)
    cfg = EvalConfig(presses=(PressSpec.parse("streamingllm:n_sink=1"),), budgets=(4, 1000), batch_size=2,
                     oracle=False, measure_overhead=False)
    full, small, large = run_eval(model, [task], cfg, tmp_path / "eval", progress=False)
    assert full["score"] == 100.0
    assert large["score"] == 100.0  # a budget above the prompt keeps everything: FullKV's answer
    truth = {r["id"]: r["prediction"] for r in full["samples"]}
    for r in small["samples"]:
        assert r["answers"] == [truth[r["id"]]] and r["score"] == float(r["prediction"] == truth[r["id"]])
    assert small["score"] == pytest.approx(100 * np.mean([r["score"] for r in small["samples"]]))
