"""The entry points on a mesh of 8 fake CPU devices equal the single-device path (one device is a 1x1x1 mesh),
and compile once per shape."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lkv_jax
from lkv_jax.config import ModelConfig
from lkv_jax.decoding import jitted_greedy_loop
from lkv_jax.inference import jitted_prefill, prepare_prompt
from lkv_jax.lookahead import init_adapter
from lkv_jax.lookahead.data_pipeline import Collate
from lkv_jax.lookahead.training import jitted_train_step, opt_state_specs, train_step
from lkv_jax.models.transformer import Transformer
from lkv_jax.sharding import MeshError, adapter_specs, check_mesh, make_mesh, param_specs, shard_model

MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]
CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=16)


def test_eight_fake_devices():
    assert len(jax.devices()) == 8


@pytest.fixture(scope="module")
def model():
    return Transformer(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch():
    rs = np.random.RandomState(0)
    samples = [dict(prompt_ids=rs.randint(3, 128, size=n), response_ids=rs.randint(3, 128, size=6))
               for n in rs.randint(20, 48, size=8)]
    return {k: jnp.asarray(v) for k, v in Collate(samples, with_labels=False)((48, tuple(range(8)))).items()}


def _optimizer():
    """Clipping + SGD with momentum: an update linear in the gradient, so float reduction-order noise
    stays at noise level (Adam's first step divides g by |g| and would amplify it where g ~ 0)."""
    import optax

    return optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9))


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_train_step_equals_single_device(model, batch, shape):
    graphdef, base = nnx.split(model)
    adapter = init_adapter(CFG, jax.random.key(1), n_lookahead=4, rank=4)
    # a non-zero B so the first step's gradient reaches every tensor
    adapter = jax.tree.map(lambda x: x + 0.01 if x.ndim == 2 and x.shape[0] == 4 else x, adapter)
    opt = _optimizer()
    opt_state = opt.init(adapter)
    ref_adapter, ref_opt, ref_metrics = jax.jit(
        lambda p, a, o, b: train_step(graphdef, p, a, o, b, optimizer=opt, chunk=16, label_source="on-the-fly"))(
        base, adapter, opt_state, batch)

    mesh = make_mesh(shape)
    fn = jitted_train_step(graphdef, base, mesh, opt, adapter, opt_state, batch, chunk=16, label_source="on-the-fly")
    new_adapter, new_opt, metrics = fn(base, adapter, opt_state, batch)
    host = lambda tree: jax.tree.map(np.asarray, tree)
    chex.assert_trees_all_close(host(new_adapter), host(ref_adapter), atol=1e-5, rtol=0)
    chex.assert_trees_all_close(float(metrics["loss"]), float(ref_metrics["loss"]), atol=1e-5, rtol=0)
    # outputs carry the declared shardings
    declared = jax.tree.leaves(adapter_specs(adapter), is_leaf=lambda x: isinstance(x, P))
    for arr, spec in zip(jax.tree.leaves(new_adapter), declared, strict=True):
        assert arr.sharding.is_equivalent_to(NamedSharding(mesh, spec), arr.ndim)
    o_declared = jax.tree.leaves(opt_state_specs(opt, opt_state, adapter), is_leaf=lambda x: isinstance(x, P))
    for arr, spec in zip(jax.tree.leaves(new_opt), o_declared, strict=True):
        assert arr.sharding.is_equivalent_to(NamedSharding(mesh, spec), arr.ndim)


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_compress_keeps_the_same_positions(model, shape):
    ids = np.random.RandomState(0).randint(3, 128, size=(8, 50))
    mask = np.ones_like(ids)
    mask[3, :11] = 0
    press = lkv_jax.presses.StreamingLLMPress(budget=20)
    ref = lkv_jax.compress(model, ids, press, attention_mask=mask)
    mesh = make_mesh(shape)
    out = lkv_jax.compress(shard_model(model, mesh), ids, press, attention_mask=mask, mesh=mesh)
    for a, b in zip(out.kept_positions, ref.kept_positions, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "tensor", None)), 3)
    for k in out.cache.keys:
        assert k.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "tensor", None, None)), 4)
    np.testing.assert_allclose(np.asarray(out.cache.keys[1]), np.asarray(ref.cache.keys[1]), atol=1e-5)



