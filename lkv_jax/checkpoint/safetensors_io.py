"""safetensors files with lkv_jax's conventions: unreadable files raise CheckpointError naming the file,
and files are written atomically with the user's umask (safetensors itself writes them 0600)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from lkv_jax.atomic_files import atomic_write
from lkv_jax.errors import CheckpointError


@contextlib.contextmanager
def open_safetensors(path):
    """`safe_open(path, framework="numpy")`; a truncated or garbage file (at open or at a tensor read
    inside the block) raises CheckpointError instead of SafetensorError."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            yield f
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated or "
                              "corrupt") from None


def save_safetensors(tensors: dict, path, metadata: dict[str, str] | None = None) -> Path:
    """Write numpy `tensors` to `path` (atomic, umask permissions, a symlink there is replaced)."""
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
