"""The training data pipeline (grain): length buckets, shuffling, batches, per-process rows, resumable state.

grain plans the batches on sample indices: the samples of each length bucket are shuffled and cut into
batches (`MapDataset.shuffle`, `.batch`; a short last batch is filled with weight-0 rows), the buckets'
batches are concatenated and shuffled, and the whole repeats with every seed folded with the epoch. Each
process then keeps its rows of every global batch (`grain.sharding.ShardOptions`) and reads and pads
only those. Every step is random access, so an iterator's state is the next batch index (saved in the
training checkpoint).

A batch (numpy, static shapes per bucket):
    prompt_ids int32 [B, T] left-padded, prompt_valid bool [B, T], positions int32 [B, T]
    response_ids int32 [B, R] right-padded, response_mask bool [B, R]   (R: a power of two >= 16)
    labels float32 [B, n_layers, N, T] (zeros at padding)                 (only from a label dataset)
    row_weight float32 [B] (0 for filler rows)
"""

from __future__ import annotations

import functools

import numpy as np

from lkv_jax.padding import bucket_of, length_bucket, pad_left, pad_right, positions_of

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PREFILL_CHUNK = 512
FILLER = -1  # the sample index of a filler row


def check_buckets(buckets) -> tuple[int, ...]:
    """Buckets must be increasing multiples of 8, and multiples of the prefill chunk above it."""
    b = tuple(int(x) for x in buckets)
    if not b or list(b) != sorted(set(b)) or any(x % 8 or (x > PREFILL_CHUNK and x % PREFILL_CHUNK) for x in b):
        raise ValueError(f"buckets must be increasing multiples of 8 (of {PREFILL_CHUNK} above {PREFILL_CHUNK}), "
                         f"got {b}")
    return b


def prefill_chunk(bucket: int) -> int:
    """The prefill chunk for a bucket (a divisor of it)."""
    return min(bucket, PREFILL_CHUNK)


def _seed(seed: int, stream: int) -> int:
    # independent shuffles per bucket (grain adds the epoch to a seed: neighbouring seeds would overlap)
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def _fill(rows, *, bucket: int, batch_size: int) -> tuple[int, tuple[int, ...]]:
    return bucket, tuple(int(i) for i in rows) + (FILLER,) * (batch_size - len(rows))


def batch_plan(lengths, batch_size: int, buckets, seed: int):
    """An endless grain MapDataset of batches (bucket length, sample indices with FILLER rows); every
    epoch holds each sample once, in a new order."""
    import grain

    buckets = check_buckets(buckets)
    by_bucket: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_bucket.setdefault(bucket_of(int(n), buckets), []).append(i)
    if not by_bucket:
        raise ValueError("the dataset is empty")
    parts = [grain.MapDataset.source(rows).shuffle(seed=_seed(seed, b))
             .batch(batch_size, batch_fn=functools.partial(_fill, bucket=b, batch_size=batch_size))
             for b, rows in sorted(by_bucket.items())]
    return grain.MapDataset.concatenate(parts).shuffle(seed=_seed(seed, 0)).repeat()


class Collate:
    """(bucket, indices) -> a padded numpy batch read from a random-access source (see module doc).

    With several processes (`shard_options`, e.g. `grain.sharding.ShardByJaxProcess()`) each one collates
    only its own contiguous slice of every global batch: rows [i * B / n, (i + 1) * B / n) for shard i of
    n, so the per-process batches, stacked in process order, are exactly the single-process batch
    (`jax.make_array_from_process_local_data` assembles them that way over the mesh's data axis).
    """

    def __init__(self, source, with_labels: bool = True, *, shard_options=None):
        self.source, self.with_labels = source, with_labels
        self.shard_index, self.shard_count = (0, 1) if shard_options is None else (
            shard_options.shard_index, shard_options.shard_count)

    def __call__(self, item):
        T, all_rows = item
        if len(all_rows) % self.shard_count:
            raise ValueError(f"a batch of {len(all_rows)} rows does not split over {self.shard_count} processes")
        first = next((i for i in all_rows if i != FILLER), None)
        if first is None:
            raise ValueError("a batch without any real sample")
        n = len(all_rows) // self.shard_count
        rows = all_rows[self.shard_index * n:(self.shard_index + 1) * n]
        real = {i: self.source[i] for i in rows if i != FILLER} or {first: self.source[first]}
        # filler rows repeat the first sample (finite values everywhere) with weight 0
        samples = [real[i] if i != FILLER else next(iter(real.values())) for i in rows]
        R = length_bucket(max(len(s["response_ids"]) for s in real.values()))
        prompt_ids, prompt_valid = pad_left([s["prompt_ids"] for s in samples], T)
        response_ids, response_mask = pad_right([s["response_ids"] for s in samples], R)
        out = {"prompt_ids": prompt_ids, "prompt_valid": prompt_valid, "positions": positions_of(prompt_valid),
               "response_ids": response_ids, "response_mask": response_mask,
               "row_weight": np.asarray([0.0 if i == FILLER else 1.0 for i in rows], np.float32)}
        if self.with_labels:
            out["labels"] = pad_left([s["labels"] for s in samples], T, dtype=np.float32)[0]
        return out


def make_dataset(source, *, batch_size: int, buckets=DEFAULT_BUCKETS, seed: int = 0, n_batches: int,
                 with_labels: bool = True, lengths=None, shard_options=None):
    """A grain MapDataset of n_batches padded batches over `source` (a `LabelDataset` or any
    random-access sequence of sample dicts). `iter(ds)` gives a resumable iterator
    (`get_state()` / `set_state()`).

    batch_size is the global batch; with `shard_options` (grain.sharding.ShardOptions, one shard per
    process) every process plans the same batches (same seed) and reads only its batch_size / shard_count
    rows of each (see `Collate`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shard_options is not None and batch_size % shard_options.shard_count:
        raise ValueError(f"batch_size {batch_size} does not split over {shard_options.shard_count} processes")
    if lengths is None:
        lengths = getattr(source, "prompt_lengths", None)
        if lengths is None:
            lengths = [len(source[i]["prompt_ids"]) for i in range(len(source))]
    plan = batch_plan(lengths, batch_size, buckets, seed)[:n_batches]
    return plan.map(Collate(source, with_labels, shard_options=shard_options))
