"""Suffix attention: the jnp reference against brute-force numpy, the Pallas kernels (interpreted on
CPU, both the TPU and the GPU driver) against the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import INTERPRET, PALLAS_COMPILED, skip_unless_runnable
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.suffix_attention import suffix_attention
from pallas_kernels.suffix_attention.kernel import gpu_split
from pallas_kernels.suffix_attention.reference import suffix_attention_reference


def make_case(seed, *, B=2, L=8, K=2, G=2, S=200, H=32, dtype=jnp.float32, evicted=False):
    """A cache per (b, k): a prefix of ragged length with random holes (and, if evicted, a random
    subset of positions per KV head), then the suffix's own L keys (positions P_b + l), then empty
    slots. q_pos = P_b + arange(L), so causality inside the suffix matters."""
    rng = np.random.default_rng(seed)
    N = K * G
    q = rng.normal(size=(B, L, N, H)) * 1.5
    keys = rng.normal(size=(B, K, S, H))
    values = rng.normal(size=(B, K, S, H))
    key_pos = np.full((B, K, S), -1, np.int32)
    key_valid = np.zeros((B, K, S), bool)
    q_pos = np.zeros((B, L), np.int32)
    for b in range(B):
        n_pre = int(rng.integers(max(1, (S - L) // 2), S - L + 1))
        P = 2 * n_pre if evicted else n_pre
        for k in range(K):
            pre = np.sort(rng.choice(P, n_pre, replace=False)) if evicted else np.arange(n_pre)
            key_pos[b, k, :n_pre] = pre
            key_valid[b, k, :n_pre] = rng.random(n_pre) > 0.15
            key_pos[b, k, n_pre:n_pre + L] = P + np.arange(L)
            key_valid[b, k, n_pre:n_pre + L] = True
        q_pos[b] = P + np.arange(L)
    score_mask = rng.random((B, L)) > 0.3
    score_mask[:, -1] = True
    cast = lambda a: jnp.asarray(a, dtype)
    return (cast(q), jnp.asarray(q_pos), cast(keys), cast(values), jnp.asarray(key_pos), jnp.asarray(key_valid),
            jnp.asarray(score_mask))


def brute_force(q, q_pos, keys, values, key_pos, key_valid, score_mask, reduce):
    """Loop over every (b, l, n) in float64 numpy."""
    q, keys, values = (np.asarray(a, np.float64) for a in (q, keys, values))
    q_pos, key_pos, key_valid, score_mask = map(np.asarray, (q_pos, key_pos, key_valid, score_mask))
    B, L, N, H = q.shape
    K, S = keys.shape[1:3]
    G = N // K
    out = np.zeros((B, L, N, H))
    probs = np.zeros((B, L, N, S))
    for b in range(B):
        for l in range(L):
            for n in range(N):
                k = n // G
                vis = key_valid[b, k] & (key_pos[b, k] <= q_pos[b, l])
                if not vis.any():
                    continue
                s = keys[b, k] @ q[b, l, n] / np.sqrt(H)
                e = np.where(vis, np.exp(s - s[vis].max()), 0.0)
                p = e / e.sum()
                probs[b, l, n] = p
                out[b, l, n] = p @ values[b, k]
    scores = np.zeros((B, K, S))
    for b in range(B):
        for k in range(K):
            rows = probs[b][score_mask[b]][:, k * G:(k + 1) * G]  # [l', G, S]
            if rows.size:
                scores[b, k] = rows.mean((0, 1)) if reduce == "mean" else rows.max((0, 1))
    return out, scores


@pytest.mark.parametrize("reduce", ["mean", "max"])
@pytest.mark.parametrize("evicted", [False, True])
def test_reference_matches_brute_force(reduce, evicted):
    args = make_case(1, B=2, L=5, K=2, G=2, S=23, H=8, evicted=evicted)
    out, scores = suffix_attention_reference(*args, reduce)
    want_out, want_scores = brute_force(*args, reduce)
    np.testing.assert_allclose(np.asarray(out), want_out, atol=1e-5)
    np.testing.assert_allclose(np.asarray(scores), want_scores, atol=1e-6)
    assert np.asarray(scores)[~np.asarray(args[5])].max() == 0.0  # invalid keys score 0
    if reduce == "mean":  # each counted query's probabilities sum to one, so do the mean scores
        np.testing.assert_allclose(np.asarray(scores).sum(-1), 1.0, atol=1e-5)


def test_reference_row_without_visible_keys_gives_zeros():
    q, q_pos, keys, values, key_pos, key_valid, score_mask = make_case(2, B=1, L=3, S=16, H=8)
    q_pos = q_pos.at[0, 0].set(-5)  # sees nothing
    out, _ = suffix_attention_reference(q, q_pos, keys, values, key_pos, key_valid, score_mask, "mean")
    assert np.isfinite(np.asarray(out)).all()
    assert np.abs(np.asarray(out)[0, 0]).max() == 0.0


TOL = {jnp.float32: dict(out=2e-5, score_atol=1e-6, score_rtol=1e-4),
       jnp.bfloat16: dict(out=2e-2, score_atol=2e-4, score_rtol=2e-2)}

CASES = [  # dtype, G, L, S, target, block_s, reduce, evicted
    (jnp.float32, 1, 1, 200, "tpu", 128, "mean", False),
    (jnp.float32, 2, 8, 300, "gpu", 32, "max", True),
    (jnp.float32, 4, 32, 130, "tpu", 128, "mean", True),
    (jnp.float32, 4, 64, 200, "tpu", 128, "max", False),
    (jnp.float32, 4, 64, 150, "gpu", 32, "max", True),  # 256 rows: two GPU row blocks
    (jnp.float32, 1, 32, 150, "gpu", 16, "mean", False),
    (jnp.bfloat16, 4, 64, 257, "gpu", 64, "mean", False),
    (jnp.bfloat16, 2, 32, 384, "tpu", 128, "max", True),
    (jnp.bfloat16, 1, 8, 100, "tpu", 128, "max", False),
    (jnp.bfloat16, 2, 1, 90, "gpu", 32, "mean", True),
]


@pytest.mark.parametrize("dtype,G,L,S,target,block_s,reduce,evicted", CASES)
def test_kernel_matches_reference(dtype, G, L, S, target, block_s, reduce, evicted):
    skip_unless_runnable(target)
    args = make_case(3, L=L, G=G, S=S, dtype=dtype, evicted=evicted)
    q, q_pos, keys, values, key_pos, key_valid, score_mask = args
    out, scores = suffix_attention(q, q_pos, keys, values, key_pos, key_valid, score_mask=score_mask, reduce=reduce,
                                   implementation="pallas", interpret=INTERPRET, block_s=block_s, target=target)
    want_out, want_scores = suffix_attention_reference(*args, reduce)
    assert out.dtype == dtype and out.shape == q.shape
    assert scores.dtype == jnp.float32 and scores.shape == key_pos.shape
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32), atol=tol["out"],
                               rtol=tol["out"])
    np.testing.assert_allclose(np.asarray(scores), np.asarray(want_scores), atol=tol["score_atol"],
                               rtol=tol["score_rtol"])
    assert np.asarray(scores)[~np.asarray(key_valid)].max() == 0.0


def test_kernel_under_tpu_memory_simulation():
    """pltpu.InterpretParams simulates TPU memory and raises on out-of-bounds block reads."""
    skip_unless_runnable(interpreter_only=True)
    args = make_case(4, B=1, L=4, K=2, G=2, S=200, H=32)
    out, scores = suffix_attention(*args[:6], score_mask=args[6], implementation="pallas",
                                   interpret=pltpu.InterpretParams(), block_s=128)
    want_out, want_scores = brute_force(*args, "mean")
    np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-5)
    np.testing.assert_allclose(np.asarray(scores), want_scores, atol=1e-6)


def test_kernel_inside_shard_map_over_batch_and_kv_heads():
    """The sharding convention: Pallas calls inside `jax.shard_map` over B ("data") and K ("tensor")."""
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    if jax.device_count() < 8:
        pytest.skip(f"needs 8 devices (the CPU tests fake them), {jax.device_count()} here")

    args = make_case(8, B=2, L=4, K=4, G=2, S=200, H=32)
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
    bk, bkh, b_ = P("data", "tensor", None), P("data", "tensor", None, None), P("data", None)
    qs = P("data", None, "tensor", None)

    def f(q, q_pos, keys, values, key_pos, key_valid, score_mask):
        return suffix_attention(q, q_pos, keys, values, key_pos, key_valid, score_mask=score_mask,
                                implementation="pallas", interpret=INTERPRET, block_s=128)

    g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(qs, b_, bkh, bkh, bk, bk, b_), out_specs=(qs, bk),
                              check_vma=False))
    out, scores = g(*args)
    want_out, want_scores = brute_force(*args, "mean")
    np.testing.assert_allclose(np.asarray(out), want_out, atol=2e-5)
    np.testing.assert_allclose(np.asarray(scores), want_scores, atol=1e-6)


def test_pallas_gradient_is_the_reference_gradient():
    args = make_case(5, B=1, L=4, K=2, G=2, S=40, H=8)
    q, q_pos, keys, values, key_pos, key_valid, score_mask = args
    probe = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 40)), jnp.float32)

    def loss(impl):
        def f(q, keys, values):
            out, scores = suffix_attention(q, q_pos, keys, values, key_pos, key_valid, score_mask=score_mask,
                                           implementation=impl, interpret=INTERPRET, block_s=128)
            return (out ** 2).sum() + (scores * probe).sum()
        return f

    got = jax.grad(loss("pallas"), argnums=(0, 1, 2))(q, keys, values)
    want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, keys, values)
    for g, w in zip(got, want, strict=True):
        assert np.abs(np.asarray(w)).max() > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)


def test_default_implementation_on_cpu_is_the_reference():
    if PALLAS_COMPILED:
        pytest.skip("on a GPU/TPU the default implementation is the kernel, tested above")
    args = make_case(6, B=1, L=3, S=20, H=8)
    out, scores = suffix_attention(*args[:6], score_mask=args[6], reduce="max")
    want_out, want_scores = brute_force(*args, "max")
    np.testing.assert_allclose(np.asarray(out), want_out, atol=1e-5)
    np.testing.assert_allclose(np.asarray(scores), want_scores, atol=1e-6)


LOWERED_AS = {"gpu": ("cuda", "__gpu$xla.gpu.triton"), "tpu": ("tpu", "tpu_custom_call")}


@pytest.mark.parametrize("target", ["gpu", "tpu"])
@pytest.mark.parametrize("L,N,K,H,S,reduce", [(32, 32, 8, 128, 8192, "mean"), (1, 8, 8, 64, 3000, "max"),
                                                  (128, 16, 4, 128, 2048, "max")])
def test_kernels_lower_for_the_hardware(target, L, N, K, H, S, reduce):
    """Cross-platform lowering on CPU runs Pallas' Triton / Mosaic TPU lowering, with their block-shape
    checks (powers of two for Triton; (8, 128)-divisible or full dims for TPU). Only the final
    hardware compile (ptxas / libtpu) is left untested without a device."""
    from pallas_kernels.suffix_attention.kernel import suffix_attention_pallas

    sds = jax.ShapeDtypeStruct
    args = (sds((2, L, N, H), jnp.bfloat16), sds((2, L), jnp.int32), sds((2, K, S, H), jnp.bfloat16),
            sds((2, K, S, H), jnp.bfloat16), sds((2, K, S), jnp.int32), sds((2, K, S), jnp.bool_),
            sds((2, L), jnp.bool_))
    platform, call = LOWERED_AS[target]
    f = jax.jit(lambda *a: suffix_attention_pallas(*a, reduce=reduce, target=target))
    text = f.trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert text.count(f"custom_call @{call}") == 2  # the two passes


def test_gpu_split_tiles_whole_blocks():
    for n_blocks, programs in [(1, 8), (128, 8), (512, 8), (513, 8), (2048, 8), (527, 8), (7, 1), (300, 64)]:
        n_split, n_inner = gpu_split(n_blocks, programs)
        assert n_split >= 1 and n_split * n_inner <= n_blocks
        assert n_blocks - n_split * n_inner < n_inner  # what is left over is less than one chunk
    assert gpu_split(512, 8) == (32, 16)  # a power-of-two cache: no tail at all


def test_bad_inputs_raise():
    q, q_pos, keys, values, key_pos, key_valid, score_mask = make_case(7, B=1, L=2, S=16, H=8)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        suffix_attention(q[:, :, :3], q_pos, keys, values, key_pos, key_valid)
    with pytest.raises(ValueError, match="key_valid must be bool"):
        suffix_attention(q, q_pos, keys, values, key_pos, key_valid.astype(jnp.int32))
    with pytest.raises(ValueError, match="reduce"):
        suffix_attention(q, q_pos, keys, values, key_pos, key_valid, reduce="sum")
    with pytest.raises(ValueError, match="implementation"):
        suffix_attention(q, q_pos, keys, values, key_pos, key_valid, implementation="cuda")
    with pytest.raises(ValueError, match="multiple of 128"):
        suffix_attention(q, q_pos, keys, values, key_pos, key_valid, implementation="pallas", interpret=INTERPRET,
                         block_s=100, target="tpu")
    with pytest.raises(ValueError, match="power of two"):
        suffix_attention(q, q_pos, keys, values, key_pos, key_valid, implementation="pallas", interpret=INTERPRET,
                         block_s=48, target="gpu")
    if not PALLAS_COMPILED:  # only a CPU refuses the compiled kernel
        with pytest.raises(ValueError, match="interpret=True"):
            suffix_attention(q, q_pos, keys, values, key_pos, key_valid, implementation="pallas")
