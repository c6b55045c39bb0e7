"""Training a small causal LM from scratch: the weighted next-token loss, an AdamW step, a length curriculum and
resumable checkpoints. Used for the project's tiny target model (experiments/train_tiny_target.py).

The curriculum is a list of stages (sequence length, steps, learning rate, batch); the learning rate warms up
at the start, stays constant within a stage and is lowered at each step up in length, which keeps a tiny model
from losing what it learnt on short sequences when the copies get longer. Checkpoints (orbax, as the adapter
training's: parameters, optimizer state and a JSON note of the step, one directory per step) are written
often so a killed run continues.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lkv_jax.config import ModelConfig, RopeConfig
from lkv_jax.inference import forward_dense_pure
from lkv_jax.lookahead.checkpointing import TrainCheckpointer
from lkv_jax.models.transformer import Transformer


def small_llama_config(vocab_size: int, *, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                       num_kv_heads: int = 2, intermediate_size: int | None = None, rope_theta: float = 10000.0,
                       bos_token_id: int = 1, eos_token_id: int = 2, pad_token_id: int = 0,
                       max_position_embeddings: int = 4096) -> ModelConfig:
    """A Llama-architecture ModelConfig for a model trained from scratch (vocab rounded up to 64)."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    return ModelConfig(
        vocab_size=-(-vocab_size // 64) * 64, hidden_size=hidden_size,
        intermediate_size=intermediate_size or 3 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads,
        family="llama", rms_norm_eps=1e-5, rope=RopeConfig(theta=rope_theta),
        max_position_embeddings=max_position_embeddings, bos_token_id=bos_token_id,
        eos_token_id=(eos_token_id,), pad_token_id=pad_token_id)


def scaled_init(model: Transformer, seed: int) -> Transformer:
    """Re-initialise a model for training from scratch, in place: kernels N(0, 1/fan_in) (output projections
    o and down also divided by sqrt(2 x layers)), embeddings N(0, 1), LM head N(0, 1/hidden), norms 1.

    With the HF-style N(0, 0.02) everywhere a 4-layer d=128 model showed no induction head after 300 steps of
    pure copying; with this one it formed after about 225 (measured on this CPU).
    """
    state = nnx.state(model, nnx.Param)
    n_layers = model.config.num_hidden_layers
    key = jax.random.PRNGKey(seed)

    def init(path, x):
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        names = names[:-1] if names[-1] == "value" else names
        k = jax.random.fold_in(key, zlib.crc32(".".join(names).encode()) % (2**31))
        if names[-1] == "kernel":
            std = x.shape[0] ** -0.5 / ((2 * n_layers) ** 0.5 if names[-2] in ("o", "down") else 1.0)
        elif names == ["embed"]:
            std = 1.0
        elif names == ["lm_head"]:
            std = x.shape[0] ** -0.5
        else:
            return x
        return (jax.random.normal(k, x.shape, jnp.float32) * std).astype(x.dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(init, state))
    return model


