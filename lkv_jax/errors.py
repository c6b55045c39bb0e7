"""The errors lkv_jax raises on purpose: one `LkvError` base, one subclass per kind of problem.

Every error here describes a bad input, file or setting in one line; the CLI prints it as
`lkv <command>: error: <message>` and exits with status 2. Anything else that escapes is a bug and
shows its traceback. `LkvError` derives from `ValueError`, the usual type of a bad argument, so that a
caller catching ValueError catches these too.
"""

from __future__ import annotations


class LkvError(ValueError):
    """Base class of every error lkv_jax raises on purpose (a problem with an input, not a bug)."""


class ConfigError(LkvError):
    """A config.json that is missing, not JSON, not an object, or lacks a required key."""


class UnsupportedModelError(ConfigError):
    """The checkpoint describes a model lkv_jax cannot run faithfully."""


class CheckpointError(LkvError):
    """A checkpoint (model weights, adapter or training state) that cannot be loaded as it stands."""


class AdapterMismatchError(LkvError):
    """An adapter (or adapter file) does not fit the model it is used with."""


class DataError(LkvError):
    """A data file (prompts JSONL, label dataset sample) that is malformed, corrupt or from another run."""


class InputError(LkvError):
    """An argument outside what the model or the command accepts (token ids, sizes, lengths)."""


class BudgetError(InputError):
    """A budget a press cannot honour: it keeps no entry, or fewer than the entries the press always
    keeps (window, sinks). The evaluation grid skips such a cell and goes on."""


class SequenceTooLongError(InputError):
    """A sequence longer than the model's positions (max_position_embeddings, RoPE scaling) allow."""


class OutputDirError(LkvError):
    """An output path that cannot be written safely (holds a model or another run, is a symlink out)."""


class MeshError(LkvError):
    """A mesh that does not fit the model or the batch."""


class TrainingDivergedError(LkvError):
    """The loss or the gradient became NaN/Inf; the last good checkpoint was left intact."""
