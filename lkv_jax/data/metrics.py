"""RULER's string-match metrics (as in RULER's `scripts/eval/synthetic/constants.py`).

string_match_all: the fraction of reference strings that occur in the prediction (case-insensitive
substring test), for tasks whose answer is a set of items (all of them must be produced).
string_match_part: 1 if any reference occurs in the prediction, for tasks with several acceptable answers.
RULER reports the mean over samples times 100; `mean_score` does the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def _refs(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("a sample needs at least one reference string")
    return refs


def string_match_all(prediction: str, references: str | Sequence[str]) -> float:
    """Mean over references of [reference.lower() in prediction.lower()], in [0, 1]."""
    refs = _refs(references)
    p = prediction.lower()
    return sum(r.lower() in p for r in refs) / len(refs)


def string_match_part(prediction: str, references: str | Sequence[str]) -> float:
    """Max over references of [reference.lower() in prediction.lower()]: 1.0 or 0.0."""
    p = prediction.lower()
    return float(max(r.lower() in p for r in _refs(references)))


METRICS: dict[str, Callable[[str, str | Sequence[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}


def mean_score(metric: str, predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """RULER's task score: 100 x the mean per-sample metric, rounded to 2 decimals."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions ({len(predictions)}) as references ({len(references)}), > 0")
    fn = METRICS[metric]
    return round(100.0 * sum(fn(p, r) for p, r in zip(predictions, references, strict=True)) / len(predictions), 2)
