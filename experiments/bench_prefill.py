"""Prefill throughput of lkv_jax against transformers (torch sdpa) on the same random weights, side by side.

    python experiments/bench_prefill.py                 # 1K, 4K, 16K tokens (the issue's setting)
    python experiments/bench_prefill.py --quick         # 512 and 1K, a minute on a laptop CPU

Model: Llama, 8 layers, hidden 512, 8 heads, 2 KV heads, float32. For each prompt length it reports
tokens/s of both (median of --repeats runs after a warm-up), the ratio lkv_jax / torch, and lkv_jax's
peak memory from XLA's compiled memory analysis of the jitted prefill (arguments + outputs + temporaries).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_timing import time_runs  # noqa: E402

import lkv_jax  # noqa: E402
from lkv_jax.inference import _prefill_jit, prepare_prompt  # noqa: E402


def build_models(vocab: int, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32768,
                                   attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = lkv_jax.load_hf(d, dtype="float32")
    return hf, ours


def peak_bytes(model, ids, chunk: int) -> tuple[int, int]:
    """(arguments + outputs + temporaries, temporaries) in bytes of the compiled prefill."""
    prompt = prepare_prompt(ids, None, chunk, model.config.vocab_size)
    graphdef, params = nnx.split(model)
    compiled = _prefill_jit.lower(graphdef, params, prompt.ids, prompt.valid, prompt.positions, chunk=prompt.chunk,
                                  capacity=prompt.ids.shape[1], all_logits=False).compile()
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return int(total), int(m.temp_size_in_bytes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--quick", action="store_true", help="lengths 512 and 1024, one repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=512, help="lkv_jax prefill chunk size")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    ap.add_argument("--out", default="runs/bench_prefill.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats = [512, 1024], 1
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    hf, ours = build_models(vocab=32000)
    rows = []
    for T in args.lengths:
        ids = np.random.RandomState(T).randint(0, 32000, size=(1, T))

        def run_ours(ids=ids):
            _, logits = lkv_jax.prefill(ours, ids, chunk_size=args.chunk)
            jax.block_until_ready(logits)

        def run_torch(ids=ids):
            with torch.no_grad():
                hf(torch.tensor(ids), use_cache=True, logits_to_keep=1)

        t_ours, t_torch = time_runs(run_ours, args.repeats), time_runs(run_torch, args.repeats)
        total, temp = peak_bytes(ours, ids, args.chunk)
        row = dict(tokens=T, lkv_jax_s=t_ours, torch_sdpa_s=t_torch, lkv_jax_tok_s=T / t_ours,
                   torch_tok_s=T / t_torch, ratio=t_torch / t_ours, lkv_jax_peak_bytes=total, lkv_jax_temp_bytes=temp)
        rows.append(row)
        print(f"T={T:6d}  lkv_jax {row['lkv_jax_tok_s']:9.0f} tok/s  torch-sdpa {row['torch_tok_s']:9.0f} tok/s  "
              f"ratio {row['ratio']:.2f}  lkv_jax peak {row['lkv_jax_peak_bytes'] / 2**20:8.1f} MiB", flush=True)
    print("\n| tokens | lkv_jax tok/s | torch sdpa tok/s | ratio (>1: lkv_jax faster) | peak MiB | temporaries MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['lkv_jax_tok_s']:.0f} | {r['torch_tok_s']:.0f} | {r['ratio']:.2f} | "
              f"{r['lkv_jax_peak_bytes'] / 2**20:.1f} | {r['lkv_jax_temp_bytes'] / 2**20:.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
                torch_threads=torch.get_num_threads(), chunk=args.chunk, repeats=args.repeats)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