def weighted_lm_loss(model: Transformer, ids: jax.Array, weights: jax.Array):
    """Weighted next-token cross-entropy. ids int [B, T+1], weights float [B, T+1] (weight of predicting
    each token). Returns (loss, (token accuracy on weighted tokens, per-row all-correct [B]))."""
    logits = forward_dense_pure(model, ids[:, :-1])
    targets, w = ids[:, 1:], weights[:, 1:]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    loss = (nll * w).sum() / jnp.maximum(w.sum(), 1.0)
    hit = (jnp.argmax(logits, -1) == targets)
    acc = (hit * w).sum() / jnp.maximum(w.sum(), 1.0)
    return loss, (acc, jnp.all(hit | (w == 0), axis=-1))


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the length curriculum."""

    length: int
    steps: int
    lr: float
    batch: int
    symbols: int | None = None  # alphabet size of the training data (None or 0: all), see training_stream
    copy: float = 0.0  # fraction of pure copy sequences
    haystack: float = 0.0  # fraction (of the rest) of benchmark-shaped haystacks with questions at the end
    distinct: float = 0.0  # fraction of those haystacks whose value words occur in one record each
    recall: float = 0.0  # fraction (of the non-copy sequences) of key-value recall streams
    recall_words: int = 5  # their values have 1 to recall_words words


_OPTIONAL = ("symbols", "copy", "haystack", "distinct", "recall", "recall_words")
_STAGE_FORMAT = "length:steps:lr:batch[:symbols[:copy[:haystack[:distinct]]]][:name=value...]"


def parse_curriculum(text: str) -> tuple[Stage, ...]:
    """`"128:600:3e-3:32:16:0.8,256:600:2e-3:16,64:800:1e-3:32:recall=1:recall_words=1"` -> stages.

    Comma-separated stages: length:steps:lr:batch, then the optional fields of `Stage` in order (symbols,
    copy, haystack, distinct, ...) and/or as name=value; symbols 0 = the whole alphabet."""
    stages = []
    for part in text.split(","):
        try:
            fields = part.split(":")
            if len(fields) < 4:
                raise ValueError(part)
            named = [f for f in fields[4:] if "=" in f]
            positional = [f for f in fields[4:] if "=" not in f]
            if fields[4:] != positional + named or len(positional) > 4:  # positional ones first, at most four
                raise ValueError(part)
            values = dict(zip(_OPTIONAL[:len(positional)], positional, strict=True))
            for f in named:
                name, value = f.split("=", 1)
                if name not in _OPTIONAL or name in values:
                    raise ValueError(part)
                values[name] = value
            symbols = int(values.get("symbols", 0))
            stages.append(Stage(int(fields[0]), int(fields[1]), float(fields[2]), int(fields[3]),
                                symbols if symbols > 0 else None, float(values.get("copy", 0.0)),
                                float(values.get("haystack", 0.0)), float(values.get("distinct", 0.0)),
                                float(values.get("recall", 0.0)), int(values.get("recall_words", 5))))
        except ValueError as e:
            raise ValueError(f"bad curriculum stage {part!r}; expected {_STAGE_FORMAT} "
                             f"(names: {', '.join(_OPTIONAL)})") from e
    if not stages:
        raise ValueError("empty curriculum")
    return tuple(stages)


def learning_rate(stages: tuple[Stage, ...], step: int, warmup: int) -> tuple[Stage, float]:
    """The stage a global step falls in and its learning rate: linear warmup over the first `warmup` steps
    of the run (and a short re-warmup of warmup // 4 steps at each later stage), then the stage's constant
    rate, with a linear decay to half of it over the last 20% of the last stage."""
    start = 0
    for i, st in enumerate(stages):
        if step < start + st.steps or i == len(stages) - 1:
            k = min(step - start, st.steps - 1)
            w = warmup if i == 0 else max(warmup // 4, 1)
            lr = st.lr * min(1.0, (k + 1) / w)
            if i == len(stages) - 1:
                tail = max(int(0.2 * st.steps), 1)
                lr *= 1.0 - 0.5 * max(0, k - (st.steps - tail)) / tail
            return st, float(lr)
        start += st.steps
    raise AssertionError("unreachable")


def _loss(graphdef, params, ids, weights):
    return weighted_lm_loss(nnx.merge(graphdef, params), ids, weights)


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"), donate_argnums=(1, 2))
def _train_step(graphdef, params, opt_state, ids, weights, lr, *, tx):
    opt_state[1].hyperparams["learning_rate"] = lr
    (loss, (acc, _)), grads = jax.value_and_grad(_loss, argnums=1, has_aux=True)(graphdef, params, ids, weights)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, acc


_eval_loss = jax.jit(_loss, static_argnames=("graphdef",))


@functools.cache
def _optimizer(weight_decay: float, clip: float) -> optax.GradientTransformation:
    # cached so trainers of the same settings share one (hashable, static) optimizer and its compilations
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, b2=0.98, weight_decay=weight_decay))


class Trainer:
    """AdamW on all parameters of an NNX Transformer; the learning rate is an injected hyperparameter so
    stage changes do not recompile. Sequence lengths compile once each."""

    def __init__(self, model: Transformer, *, weight_decay: float = 0.01, clip: float = 1.0):
        self.graphdef, self.params = nnx.split(model, nnx.Param)
        self.tx = _optimizer(float(weight_decay), float(clip))
        self.opt_state = self.tx.init(self.params)
        self.step = 0

    @property
    def model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.params)

    def train_step(self, ids: np.ndarray, weights: np.ndarray, lr: float) -> tuple[float, float]:
        """One update on ids int [B, T+1] / weights [B, T+1]; returns (loss, weighted token accuracy)."""
        self.params, self.opt_state, loss, acc = _train_step(self.graphdef, self.params, self.opt_state,
                                                             jnp.asarray(ids), jnp.asarray(weights), jnp.float32(lr),
                                                             tx=self.tx)
        self.step += 1
        return float(loss), float(acc)

    def evaluate(self, ids: np.ndarray, weights: np.ndarray) -> dict[str, float]:
        """Teacher-forced loss, answer-token accuracy and the fraction of rows with every answer token right."""
        loss, (acc, rows) = _eval_loss(self.graphdef, self.params, jnp.asarray(ids), jnp.asarray(weights))
        return {"loss": float(loss), "token_acc": float(acc), "row_exact": float(jnp.mean(rows))}

    # -------------------------------------------------------------------------------- checkpoints
    def _shapes(self) -> list[list[int]]:
        return [list(np.shape(x)) for x in jax.tree.leaves((self.params, self.opt_state))]

    def save(self, directory: str | Path, extra: dict | None = None) -> None:
        """Checkpoint the parameters, optimizer state, step and `extra` under `directory/<step>/` (orbax:
        written aside and renamed whole, so a kill leaves the previous checkpoints intact; the last two kept)."""
        ckpt = TrainCheckpointer(directory, keep=2)
        try:
            if self.step in ckpt.manager.all_steps():  # saved again (a resumed run): the newer one wins
                ckpt.manager.delete(self.step)
            ckpt.save(self.step, self.params, self.opt_state, {}, {**(extra or {}), "shapes": self._shapes()})
        finally:
            ckpt.close()

    def restore(self, directory: str | Path) -> dict | None:
        """Restore the newest checkpoint of `save` under `directory` that restores (damaged newer ones are
        moved aside, with a warning); returns its note, {"step": ..., **extra}, or None if there is none.
        ValueError if the checkpoint was written for another model shape or optimizer."""
        directory = Path(directory)
        if not directory.is_dir():
            return None

        def check(info):
            if info.get("shapes") != self._shapes():
                raise ValueError(f"checkpoint {directory} does not match this model/optimizer")

        ckpt = TrainCheckpointer(directory, keep=2)
        try:
            step, restored, skipped = ckpt.restore_newest(self.params, self.opt_state, check)
        finally:
            ckpt.close()
        for s in skipped:
            warnings.warn(f"checkpoint step {s.step} does not restore ({s.reason}); moved to {s.moved_to}",
                          stacklevel=2)
        if step is None:
            return None
        self.params, self.opt_state, _, info = restored
        self.step = int(step)
        return {k: v for k, v in info.items() if k != "shapes"}


def run_curriculum(trainer: Trainer, stages: tuple[Stage, ...], batches: Callable[[int, Stage], tuple],
                   *, warmup: int = 100, log_every: int = 25, checkpoint: str | Path | None = None,
                   checkpoint_every: int = 100, log: Callable[[str], None] = print,
                   on_stage_end: Callable[[Stage, Trainer], None] | None = None) -> Iterator[dict]:
    """Train through `stages` from `trainer.step` (so a restored trainer continues where it stopped).

    batches(step, stage) -> (ids [B, T+1], weights [B, T+1]) must depend only on its arguments, so a resumed
    run sees the same data. Yields a dict of metrics every `log_every` steps.
    """
    total = sum(s.steps for s in stages)
    t0, tokens = time.time(), 0
    while trainer.step < total:
        step = trainer.step
        stage, lr = learning_rate(stages, step, warmup)
        ids, weights = batches(step, stage)
        loss, acc = trainer.train_step(ids, weights, lr)
        tokens += ids.size
        done = trainer.step
        if done % log_every == 0 or done == total:
            rec = {"step": done, "length": stage.length, "symbols": stage.symbols, "lr": lr, "loss": loss,
                   "token_acc": acc, "tokens_per_s": tokens / max(time.time() - t0, 1e-9)}
            log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}))
            yield rec
        if checkpoint is not None and (done % checkpoint_every == 0 or done == total):
            trainer.save(checkpoint)
        boundary = np.cumsum([s.steps for s in stages])
        if on_stage_end is not None and done in boundary:
            on_stage_end(stage, trainer)
