"""lkv_jax.padding: left / right padding, positions, length buckets and trimming at EOS."""

from __future__ import annotations

import numpy as np
import pytest

from lkv_jax.padding import bucket_of, length_bucket, pad_left, pad_right, positions_of, round_up, trim_at_eos


def test_pad_left_and_right_put_each_row_at_its_end_or_start():
    rows = [[5, 6, 7], [8], []]
    ids, mask = pad_left(rows, 4, pad=9)
    np.testing.assert_array_equal(ids, [[9, 5, 6, 7], [9, 9, 9, 8], [9, 9, 9, 9]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(positions_of(mask), [[0, 0, 1, 2], [0, 0, 0, 0], [0, 0, 0, 0]])
    ids, mask = pad_right(rows)  # the longest row's length
    np.testing.assert_array_equal(ids, [[5, 6, 7], [8, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert ids.dtype == np.int32 and mask.dtype == bool
    with pytest.raises(ValueError, match="does not fit 2"):
        pad_left(rows, 2)


def test_pad_left_pads_the_last_axis_of_any_rank():
    labels = [np.full((2, 3, n), n, np.float32) for n in (2, 4)]
    out, mask = pad_left(labels, 5, dtype=np.float32)
    assert out.shape == (2, 2, 3, 5) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0, :, :, :3], 0)
    np.testing.assert_array_equal(out[0, :, :, 3:], 2)
    np.testing.assert_array_equal(out[1, :, :, 1:], 4)
    np.testing.assert_array_equal(mask.sum(1), [2, 4])


def test_length_buckets():
    assert [length_bucket(n) for n in (0, 1, 16, 17, 100, 1000)] == [16, 16, 16, 32, 128, 1024]
    # up to the chunk: powers of two (capped at the chunk rounded to 8), then whole chunks
    assert [length_bucket(n, 100) for n in (3, 50, 100, 101, 250)] == [16, 64, 104, 200, 300]
    assert [round_up(n, 64) for n in (1, 64, 65)] == [64, 64, 128]
    assert [bucket_of(n, (8, 16, 32)) for n in (1, 8, 9, 32)] == [8, 8, 16, 32]
    with pytest.raises(ValueError, match="largest bucket 32"):
        bucket_of(33, (8, 16, 32))


def test_trim_at_eos():
    row = np.asarray([4, 5, 2, 0, 0])
    assert trim_at_eos(row, (2,)) == [4, 5, 2]
    assert trim_at_eos(row, (2,), keep_eos=False) == [4, 5]
    assert trim_at_eos(row, {3, 7}) == [4, 5, 2, 0, 0]  # no EOS: every token
    assert trim_at_eos(row, None) == [4, 5, 2, 0, 0]
    assert all(type(t) is int for t in trim_at_eos(row, (2,)))
