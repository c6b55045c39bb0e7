"""LookaheadKV's cost: eviction overhead against SnapKV and the draft-based methods, and training cost.

    python experiments/bench_lookahead.py                # 4K and 16K tokens (the issue's setting; a GPU/TPU)
    python experiments/bench_lookahead.py --quick        # 1K and 2K tokens, a few minutes on a CPU

One random Llama-shaped target (8 layers, hidden 512, 8 heads, 2 KV heads, float32 unless --dtype) for
every method. For each prompt length:
  * eviction overhead = time to first token with the press (prefill + scoring + selection, `compress`)
    minus a plain prefill of the same prompt, as % of the plain prefill: LookaheadKV (32 lookahead
    tokens, rank-8 LoRA on all projections), SnapKV (kvpress defaults), SpecKV (a 2-layer hidden-256
    draft generating 32 tokens) and LAQ (8 pseudo tokens from the target);
  * the same overhead as a user sees it: time to first token through `lkv_jax.generate(model, ids,
    max_new_tokens=1, press=...)` against `generate` without a press, TTFT(press) / TTFT(no press) - 1;
  * LookaheadKV's cost ratio: draft-method overhead / LookaheadKV overhead (the paper: 14.5x at 32K);
  * one training step (batch 1, labels given): wall time, and peak memory from XLA's compiled memory
    analysis next to that of a plain prefill of the same prompt.
Eviction times are the best of --repeats interleaved runs after a warm-up (robust to other load on
the machine); the training step's is the median. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_timing import best_interleaved, profile_calls, time_runs  # noqa: E402

import lkv_jax  # noqa: E402
from lkv_jax.inference import jitted_prefill, prepare_prompt  # noqa: E402
from lkv_jax.lookahead import init_adapter  # noqa: E402
from lkv_jax.lookahead.data_pipeline import prefill_chunk  # noqa: E402
from lkv_jax.lookahead.training import TrainConfig, make_optimizer, train_step  # noqa: E402
from lkv_jax.presses import LookaheadKVPress  # noqa: E402
from lkv_jax.presses.laq import LAQPress  # noqa: E402
from lkv_jax.presses.snapkv import SnapKVPress  # noqa: E402
from lkv_jax.presses.speckv import SpecKVPress  # noqa: E402
from lkv_jax.sharding import resolve_mesh  # noqa: E402

VOCAB = 32000


def build(layers: int, hidden: int, heads: int, kv_heads: int, inter: int, dtype: str, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                   max_position_embeddings=65536, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        return lkv_jax.load_hf(d, dtype=dtype)


CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of all threads; less sensitive to load)


def memory(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def bench_eviction(model, draft, ids, budget: int, repeats: int, profile: str | None = None) -> dict:
    prompt = prepare_prompt(ids, None, 512, model.config.vocab_size)
    graphdef, params = nnx.split(model)
    T = prompt.ids.shape[1]

    def plain():
        fn = jitted_prefill(graphdef, params, resolve_mesh(None), chunk=prompt.chunk, capacity=T)
        return fn(params, prompt.ids, prompt.valid, prompt.positions)

    adapter = init_adapter(model.config, jax.random.key(0))
    presses = {
        "LookaheadKV": LookaheadKVPress(adapter, budget=budget),
        "SnapKV": SnapKVPress(budget=budget),
        "SpecKV": SpecKVPress(draft, budget=budget, n_draft_tokens=32),
        "LAQ": LAQPress(budget=budget),
    }
    first_token = lambda press=None: lkv_jax.generate(model, ids, max_new_tokens=1, press=press)
    fns = {"prefill": plain, "generate": first_token,
           **{name: (lambda press=press: lkv_jax.compress(model, ids, press)) for name, press in presses.items()},
           **{f"{name}_generate": (lambda press=press: first_token(press)) for name, press in presses.items()}}
    t = best_interleaved(fns, repeats, clock=CLOCK)
    if profile:
        profile_calls({f"{k} T={T}": fn for k, fn in fns.items()}, profile)
    t_prefill = t["prefill"]
    row = {"prompt_tokens": int(ids.shape[1]), "prefill_s": t_prefill, "generate_s": t["generate"]}
    for name in presses:
        row[f"{name}_ttft_s"] = t[name]  # compress: prefill + scoring + selection
        row[f"{name}_overhead_pct"] = 100.0 * (t[name] - t_prefill) / t_prefill
        row[f"{name}_generate_s"] = t[f"{name}_generate"]
        row[f"{name}_ttft_overhead_pct"] = 100.0 * (t[f"{name}_generate"] / t["generate"] - 1)
    lk = row["LookaheadKV_overhead_pct"]
    for name in ("SpecKV", "LAQ"):  # undefined when the overhead is within the timing noise
        row[f"{name}_over_LookaheadKV"] = row[f"{name}_overhead_pct"] / lk if lk > 0 else None
    return row


def bench_training(model, T: int, repeats: int) -> dict:
    cfg = model.config
    adapter = init_adapter(cfg, jax.random.key(0))
    opt = make_optimizer(TrainConfig(data_dir="", out_dir="", steps=100, warmup_steps=0))
    opt_state = opt.init(adapter)
    rs = np.random.RandomState(0)
    labels = rs.rand(1, cfg.num_hidden_layers, cfg.num_attention_heads, T).astype(np.float32)
    batch = {"prompt_ids": jnp.asarray(rs.randint(3, VOCAB, (1, T)), jnp.int32),
             "prompt_valid": jnp.ones((1, T), bool), "positions": jnp.arange(T, dtype=jnp.int32)[None],
             "response_ids": jnp.zeros((1, 16), jnp.int32), "response_mask": jnp.ones((1, 16), bool),
             "labels": jnp.asarray(labels / labels.sum(-1, keepdims=True)), "row_weight": jnp.ones((1,), jnp.float32)}
    graphdef, params = nnx.split(model)
    chunk = prefill_chunk(T)
    step = jax.jit(lambda p, a, s, b: train_step(graphdef, p, a, s, b, optimizer=opt, chunk=chunk))
    compiled = step.lower(params, adapter, opt_state, batch).compile()
    t = time_runs(lambda: compiled(params, adapter, opt_state, batch), repeats)
    prefill = jitted_prefill(graphdef, params, resolve_mesh(None), chunk=chunk, capacity=T).lower(
        params, batch["prompt_ids"], batch["prompt_valid"], batch["positions"]).compile()
    m_step, m_prefill = memory(compiled), memory(prefill)
    return {"prompt_tokens": T, "step_s": t, "step_peak_mib": m_step / 2**20, "prefill_peak_mib": m_prefill / 2**20,
            "step_over_prefill_memory": m_step / m_prefill}


def _ratio(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1K and 2K tokens instead of 4K and 16K")
    p.add_argument("--lengths", default=None, help="comma-separated prompt lengths (overrides --quick)")
    p.add_argument("--budget", type=int, default=128, help="entries kept per layer and KV head (default 128)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per method (best of; default 5)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="eviction timing clock: wall time, or process CPU time (for a CPU shared with other jobs)")
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="write a jax.profiler trace of one more call of each measured eviction function to DIR")
    p.add_argument("--out", default="bench_lookahead.json", help="JSON results path")
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    lengths = ([int(x) for x in args.lengths.split(",")] if args.lengths else
               [1024, 2048] if args.quick else [4096, 16384])
    model = build(8, 512, 8, 2, 1408, args.dtype, 0)
    draft = build(2, 256, 4, 2, 704, args.dtype, 1)
    rs = np.random.RandomState(0)
    evict, training = [], []
    for T in lengths:
        ids = rs.randint(3, VOCAB, (1, T)).astype(np.int32)
        evict.append(bench_eviction(model, draft, ids, args.budget, args.repeats, args.profile))
        training.append(bench_training(model, T, args.repeats))
    print(f"backend {jax.default_backend()}, budget {args.budget}, dtype {args.dtype}, clock {args.clock}")
    print(f"{'tokens':>7} {'prefill ms':>10} | overhead % of prefill: {'LookaheadKV':>11} {'SnapKV':>7} "
          f"{'SpecKV':>7} {'LAQ':>7} | ratio SpecKV/LKV LAQ/LKV")
    for r in evict:
        print(f"{r['prompt_tokens']:>7} {1e3 * r['prefill_s']:>10.1f} | {'':>22} "
              f"{r['LookaheadKV_overhead_pct']:>11.2f} "
              f"{r['SnapKV_overhead_pct']:>7.2f} {r['SpecKV_overhead_pct']:>7.2f} {r['LAQ_overhead_pct']:>7.2f} | "
              f"{_ratio(r['SpecKV_over_LookaheadKV']):>16} {_ratio(r['LAQ_over_LookaheadKV']):>7}")
    print(f"{'tokens':>7} {'generate ms':>11} | TTFT overhead % through generate(max_new_tokens=1): "
          f"{'LookaheadKV':>11} {'SnapKV':>7} {'SpecKV':>7} {'LAQ':>7}")
    for r in evict:
        print(f"{r['prompt_tokens']:>7} {1e3 * r['generate_s']:>11.1f} | {'':>51} "
              f"{r['LookaheadKV_ttft_overhead_pct']:>11.2f} {r['SnapKV_ttft_overhead_pct']:>7.2f} "
              f"{r['SpecKV_ttft_overhead_pct']:>7.2f} {r['LAQ_ttft_overhead_pct']:>7.2f}")
    print(f"{'tokens':>7} {'train step ms':>13} {'step peak MiB':>13} {'prefill peak MiB':>16} {'ratio':>6}")
    for r in training:
        print(f"{r['prompt_tokens']:>7} {1e3 * r['step_s']:>13.1f} {r['step_peak_mib']:>13.1f} "
              f"{r['prefill_peak_mib']:>16.1f} {r['step_over_prefill_memory']:>6.2f}")
    result = {"backend": jax.default_backend(), "budget": args.budget, "dtype": args.dtype, "clock": args.clock,
              "model": "llama 8 layers, hidden 512, 8/2 heads; draft 2 layers, hidden 256",
              "eviction": evict, "training": training}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
