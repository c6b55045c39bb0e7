"""The essay haystack, split by file into a training half and an evaluation half.

No training prompt may share text with an evaluation prompt, so the split is by essay: the essays sorted
by file name, every second one (index 1, 3, 5, ...) is in the evaluation half, the others in training.
"""

from __future__ import annotations

from functools import cache

from lkv_jax.data.installed import essay_dir

SPLITS = ("train", "eval")


@cache
def essay_names(split: str) -> tuple[str, ...]:
    """File stems of one half, sorted."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    names = sorted(p.stem for p in essay_dir().glob("*.txt"))
    return tuple(n for i, n in enumerate(names) if (i % 2 == 1) == (split == "eval"))


@cache
def load_essays(split: str) -> tuple[str, ...]:
    """The essays' texts of one half, in `essay_names(split)` order (UTF-8, as shipped)."""
    d = essay_dir()
    return tuple((d / f"{n}.txt").read_text(encoding="utf-8") for n in essay_names(split))
