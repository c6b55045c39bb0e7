"""Benchmark of the eviction kernels: Pallas suffix attention and threshold-select against their XLA
references, and (--e2e) the end-to-end LookaheadKV-style eviction overhead as a % of prefill.

    python experiments/bench_kernel.py                  # S = 8K, 32K, 128K; L=32, N=32, K=8, H=128, bf16
    python experiments/bench_kernel.py --e2e            # + eviction overhead on a 4-layer Llama-3.1-8B shape at 32K
    python experiments/bench_kernel.py --quick --e2e    # ~1 min on CPU (Pallas interpreted: not a speed figure)
    python experiments/bench_kernel.py --e2e --skip-kernels --e2e-tokens 8192   # the e2e run alone, at 8K

Per S it times (median of --repeats after a warm-up, each under jit):
  attn  the suffix-attention reference (dense jnp, [B, K, G, L, S] float32 probabilities) vs the Pallas
        kernel (two passes over S blocks), with XLA's compiled temporary memory of each;
  select top-`budget` per KV head: XLA `lax.top_k` (select_slots, implementation "xla") vs the Pallas
        threshold-select.
--e2e: prefill (lkv_jax.inference.prefill) of a random lkv_jax model with Llama-3.1-8B layer shapes
(fewer layers), then the eviction step: a 32-token glimpse (scores over the cache) + top-k + gather, as
lkv_jax does it: the dense per-head glimpse (training path), LookaheadKVPress's inference path through
the score-and-evict op with implementation "xla" and "pallas", and the kernels with Pallas select.
On CPU the Pallas paths run in interpret mode (`interpret=True`), which measures correctness plumbing,
not speed. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_timing import time_runs  # noqa: E402

from pallas_kernels.suffix_attention import suffix_attention  # noqa: E402
from pallas_kernels.suffix_attention.reference import suffix_attention_reference  # noqa: E402
from pallas_kernels.topk_select import select_slots as pallas_select_slots  # noqa: E402


def timed_donating(fn, make_arg, repeats: int) -> float:
    """Like `time_runs` for fn(arg) with a donated argument: a fresh copy per run, made outside the clock
    (inside one jitted prefill + evict, XLA updates the cache in place the same way)."""
    jax.block_until_ready(fn(make_arg()))
    ts = []
    for _ in range(repeats):
        arg = jax.block_until_ready(make_arg())
        t0 = time.perf_counter()
        jax.block_until_ready(fn(arg))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def temp_bytes(jitted, *args) -> int | None:
    try:
        return int(jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes)
    except Exception:  # memory analysis is not available on every backend
        return None


def attention_inputs(S, L, N, K, H, dtype, seed=0):
    """A full cache of S slots: S - L prompt keys, then the suffix's own L keys (causal among them)."""
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (1, L, N, H), dtype)
    keys = jax.random.normal(ks[1], (1, K, S, H), dtype)
    values = jax.random.normal(ks[2], (1, K, S, H), dtype)
    key_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (1, K, S))
    key_valid = jnp.ones((1, K, S), bool)
    q_pos = (S - L + jnp.arange(L, dtype=jnp.int32))[None]
    return q, q_pos, keys, values, key_pos, key_valid, jnp.ones((1, L), bool)


