"""Argument checks shared by the subcommands, raising `InputError` that names the option.

In `run` rather than as argparse types: argparse reports a bad type with its usage text (several
lines), these are one line like every other error of the CLI.
"""

from __future__ import annotations

from lkv_jax.errors import InputError


def require_positive(**options: int | None) -> None:
    """Raise unless every given option (keyword = option name with `_` for `-`; None = not given) is >= 1."""
    for name, value in options.items():
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def check_token_ids(ids, vocab_size: int, option: str = "--prompt-ids") -> None:
    """Raise unless every token id lies in the model's vocabulary [0, vocab_size)."""
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise InputError(f"{option}: token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})")
