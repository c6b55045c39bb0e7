"""Training the lookahead adapter: prefill without gradient, differentiate only the lookahead glimpse.

A step: prefill the batch's prompts into a cache (under `stop_gradient`: the prompt never depends on
the adapter because the LoRA is masked to lookahead positions), take the labels (from the dataset, or
on the fly from a glimpse of the response at the same cache), glimpse with the lookahead suffix, and
minimise the mean KL(label || prediction) with AdamW (warmup + cosine, global-norm clipping). The
gradient and the optimizer state exist for the adapter alone.

`train_step(graphdef, base_params, adapter, opt_state, batch, ...)` is the pure step; base, adapter and
batch are separate arguments so that each can be given its own sharding: `jitted_train_step` jits it over
a device mesh (one device is a 1x1x1 mesh).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lkv_jax.atomic_files import atomic_write_text, open_append
from lkv_jax.distributed import fetch_to_host, global_batch
from lkv_jax.errors import TrainingDivergedError
from lkv_jax.inference import prefill_pure
from lkv_jax.lookahead.adapter import LookaheadAdapter, init_adapter, param_summary, save_adapter
from lkv_jax.lookahead.data_pipeline import DEFAULT_BUCKETS, check_buckets, make_dataset, prefill_chunk
from lkv_jax.lookahead.labels import labels_from_cache
from lkv_jax.lookahead.loss import label_mass_recall, lookahead_loss
from lkv_jax.lookahead.scoring import lookahead_glimpse
from lkv_jax.models.transformer import PROJECTIONS
from lkv_jax.output_dirs import claim_output_dir, move_aside
from lkv_jax.sharding import adapter_specs, batch_sharding, entry_mesh, entry_point, make_mesh, named, param_shardings

LABEL_SOURCES = ("dataset", "on-the-fly")


# The role of a TrainConfig field (its metadata "role"): "step" fields define the run and the compiled
# train step (optimiser, labels, metrics); "run" fields define the run only (shapes, data order); the
# others (paths, cadence, mesh, dtype) say where and how it runs. A resumed run must keep the first two.
STEP, RUN = "step", "run"


def _setting(default=dataclasses.MISSING, *, role: str | None = None, help: str = "", **cli):
    """A TrainConfig field with its role and its `lkv train` argument: `help`, and optionally `flag` (else
    --name-with-dashes), `position` (a positional argument), `choices`, `parse` (the string -> value
    conversion, else the default's type; tuples are comma separated), `metavar`."""
    return dataclasses.field(default=default, metadata={"role": role, "help": help, **cli})


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (saved with each checkpoint); `lkv train`'s arguments are
    derived from the fields."""

    data_dir: str = _setting(position=1, metavar="data",
                             help="label dataset directory written by `lkv make-labels`")
    out_dir: str = _setting(position=2, metavar="out", help="run directory: checkpoints/, metrics.jsonl, "
                            "adapter.safetensors (an existing run there is resumed)")
    model_dir: str | None = _setting(None, position=0, metavar="model",
                                     help="Hugging Face model directory (the frozen base model)")
    steps: int = _setting(1000, role=STEP, help="optimizer steps")
    batch_size: int = _setting(4, role=RUN)
    learning_rate: float = _setting(5e-4, role=STEP, flag="--lr", help="peak learning rate")
    warmup_steps: int = _setting(50, role=STEP)
    end_lr_ratio: float = _setting(0.1, role=STEP, help="final lr / peak lr of the cosine")
    weight_decay: float = _setting(0.0, role=STEP)
    clip_norm: float = _setting(1.0, role=STEP, help="global gradient-norm clip")
    n_lookahead: int = _setting(32, role=RUN)
    rank: int = _setting(8, role=RUN)
    alpha: float = _setting(32.0, role=RUN)
    targets: tuple[str, ...] = _setting(PROJECTIONS, role=RUN, help="LoRA projections, comma separated")
    buckets: tuple[int, ...] = _setting(DEFAULT_BUCKETS, role=RUN, help="prompt length buckets")
    seed: int = _setting(0, role=RUN)
    labels: str = _setting("dataset", role=STEP, choices=LABEL_SOURCES,
                           help="read stored labels, or recompute them from the stored responses in each step")
    checkpoint_every: int = _setting(100)
    keep_checkpoints: int = _setting(3)
    log_every: int = _setting(10)
    recall_budgets: tuple[int, ...] = _setting((64, 128, 256), role=STEP)
    dtype: str = _setting("bfloat16", help="base model activation dtype")
    # a run checkpointed on one mesh resumes on another
    mesh: tuple[int, int, int] | None = _setting(
        None, parse=_ints, metavar="DATA,FSDP,TENSOR",
        help="run the step over a device mesh of these axis sizes (e.g. 4,2,1 on 8 chips; the batch size must be "
             "divisible by DATA); default: one device")

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


def _fields(*roles: str) -> tuple[str, ...]:
    """The names of TrainConfig's fields of these roles."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("role") in roles)


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


def opt_state_specs(optimizer: optax.GradientTransformation, opt_state, adapter):
    """Specs for the optimizer state: parameter-shaped parts follow the adapter, the rest replicated."""
    return optax.tree_map_params(optimizer, lambda _, spec: spec, opt_state, adapter_specs(adapter),
                                 transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))


