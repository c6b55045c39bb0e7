"""Argument checks of the public ops: chex's rank, shape and dtype assertions, raised as ValueErrors that name
the argument and its layout (chex's own messages number the inputs instead of naming them)."""

from __future__ import annotations

import chex


def check_arg(name: str, layout: str, x, *, rank: int | None = None, shape=None, dtype=None) -> None:
    """Assert the rank, shape (a tuple; None for a free size) and dtype (a concrete dtype, or `int`,
    `float`, `bool` for the family) of one argument; else ValueError("<name> must be <layout>: <reason>")."""
    try:
        if rank is not None:
            chex.assert_rank(x, rank)
        if shape is not None:
            chex.assert_shape(x, shape)
        if dtype is not None:
            chex.assert_type(x, dtype)
    except AssertionError as e:
        raise ValueError(f"{name} must be {layout}: {e}") from None