def test_compress_of_a_placed_model_runs_on_its_mesh(model):
    """mesh=None on a model placed by shard_model runs over that mesh, as prefill and generate do."""
    ids = np.random.RandomState(1).randint(3, 128, size=(4, 40))
    press = lkv_jax.presses.SnapKVPress(budget=16, window_size=8)
    ref = lkv_jax.compress(model, ids, press)
    mesh = make_mesh((2, 1, 2))
    out = lkv_jax.compress(shard_model(model, mesh), ids, press)
    for a, b in zip(out.kept_positions, ref.kept_positions, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "tensor", None)), 3)

def test_pallas_scoring_inside_shard_map_matches_single_device(model):
    ids = np.random.RandomState(4).randint(3, 128, size=(4, 40))
    press = lkv_jax.presses.SnapKVPress(budget=16, window_size=8, implementation="pallas", interpret=True)
    ref = lkv_jax.compress(model, ids, press)
    mesh = make_mesh((2, 2, 2))
    out = lkv_jax.compress(shard_model(model, mesh), ids, press, mesh=mesh)
    for a, b in zip(out.kept_positions, ref.kept_positions, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tensor_parallelism_lowers_per_device_memory():
    cfg = ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=8, head_dim=32)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    ids = np.random.RandomState(0).randint(3, 1024, size=(8, 64))
    prompt = prepare_prompt(ids, None, 64, cfg.vocab_size)

    def per_device_bytes(shape):
        mesh = make_mesh(shape)
        sharded = shard_model(model, mesh)
        graphdef, params = nnx.split(sharded)
        b = NamedSharding(mesh, P("data", None))
        args = [jax.device_put(x, b) for x in (prompt.ids, prompt.valid, prompt.positions)]
        fn = jitted_prefill(graphdef, params, mesh, chunk=prompt.chunk, capacity=64)
        m = fn.lower(params, *args).compile().memory_analysis()
        return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes

    data_parallel, tensor_parallel = per_device_bytes((8, 1, 1)), per_device_bytes((1, 1, 8))
    assert tensor_parallel < 0.5 * data_parallel, (tensor_parallel, data_parallel)


def test_converted_checkpoint_restores_onto_another_mesh(model, tmp_path):
    src = make_mesh((8, 1, 1))
    lkv_jax.save_converted(shard_model(model, src), tmp_path / "ckpt")
    dst = make_mesh((1, 2, 4))
    shardings = jax.tree.map(lambda s: NamedSharding(dst, s), param_specs(model), is_leaf=lambda x: isinstance(x, P))
    restored = lkv_jax.load_converted(tmp_path / "ckpt", shardings=shardings)
    k = restored.layers[0].q.kernel[...]
    assert k.sharding.is_equivalent_to(NamedSharding(dst, P("fsdp", "tensor")), 2)
    np.testing.assert_array_equal(np.asarray(k), np.asarray(model.layers[0].q.kernel[...]))
    ids = np.arange(3, 40)[None]
    np.testing.assert_allclose(np.asarray(lkv_jax.forward(restored, ids)), np.asarray(lkv_jax.forward(model, ids)),
                               atol=1e-5)


def test_mesh_errors_name_axis_and_sizes(model):
    with pytest.raises(MeshError, match=r"'tensor' of size 8 does not divide num_key_value_heads=4"):
        check_mesh(make_mesh((1, 1, 8)), CFG)
    with pytest.raises(MeshError, match=r"'data' of size 8 does not divide batch size=6"):
        check_mesh(make_mesh((8, 1, 1)), CFG, batch=6)
    with pytest.raises(MeshError, match="needs 16 devices"):
        make_mesh((4, 2, 2))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
@pytest.mark.parametrize("press_name", [None, "snapkv"])
def test_generate_on_a_mesh_equals_single_device(model, shape, press_name):
    rs = np.random.RandomState(7)
    ids = rs.randint(3, 128, size=(8, 40))
    mask = np.ones_like(ids)
    mask[2, :9] = 0  # a left-padded row
    press = None if press_name is None else lkv_jax.presses.SnapKVPress(budget=16, window_size=4)
    want = lkv_jax.generate(model, ids, 6, press, attention_mask=mask, eos_token_id=5)
    mesh = make_mesh(shape)
    got = lkv_jax.generate(shard_model(model, mesh), ids, 6, press, attention_mask=mask, eos_token_id=5, mesh=mesh)
    chex.assert_trees_all_equal(got, want)


