"""Training the lookahead adapter: gradients, the data pipeline, learning on a tiny problem, checkpoints.

The learnable problem: a tiny random Llama (2 layers, hidden 64, 4 query / 2 KV heads), random 40-token
prompts and the model's own 12-token greedy responses; 8 lookahead tokens, rank-8 LoRA, 150 AdamW steps.
On held-out prompts the trained adapter must keep more of the response's attention mass at budget 8
than SnapKV (window 4 and window 1) and than the untrained adapter.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import chex
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lkv_jax
from lkv_jax.evaluation.oracle import coverage, kept_mask
from lkv_jax.lookahead import LabelDataset, init_adapter, load_adapter, make_label_dataset
from lkv_jax.lookahead.data_pipeline import batch_plan, make_dataset
from lkv_jax.lookahead.label_store import read_shard, shard_path, write_shard
from lkv_jax.lookahead.loss import kl_divergence
from lkv_jax.lookahead.training import (
    TrainConfig,
    TrainingDivergedError,
    loss_fn,
    make_optimizer,
    train,
    train_step,
)
from lkv_jax.presses import LookaheadKVPress
from lkv_jax.presses.snapkv import SnapKVPress

PROMPT_LEN, N_TRAIN, N_TEST = 40, 64, 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import build_hf_model, save_hf_model

    root = tmp_path_factory.mktemp("lkv_train")
    hf = build_hf_model("llama")
    model_dir = save_hf_model(hf, root / "model")
    model = lkv_jax.load_hf(model_dir, dtype="float32")
    rs = np.random.RandomState(0)
    prompts = [list(rs.randint(3, 128, PROMPT_LEN)) for _ in range(N_TRAIN + N_TEST)]
    # equal lengths and one batch shape: one compilation of generate and of the labels
    make_label_dataset(model, prompts[:N_TRAIN], root / "train", max_new_tokens=12, batch_size=32,
                       progress=False)
    make_label_dataset(model, prompts[N_TRAIN:], root / "test", max_new_tokens=12, batch_size=32,
                       progress=False)
    return {"root": root, "model": model, "model_dir": model_dir}


def config(setup, name, **kw):
    base = dict(data_dir=str(setup["root"] / "train"), out_dir=str(setup["root"] / name), steps=150, batch_size=8,
                learning_rate=1e-2, warmup_steps=10, n_lookahead=8, rank=8, buckets=(64,), checkpoint_every=50,
                log_every=10, recall_budgets=(8, 64), dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


def first_batch(setup, batch_size=4):
    ds = make_dataset(LabelDataset(setup["root"] / "train"), batch_size=batch_size, buckets=(64,), n_batches=1)
    return {k: jnp.asarray(v) for k, v in ds[0].items()}


def test_kl_hand_values():
    label = jnp.asarray([[0.5, 0.5, 0.0, 9.0]])
    pred = jnp.asarray([[0.25, 0.75, 0.5, 1.0]])
    valid = jnp.asarray([[True, True, True, False]])
    # renormalised: p = (.5, .5, 0), q = (.2, .6, .4)/... -> q = (0.25/1.5, 0.75/1.5, 0.5/1.5)
    q = np.array([0.25, 0.75, 0.5]) / 1.5
    want = 0.5 * np.log(0.5 / q[0]) + 0.5 * np.log(0.5 / q[1])
    np.testing.assert_allclose(float(kl_divergence(label, pred, valid)[0]), want, rtol=1e-6)


def test_data_pipeline_buckets_padding_and_state(setup, tmp_path):
    rows = [{"prompt_ids": np.arange(1, n + 1), "response_ids": np.arange(r) + 3,
             "labels": np.full((2, 4, n), 1.0 / n, np.float32)} for n, r in ((5, 3), (20, 17), (7, 1), (9, 2), (30, 4))]
    ds = make_dataset(rows, batch_size=2, buckets=(8, 16, 32), seed=3, n_batches=7)
    batches = [ds[i] for i in range(len(ds))]
    seen = []
    for b in batches[:3]:  # one epoch: bucket 8 holds lengths 5, 7; 16: 9 (+ a filler row); 32: 20, 30
        T = b["prompt_ids"].shape[1]
        assert T in (8, 16, 32) and b["labels"].shape == (2, 2, 4, T) and b["response_ids"].shape[1] >= 16
        for i in range(2):
            n = int(b["prompt_valid"][i].sum())
            assert b["prompt_valid"][i, T - n:].all()  # left padding
            if b["row_weight"][i] > 0:
                seen.append(n)
                np.testing.assert_array_equal(b["prompt_ids"][i, T - n:], np.arange(1, n + 1))
                np.testing.assert_array_equal(b["positions"][i, T - n:], np.arange(n))
                assert b["labels"][i, :, :, : T - n].sum() == 0
    assert sorted(seen) == [5, 7, 9, 20, 30]
    # a resumed iterator continues with exactly the batches an uninterrupted one yields
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    it2 = iter(ds)
    it2.set_state(json.loads(json.dumps(state)))
    for want in batches[3:]:
        got = next(it2)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(ValueError, match="largest bucket"):
        make_dataset(rows, batch_size=2, buckets=(8, 16), n_batches=1)


def test_gradients_only_for_the_adapter(setup):
    model = setup["model"]
    batch = first_batch(setup)
    ad = init_adapter(model.config, jax.random.key(1), n_lookahead=8)
    graphdef, params = nnx.split(model)
    before = [np.asarray(x).copy() for x in jax.tree.leaves(params)]
    grads = jax.eval_shape(jax.grad(lambda a: loss_fn(a, model, batch, chunk=64)[0]), ad)
    assert jax.tree.structure(grads) == jax.tree.structure(ad)
    assert all(g.shape == a.shape for g, a in zip(jax.tree.leaves(grads), jax.tree.leaves(ad), strict=True))
    opt = make_optimizer(config(setup, "unused", warmup_steps=0))
    opt_state = opt.init(ad)
    arrays = [x for x in jax.tree.leaves(opt_state) if x.ndim > 0]
    assert sum(x.size for x in arrays) == 2 * sum(x.size for x in jax.tree.leaves(ad))  # Adam's mu and nu only
    step = jax.jit(lambda p, a, s, b: train_step(graphdef, p, a, s, b, optimizer=opt, chunk=64, recall_budgets=(8,)))
    new, _, metrics = step(params, ad, opt_state, batch)
    assert jax.tree.structure(new) == jax.tree.structure(ad)
    # the adapter moved: B (zero at init) and the embeddings got a gradient ...
    assert float(jnp.abs(new.layers[0]["down"]["b"]).max()) > 0
    assert float(jnp.abs(new.embeddings - ad.embeddings).max()) > 0
    # ... except where it cannot act: the last layer's o/gate/up/down come after its attention scores
    assert float(jnp.abs(new.layers[1]["down"]["b"]).max()) == 0.0
    for x, y in zip(jax.tree.leaves(nnx.state(model)), before, strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)  # the base did not
    assert 0 < float(metrics["recall@8"]) < 1 and np.isfinite(float(metrics["loss"]))
    # labels computed inside the step from the responses equal the stored ones
    both = jax.jit(lambda a: (loss_fn(a, model, batch, chunk=64, label_source="on-the-fly")[0],
                              loss_fn(a, model, batch, chunk=64)[0]))
    on_the_fly, stored = both(new)
    np.testing.assert_allclose(float(on_the_fly), float(stored), rtol=1e-5)


def held_out_recall(setup, press, budget):
    test = LabelDataset(setup["root"] / "test")
    ids = np.stack([test[i]["prompt_ids"] for i in range(len(test))])
    out = lkv_jax.compress(setup["model"], ids, press)
    def recall(i):  # label mass on the kept positions, each head's label normalised over the prompt
        label = np.asarray(test[i]["labels"], np.float64)
        label = label / np.maximum(label.sum(-1, keepdims=True), 1e-30)
        return coverage(label, [kept_mask(k[i], ids.shape[1]) for k in out.kept_positions]).mean()
    return float(np.mean([recall(i) for i in range(len(test))]))


def test_training_lowers_kl_and_beats_snapkv(setup):
    cfg = config(setup, "learn")
    ad = train(cfg, model=setup["model"], progress=False)
    log = [json.loads(line) for line in open(setup["root"] / "learn" / "metrics.jsonl")]
    assert [m["step"] for m in log] == list(range(10, 151, 10))
    first, last = np.mean([m["loss"] for m in log[:2]]), np.mean([m["loss"] for m in log[-3:]])
    assert last < 0.6 * first, (first, last)
    assert np.mean([m["recall@8"] for m in log[-3:]]) > np.mean([m["recall@8"] for m in log[:2]])
    assert log[0]["recall@64"] == 1.0  # the budget is clipped to the 40-token prompt: everything kept
    budget = 8
    trained = held_out_recall(setup, LookaheadKVPress(ad, budget=budget), budget)
    fresh = held_out_recall(setup, LookaheadKVPress(init_adapter(setup["model"].config, jax.random.key(0),
                                                                 n_lookahead=8), budget=budget), budget)
    snap4 = held_out_recall(setup, SnapKVPress(budget=budget, window_size=4), budget)
    snap1 = held_out_recall(setup, SnapKVPress(budget=budget, window_size=1, kernel_size=1), budget)
    print(f"KL {first:.3f} -> {last:.3f}; held-out recall@{budget}: trained {trained:.3f}, untrained {fresh:.3f}, "
          f"SnapKV w4 {snap4:.3f}, SnapKV w1 {snap1:.3f}")
    assert trained > max(snap4, snap1) + 0.05 and trained > fresh, (trained, fresh, snap4, snap1)
    saved = load_adapter(setup["root"] / "learn" / "adapter.safetensors", setup["model"].config)
    np.testing.assert_array_equal(np.asarray(saved.embeddings), np.asarray(ad.embeddings))


def full_run(setup):
    """The uninterrupted 20-step reference run (trained once per module)."""
    path = setup["root"] / "full" / "adapter.safetensors"
    if not path.is_file():
        train(config(setup, "full", steps=20, checkpoint_every=4, keep_checkpoints=2), model=setup["model"],
              progress=False)
    return load_adapter(path)


def test_kill_and_resume_equals_uninterrupted(setup):
    from lkv_jax.cli import main

    full = full_run(setup)
    args = ["train", setup["model_dir"], str(setup["root"] / "train"), str(setup["root"] / "cut"), "--steps", "20",
            "--batch-size", "8", "--lr", "1e-2", "--warmup-steps", "10", "--n-lookahead", "8", "--buckets", "64",
            "--checkpoint-every", "4", "--keep-checkpoints", "2", "--log-every", "10", "--dtype", "float32",
            "--no-progress"]
    assert main(args + ["--stop-after", "10"]) == 0  # killed after step 10 (its last checkpoint: 10)
    ckpts = sorted(p.name for p in (setup["root"] / "cut" / "checkpoints").iterdir())
    assert ckpts == ["10", "8"]  # keep-2
    assert main(args[:-1] + ["--rank", "4", "--no-progress"]) == 2  # other settings: refused, nothing touched
    assert main(args) == 0
    resumed = load_adapter(setup["root"] / "cut" / "adapter.safetensors")
    chex.assert_trees_all_close(resumed, full, rtol=0, atol=0)
    log = [json.loads(line) for line in open(setup["root"] / "cut" / "metrics.jsonl")]
    full_log = [json.loads(line) for line in open(setup["root"] / "full" / "metrics.jsonl")]
    assert [m["step"] for m in log] == [10, 20] and [m["loss"] for m in log] == [m["loss"] for m in full_log]


def test_hard_kill_between_checkpoints_resumes_exactly(setup, monkeypatch):
    """Killed in step 11 (last checkpoint: 8): the resumed run replays 9.. and matches the full run."""
    from lkv_jax.lookahead import training

    real = training.jitted_train_step
    calls = {"n": 0}

    def dying(*args, **kwargs):
        step = real(*args, **kwargs)

        def wrapped(*args):
            calls["n"] += 1
            if calls["n"] == 11:
                raise KeyboardInterrupt("killed")
            return step(*args)
        return wrapped

    cfg = config(setup, "hard", steps=20, checkpoint_every=4, keep_checkpoints=2)
    monkeypatch.setattr(training, "jitted_train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, model=setup["model"], progress=False)
    monkeypatch.setattr(training, "jitted_train_step", real)
    from lkv_jax.lookahead.checkpointing import TrainCheckpointer

    ck = TrainCheckpointer(setup["root"] / "hard" / "checkpoints", keep=2)
    assert sorted(ck.manager.all_steps()) == [4, 8]
    ck.close()
    resumed = train(cfg, model=setup["model"], progress=False)
    full = full_run(setup)
    chex.assert_trees_all_close(jax.device_get(resumed), full, rtol=0, atol=0)
    log = [json.loads(line) for line in open(setup["root"] / "hard" / "metrics.jsonl")]
    full_log = [json.loads(line) for line in open(setup["root"] / "full" / "metrics.jsonl")]
    assert [(m["step"], m["loss"]) for m in log] == [(m["step"], m["loss"]) for m in full_log]


def test_nan_loss_stops_and_keeps_last_checkpoint(setup):
    root = setup["root"]
    shutil.copytree(root / "train", root / "bad")
    sample = batch_plan([PROMPT_LEN] * N_TRAIN, 8, (64,), seed=0)[3][1][0]  # a sample of the 4th batch
    shard_size = LabelDataset(root / "bad").shard_size
    path = shard_path(root / "bad", sample // shard_size)
    samples = read_shard(path, min(shard_size, N_TRAIN - sample // shard_size * shard_size))
    samples[sample % shard_size]["labels"][0, 0, 3] = np.nan
    write_shard(path, samples)
    cfg = config(setup, "nan", data_dir=str(root / "bad"), steps=20, checkpoint_every=1, keep_checkpoints=2)
    with pytest.raises(TrainingDivergedError, match="loss nan") as e:
        train(cfg, model=setup["model"], progress=False)
    from lkv_jax.lookahead.checkpointing import TrainCheckpointer

    ck = TrainCheckpointer(root / "nan" / "checkpoints")
    last = ck.latest_step()
    assert last == 3 and f"step {last + 1}:" in str(e.value) and f"(step {last})" in str(e.value)
    ad = init_adapter(setup["model"].config, jax.random.key(0), n_lookahead=8)
    restored, _, data_state, info = ck.restore(last, ad, make_optimizer(cfg).init(ad))
    ck.close()
    assert info["step"] == last and data_state["next_index"] == last
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored))


# ------------------------------------------------------------------------------------------------
# training on a device mesh (8 fake CPU devices, see conftest)


def test_process_shards_stack_into_the_single_process_batch(setup):
    source = LabelDataset(setup["root"] / "train")
    whole = make_dataset(source, batch_size=8, buckets=(64,), seed=5, n_batches=3)
    parts = [make_dataset(source, batch_size=8, buckets=(64,), seed=5, n_batches=3,
                          shard_options=grain.sharding.ShardOptions(i, 4)) for i in range(4)]
    for b in range(3):
        for k, v in whole[b].items():
            got = np.concatenate([p[b][k] for p in parts])
            np.testing.assert_array_equal(got, v)
        assert parts[0][b]["prompt_ids"].shape[0] == 2
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        make_dataset(source, batch_size=8, buckets=(64,), n_batches=1, shard_options=grain.sharding.ShardOptions(0, 3))


def _assert_close_adapters(a, b, atol):
    chex.assert_trees_all_close(jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b), atol=atol, rtol=0)


# six AdamW steps: Adam divides each gradient by its running RMS, which turns the float32 reduction-order
# noise of a sharded step (~1e-7) into up to ~1e-5 where gradients are small (measured 5e-6 on (8,1,1),
# 1e-5 on (2,2,2)); the adapter itself moves by ~1.5e-2, 300x the tolerance
MESH_ATOL = 5e-5


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_train_on_a_mesh_equals_single_device(setup, shape):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lkv_jax.sharding import adapter_specs, make_mesh

    single = train(config(setup, "single6", steps=6, checkpoint_every=3), model=setup["model"], progress=False)
    name = "mesh" + "".join(map(str, shape))
    sharded = train(config(setup, name, steps=6, checkpoint_every=3, mesh=shape), model=setup["model"],
                    progress=False)
    _assert_close_adapters(sharded, single, MESH_ATOL)
    # the comparison is not vacuous: six AdamW steps moved the adapter far more than the tolerance
    init = init_adapter(setup["model"].config, jax.random.key(0), 8, 8, 32.0)
    moved = max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                for x, y in zip(jax.tree.leaves(single), jax.tree.leaves(init), strict=True))
    assert moved > 100 * MESH_ATOL
    log = [json.loads(line) for line in open(setup["root"] / name / "metrics.jsonl")]
    ref = [json.loads(line) for line in open(setup["root"] / "single6" / "metrics.jsonl")]
    np.testing.assert_allclose([m["loss"] for m in log], [m["loss"] for m in ref], rtol=1e-5)
    mesh = make_mesh(shape)
    declared = jax.tree.leaves(adapter_specs(sharded), is_leaf=lambda x: isinstance(x, P))
    for arr, spec in zip(jax.tree.leaves(sharded), declared, strict=True):
        assert arr.sharding.is_equivalent_to(NamedSharding(mesh, spec), arr.ndim)
    saved = load_adapter(setup["root"] / name / "adapter.safetensors")
    _assert_close_adapters(saved, sharded, 0.0)


def test_checkpoint_from_one_mesh_resumes_on_another(setup):
    """Stopped after 3 steps on (8,1,1), resumed on (2,2,2): the same adapter as 6 steps on one device."""
    cfg = config(setup, "remesh", steps=6, checkpoint_every=3, mesh=(8, 1, 1))
    train(cfg, model=setup["model"], progress=False, stop_after=3)
    resumed = train(dataclasses.replace(cfg, mesh=(2, 2, 2)), model=setup["model"], progress=False)
    single = train(config(setup, "single6", steps=6, checkpoint_every=3), model=setup["model"], progress=False)
    _assert_close_adapters(resumed, single, MESH_ATOL)
    log = [json.loads(line)["step"] for line in open(setup["root"] / "remesh" / "metrics.jsonl")]
    assert log == [3, 6]


def test_mesh_that_does_not_divide_the_batch_is_refused(setup):
    from lkv_jax.sharding import MeshError

    with pytest.raises(MeshError, match="'data' of size 8 does not divide batch size=4"):
        train(config(setup, "badmesh", steps=2, batch_size=4, mesh=(8, 1, 1)), model=setup["model"], progress=False)
    with pytest.raises(ValueError, match="three positive sizes"):
        config(setup, "badmesh2", mesh=(2, 2))


WORKER = """
import json, sys
import numpy as np
from lkv_jax.distributed import maybe_initialize_distributed
assert maybe_initialize_distributed()
import jax
import lkv_jax
from lkv_jax.lookahead.training import TrainConfig, train
from lkv_jax.sharding import make_mesh, shard_model

