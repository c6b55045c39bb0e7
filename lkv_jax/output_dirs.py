"""Which command owns an output directory, and refusing to write where that would destroy something.

A command that writes a directory (`lkv train`, `lkv make-labels`, `lkv eval`) claims it: the directory
must be new, empty, unrelated, or that command's own (resumable) output, and it then gets a marker file
naming the command. A directory that holds a model, or another command's output, is refused: a run's
config.json would overwrite the model's, its files mix with another run's. `lkv convert` writes a model
and refuses any non-empty destination unless told to overwrite it (then its writers remove the old
weights before writing, so that a stale shard index cannot shadow the new weights).

Outputs are created inside the output directory only: a subdirectory that is a symlink is refused, and
files are written with `lkv_jax.atomic_files` (a symlink at a file's name is replaced, not followed).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lkv_jax.atomic_files import atomic_write_text
from lkv_jax.errors import OutputDirError

MARKER = ".lkv-output.json"
# weights of a model directory: Hugging Face safetensors (single or sharded + index), pickles, GGUF
MODEL_WEIGHT_GLOBS = ("model.safetensors", "model-*-of-*.safetensors", "*.safetensors.index.json",
                      "pytorch_model*.bin", "*.gguf")
CONVERTED_PARAMS = "params"  # the orbax parameter tree of a converted directory (lkv_jax.checkpoint.orbax_io)


def _json_object(path: Path) -> dict:
    """The JSON object in `path`, or {} if it is missing or not an object (recognition only)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def holds_model(directory) -> bool:
    """Whether `directory` holds a model: a Hugging Face config.json, weight files or converted params."""
    d = Path(directory)
    config = _json_object(d / "config.json")
    if "architectures" in config or "model_type" in config:
        return True
    if (d / CONVERTED_PARAMS).is_dir() and (d / "config.json").exists():
        return True
    return any(any(d.glob(pattern)) for pattern in MODEL_WEIGHT_GLOBS)


def _owner_by_files(d: Path) -> str | None:
    """The command whose output `d` is, recognised by its files (a directory without the marker)."""
    if (d / "checkpoints").is_dir() or {"data_dir", "out_dir"} <= set(_json_object(d / "config.json")):
        return "train"
    if (d / "samples").is_dir() or {"n_samples", "label_dtype"} <= set(_json_object(d / "meta.json")):
        return "make-labels"
    if (d / "cells").is_dir() or "presses" in _json_object(d / "run.json"):
        return "eval"
    return None


def owner(directory) -> str | None:
    """The command that wrote `directory` (its marker, else recognised by its files), or None."""
    d = Path(directory)
    command = _json_object(d / MARKER).get("command")
    return command if isinstance(command, str) else _owner_by_files(d)


def claim_output_dir(directory, command: str, subdirs: tuple[str, ...] = ()) -> Path:
    """Create `directory` for `command`'s output, or reuse it if it is that command's own output (resume),
    and its `subdirs`.

    Raises OutputDirError, before writing anything, if it is a file, holds a model, holds another
    command's output, or one of `subdirs` is a symlink. Returns the directory as an absolute path, with
    the marker written.
    """
    d = Path(directory).absolute()
    if d.exists() and not d.is_dir():
        raise OutputDirError(f"output {d} exists and is not a directory")
    for name in subdirs:
        _refuse_symlink(d / name)
    if d.is_dir():
        found = owner(d)
        if found is not None and found != command:
            raise OutputDirError(f"{d} holds a `lkv {found}` output, not a `lkv {command}` one; "
                                 "choose a new output directory")
        if found is None and holds_model(d):
            raise OutputDirError(f"{d} holds a model (config.json / weights), which `lkv {command}` would "
                                 "overwrite; choose a new output directory")
    d.mkdir(parents=True, exist_ok=True)
    if not (d / MARKER).is_file() or os.path.islink(d / MARKER):
        atomic_write_text(d / MARKER, json.dumps({"command": command}) + "\n")
    for name in subdirs:
        (d / name).mkdir(exist_ok=True)
    return d


def _refuse_symlink(path: Path) -> None:
    """An output subdirectory that is a symlink would put the outputs outside the output directory."""
    if path.is_symlink():
        raise OutputDirError(f"{path} is a symlink; outputs are created inside the output directory only "
                             "(remove the link)")


def check_convert_destination(src, dst, *, overwrite: bool = False) -> Path:
    """Refuse a destination a conversion must not write: the source itself, a file, or a non-empty
    directory unless `overwrite`. Changes nothing: the writers (`save_hf`, `save_converted`, the GGUF
    import) remove the old weights and shard index only once the source has loaded, just before they
    write the new ones, so a failed conversion leaves the destination as it was."""
    s, d = Path(src), Path(dst)
    if d.exists() and s.exists() and d.resolve() == s.resolve():
        raise OutputDirError(f"the destination {dst} is the source; convert into another directory")
    if d.exists() and not d.is_dir():
        raise OutputDirError(f"destination {dst} exists and is not a directory")
    if d.is_dir() and any(d.iterdir()) and not overwrite:
        raise OutputDirError(f"destination {dst} is not empty; pass --overwrite to replace the model in it "
                             "(its old weights and shard index are removed first)")
    return d


def remove_weight_files(directory) -> list[Path]:
    """Delete the model weights in `directory` (safetensors, shard index, pickles, GGUF, converted params);
    a symlink among them is removed itself, never what it points to. Returns what was removed."""
    d = Path(directory)
    found = [p for pattern in MODEL_WEIGHT_GLOBS for p in d.glob(pattern)]
    if os.path.lexists(d / CONVERTED_PARAMS):
        found.append(d / CONVERTED_PARAMS)
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return found


def move_aside(paths, into) -> Path:
    """Move the existing `paths` into a new numbered folder `into/<n>/` (never deleting anything);
    returns that folder. Used for damaged checkpoints and for the files of a run that is restarted."""
    into = Path(into)
    into.mkdir(parents=True, exist_ok=True)
    n = 1
    while (into / str(n)).exists():
        n += 1
    dest = into / str(n)
    dest.mkdir()
    for p in map(Path, paths):
        if os.path.lexists(p):
            os.replace(p, dest / p.name)
    return dest
