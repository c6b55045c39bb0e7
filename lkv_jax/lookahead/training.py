"""Training the lookahead adapter: prefill without gradient, differentiate only the lookahead glimpse.

A step: prefill the batch's prompts into a cache (under `stop_gradient`: the prompt never depends on
the adapter because the LoRA is masked to lookahead positions), take the labels (from the dataset, or
on the fly from a glimpse of the response at the same cache), glimpse with the lookahead suffix, and
minimise the mean KL(label || prediction) with AdamW (warmup + cosine, global-norm clipping). The
gradient and the optimizer state exist for the adapter alone.

`train_step(graphdef, base_params, adapter, opt_state, batch, ...)` is the pure step; base, adapter and
batch are separate arguments so that each can be given its own sharding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lkv_jax.atomic_files import atomic_write_text, open_append
from lkv_jax.errors import TrainingDivergedError
from lkv_jax.inference import prefill_pure
from lkv_jax.lookahead.adapter import LookaheadAdapter, init_adapter, param_summary, save_adapter
from lkv_jax.lookahead.data_pipeline import DEFAULT_BUCKETS, check_buckets, make_dataset, prefill_chunk
from lkv_jax.lookahead.labels import labels_from_cache
from lkv_jax.lookahead.loss import label_mass_recall, lookahead_loss
from lkv_jax.lookahead.scoring import lookahead_glimpse
from lkv_jax.models.transformer import PROJECTIONS
from lkv_jax.output_dirs import claim_output_dir, move_aside

LABEL_SOURCES = ("dataset", "on-the-fly")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (saved with each checkpoint)."""

    data_dir: str
    out_dir: str
    model_dir: str | None = None
    steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 5e-4
    warmup_steps: int = 50
    end_lr_ratio: float = 0.1  # cosine decays to learning_rate * end_lr_ratio
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    n_lookahead: int = 32
    rank: int = 8
    alpha: float = 32.0
    targets: tuple[str, ...] = PROJECTIONS
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    seed: int = 0
    labels: str = "dataset"  # or "on-the-fly": labels from the stored responses inside the step
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 10
    recall_budgets: tuple[int, ...] = (64, 128, 256)
    dtype: str = "bfloat16"  # base model activations
    # (data, fsdp, tensor) mesh sizes: the step runs jitted over that mesh (base FSDP + tensor parallel,
    # adapter and optimizer state sharded like their base weights, batch over data); None: one device.
    # Not run-defining: a run checkpointed on one mesh resumes on another.
    mesh: tuple[int, int, int] | None = None

    def __post_init__(self):
        if self.labels not in LABEL_SOURCES:
            raise ValueError(f"labels must be one of {LABEL_SOURCES}, got {self.labels!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0 or self.warmup_steps < 0 or self.clip_norm <= 0:
            raise ValueError("need learning_rate > 0, warmup_steps >= 0 and clip_norm > 0")
        check_buckets(self.buckets)
        if self.mesh is not None and (len(self.mesh) != 3 or any(int(n) < 1 for n in self.mesh)):
            raise ValueError(f"mesh must be three positive sizes (data, fsdp, tensor), got {self.mesh}")


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, then cosine decay to learning_rate * end_lr_ratio."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1), end_value=cfg.learning_rate * cfg.end_lr_ratio)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on `make_schedule(cfg)`."""
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.adamw(make_schedule(cfg), weight_decay=cfg.weight_decay))


def loss_fn(adapter: LookaheadAdapter, model, batch: dict, *, chunk: int, label_source: str = "dataset"):
    """Scalar loss and (prediction, labels) [B, n_layers, N, T] for a batch (see `data_pipeline`)."""
    ids, valid = batch["prompt_ids"], batch["prompt_valid"]
    cache, _ = prefill_pure(model, ids, valid, batch["positions"], chunk=chunk, capacity=ids.shape[1])
    cache = jax.lax.stop_gradient(cache)
    if label_source == "dataset":
        labels = batch["labels"]
    else:
        labels = labels_from_cache(model, cache, valid, batch["response_ids"], batch["response_mask"])
    labels = jax.lax.stop_gradient(labels)
    g = lookahead_glimpse(model, cache, adapter)
    pred = jnp.stack(g.scores, axis=1)
    return lookahead_loss(labels, pred, valid, batch["row_weight"]), (pred, labels)