def run_or_error(fn):
    """fn() or the error text (a kernel that fails to lower on some backend must not stop the table)."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def bench_attention(S, a, interpret, repeats):
    args = attention_inputs(S, a.L, a.N, a.K, a.H, jnp.bfloat16)
    ref = jax.jit(lambda *x: suffix_attention_reference(*x, "mean"))
    ker = jax.jit(lambda q, qp, k, v, kp, kv, sm: suffix_attention(q, qp, k, v, kp, kv, score_mask=sm,
                                                                   implementation="pallas", interpret=interpret))
    row = {"S": S}
    row["ref_s"], row["ref_error"] = run_or_error(lambda: time_runs(lambda: ref(*args), repeats))
    row["pallas_s"], row["pallas_error"] = run_or_error(lambda: time_runs(lambda: ker(*args), repeats))
    row["ref_temp_bytes"], row["pallas_temp_bytes"] = temp_bytes(ref, *args), temp_bytes(ker, *args)
    if row["ref_s"] and row["pallas_s"]:
        ro, rs = ref(*args)
        po, ps = ker(*args)
        row["max_abs_err_out"] = float(jnp.abs(ro.astype(jnp.float32) - po.astype(jnp.float32)).max())
        row["max_abs_err_scores"] = float(jnp.abs(rs - ps).max())
        row["speedup"] = row["ref_s"] / row["pallas_s"]
    return row


def bench_select(S, a, interpret, repeats):
    budget = min(a.budget, S // 2)
    scores = jax.random.uniform(jax.random.key(1), (1, a.K, S), jnp.float32)
    selectable = jnp.arange(S)[None, None] < S - a.L
    selectable = jnp.broadcast_to(selectable, scores.shape)
    protected = jnp.zeros_like(selectable)
    keep = jnp.full((1,), budget, jnp.int32)
    ref = jax.jit(lambda s: pallas_select_slots(s, selectable, protected, budget, keep))
    ker = jax.jit(lambda s: pallas_select_slots(s, selectable, protected, budget, keep, implementation="pallas",
                                                interpret=interpret))
    row = {"S": S, "budget": budget}
    row["topk_s"], row["topk_error"] = run_or_error(lambda: time_runs(lambda: ref(scores), repeats))
    row["pallas_s"], row["pallas_error"] = run_or_error(lambda: time_runs(lambda: ker(scores), repeats))
    if row["topk_s"] and row["pallas_s"]:
        (rs, rk), (ps, pk) = ref(scores), ker(scores)
        row["same_slots"] = bool((rs == ps).all() and (rk == pk).all())
        row["speedup"] = row["topk_s"] / row["pallas_s"]
    return row


# ----------------------------------------------------------------------------------------------
# end to end


def llama_config(quick: bool, n_layers: int):
    from lkv_jax.config import ModelConfig, RopeConfig

    if quick:
        return ModelConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    return ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=n_layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                       rope=RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0),
                       max_position_embeddings=131072)


def evict_lkv(model, cache, x, n_kept, implementation=None, interpret=False):
    """lkv_jax's eviction: glimpse + lax.top_k + gather. implementation=None: the dense per-query-head
    glimpse (the training path); "xla" / "pallas": the LookaheadKVPress inference path, the glimpse
    writing the suffix into the cache and scoring through the score-and-evict op."""
    from lkv_jax.eviction import compact_cache
    from lkv_jax.inference import KVHeadScores, append_pure, glimpse_pure

    cfg = model.config
    B = x.shape[0]
    if implementation is None:
        out = glimpse_pure(model, cache, x, logits=False)
    else:
        out = append_pure(model, cache, x, KVHeadScores("mean", implementation, interpret), logits=False)
    keep = jnp.full((B,), n_kept, jnp.int32)
    slots, kept = [], []
    for l, sc in enumerate(out.scores):
        s = sc if implementation is not None else sc.reshape(B, cfg.num_key_value_heads, cfg.n_groups, -1).mean(2)
        sl, kp = pallas_select_slots(s, cache.valid[l], jnp.zeros_like(cache.valid[l]), n_kept, keep)
        slots.append(sl)
        kept.append(kp)
    return compact_cache(cache, slots, kept)[0]


def evict_kernels(model, cache, x, n_kept, *, interpret, select_impl):
    """The same eviction with the suffix-attention kernel (suffix written into the cache's spare slots)
    and `select_impl` ("xla" top_k or "pallas" threshold-select) + gather."""
    from lkv_jax.cache import write_entries
    from lkv_jax.eviction import compact_cache

    B, L, _ = x.shape
    positions = cache.next_position[:, None] + jnp.arange(L)[None]
    keep = jnp.full((B,), n_kept, jnp.int32)
    slots, kept = [], []
    for l, layer in enumerate(model.layers):
        q, k, v = layer.qkv(x, positions, model.inv_freq)
        keys, values, pos, val = write_entries(cache.keys[l], cache.values[l], cache.positions[l], cache.valid[l],
                                               cache.cursor[l], k, v, positions, jnp.ones((B, L), bool))
        out, sc = suffix_attention(q, positions, keys, values, pos, val, implementation="pallas",
                                   interpret=interpret)
        x = layer.finish(x, out)
        sl, kp = pallas_select_slots(sc, cache.valid[l], jnp.zeros_like(cache.valid[l]), n_kept, keep,
                                     implementation=select_impl, interpret=interpret)
        slots.append(sl)
        kept.append(kp)
    return compact_cache(cache, slots, kept)[0]


def bench_e2e(a, interpret, repeats):
    from flax import nnx

    from lkv_jax.inference import prefill
    from lkv_jax.models.transformer import Transformer

    cfg = llama_config(a.quick, a.layers)
    model = Transformer(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    T = a.e2e_tokens
    ids = np.asarray(jax.random.randint(jax.random.key(2), (1, T), 0, cfg.vocab_size))
    prefill_s = time_runs(lambda: prefill(model, ids, extra_capacity=a.L)[0].keys[0], repeats)
    cache, _ = prefill(model, ids, extra_capacity=a.L)
    x = model.embed_tokens(jnp.asarray(ids[:, -a.L:]))  # stands in for the 32 lookahead embeddings
    n_kept = min(a.budget, T // 2)
    graphdef, params = nnx.split(model)
    variants = {
        "lkv_glimpse+topk": lambda m, c, x: evict_lkv(m, c, x, n_kept),
        "press_path[xla]+topk": lambda m, c, x: evict_lkv(m, c, x, n_kept, implementation="xla"),
        "press_path[pallas]+topk": lambda m, c, x: evict_lkv(m, c, x, n_kept, implementation="pallas",
                                                             interpret=interpret),
        "kernel+topk": lambda m, c, x: evict_kernels(m, c, x, n_kept, interpret=interpret, select_impl="xla"),
        "kernel+pallas_select": lambda m, c, x: evict_kernels(m, c, x, n_kept, interpret=interpret,
                                                              select_impl="pallas"),
    }
    res = {"config": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
                      "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "tokens": T,
                      "suffix": a.L, "budget": n_kept},
           "prefill_s": prefill_s, "evict": {}}
    kept_positions = {}
    copy_cache = jax.jit(lambda c: jax.tree.map(jnp.copy, c))
    for name, fn in variants.items():
        # the cache is donated: writing the suffix into it must not copy the whole cache per layer
        jf = jax.jit(lambda p, c, x, fn=fn: fn(nnx.merge(graphdef, p), c, x), donate_argnums=1)
        t, err = run_or_error(lambda jf=jf: timed_donating(lambda c: jf(params, c, x).positions[0],
                                                           lambda: copy_cache(cache), repeats))
        res["evict"][name] = {"s": t, "error": err, "pct_of_prefill": None if t is None else 100 * t / prefill_s}
        if t is not None:
            kept_positions[name] = np.asarray(jf(params, copy_cache(cache), x).positions[0])
    base = kept_positions.get("lkv_glimpse+topk")
    for name, p in kept_positions.items():  # bf16 score differences may flip near-ties: report the overlap
        if base is not None:
            same = [len(np.intersect1d(a_, b_)) / max(len(a_[a_ >= 0]), 1)
                    for a_, b_ in zip(base.reshape(-1, base.shape[-1]), p.reshape(-1, p.shape[-1]), strict=True)]
            res["evict"][name]["kept_overlap_with_lkv"] = float(np.mean(same))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, ~1 minute on a CPU")
    ap.add_argument("--e2e", action="store_true", help="also the end-to-end eviction overhead vs prefill")
    ap.add_argument("--sizes", type=int, nargs="*", help="cache lengths S (default 8K 32K 128K; quick 1K 4K)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--layers", type=int, default=4, help="layers of the e2e Llama-3.1-8B-shaped model")
    ap.add_argument("--e2e-tokens", type=int, default=None, help="prompt tokens of the e2e run (default 32K)")
    ap.add_argument("--budget", type=int, default=2048, help="entries kept per layer and KV head")
    ap.add_argument("--skip-kernels", action="store_true",
                    help="only the --e2e run (not the per-S kernel sweep): e.g. one e2e length per call")
    ap.add_argument("--out", default="experiments/results/bench_kernel.json")
    a = ap.parse_args(argv)
    backend = jax.default_backend()
    interpret = backend not in ("gpu", "tpu")
    a.L, a.N, a.K, a.H = 32, 32, 8, 128
    sizes = a.sizes or ([1024, 4096] if a.quick else [8192, 32768, 131072])
    repeats = a.repeats or (2 if a.quick or interpret else 10)
    if a.e2e_tokens is None:
        a.e2e_tokens = 1024 if a.quick else 32768
    if a.quick:
        a.budget = min(a.budget, 256)
    if interpret and not a.quick:
        print("warning: no GPU/TPU, the Pallas kernels run interpreted: this will be slow (try --quick)")
    device = str(jax.devices()[0].device_kind)
    print(f"backend {backend} ({device}), pallas {'interpreted' if interpret else 'compiled'}, repeats {repeats}")

    results = {"backend": backend, "device": device, "interpret": interpret, "quick": a.quick,
               "shapes": {"B": 1, "L": a.L, "N": a.N, "K": a.K, "H": a.H, "dtype": "bfloat16"},
               "attention": [], "select": []}
    print(f"\n{'S':>7} | {'attn ref ms':>11} {'pallas ms':>10} {'speedup':>7} {'ref tmp MB':>10} {'pal tmp MB':>10}"
          f" | {'top_k ms':>8} {'pallas ms':>9} {'speedup':>7} same")
    for S in [] if a.skip_kernels else sizes:
        r = bench_attention(S, a, interpret, repeats)
        s = bench_select(S, a, interpret, repeats)
        results["attention"].append(r)
        results["select"].append(s)
        ms = lambda v: f"{1e3 * v:.2f}" if v else "err"
        mb = lambda v: f"{v / 2 ** 20:.1f}" if v is not None else "?"
        print(f"{S:>7} | {ms(r['ref_s']):>11} {ms(r['pallas_s']):>10} {r.get('speedup', 0):>7.2f} "
              f"{mb(r['ref_temp_bytes']):>10} {mb(r['pallas_temp_bytes']):>10} | {ms(s['topk_s']):>8} "
              f"{ms(s['pallas_s']):>9} {s.get('speedup', 0):>7.2f} {s.get('same_slots', '?')}")
    if a.e2e:
        e = bench_e2e(a, interpret, repeats)
        results["e2e"] = e
        print(f"\ne2e: {e['config']}")
        print(f"prefill {1e3 * e['prefill_s']:.1f} ms")
        for name, v in e["evict"].items():
            if v["s"] is None:
                print(f"  {name:<22} error: {v['error']}")
            else:
                print(f"  {name:<22} {1e3 * v['s']:9.2f} ms  {v['pct_of_prefill']:6.2f}% of prefill  "
                      f"kept overlap with lkv {v.get('kept_overlap_with_lkv', float('nan')):.3f}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
