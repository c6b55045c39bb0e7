"""The training data pipeline (grain): shuffle, length buckets, batches, resumable iterator state.

Each epoch, samples are shuffled (seed, epoch) within their length bucket, cut into batches, and the
batches shuffled; a short last batch per bucket is filled with weight-0 rows. The plan of batches is a
plain list, so `grain.MapDataset.source(plan).map(collate)` has random access and its iterator state
is just the next batch index (saved in the training checkpoint).

A batch (numpy, static shapes per bucket):
    prompt_ids int32 [B, T] left-padded, prompt_valid bool [B, T], positions int32 [B, T]
    response_ids int32 [B, R] right-padded, response_mask bool [B, R]   (R: a power of two >= 16)
    labels float32 [B, n_layers, N, T] (zeros at padding)                 (only from a label dataset)
    row_weight float32 [B] (0 for filler rows)
"""

from __future__ import annotations

import numpy as np

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PREFILL_CHUNK = 512


def check_buckets(buckets) -> tuple[int, ...]:
    """Buckets must be increasing multiples of 8, and multiples of the prefill chunk above it."""
    b = tuple(int(x) for x in buckets)
    if not b or list(b) != sorted(set(b)) or any(x % 8 or (x > PREFILL_CHUNK and x % PREFILL_CHUNK) for x in b):
        raise ValueError(f"buckets must be increasing multiples of 8 (of {PREFILL_CHUNK} above {PREFILL_CHUNK}), "
                         f"got {b}")
    return b


def bucket_of(length: int, buckets) -> int:
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"a prompt of {length} tokens is longer than the largest bucket {buckets[-1]}")


def prefill_chunk(bucket: int) -> int:
    """The prefill chunk for a bucket (a divisor of it)."""
    return min(bucket, PREFILL_CHUNK)


def plan_epoch(lengths, batch_size: int, buckets, seed: int, epoch: int) -> list[tuple[int, tuple[int, ...]]]:
    """One epoch's batches: (bucket length, sample indices with -1 for filler rows)."""
    rng = np.random.default_rng([seed, epoch])
    by_bucket: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_bucket.setdefault(bucket_of(int(n), buckets), []).append(i)
    batches = []
    for b in sorted(by_bucket):
        idx = rng.permutation(by_bucket[b])
        for s in range(0, len(idx), batch_size):
            rows = [int(i) for i in idx[s: s + batch_size]]
            batches.append((b, tuple(rows + [-1] * (batch_size - len(rows)))))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]


def plan_batches(lengths, batch_size: int, buckets, seed: int, n_batches: int) -> list[tuple[int, tuple[int, ...]]]:
    """Enough epochs of `plan_epoch` to give n_batches batches."""
    if len(lengths) == 0:
        raise ValueError("the dataset is empty")
    plan, epoch = [], 0
    while len(plan) < n_batches:
        plan.extend(plan_epoch(lengths, batch_size, check_buckets(buckets), seed, epoch))
        epoch += 1
    return plan[:n_batches]


def response_bucket(n: int) -> int:
    return max(16, 1 << (max(n, 1) - 1).bit_length())


class Collate:
    """(bucket, indices) -> a padded numpy batch read from a random-access source (see module doc).

    With several processes (multi-host training) each one collates only its own contiguous slice of
    every global batch: rows [i * B / n, (i + 1) * B / n) for process i of n, so the per-process batches,
    stacked in process order, are exactly the single-process batch (`jax.make_array_from_process_local_data`
    assembles them that way over the mesh's data axis).
    """

    def __init__(self, source, with_labels: bool = True, *, process_index: int = 0, process_count: int = 1):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        self.source, self.with_labels = source, with_labels
        self.process_index, self.process_count = process_index, process_count

    def __call__(self, item):
        T, all_rows = item
        if len(all_rows) % self.process_count:
            raise ValueError(f"a batch of {len(all_rows)} rows does not split over {self.process_count} processes")
        first = next((i for i in all_rows if i >= 0), None)
        if first is None:
            raise ValueError("a batch without any real sample")
        n = len(all_rows) // self.process_count
        rows = all_rows[self.process_index * n:(self.process_index + 1) * n]
        samples = [self.source[i] for i in rows if i >= 0] or [self.source[first]]
        B = len(rows)
        R = response_bucket(max(len(s["response_ids"]) for s in samples))
        out = {"prompt_ids": np.zeros((B, T), np.int32), "prompt_valid": np.zeros((B, T), bool),
               "positions": np.zeros((B, T), np.int32), "response_ids": np.zeros((B, R), np.int32),
               "response_mask": np.zeros((B, R), bool), "row_weight": np.zeros((B,), np.float32)}
        if self.with_labels:
            nl, N = samples[0]["labels"].shape[:2]
            out["labels"] = np.zeros((B, nl, N, T), np.float32)
        for b, i in enumerate(rows):
            # filler rows repeat the first sample (finite values everywhere) with weight 0
            s = self.source[i] if i >= 0 else samples[0]
            p, r = np.asarray(s["prompt_ids"]), np.asarray(s["response_ids"])
            n = len(p)
            out["prompt_ids"][b, T - n:] = p
            out["prompt_valid"][b, T - n:] = True
            out["positions"][b, T - n:] = np.arange(n)
            out["response_ids"][b, : len(r)] = r
            out["response_mask"][b, : len(r)] = True
            out["row_weight"][b] = 1.0 if i >= 0 else 0.0
            if self.with_labels:
                out["labels"][b, :, :, T - n:] = s["labels"]
        return out


def make_dataset(source, *, batch_size: int, buckets=DEFAULT_BUCKETS, seed: int = 0, n_batches: int,
                 with_labels: bool = True, lengths=None, process_index: int = 0, process_count: int = 1):
    """A grain MapDataset of n_batches padded batches over `source` (a `LabelDataset` or any
    random-access sequence of sample dicts). `iter(ds)` gives a resumable iterator
    (`get_state()` / `set_state()`).

    batch_size is the global batch; with process_count > 1 every process plans the same batches (same
    seed) and reads only its batch_size / process_count rows of each (see `Collate`)."""
    import grain

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if lengths is None:
        lengths = getattr(source, "prompt_lengths", None)
        if lengths is None:
            lengths = [len(source[i]["prompt_ids"]) for i in range(len(source))]
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} does not split over {process_count} processes")
    plan = plan_batches(lengths, batch_size, buckets, seed, n_batches)
    return grain.MapDataset.source(plan).map(
        Collate(source, with_labels, process_index=process_index, process_count=process_count))