def train_step(graphdef, base_params, adapter, opt_state, batch, *, optimizer, chunk: int,
               label_source: str = "dataset", recall_budgets=(64, 128, 256)):
    """One AdamW step on the adapter only. Pure and jittable (graphdef, optimizer, chunk, label_source,
    recall_budgets static). Returns (adapter, opt_state, metrics dict of float32 scalars)."""
    model = nnx.merge(graphdef, base_params)
    (loss, (pred, labels)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        adapter, model, batch, chunk=chunk, label_source=label_source)
    updates, opt_state = optimizer.update(grads, opt_state, adapter)
    adapter = optax.apply_updates(adapter, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    for b in recall_budgets:
        metrics[f"recall@{b}"] = label_mass_recall(labels, pred, batch["prompt_valid"],
                                                   model.config.num_key_value_heads, b, batch["row_weight"])
    return adapter, opt_state, metrics


def jit_train_step(graphdef, optimizer, *, label_source: str = "dataset", recall_budgets=(64, 128, 256)):
    """`step(base_params, adapter, opt_state, batch, chunk)` compiled per prompt bucket (chunk static)."""
    def step(base_params, adapter, opt_state, batch, chunk):
        return train_step(graphdef, base_params, adapter, opt_state, batch, optimizer=optimizer, chunk=chunk,
                          label_source=label_source, recall_budgets=tuple(recall_budgets))
    return jax.jit(step, static_argnames=("chunk",))


@functools.lru_cache(maxsize=8)
def _step_for(graphdef, cfg: TrainConfig):
    # one compiled step per (model structure, optimisation settings): resuming in the same process
    # (tests, notebooks) reuses the compilation
    return jit_train_step(graphdef, make_optimizer(cfg), label_source=cfg.labels, recall_budgets=cfg.recall_budgets)


def _optimisation_key(cfg: TrainConfig) -> TrainConfig:
    """cfg with the fields that do not change the step's computation blanked (the cache key)."""
    return dataclasses.replace(cfg, data_dir="", out_dir="", model_dir=None, checkpoint_every=1, keep_checkpoints=1,
                               log_every=1, seed=0, buckets=(8,), mesh=None)


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past the step the run starts from (they are recomputed identically; all of
    them on a fresh start). Rewritten atomically: a symlink there becomes a file of the run directory."""
    if not path.exists() and not path.is_symlink():
        return
    lines = path.read_text().splitlines() if path.exists() else []
    keep = [ln for ln in lines if ln.strip() and _metric_step(ln) <= last_step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _metric_step(line: str) -> float:
    """The step of a metrics.jsonl line (a line that is not a metrics record counts as past every step)."""
    try:
        record = json.loads(line)
    except ValueError:
        return math.inf
    return record.get("step", 0) if isinstance(record, dict) else math.inf


# the files of a run directory (what --restart moves aside)
RUN_FILES = ("checkpoints", "checkpoints-unrestorable", "metrics.jsonl", "config.json", "adapter.safetensors")


def set_aside_run(out_dir) -> Path | None:
    """Move a run's files into out_dir/previous-runs/<n>/ (to start it over with other settings, e.g. a
    lower learning rate after a divergence; nothing is deleted). Returns that folder, None if no run."""
    out = Path(out_dir)
    present = [out / name for name in RUN_FILES if (out / name).exists() or (out / name).is_symlink()]
    return move_aside(present, out / "previous-runs") if present else None


def diverged_message(step: int, m: dict, bucket: int, last_good: int | None, ckpt_dir: Path, cfg: TrainConfig) -> str:
    """What a divergence at `step` means and how to go on (one line)."""
    kept = (f"the last good checkpoint (step {last_good}) in {ckpt_dir} is intact" if last_good is not None
            else "no checkpoint had been written yet")
    return (f"step {step}: loss {m['loss']}, gradient norm {m['grad_norm']} (prompt bucket {bucket}); stopped, {kept}. "
            f"Check the labels of this batch, or start over with a lower learning rate: rerun with "
            f"--lr {cfg.learning_rate / 2:g} --restart (moves this run to {Path(cfg.out_dir) / 'previous-runs'}) "
            "or with a new output directory")


# settings a resumed run must share with the checkpointed one (else it is not the same run)
RUN_DEFINING = ("steps", "batch_size", "learning_rate", "warmup_steps", "end_lr_ratio", "weight_decay", "clip_norm",
                "n_lookahead", "rank", "alpha", "targets", "buckets", "seed", "labels", "recall_budgets")


def check_resumable(saved: dict, cfg: TrainConfig) -> None:
    """Raise ValueError if `cfg` differs from the checkpointed run's config in a run-defining field."""
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists, as saved
    diff = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in RUN_DEFINING if k in saved and saved[k] != now[k]]
    if diff:
        raise ValueError(f"{cfg.out_dir} holds a run with other settings ({'; '.join(diff)}); resume with the "
                         "same settings, start over with --restart (the old run is moved aside), or use a new "
                         "output directory")


