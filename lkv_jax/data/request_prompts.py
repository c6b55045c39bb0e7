"""Open requests over real text, for LookaheadKV's training data on a real model.

The paper trains on the target model's own responses to varied long prompts (ChatQA2, Tulu, Stack, few-shot).
Offline we have two sources of real long text, and ask open questions about each:

- essays (the training half of `lkv_jax.data.essays`, never the evaluation half): summarise the passage,
  answer a question about something it names, list what it names, rewrite a paragraph;
- code: the Python standard library's own source on this machine (`sysconfig`'s stdlib folder): say what
  a function or class does, list the definitions, name the imports, point out an edge case.

A request is a `Request`: the passage, the question, and where the question goes (after the passage, as in
most long-context prompts, or before it). `request_prompts` draws `n` of them at a token length in a range,
deterministically from a seed. Lengths count tokens of the user message under the caller's counter.
"""

from __future__ import annotations

import dataclasses
import re
import sysconfig
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

import numpy as np

from lkv_jax.data.essays import load_essays

Counter = Callable[[str], int]

KINDS = ("essay", "code")

_ESSAY_REQUESTS = (
    "Summarise the passage above in a few sentences.",
    "What does the author say about {name}? Answer from the passage.",
    "List the people, companies and places the passage names, with one line on each.",
    "Rewrite the first paragraph of the passage in plain, simple words.",
    "What is the main argument of the passage? Quote the sentence that supports it best.",
    "Write three questions a careful reader might ask about this passage, and answer them.",
)
_CODE_REQUESTS = (
    "What does the function `{name}` in the code above do? Explain step by step.",
    "List every function and class defined in the code above, with one line on what each is for.",
    "Which modules does the code above import, and what does it use each for?",
    "Point out an edge case or possible bug in `{name}` and say how to fix it.",
    "Write a short docstring for `{name}` describing its arguments and return value.",
)


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt: `user` is the whole user message (passage and question); `kind` "essay" | "code";
    `source` names the essay or module the passage comes from."""

    kind: str
    user: str
    question: str
    source: str


@cache
def _stdlib_sources() -> tuple[tuple[str, str], ...]:
    """(module path, text) of the standard library's top-level .py files over 4 KB, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 4096)
    if not files:
        raise FileNotFoundError(f"no Python sources found in {root}")
    return tuple((p.name, p.read_text(encoding="utf-8", errors="replace")) for p in files)


def _passage(units: Sequence[str], start: int, lo: int, hi: int, count: Counter, sep: str) -> str | None:
    """Consecutive units from `start` joined by `sep`, as many as fit under `hi` tokens; None if they
    stay under `lo` before the text ends."""
    text, best = "", None
    for u in units[start:]:
        text = f"{text}{sep}{u}" if text else u
        n = count(text)
        if n > hi:
            break
        if n >= lo:
            best = text
    return best


def _names_in_essay(text: str) -> list[str]:
    """Capitalised words used at least twice and never in lower case ("Their" at a sentence start is out):
    people, companies, places."""
    lower = set(re.findall(r"\b[a-z]+\b", text))
    counts: dict[str, int] = {}
    for w in re.findall(r"\b[A-Z][a-z]{2,}\b", text):
        counts[w] = counts.get(w, 0) + 1
    return sorted(w for w, c in counts.items() if c >= 2 and w.lower() not in lower)


def _names_in_code(text: str) -> list[str]:
    return sorted(set(re.findall(r"^\s*def ([A-Za-z_][A-Za-z0-9_]*)\(", text, flags=re.M)))


def _essay_request(rng: np.random.Generator, lo: int, hi: int, count: Counter, *, split: str = "train",
                   requests: Sequence[str] = _ESSAY_REQUESTS) -> Request | None:
    essays = load_essays(split)
    i = int(rng.integers(len(essays)))
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n|(?<=[.?!])(?=[A-Z])", essays[i]) if p.strip()]
    start = int(rng.integers(max(1, len(paragraphs) // 2)))
    passage = _passage(paragraphs, start, lo, hi, count, "\n\n")
    if passage is None:
        return None
    template = requests[int(rng.integers(len(requests)))]
    names = _names_in_essay(passage)
    if "{name}" in template:
        if not names:
            return None
        template = template.format(name=names[int(rng.integers(len(names)))])
    return Request("essay", f"{passage}\n\n{template}", template, f"{split} essay {i}")


def _code_request(rng: np.random.Generator, lo: int, hi: int, count: Counter) -> Request | None:
    sources = _stdlib_sources()
    name, text = sources[int(rng.integers(len(sources)))]
    lines = text.splitlines()
    # start at a top-level definition or import, so the passage reads as whole blocks
    starts = [k for k, line in enumerate(lines) if line.startswith(("def ", "class ", "import ", "from "))] or [0]
    start = starts[int(rng.integers(len(starts)))]
    blocks = lines[start:]
    passage = _passage(blocks, 0, lo, hi, count, "\n")
    if passage is None:
        return None
    template = _CODE_REQUESTS[int(rng.integers(len(_CODE_REQUESTS)))]
    if "{name}" in template:
        defs = _names_in_code(passage)
        if not defs:
            return None
        template = template.format(name=defs[int(rng.integers(len(defs)))])
    return Request("code", f"```python\n{passage}\n```\n\n{template}", template, f"stdlib {name}")


_BUILDERS = {"essay": _essay_request, "code": _code_request}


def request_prompts(kind: str, n: int, *, min_tokens: int, max_tokens: int, count: Counter,
                    seed: int = 0) -> list[Request]:
    """`n` requests of one kind whose user message is `min_tokens`..`max_tokens` tokens under `count`.

    Deterministic for a seed; draws that cannot fit the range (a short essay, no named thing) are
    redrawn, and a ValueError says so if the range cannot be met at all."""
    if kind not in _BUILDERS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    # the passage leaves room for the question (at most ~60 tokens)
    return _draw(n, lambda: _BUILDERS[kind](rng, max(1, min_tokens - 60), max_tokens - 60, count), kind,
                 min_tokens, max_tokens, count)


def _draw(n: int, make: Callable[[], Request | None], what: str, min_tokens: int, max_tokens: int,
          count: Counter) -> list[Request]:
    """`n` requests from `make()` whose user message is min_tokens..max_tokens tokens long, in at most
    50 n + 50 draws (a ValueError says the range cannot be met)."""
    if not 0 < min_tokens <= max_tokens:
        raise ValueError(f"need 0 < min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    out: list[Request] = []
    for _ in range(50 * n + 50):
        if len(out) == n:
            break
        r = make()
        if r is not None and min_tokens <= count(r.user) <= max_tokens:
            out.append(r)
    if len(out) < n:
        raise ValueError(f"could not draw {n} {what} requests of {min_tokens}-{max_tokens} tokens")
    return out


SUMMARY_REQUEST = _ESSAY_REQUESTS[0]


def summary_requests(n: int, *, min_tokens: int, max_tokens: int, count: Counter, seed: int = 0,
                     split: str = "eval") -> list[Request]:
    """`n` "summarise the passage above" requests over essay passages of one half (the evaluation half by
    default: the long-answer evaluation task), `min_tokens`..`max_tokens` tokens under `count`."""
    rng = np.random.default_rng([seed, len(KINDS)])
    return _draw(n, lambda: _essay_request(rng, max(1, min_tokens - 20), max_tokens - 20, count, split=split,
                                           requests=(SUMMARY_REQUEST,)), "summary", min_tokens, max_tokens, count)
