"""Ragged token rows to static shapes and back: left and right padding, length buckets, trimming at EOS.

Every compiled function sees a few padded shapes instead of one per length: prompts are padded on the
left (their last token is the newest, and positions count from each row's first real token), responses
on the right, to a bucketed length. Generation fills a row that reached EOS with the pad id, which
`trim_at_eos` cuts off again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

MIN_BUCKET = 16


def pad_left(rows: Sequence, length: int | None = None, pad=0, dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ragged in their last axis -> (array [B, ..., T], bool [B, T] real-entry mask), each row's
    entries at the end of its row and `pad` before them. T = `length`, else the longest row."""
    return _pad(rows, length, pad, dtype, left=True)


def pad_right(rows: Sequence, length: int | None = None, pad=0, dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """As `pad_left`, with each row's entries at the start of its row and `pad` after them."""
    return _pad(rows, length, pad, dtype, left=False)


def _pad(rows, length, pad, dtype, *, left: bool) -> tuple[np.ndarray, np.ndarray]:
    rows = [np.asarray(r) for r in rows]
    T = max(r.shape[-1] for r in rows) if length is None else int(length)
    if any(r.shape[-1] > T for r in rows):
        raise ValueError(f"a row of {max(r.shape[-1] for r in rows)} entries does not fit {T}")
    out = np.full((len(rows), *rows[0].shape[:-1], T), pad, dtype)
    mask = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        n = r.shape[-1]
        at = slice(T - n, T) if left else slice(0, n)
        out[i, ..., at] = r
        mask[i, at] = True
    return out, mask


def positions_of(mask: np.ndarray) -> np.ndarray:
    """int32 [B, T] positions of a left-padded batch: 0, 1, ... from each row's first real entry, 0 at padding."""
    mask = np.asarray(mask, bool)
    return np.where(mask, np.cumsum(mask, axis=-1) - 1, 0).astype(np.int32)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-int(n) // int(multiple)) * int(multiple)


def length_bucket(n: int, chunk_size: int | None = None) -> int:
    """Padded length for n tokens: a power of two >= 16, up to `chunk_size` (rounded up to a multiple of 8),
    then a multiple of chunk_size (a prefill runs in whole chunks). chunk_size None: powers of two only."""
    pow2 = max(MIN_BUCKET, 1 << (max(int(n), 1) - 1).bit_length())
    if chunk_size is None:
        return pow2
    if n <= chunk_size:
        return min(pow2, round_up(chunk_size, 8))
    return round_up(n, chunk_size)


def bucket_of(n: int, buckets: Sequence[int]) -> int:
    """The smallest of the increasing `buckets` that holds n tokens."""
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"a prompt of {n} tokens is longer than the largest bucket {buckets[-1]}")


def trim_at_eos(tokens: Iterable[int], eos_ids, keep_eos: bool = True) -> list[int]:
    """Generated tokens up to the first EOS (included if keep_eos); what follows it is padding."""
    eos = {int(e) for e in eos_ids or ()}
    out = []
    for t in np.asarray(tokens).tolist():
        if t in eos:
            if keep_eos:
                out.append(int(t))
            break
        out.append(int(t))
    return out
