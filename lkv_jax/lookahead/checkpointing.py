"""Training checkpoints with orbax: adapter, optimizer state, step and data-iterator state.

`orbax.checkpoint.CheckpointManager` gives atomic saves (written to a temporary directory, renamed
when complete) and keep-N retention. The adapter and the optax state are stored as flat dicts of
their leaves (in `jax.tree` order) and restored into templates of the same structure, so any pytree
node type (the adapter dataclass, optax's named tuples) round-trips without orbax knowing it.

Sharded `jax.Array` leaves are saved as they are (every process writes its shards) and restored with
the template's shardings, so a checkpoint written on one mesh restores onto another: give templates
placed on the new mesh.

A damaged checkpoint (truncated tensor file, empty step directory, a missing item) does not block a
resume: `restore_newest` falls back to the newest one that restores and moves the damaged ones aside
(never deletes them), so the resumed run can write those steps anew.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import jax
import numpy as np

from lkv_jax.output_dirs import move_aside


def _flat(tree) -> dict:
    # jax.Arrays stay as they are (possibly sharded over processes); anything else becomes numpy
    return {f"p{i:05d}": x if isinstance(x, jax.Array) else np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def _unflat(template, flat: dict):
    leaves, treedef = jax.tree.flatten(template)
    if len(flat) != len(leaves):
        raise ValueError(f"checkpoint holds {len(flat)} tensors, the template {len(leaves)}: "
                         "was it written with other adapter settings (rank, targets, layers)?")
    out = []
    for i, ref in enumerate(leaves):
        x = flat[f"p{i:05d}"]
        if tuple(np.shape(x)) != tuple(np.shape(ref)):
            raise ValueError(f"checkpoint tensor {i} has shape {np.shape(x)}, expected {np.shape(ref)}: "
                             "was it written with other adapter settings?")
        dtype = ref.dtype if hasattr(ref, "dtype") else np.asarray(ref).dtype
        if not isinstance(x, jax.Array):
            x = jax.numpy.asarray(x)
        out.append(x if x.dtype == dtype else x.astype(dtype))
    return jax.tree.unflatten(treedef, out)


class TrainCheckpointer:
    """Save / restore (step, adapter, opt_state, data_state, info) under `directory/<step>/`."""

    def __init__(self, directory, keep: int = 3):
        import orbax.checkpoint as ocp

        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self._ocp = ocp
        self.directory = Path(directory).absolute()  # orbax needs absolute paths
        with _quiet_orbax():
            self.manager = ocp.CheckpointManager(
                self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, adapter, opt_state, data_state: dict, info: dict) -> None:
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(
            adapter=ocp.args.StandardSave(_flat(adapter)), opt_state=ocp.args.StandardSave(_flat(opt_state)),
            data=ocp.args.JsonSave(data_state), info=ocp.args.JsonSave({**info, "step": int(step)})))

    def read_info(self, step: int) -> dict:
        """The JSON info saved with checkpoint `step` (the run's config), without loading tensors."""
        ocp = self._ocp
        return self.manager.restore(step, args=ocp.args.Composite(info=ocp.args.JsonRestore()))["info"]

    def restore(self, step: int, adapter_template, opt_state_template):
        """Returns (adapter, opt_state, data_state, info) of checkpoint `step`, placed like the templates'
        leaves (their shardings, when they are jax.Arrays)."""
        ocp = self._ocp
        r = self.manager.restore(step, args=ocp.args.Composite(
            adapter=ocp.args.StandardRestore(_flat(adapter_template)),
            opt_state=ocp.args.StandardRestore(_flat(opt_state_template)),
            data=ocp.args.JsonRestore(), info=ocp.args.JsonRestore()))
        return (_unflat(adapter_template, r["adapter"]), _unflat(opt_state_template, r["opt_state"]),
                r["data"], r["info"])

    def restore_newest(self, adapter_template, opt_state_template, check_info=None):
        """Restore the newest checkpoint that restores: (step, (adapter, opt_state, data_state, info)) or
        (None, None) if none does, and the `Skipped` newer ones, moved aside (next to `directory`) so that
        their steps can be written again. `check_info(info)` may raise to refuse a checkpoint (other
        settings): that error propagates, it is not a damaged checkpoint."""
        skipped = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                with _quiet_orbax():
                    info = self.read_info(step)
            except Exception as e:  # whatever a damaged step raises, it is skipped
                skipped.append(Skipped(step, _reason(e)))
                continue
            if check_info is not None:
                check_info(info)
            try:
                with _quiet_orbax():
                    restored = self.restore(step, adapter_template, opt_state_template)
            except Exception as e:  # likewise
                skipped.append(Skipped(step, _reason(e)))
                continue
            return step, restored, self._set_aside(skipped)
        return None, None, self._set_aside(skipped)

    def _set_aside(self, skipped: list) -> list:
        """Move the skipped steps' directories to <directory>-unrestorable/<n>/ (process 0) and rescan."""
        if not skipped:
            return skipped
        target = self.directory.with_name(self.directory.name + "-unrestorable")
        if jax.process_index() == 0:
            dest = move_aside([self.directory / str(s.step) for s in skipped], target)
            skipped = [dataclasses.replace(s, moved_to=dest / str(s.step)) for s in skipped]
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("lkv_jax: damaged checkpoints moved aside")
        with _quiet_orbax():
            self.manager.reload()
        return skipped

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A checkpoint step that did not restore, why (one line), and where it was moved."""

    step: int
    reason: str
    moved_to: Path | None = None


def _reason(error: BaseException, limit: int = 200) -> str:
    """One line about why a checkpoint did not restore (orbax / tensorstore messages run long)."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet_orbax():
    """Silence orbax's warnings about a damaged step (e.g. missing metadata): the skip message says it."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