@jax.jit
def _all_finite(tree) -> jax.Array:
    # one replicated scalar, also for arrays sharded over several processes
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


class _Placement:
    """Where a run's arrays live and which compiled step it calls: one device (mesh None) or a
    ("data", "fsdp", "tensor") mesh, with this process feeding its rows of every global batch."""

    def __init__(self, cfg: TrainConfig, model, optimizer):
        from lkv_jax.sharding import check_mesh, make_mesh

        self.cfg, self.optimizer = cfg, optimizer
        self.mesh = None if cfg.mesh is None else make_mesh(tuple(int(n) for n in cfg.mesh))
        if self.mesh is not None:
            check_mesh(self.mesh, model.config, batch=cfg.batch_size)
        n_proc = jax.process_count()
        if n_proc > 1 and (self.mesh is None or self.mesh.devices.size != jax.device_count()):
            # without one mesh over every device the processes would train separate adapters
            raise ValueError(f"training on {n_proc} processes needs a mesh (TrainConfig.mesh / --mesh) over all "
                             f"{jax.device_count()} devices, got {cfg.mesh}")
        if cfg.batch_size % n_proc:
            raise ValueError(f"batch_size {cfg.batch_size} does not split over {n_proc} processes")
        self.graphdef, state = nnx.split(model)
        self.base = state
        self._steps: dict[int, object] = {}  # mesh: one jitted step per prompt bucket
        if self.mesh is None:
            self._single = _step_for(self.graphdef, _optimisation_key(cfg))  # compiles per bucket itself
        else:
            from lkv_jax.sharding import named, param_specs

            self.base = jax.device_put(nnx.to_pure_dict(state), named(self.mesh, param_specs(model)))

    def place(self, adapter, opt_state):
        """The fresh adapter and optimizer state, sharded over the mesh (templates for a restore too)."""
        if self.mesh is None:
            return adapter, opt_state
        from lkv_jax.distributed import opt_state_specs
        from lkv_jax.sharding import adapter_specs, named

        o_specs = opt_state_specs(self.optimizer, opt_state, adapter)
        return (jax.device_put(adapter, named(self.mesh, adapter_specs(adapter))),
                jax.device_put(opt_state, named(self.mesh, o_specs)))

    def step(self, adapter, opt_state, local_batch: dict):
        """One compiled step on this process's rows of the batch (all rows on one process)."""
        T = local_batch["prompt_ids"].shape[1]
        chunk = prefill_chunk(T)
        if self.mesh is None:
            return self._single(self.base, adapter, opt_state, local_batch, chunk)
        from lkv_jax.distributed import global_batch, train_step_on_mesh

        batch = global_batch(local_batch, self.mesh)
        if T not in self._steps:
            self._steps[T] = train_step_on_mesh(self.graphdef, self.optimizer, self.mesh, self.base, adapter,
                                                opt_state, batch, chunk=chunk, label_source=self.cfg.labels,
                                                recall_budgets=self.cfg.recall_budgets)
        return self._steps[T](self.base, adapter, opt_state, batch)


