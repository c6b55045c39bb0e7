"""LookaheadKV's learned part: the adapter, its glimpse scores, response labels and training."""

from lkv_jax.lookahead.adapter import (
    AdapterMismatchError,
    LookaheadAdapter,
    base_param_count,
    count_params,
    init_adapter,
    load_adapter,
    param_summary,
    save_adapter,
)
from lkv_jax.lookahead.label_store import LabelDataset, make_label_dataset, read_prompts
from lkv_jax.lookahead.labels import compute_labels, generate_responses, labels_from_cache, response_labels_pure
from lkv_jax.lookahead.scoring import lookahead_glimpse

__all__ = [
    "AdapterMismatchError", "LabelDataset", "LookaheadAdapter", "base_param_count", "compute_labels",
    "count_params", "generate_responses", "init_adapter", "labels_from_cache", "load_adapter",
    "lookahead_glimpse", "make_label_dataset", "param_summary", "read_prompts", "response_labels_pure",
    "save_adapter",
]

_TRAINING = ("TrainConfig", "TrainingDivergedError", "make_optimizer", "train", "train_step")


def __getattr__(name: str):
    # training pulls in optax/orbax/grain: loaded on first use, not with `import lkv_jax`
    if name in _TRAINING:
        from lkv_jax.lookahead import training

        return getattr(training, name)
    raise AttributeError(f"module 'lkv_jax.lookahead' has no attribute {name!r}")