@pytest.mark.parametrize("scorer", ["snapkv", "lookaheadkv"])
def test_decoding_time_eviction_on_a_mesh_equals_single_device(model, scorer):
    rs = np.random.RandomState(3)
    ids = rs.randint(3, 128, size=(4, 24))
    mask = np.ones_like(ids)
    mask[1, :7] = 0  # a shorter row: it evicts later than the others
    press = (lkv_jax.presses.SnapKVPress(window_size=4) if scorer == "snapkv" else
             lkv_jax.presses.LookaheadKVPress(init_adapter(CFG, jax.random.key(0), n_lookahead=4)))
    dp = lkv_jax.DecodingPress(press, budget=24, interval=6, keep_recent=2)
    want = lkv_jax.generate(model, ids, 20, attention_mask=mask, eos_token_id=(), decoding_press=dp)
    mesh = make_mesh((2, 2, 2))
    got = lkv_jax.generate(shard_model(model, mesh), ids, 20, attention_mask=mask, eos_token_id=(),
                           decoding_press=dp, mesh=mesh)
    chex.assert_trees_all_equal(got, want)


def test_prefill_and_decode_on_a_mesh_have_the_declared_shardings(model):
    mesh = make_mesh((2, 2, 2))
    sharded = shard_model(model, mesh)
    ids = np.random.RandomState(8).randint(3, 128, size=(4, 24))
    cache, logits = lkv_jax.prefill(sharded, ids, mesh=mesh, extra_capacity=4)
    for k in cache.keys:
        assert k.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "tensor", None, None)), 4)
    assert logits.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None)), 2)
    ref_cache, ref_logits = lkv_jax.prefill(model, ids, extra_capacity=4)
    host = lambda tree: jax.tree.map(np.asarray, tree)
    chex.assert_trees_all_close(host((cache, logits)), host((ref_cache, ref_logits)), atol=1e-5, rtol=0)
    graphdef, params = nnx.split(sharded)
    loop = jitted_greedy_loop(graphdef, params, mesh, max_new_tokens=5, eos=(), pad=0)
    tokens, n = loop(params, cache, logits)
    assert tokens.shape == (4, 5) and int(n) == 5
    assert tokens.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None)), 2)
    want = lkv_jax.generate(model, ids, 5, eos_token_id=())
    chex.assert_trees_all_equal(np.asarray(tokens), want)
    got = lkv_jax.generate_from_cache(sharded, cache, logits, 5, eos_token_id=(), mesh=mesh)
    chex.assert_trees_all_equal(got, want)
    # one decoding step on the mesh
    step_logits, step_cache = lkv_jax.inference.decode(sharded, cache, want[:, 0], mesh=mesh)
    ref_step_logits, _ = lkv_jax.inference.decode(model, ref_cache, want[:, 0])
    assert step_cache.keys[0].sharding.is_equivalent_to(NamedSharding(mesh, P("data", "tensor", None, None)), 4)
    chex.assert_trees_all_close(np.asarray(step_logits), np.asarray(ref_step_logits), atol=1e-5, rtol=0)


def test_prefill_and_generate_compile_once_per_shape(model, monkeypatch):
    """The same shapes with other values reuse the compiled entry point (one trace each)."""
    from lkv_jax import decoding, inference

    monkeypatch.setattr(inference, "prefill_pure", chex.assert_max_traces(inference.prefill_pure, n=2))
    monkeypatch.setattr(decoding, "greedy_loop_pure", chex.assert_max_traces(decoding.greedy_loop_pure, n=1))
    rs = np.random.RandomState(9)
    shape = (3, 29)  # a shape no other test uses, so the first call traces
    for _ in range(2):
        lkv_jax.prefill(model, rs.randint(3, 128, size=shape))
    for _ in range(2):  # generate traces prefill once more (room for the new tokens) and the loop once
        lkv_jax.generate(model, rs.randint(3, 128, size=shape), 4, eos_token_id=())
