"""Eviction overhead of every press, as a percentage of plain prefill time, on the benchmark model.

    python experiments/bench_presses.py                  # 4K and 16K tokens (the issue's setting)
    python experiments/bench_presses.py --quick          # 512 and 1K tokens, two repeats (minutes on a shared CPU)
    python experiments/bench_presses.py --presses snapkv,tova --lengths 8192 --budget 256

Model: Llama, 8 layers, hidden 512, 8 heads, 2 KV heads, float32, random init, built with lkv_jax directly
(SpecKV's draft: the same shape with 2 layers). For each prompt length: the median time of the jitted plain
prefill (last-token logits) and, per press, of the whole `press.compress` (prefill + scoring + eviction;
SpecKV includes its draft generation, LAQ its pseudo-token decoding), best of --repeats runs with the
prefill and the press run alternately (the machine's load hits both alike); overhead = press / prefill - 1.
Beside it, what a user sees: time to first token through `lkv_jax.generate(model, ids, max_new_tokens=1,
press=...)` against the same call without a press (both timed in the same round-robin), and the TTFT
overhead = TTFT(press) / TTFT(no press) - 1.

With --kvpress, NVIDIA kvpress side by side on the same weights (`bench_kvpress.py`: its own venv
.venv-kvpress, created on first use; SnapKV, StreamingLLM, TOVA, Knorm, ObservedAttention), written to
OUT with the suffix .kvpress.json. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_timing import best_interleaved, profile_calls, time_runs  # noqa: E402

import lkv_jax  # noqa: E402
from lkv_jax.compression import compress_prompt  # noqa: E402
from lkv_jax.config import ModelConfig  # noqa: E402
from lkv_jax.inference import jitted_prefill, prepare_prompt  # noqa: E402
from lkv_jax.models.transformer import Transformer  # noqa: E402
from lkv_jax.presses import make_press  # noqa: E402
from lkv_jax.sharding import resolve_mesh  # noqa: E402

DEFAULT_PRESSES = ("streamingllm", "knorm", "random", "tova", "snapkv", "snapkv-paper", "pyramidkv",
                   "observed-attention", "expected-attention", "adakv-snapkv", "laq", "speckv")


def bench_config(n_layers: int = 8, vocab: int = 32000) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_hidden_layers=n_layers,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=32768,
                       eos_token_id=(2,))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--presses", default=",".join(DEFAULT_PRESSES), help="comma-separated registered names")
    ap.add_argument("--budget", type=int, default=128, help="entries kept per layer and KV head")
    ap.add_argument("--quick", action="store_true", help="512 and 1K tokens, two repeats")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk size")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--n-draft-tokens", type=int, default=32, help="SpecKV draft length")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="write a jax.profiler trace of one more call of each measured function to DIR")
    ap.add_argument("--out", default="runs/bench_presses.json")
    ap.add_argument("--kvpress", action="store_true",
                    help="also time NVIDIA kvpress on the same weights (bench_kvpress.py; creates .venv-kvpress)")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats = [512, 1024], 2
    dtype = jnp.dtype(args.dtype)
    model = Transformer(bench_config(), dtype=dtype, rngs=nnx.Rngs(0))
    names = [n.strip() for n in args.presses.split(",") if n.strip()]
    draft = Transformer(bench_config(n_layers=2), dtype=dtype, rngs=nnx.Rngs(1)) if "speckv" in names else None
    graphdef, params = nnx.split(model)
    print(f"backend {jax.default_backend()}, model 8 layers / hidden 512 / 8 heads / 2 KV heads, {args.dtype}, "
          f"budget {args.budget}", flush=True)
    rows = []
    for T in args.lengths:
        ids = np.random.RandomState(T).randint(3, 32000, size=(1, T))
        prompt = prepare_prompt(ids, None, args.chunk, model.config.vocab_size)

        def prefill(prompt=prompt):
            fn = jitted_prefill(graphdef, params, resolve_mesh(None), chunk=prompt.chunk,
                                capacity=prompt.ids.shape[1])
            cache, logits = fn(params, prompt.ids, prompt.valid, prompt.positions)
            jax.block_until_ready(logits)

        def first_token(press=None, ids=ids):
            return lkv_jax.generate(model, ids, max_new_tokens=1, press=press)

        t_prefill = time_runs(prefill, args.repeats, reduce=min)
        print(f"T={T:6d}  prefill {t_prefill * 1e3:9.1f} ms", flush=True)
        traced = {f"prefill T={T}": prefill, f"generate T={T}": first_token}
        for name in names:
            kw = {"draft_model": draft, "n_draft_tokens": args.n_draft_tokens} if name == "speckv" else {}
            press = make_press(name, budget=args.budget, **kw)

            def run(press=press, prompt=prompt):
                out = compress_prompt(model, prompt, press)
                jax.block_until_ready(out.cache.keys)

            fns = {"prefill": prefill, "press": run, "ttft": first_token,
                   "ttft_press": lambda press=press: first_token(press)}
            best = best_interleaved(fns, args.repeats)
            tp, t = best["prefill"], best["press"]
            row = dict(tokens=T, press=name, prefill_s=tp, press_s=t, overhead_pct=100 * (t / tp - 1),
                       ttft_s=best["ttft"], ttft_press_s=best["ttft_press"],
                       ttft_overhead_pct=100 * (best["ttft_press"] / best["ttft"] - 1))
            rows.append(row)
            traced.update({f"compress {name} T={T}": run, f"generate {name} T={T}": fns["ttft_press"]})
            print(f"T={T:6d}  {name:22s} {t * 1e3:9.1f} ms  overhead {row['overhead_pct']:7.2f} %  "
                  f"TTFT {row['ttft_press_s'] * 1e3:9.1f} ms vs {row['ttft_s'] * 1e3:9.1f} ms: "
                  f"{row['ttft_overhead_pct']:7.2f} %", flush=True)
        if args.profile:
            profile_calls(traced, args.profile)
    print("\n| tokens | press | prefill ms | prefill + evict ms | overhead % | TTFT no press ms | TTFT press ms "
          "| TTFT overhead % |")
    print("|---|---|---|---|---|---|---|---|")
    fmt = lambda r, k, scale=1e3: "-" if r.get(k) is None else f"{r[k] * scale:.1f}"
    for r in rows:
        print(f"| {r['tokens']} | {r['press']} | {r['prefill_s'] * 1e3:.1f} | {r['press_s'] * 1e3:.1f} | "
              f"{r['overhead_pct']:.2f} | {fmt(r, 'ttft_s')} | {fmt(r, 'ttft_press_s')} | "
              f"{fmt(r, 'ttft_overhead_pct', 1):s} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(backend=jax.default_backend(), devices=[str(d) for d in jax.devices()], dtype=args.dtype,
                budget=args.budget, chunk=args.chunk, repeats=args.repeats, n_draft_tokens=args.n_draft_tokens)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {out}")
    if args.kvpress:
        import bench_kvpress

        both = [n for n in names if n in bench_kvpress.PRESSES]
        bench_kvpress.run(args.lengths, both, budget=args.budget, repeats=args.repeats,
                          out=out.with_suffix(".kvpress.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