def jitted_train_step(graphdef, base_params, mesh: Mesh, optimizer: optax.GradientTransformation, adapter,
                      opt_state, batch: dict, *, chunk: int, label_source: str = "dataset",
                      recall_budgets=(64, 128, 256), optimizer_key=None):
    """`train_step` jitted over `mesh` (built once per model structure, mesh, optimizer, pytree structures
    and chunk; cached): call it as `fn(base_params, adapter, opt_state, batch)`. The base (`nnx.split`'s
    state) per its declared axes (FSDP + tensor), the adapter per `adapter_specs`, the optimizer state like
    the adapter, the batch over data, the metrics replicated. `optimizer_key` identifies the optimizer in
    the cache (default: the optimizer object itself)."""
    recall_budgets = tuple(recall_budgets)

    def build():
        def step(base_params, adapter, opt_state, batch):
            return train_step(graphdef, base_params, adapter, opt_state, batch, optimizer=optimizer, chunk=chunk,
                              label_source=label_source, recall_budgets=recall_budgets)

        a_sh = named(mesh, adapter_specs(adapter))
        o_sh = named(mesh, opt_state_specs(optimizer, opt_state, adapter))
        b_sh = {k: batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
        return jax.jit(step, in_shardings=(param_shardings(mesh, base_params), a_sh, o_sh, b_sh),
                       out_shardings=(a_sh, o_sh, NamedSharding(mesh, P())))

    structure = (jax.tree.structure(adapter), jax.tree.structure(opt_state),
                 tuple(sorted((k, np.ndim(v)) for k, v in batch.items())))
    key = ("train_step", graphdef, mesh, optimizer if optimizer_key is None else optimizer_key, chunk,
           label_source, recall_budgets, structure)
    return entry_point(key, build)


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
RUN_DEFINING = _fields(RUN, STEP)


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
    """Where a run's arrays live, a ("data", "fsdp", "tensor") mesh (one device: 1x1x1), and its compiled
    step, with this process feeding its rows of every global batch."""

    def __init__(self, cfg: TrainConfig, model, optimizer):
        self.cfg, self.optimizer = cfg, optimizer
        self.mesh = entry_mesh(model, None if cfg.mesh is None else make_mesh(cfg.mesh), batch=cfg.batch_size)
        n_proc = jax.process_count()
        if n_proc > 1 and self.mesh.devices.size != jax.device_count():
            # without one mesh over every device the processes would train separate adapters
            raise ValueError(f"training on {n_proc} processes needs a mesh (TrainConfig.mesh / --mesh) over all "
                             f"{jax.device_count()} devices, got {cfg.mesh}")
        if cfg.batch_size % n_proc:
            raise ValueError(f"batch_size {cfg.batch_size} does not split over {n_proc} processes")
        self.graphdef, state = nnx.split(model)
        self.base = jax.device_put(state, param_shardings(self.mesh, state))
        # the optimizer is rebuilt per run: its settings identify it in the compile cache, so a resumed run in
        # the same process (tests, notebooks) reuses the compilation
        self.optimizer_key = json.dumps({name: getattr(cfg, name) for name in _fields(STEP)})

    def place(self, adapter, opt_state):
        """The fresh adapter and optimizer state, sharded over the mesh (templates for a restore too)."""
        o_specs = opt_state_specs(self.optimizer, opt_state, adapter)
        return (jax.device_put(adapter, named(self.mesh, adapter_specs(adapter))),
                jax.device_put(opt_state, named(self.mesh, o_specs)))

    def step(self, adapter, opt_state, local_batch: dict):
        """One compiled step on this process's rows of the batch (all rows on one process)."""
        batch = global_batch(local_batch, self.mesh)
        fn = jitted_train_step(self.graphdef, self.base, self.mesh, self.optimizer, adapter, opt_state, batch,
                               chunk=prefill_chunk(local_batch["prompt_ids"].shape[1]), label_source=self.cfg.labels,
                               recall_budgets=self.cfg.recall_budgets, optimizer_key=self.optimizer_key)
        return fn(self.base, adapter, opt_state, batch)


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

    With `cfg.mesh` the step runs over that device mesh (`jitted_train_step`), else on one device; when
    launched as several processes (`lkv_jax.distributed.maybe_initialize_distributed`) each reads its
    own rows of every batch, all write their shards of the checkpoints, and process 0 alone writes the
    metrics and the adapter file. The returned adapter is then sharded like the checkpoint.
    """
    import grain
    from tqdm import tqdm

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