cfg = TrainConfig(**json.loads(sys.argv[1]))
model = lkv_jax.load_hf(cfg.model_dir, dtype="float32")
train(cfg, model=model, progress=False)
ids = np.asarray(json.loads(sys.argv[2]))
mesh = make_mesh(cfg.mesh)
tokens = lkv_jax.generate(shard_model(model, mesh), ids, 6, lkv_jax.presses.SnapKVPress(budget=16, window_size=4),
                          mesh=mesh)
if jax.process_index() == 0:
    np.save(sys.argv[3], tokens)
print("process", jax.process_index(), "of", jax.process_count(), "devices", jax.local_device_count(), "/",
      jax.device_count())
"""


def test_two_processes_train_and_generate_like_one_device(setup, tmp_path):
    """Multi-host on one machine: 2 processes x 4 CPU devices (gloo collectives), one (2,2,2) mesh. Each
    process reads its half of every batch and writes its shards of the checkpoints; the adapter equals the
    single-device run and lkv_jax.generate on the mesh equals it on one device."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    cfg = config(setup, "twoproc", steps=6, checkpoint_every=3, mesh=(2, 2, 2), model_dir=str(setup["model_dir"]))
    ids = np.random.RandomState(3).randint(3, 128, size=(4, 30))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    argv = [sys.executable, str(script), json.dumps(dataclasses.asdict(cfg)), json.dumps(ids.tolist()),
            str(tmp_path / "tokens.npy")]
    procs = []
    for pid in range(2):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(pid), "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "process 1 of 2 devices 4 / 8" in outs[1]
    single = train(config(setup, "single6", steps=6, checkpoint_every=3), model=setup["model"], progress=False)
    _assert_close_adapters(load_adapter(setup["root"] / "twoproc" / "adapter.safetensors"), single, MESH_ATOL)
    assert sorted(int(p.name) for p in (setup["root"] / "twoproc" / "checkpoints").iterdir() if p.name.isdigit()) \
        == [3, 6]
    want = lkv_jax.generate(setup["model"], ids, 6, SnapKVPress(budget=16, window_size=4))
    np.testing.assert_array_equal(np.load(tmp_path / "tokens.npy"), want)