def train(cfg: TrainConfig, *, model=None, progress: bool = True, stop_after: int | None = None,
          restart: bool = False) -> LookaheadAdapter:
    """Train (or resume) an adapter per `cfg`; returns it and writes `out_dir/adapter.safetensors`.

    out_dir/checkpoints/ holds orbax checkpoints (resumed automatically, from the newest one that
    restores: damaged newer ones are reported and moved to checkpoints-unrestorable/), out_dir/metrics.jsonl
    the metrics, out_dir/config.json the config. An out_dir that holds a model or another command's
    output is refused (OutputDirError). `model`: an already loaded base (else cfg.model_dir).
    `stop_after`: stop once this step is reached (to split a run across preemptible jobs). `restart`:
    move an existing run to out_dir/previous-runs/<n>/ and start over (e.g. with a lower learning rate).
    Raises TrainingDivergedError on a non-finite loss or gradient, before it reaches a checkpoint.

    With `cfg.mesh` the step runs over a device mesh (`lkv_jax.distributed.train_step_on_mesh`); when
    launched as several processes (`lkv_jax.distributed.maybe_initialize_distributed`) each reads its
    own rows of every batch, all write their shards of the checkpoints, and process 0 alone writes the
    metrics and the adapter file. The returned adapter is then sharded like the checkpoint.
    """
    import grain
    from tqdm import tqdm

    from lkv_jax.distributed import fetch_to_host
    from lkv_jax.lookahead.checkpointing import TrainCheckpointer
    from lkv_jax.lookahead.label_store import LabelDataset

    if model is None:
        if cfg.model_dir is None:
            raise ValueError("give model_dir (a Hugging Face checkpoint directory) or a loaded model")
        from lkv_jax.checkpoint.hf import load_hf

        model = load_hf(cfg.model_dir, dtype=cfg.dtype)
    source = LabelDataset(cfg.data_dir)  # a damaged shard: one line naming it, before any compilation
    meta = source.meta
    mc = model.config
    if (meta["n_layers"], meta["n_heads"]) != (mc.num_hidden_layers, mc.num_attention_heads):
        raise ValueError(f"labels in {cfg.data_dir} are for {meta['n_layers']} layers x {meta['n_heads']} heads, "
                         f"the model has {mc.num_hidden_layers} x {mc.num_attention_heads}")
    too_long = int((source.prompt_lengths > cfg.buckets[-1]).sum())
    if too_long:
        raise ValueError(f"{too_long} prompts are longer than the largest bucket {cfg.buckets[-1]}; add a bucket")
    mc.check_length(int(source.prompt_lengths.max()) + cfg.n_lookahead)  # the glimpse's positions

    lead = jax.process_index() == 0  # the process that writes the metrics and the adapter file
    out = claim_output_dir(cfg.out_dir, "train", subdirs=("checkpoints",))
    if restart and lead:
        moved = set_aside_run(out)
        if moved is not None:
            print(f"lkv train: the previous run was moved to {moved}", file=sys.stderr)
    metrics_path = out / "metrics.jsonl"

    optimizer = make_optimizer(cfg)
    placement = _Placement(cfg, model, optimizer)
    adapter = init_adapter(mc, jax.random.key(cfg.seed), cfg.n_lookahead, cfg.rank, cfg.alpha, cfg.targets)
    adapter, opt_state = placement.place(adapter, optimizer.init(adapter))
    if progress and lead:
        print(param_summary(mc, adapter))
    dataset = make_dataset(source, batch_size=cfg.batch_size, buckets=cfg.buckets, seed=cfg.seed,
                           n_batches=cfg.steps, with_labels=cfg.labels == "dataset",
                           shard_options=grain.sharding.ShardByJaxProcess())
    it = iter(dataset)
    ckpt = TrainCheckpointer(out / "checkpoints", keep=cfg.keep_checkpoints)
    try:
        latest, restored, skipped = ckpt.restore_newest(
            adapter, opt_state, lambda info: check_resumable(info.get("config", {}), cfg))
    except BaseException:
        ckpt.close()
        raise
    for s in skipped if lead else ():
        print(f"lkv train: skipped checkpoint step {s.step}, it does not restore ({s.reason}); moved to "
              f"{s.moved_to}; resuming from {'step ' + str(latest) if latest is not None else 'the start'}",
              file=sys.stderr)
    step = 0
    if latest is not None:
        adapter, opt_state, data_state, _ = restored
        it.set_state(data_state)
        step = latest
    if lead:
        _trim_metrics(metrics_path, step)
        atomic_write_text(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=1))
    end = cfg.steps if stop_after is None else min(cfg.steps, int(stop_after))
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not (progress and lead))
    t0 = time.perf_counter()
    try:
        with open_append(metrics_path) if lead else open(os.devnull, "a") as log:
            while step < end:
                batch = next(it)
                T = batch["prompt_ids"].shape[1]
                new_adapter, new_opt, m = placement.step(adapter, opt_state, batch)
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and bool(_all_finite(new_adapter))):
                    raise TrainingDivergedError(diverged_message(step + 1, m, T, ckpt.latest_step(), ckpt.directory,
                                                                 cfg))
                adapter, opt_state = new_adapter, new_opt
                step += 1
                if step % cfg.log_every == 0 or step == end:
                    lr = float(make_schedule(cfg)(step - 1))
                    log.write(json.dumps({"step": step, **m, "lr": lr, "bucket": T,
                                          "seconds": round(time.perf_counter() - t0, 3)}) + "\n")
                    log.flush()
                if step % cfg.checkpoint_every == 0 or step == end:
                    ckpt.save(step, adapter, opt_state, it.get_state(), {"config": dataclasses.asdict(cfg)})
                bar.set_postfix(loss=f"{m['loss']:.4f}", r64=f"{m.get('recall@64', float('nan')):.3f}")
                bar.update(1)
    finally:
        bar.close()
        ckpt.close()
    host_adapter = fetch_to_host(adapter)  # every process takes part in the gather
    if lead:
        save_adapter(host_adapter, out / "adapter.safetensors")
    return adapter
