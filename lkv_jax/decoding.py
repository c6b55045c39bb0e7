"""Greedy decoding: from any cache (full, compressed, or with a question appended), and from a prompt with
its full cache. Presses that decode (SpecKV's draft) and label generation use it; `lkv_jax.generate`
adds the optional eviction in front."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lkv_jax.cache import KVCache
from lkv_jax.distributed import fetch_to_host
from lkv_jax.inference import DEFAULT_CHUNK, append_pure, prefill
from lkv_jax.models.transformer import Transformer
from lkv_jax.sharding import batch_sharding, cache_shardings, entry_mesh, entry_point, param_shardings


def greedy_loop_pure(model: Transformer, cache: KVCache, first_logits, *, max_new_tokens: int,
                     eos: tuple[int, ...], pad: int, return_cache: bool = False, step=None, state=None):
    """Greedy decoding inside one while loop (pure, jittable). first_logits float32 [B, V]; the cache needs
    room for max_new_tokens - 1 more entries. Returns (tokens int32 [B, max_new_tokens] with pad after
    each row's EOS and after the last step, n: how many columns were produced), plus the cache after
    the last step with return_cache.

    step(cache, state, tok int32 [B]) -> (logits float32 [B, V], cache, state): one decoding step, carrying
    `state` beside the cache (default: append the token; decoding-time eviction appends per row and evicts)."""
    if step is None:
        def step(cache, state, tok):
            g = append_pure(model, cache, model.embed_tokens(tok[:, None]))
            return g.logits[:, 0], g.cache, state

    B = first_logits.shape[0]
    eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)
    tok = jnp.argmax(first_logits, -1).astype(jnp.int32)
    out = jnp.full((B, max_new_tokens), pad, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, eos_ids)

    def cond(s):
        i, _, _, _, _, done = s
        return (i < max_new_tokens) & ~done.all()

    def body(s):
        i, tok, cache, state, out, done = s
        logits, cache, state = step(cache, state, tok)
        nxt = jnp.where(done, pad, jnp.argmax(logits, -1).astype(jnp.int32))
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
        return i + 1, nxt, cache, state, out, done | jnp.isin(nxt, eos_ids)

    n, _, cache, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, cache, state, out, done))
    return (out, n, cache) if return_cache else (out, n)


def jitted_greedy_loop(graphdef, params, mesh: Mesh, *, max_new_tokens: int, eos: tuple[int, ...], pad: int,
                       donate_cache: bool = False):
    """The jitted `greedy_loop_pure` of one model structure on `mesh` (built once, cached): `fn(params,
    cache, first_logits) -> (tokens [B, max_new_tokens] over data, n replicated)`, and with donate_cache
    also the final cache, which XLA aliases to the donated input: the while loop then updates the caller's
    buffers in place instead of first copying the whole cache (1.5 GB at batch 8 x 4K tokens on
    SmolLM2-135M) and holding two of them."""
    def build():
        def greedy_loop(params, cache, first_logits):
            return greedy_loop_pure(nnx.merge(graphdef, params), cache, first_logits, max_new_tokens=max_new_tokens,
                                    eos=eos, pad=pad, return_cache=donate_cache)

        b2, c_sh = batch_sharding(mesh, 2), cache_shardings(mesh, len(params["layers"]))
        out = (b2, NamedSharding(mesh, P())) + ((c_sh,) if donate_cache else ())
        return jax.jit(greedy_loop, in_shardings=(param_shardings(mesh, params), c_sh, b2), out_shardings=out,
                       donate_argnums=(1,) if donate_cache else ())

    return entry_point(("greedy", graphdef, mesh, max_new_tokens, eos, pad, donate_cache), build)


def decoding_ids(config, eos_token_id=None, pad_token_id=None) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id) of a generate call: the arguments, else the model config's, else EOS for pad."""
    eos = config.eos_token_id if eos_token_id is None else (
        (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (
        config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0))
    return tuple(int(e) for e in eos), int(pad)


def greedy_generate(model: Transformer, input_ids, max_new_tokens: int, *, attention_mask=None,
                    eos_token_id: int | tuple[int, ...] | None = None, pad_token_id: int | None = None,
                    chunk_size: int = DEFAULT_CHUNK, mesh: Mesh | None = None) -> np.ndarray:
    """Greedy decoding of a left-padded batch from its full cache: `lkv_jax.generate` without a press.
    input_ids int [B, T]; returns the new tokens int [B, n], n <= max_new_tokens."""
    check_generation_length(model, input_ids, attention_mask, max_new_tokens)
    # the first new token comes from the prompt's logits: the cache needs room for the other n - 1 only
    cache, logits = prefill(model, input_ids, attention_mask, chunk_size=chunk_size,
                            extra_capacity=max_new_tokens - 1, mesh=mesh)
    # the cache is this call's own: decode into it in place
    return generate_from_cache(model, cache, logits, max_new_tokens, eos_token_id=eos_token_id,
                               pad_token_id=pad_token_id, donate_cache=True, mesh=mesh)


def check_generation_length(model: Transformer, input_ids, attention_mask, max_new_tokens: int) -> None:
    """Refuse a generate call before anything is allocated: decoding continues right after each row's
    prompt, so the longest prompt plus max_new_tokens must fit the model's positions."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    model.config.check_length(_longest_prompt(input_ids, attention_mask) + max_new_tokens)


def _longest_prompt(input_ids, attention_mask) -> int:
    """Real tokens in the longest row of a (left-padded) prompt batch."""
    ids = np.asarray(input_ids)
    if attention_mask is None:
        return int(ids.shape[-1])
    return int(np.asarray(attention_mask).astype(bool).reshape(-1, ids.shape[-1]).sum(-1).max())


def generate_from_cache(model: Transformer, cache: KVCache, first_logits, max_new_tokens: int, *,
                        eos_token_id: int | tuple[int, ...] | None = None,
                        pad_token_id: int | None = None, donate_cache: bool = False,
                        mesh: Mesh | None = None) -> np.ndarray:
    """Greedy decoding from any cache (full, compressed, or with a question appended).

    first_logits float32 [B, V] give the first new token; the cache needs room for max_new_tokens - 1
    more entries. Returns int [B, n], n <= max_new_tokens, as `generate`.
    donate_cache=True decodes into the cache's own buffers (no copy of the whole cache first, half
    the peak memory); the cache must not be used again (its arrays are deleted once a step has run).
    With a `mesh` the loop runs over it, the cache laid out per `cache_specs`.
    """
    if max_new_tokens == 1:
        # no decoding step: the loop would only copy the (undonated) cache into its carry
        return fetch_to_host(jnp.argmax(first_logits, -1).astype(jnp.int32))[:, None]
    mesh = entry_mesh(model, mesh, batch=first_logits.shape[0])
    eos, pad = decoding_ids(model.config, eos_token_id, pad_token_id)
    graphdef, params = nnx.split(model)
    fn = jitted_greedy_loop(graphdef, params, mesh, max_new_tokens=max_new_tokens, eos=eos, pad=pad,
                            donate_cache=donate_cache)
    tokens, n = fn(params, _distinct_buffers(cache) if donate_cache else cache, first_logits)[:2]
    tokens, n = fetch_to_host((tokens, n))
    return tokens[:, : int(n)]


def _distinct_buffers(cache: KVCache) -> KVCache:
    """The cache with no array appearing twice (a buffer cannot be donated twice in one call): a repeat,
    e.g. one positions array shared by every layer, is copied."""
    seen: set[int] = set()

    def once(x):
        if id(x) in seen:
            return jnp.copy(x)
        seen.add(id(x))
        return x

    return jax.tree.map(once, cache)
