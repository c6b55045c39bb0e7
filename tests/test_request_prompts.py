"""Open-request training prompts over real text: essay passages only from the training half, code from the
standard library file it names, the asked-about name present in the passage, lengths in range, seeded."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import pytest

from lkv_jax.data.essays import load_essays
from lkv_jax.data.request_prompts import request_prompts


def count(text: str) -> int:  # any monotone counter serves; a word count keeps the test tokenizer-free
    return len(text.split())


def _norm(text: str) -> str:
    # whitespace dropped: the shipped essays run paragraphs together ("accelerating.We"), the passages
    # put the paragraph break back
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize("kind", ["essay", "code"])
def test_requests_fit_the_range_are_seeded_and_come_from_their_source(kind):
    reqs = request_prompts(kind, 12, min_tokens=600, max_tokens=1200, count=count, seed=4)
    assert len(reqs) == 12 and all(600 <= count(r.user) <= 1200 for r in reqs)
    assert [r.user for r in reqs] == [r.user for r in request_prompts(kind, 12, min_tokens=600, max_tokens=1200,
                                                                      count=count, seed=4)]
    assert [r.user for r in reqs] != [r.user for r in request_prompts(kind, 12, min_tokens=600, max_tokens=1200,
                                                                      count=count, seed=5)]
    train = [_norm(t) for t in load_essays("train")]
    held_out = [_norm(t) for t in load_essays("eval")]
    for r in reqs:
        assert r.user.endswith(r.question)
        passage = r.user[: -len(r.question)].strip()
        if kind == "essay":
            body = _norm(passage)
            assert any(body in t for t in train)
            # no sentence of the passage occurs in an evaluation essay
            for sentence in re.split(r"(?<=[.?!])", body):
                if len(sentence) > 50:
                    assert not any(sentence in t for t in held_out), sentence
        else:
            code = passage.removeprefix("```python\n").removesuffix("\n```")
            source = Path(sysconfig.get_paths()["stdlib"]) / r.source.split()[1]
            assert code in source.read_text(encoding="utf-8", errors="replace")
        named = re.search(r"about (\w+)\?|`(\w+)`", r.question)
        if named:  # the thing asked about is in the passage (a def, for code)
            name = named.group(1) or named.group(2)
            assert (f"def {name}(" if kind == "code" else name) in passage


def test_kinds_and_ranges_are_checked():
    with pytest.raises(ValueError, match="kind must be one of"):
        request_prompts("poems", 1, min_tokens=10, max_tokens=20, count=count)
    with pytest.raises(ValueError, match="min_tokens <= max_tokens"):
        request_prompts("essay", 1, min_tokens=30, max_tokens=20, count=count)
    with pytest.raises(ValueError, match="could not draw"):
        request_prompts("essay", 1, min_tokens=10**6, max_tokens=10**6 + 10, count=count)
