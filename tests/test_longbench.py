"""LongBench loader, prompts, truncation and metrics, against values worked out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lkv_jax.data.longbench import (
    DATASET2MAXLEN,
    DATASET2PROMPT,
    LONGBENCH_TASKS,
    build_prompt,
    format_prompt,
    load_longbench,
    split_prompt,
    truncate_middle,
)
from lkv_jax.data.longbench_metrics import (
    classification_score,
    code_sim_score,
    count_score,
    fuzz_ratio,
    normalize_answer,
    qa_f1_score,
    retrieval_score,
    rouge_score,
    score_sample,
    score_task,
)

# ----------------------------------------------------------------------------------------------
# metrics


def test_normalize_and_qa_f1_by_hand():
    assert normalize_answer("The  Cat, sat on a mat!") == "cat sat on mat"
    # pred -> "cat sat on mat" (4 tokens), truth -> "cat on mat" (3): 3 shared, P = 3/4, R = 1
    assert qa_f1_score("The cat sat on the mat.", "a cat on a mat") == pytest.approx(2 * 0.75 / 1.75)
    assert qa_f1_score("dog", "cat") == 0.0
    # multiset overlap: "a a b" vs "a b b" share {a, b} -> P = R = 2/3 (no articles here: x, y)
    assert qa_f1_score("x x y", "x y y") == pytest.approx(2 / 3)


def test_rouge_l_uses_the_rouge_package_set_semantics():
    # one sentence: LCS "the cat on the mat" has the DISTINCT words {the, cat, on, mat} = 4;
    # reference / prediction have 5 distinct words each -> P = R = 0.8 (textbook token LCS gives 5/6)
    assert rouge_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-6)
    # summary level: sentences split on "." ; union of per-sentence LCS words = {a, b, c, d} -> 1.0
    # (a flat LCS of "a b c d" and "a c b d" would give 3/4)
    assert rouge_score("a b. c d", "a c. b d") == pytest.approx(1.0, abs=1e-6)
    # P = 2/2, R = 2/4 -> F = 2/3
    assert rouge_score("x y", "x y z w") == pytest.approx(2 / 3, abs=1e-6)
    assert rouge_score("", "anything") == 0.0  # the package raises on an empty hypothesis -> 0
    assert rouge_score("...", "anything") == 0.0


def test_rouge_l_matches_the_rouge_package_on_random_texts():
    # LongBench's own metric is pltrdy/rouge's Rouge().get_scores(...)["rouge-l"]["f"]; short texts from a
    # small alphabet (repeated words, "." sentence breaks, empty pieces) exercise its set and union rules
    from rouge import Rouge
    rng = np.random.default_rng(0)
    words = np.array("a b c d e the cat sat on mat . , x".split())

    def text():
        return " ".join(rng.choice(words, size=rng.integers(0, 25)))

    for _ in range(2000):
        p, g = text(), text()
        try:
            expected = Rouge().get_scores([p], [g], avg=True)["rouge-l"]["f"]
        except ValueError:  # empty hypothesis or reference: LongBench's rouge_score returns 0
            expected = 0.0
        assert rouge_score(p, g) == pytest.approx(expected, abs=1e-12), (p, g)


def test_classification_retrieval_count_code_by_hand():
    classes = ["abbreviation", "location", "city", "description"]
    # both "location" and "city" named, truth among them -> 1/2
    assert classification_score("location city", "city", all_classes=classes) == 0.5
    assert classification_score("a description", "city", all_classes=classes) == 0.0
    # "city" is contained in the truth "city state" but differs: dropped -> 1/1
    assert classification_score("city state", "city state", all_classes=["city", "city state"]) == 1.0
    with pytest.raises(ValueError, match="all_classes"):
        classification_score("x", "y")
    # numbers [3, 13], one right -> 0.5
    assert retrieval_score("Paragraph 3 or Paragraph 13", "Paragraph 3") == 0.5
    assert retrieval_score("no idea", "Paragraph 3") == 0.0
    # numbers [12, 12, 3] -> 2/3
    assert count_score("There are 12 unique, 12 total, 3 dup", 12) == pytest.approx(2 / 3)
    # first line without ` # // is "x = 1"; LCS("x = 1", "x = 2") = 4 -> 2*4/10 = 0.8
    assert code_sim_score("```python\n# comment\nx = 1\ny = 3", "x = 2") == pytest.approx(0.8)
    # fuzzywuzzy's documented example: ratio("this is a test", "this is a test!") == 97
    assert fuzz_ratio("this is a test", "this is a test!") == 97
    assert fuzz_ratio("", "") == 100 and fuzz_ratio("a", "") == 0
    # halves round as python-Levenshtein's float does: LCS 1 of 16 chars -> 1 - 14/16 = 0.125 exactly -> 12;
    # LCS 17 of 80 -> 1 - 46/80 = 0.42500000000000004 -> 43 (fuzzywuzzy 0.18 + python-Levenshtein agree)
    assert fuzz_ratio("a" + "b" * 7, "a" + "c" * 7) == 12
    assert fuzz_ratio("x" * 17 + "a" * 23, "x" * 17 + "b" * 23) == 43


def test_score_sample_first_line_rule_and_max_over_answers():
    # triviaqa keeps the first line only: "Paris" matches the second answer exactly
    assert score_sample("triviaqa", "\nParis\nLondon", ["London", "Paris"]) == 1.0
    # hotpotqa scores the whole text: "paris london" vs "paris" -> P = 1/2, R = 1 -> 2/3
    assert score_sample("hotpotqa", "Paris\nLondon", ["Paris"]) == pytest.approx(2 / 3)
    assert score_task("hotpotqa", ["Paris", "Paris London"], [["Paris"], ["Paris"]]) == pytest.approx(
        round(100 * (1 + 2 / 3) / 2, 2))
    with pytest.raises(ValueError, match="no LongBench metric"):
        score_sample("vcsum", "x", ["y"])
    with pytest.raises(TypeError):
        score_sample("hotpotqa", "x", "y")


# ----------------------------------------------------------------------------------------------
# loader, prompts, truncation


def _record(i: int, **kw) -> dict:
    r = {"input": f"question {i}?", "context": f"context {i} {{braces}} text", "answers": [f"answer {i}"],
         "length": 4, "dataset": "hotpotqa", "language": "en", "all_classes": None, "_id": f"id{i}"}
    r.update(kw)
    return r


def test_tables_cover_the_16_english_tasks():
    assert len(LONGBENCH_TASKS) == 16
    assert set(DATASET2PROMPT) == set(DATASET2MAXLEN) == set(LONGBENCH_TASKS)
    assert DATASET2MAXLEN["gov_report"] == 512 and DATASET2MAXLEN["hotpotqa"] == 32
    for t in LONGBENCH_TASKS:
        assert DATASET2PROMPT[t].count("{context}") == 1


def test_loader_reads_official_jsonl(tmp_path):
    with open(tmp_path / "hotpotqa.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps(_record(i)) + "\n")
    records = load_longbench("hotpotqa", tmp_path)
    assert [r["_id"] for r in records] == ["id0", "id1", "id2"]
    assert records[1]["answers"] == ["answer 1"]
    assert len(load_longbench("hotpotqa", tmp_path, limit=2)) == 2
    with pytest.raises(FileNotFoundError):
        load_longbench("qasper", tmp_path)
    with pytest.raises(ValueError, match="unknown LongBench task"):
        load_longbench("nope", tmp_path)
    with open(tmp_path / "musique.jsonl", "w") as f:
        f.write(json.dumps({"input": "q", "context": "c"}) + "\n")
    with pytest.raises(ValueError, match="answers"):
        load_longbench("musique", tmp_path)
    with open(tmp_path / "qasper.jsonl", "w") as f:  # the second line lacks a field the first one has
        f.write(json.dumps(_record(0)) + "\n" + json.dumps({"input": "q", "context": "c"}) + "\n")
    with pytest.raises(ValueError, match="qasper.jsonl:2: record lacks .*answers"):
        load_longbench("qasper", tmp_path)
    (tmp_path / "trec.jsonl").write_text(json.dumps(_record(0)) + "\nnot json\n")
    with pytest.raises(ValueError, match="JSON"):
        load_longbench("trec", tmp_path)


def test_loader_reads_the_official_zip_from_the_hub_cache(tmp_path, monkeypatch):
    import zipfile

    import huggingface_hub

    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("data/hotpotqa.jsonl", "".join(json.dumps(_record(i)) + "\n" for i in range(3)))
    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda *a, **kw: asked.append((a, kw)) or str(archive))  # no download in tests
    records = load_longbench("hotpotqa", from_hub=True, limit=2, hub_cache=tmp_path / "cache")
    assert [r["_id"] for r in records] == ["id0", "id1"] and records[0] == _record(0)


def test_prompt_format_and_split():
    r = _record(0)
    text = format_prompt("hotpotqa", r)
    assert text.startswith("Answer the question based on the given passages.")
    assert "context 0 {braces} text" in text and text.endswith("Question: question 0?\nAnswer:")
    ctx, q = split_prompt("hotpotqa", r)
    assert ctx + q == text and ctx.endswith("context 0 {braces} text") and "question 0?" in q
    ctx, q = split_prompt("repobench-p", r)
    assert ctx + q == format_prompt("repobench-p", r) and q == "question 0?Next line of code:\n"


def test_truncate_middle_by_hand():
    ids = np.arange(10)
    np.testing.assert_array_equal(truncate_middle(ids, 6), [0, 1, 2, 7, 8, 9])
    np.testing.assert_array_equal(truncate_middle(ids, 7), [0, 1, 2, 7, 8, 9])  # int(7 / 2) each side
    np.testing.assert_array_equal(truncate_middle(ids, 10), ids)


class CharTokenizer:
    """One token per character, BOS = 1 when special tokens are added; a two-line chat template."""

    chat_template = "fake"

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "<s>U:" + messages[0]["content"] + "\nA:"


def _text(ids):
    return "".join(chr(i) for i in ids if i != 1)


def test_build_prompt_tokenises_splits_and_truncates():
    tok, r = CharTokenizer(), _record(0, context="x" * 2000)
    p = build_prompt(tok, "hotpotqa", r, max_length=10_000)
    assert p.context_ids[0] == 1 and not p.truncated
    assert _text(p.context_ids) + _text(p.question_ids) == format_prompt("hotpotqa", r)
    full = np.concatenate([p.context_ids, p.question_ids])
    t = build_prompt(tok, "hotpotqa", r, max_length=400)
    assert t.truncated and len(t.context_ids) + len(t.question_ids) == 400
    np.testing.assert_array_equal(np.concatenate([t.context_ids, t.question_ids]),
                                  np.concatenate([full[:200], full[-200:]]))
    assert _text(t.question_ids) == split_prompt("hotpotqa", r)[1]  # the question survives whole
    c = build_prompt(tok, "hotpotqa", r, max_length=10_000, chat_template=True)
    assert _text(c.context_ids).startswith("<s>U:Answer") and _text(c.question_ids).endswith("Answer:\nA:")
    # no chat template on the few-shot tasks (official rule)
    f = build_prompt(tok, "triviaqa", r, max_length=10_000, chat_template=True)
    assert _text(f.context_ids).startswith("Answer the question")
