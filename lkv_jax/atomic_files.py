"""Writing output files atomically, with the user's umask, and never through a symlink.

A file is written under a temporary name in its own directory and renamed over the target: a crash
leaves the old file or the new one, never half of one, and a symlink at the target is replaced by the
new file instead of having its (possibly outside) target overwritten. Appends open with O_NOFOLLOW.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from lkv_jax.errors import OutputDirError

_UMASK_LOCK = threading.Lock()


def file_mode() -> int:
    """The permission bits a plain `open(path, "w")` gives a new file: 0o666 less the umask."""
    with _UMASK_LOCK:  # reading the umask means setting it: keep other threads from seeing 0
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def temporary_path(path: Path) -> Path:
    """A hidden name next to `path` for writing it (per process, so concurrent writers do not collide)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to write a temporary file, give it the umask's mode, rename it to `path`."""
    path = Path(path)
    tmp = temporary_path(path)
    if os.path.lexists(tmp):  # a leftover of a crash (or a planted link): never write through it
        tmp.unlink()
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # some writers (safetensors) create their files 0600
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()
    return path


def atomic_write_text(path, text: str) -> Path:
    """Write `text` to `path` atomically (see the module doc)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_copy(src, dst) -> Path:
    """Copy the file `src` to `dst` atomically, its contents and timestamps (a link at dst is replaced)."""
    return atomic_write(dst, lambda tmp: shutil.copy2(src, tmp))


def open_append(path):
    """`path` opened for appending text; a symlink there is refused (ELOOP) rather than followed."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        if os.path.islink(path):
            raise OutputDirError(f"{path} is a symlink; outputs are written inside the output directory only "
                                 "(remove the link)") from e
        raise
    return os.fdopen(fd, "a")
