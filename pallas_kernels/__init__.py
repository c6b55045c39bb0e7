"""Pallas kernels, each beside its pure-jnp reference (the reference is the spec).

- `pallas_kernels.suffix_attention.suffix_attention`: a short query suffix over a long KV cache,
  returning the attention output and the per-key attention mass (the scoring step of SnapKV, TOVA,
  LookaheadKV, SpecKV, LAQ) without materialising [B, N, L, S].
- `pallas_kernels.topk_select.select_slots`: top-n cache slots per KV head by threshold cuts
  (a press's `implementation="pallas"` selects with it; `implementation=None` keeps `lax.top_k` until the
  kernel is measured faster on hardware).

Every op takes `implementation=None|"xla"|"pallas"` and `interpret=`; this package never imports lkv_jax.
"""
