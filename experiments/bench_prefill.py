"""Prefill throughput of lkv_jax against transformers (torch sdpa) on the same random weights, side by side.

    python experiments/bench_prefill.py                 # 1K, 4K, 16K tokens (the issue's setting)
    python experiments/bench_prefill.py --quick         # 512 and 1K, a minute on a laptop CPU
    python experiments/bench_prefill.py --breakdown --lengths 4096 16384   # where the prefill time goes
    python experiments/bench_prefill.py --profile runs/prof   # + a jax.profiler trace of the measured calls

Model: Llama, 8 layers, hidden 512, 8 heads, 2 KV heads, float32. For each prompt length it reports
tokens/s of both (median of --repeats runs after a warm-up), the ratio lkv_jax / torch, and lkv_jax's
peak memory from XLA's compiled memory analysis of the jitted prefill (arguments + outputs + temporaries).
Prints a table and writes JSON.

--breakdown (no torch needed): the share of lkv_jax's prefill time spent in attention, the q/k/v/o
projections, the MLP, the RMS norms, RoPE and the rest (embedding, cache writes, LM head, loop
plumbing), read from a `jax.profiler` trace of --repeats calls: every XLA op's time, attributed by the
named scope of the model code it came from (a fusion under its own label, else the first labelled op it
fuses). Beside each share: the category's FLOPs (counted from the shapes), the bytes its ops read and
write (their operand and result sizes in the compiled HLO), and the rates those give against this
machine's measured f32 matmul rate and memory bandwidth, to say what bounds it. Writes JSON (--out, default
runs/bench_prefill_breakdown.json).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_timing import hlo_op_seconds, profile_calls, time_runs  # noqa: E402

import lkv_jax  # noqa: E402
from lkv_jax.inference import jitted_prefill, prepare_prompt  # noqa: E402
from lkv_jax.sharding import resolve_mesh  # noqa: E402


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
    fn = jitted_prefill(graphdef, params, resolve_mesh(None), chunk=prompt.chunk, capacity=prompt.ids.shape[1])
    compiled = fn.lower(params, prompt.ids, prompt.valid, prompt.positions).compile()
    m = compiled.memory_analysis()
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return int(total), int(m.temp_size_in_bytes)


CATEGORIES = ("attention", "projections", "mlp", "norm", "rope")  # named scopes in the model code


def _hlo_ops(hlo_text: str) -> dict[str, dict]:
    """Every instruction of a compiled module's text: name -> {shape, operands, category, matmul}.

    The category is the first named scope of CATEGORIES in the instruction's op_name metadata, else in
    that of the computation it calls (a fusion's ops). XLA:CPU drops the metadata of the XNNPACK fusions
    it builds around batched dots; in the prefill those are attention's (the projections and the MLP
    multiply 2-D activations by 2-D weights), so an unlabelled batched dot counts as attention."""
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"^(?:ENTRY )?%(\S+) \(.*?\{\n(.*?)\n\}", hlo_text,
                                                          re.M | re.S)}
    ops = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(([^)]*)\)(.*)$", hlo_text, re.M):
        name, shape, opcode, operands, rest = m.groups()
        called = re.search(r"calls=%([\w.-]+)", rest)
        text = rest + "\n" + (bodies.get(called.group(1), "") if called else "")
        scopes = [c for op_name in re.findall(r'op_name="([^"]*)"', text) for c in CATEGORIES
                  if c in op_name.split("/")]
        matmul = opcode == "dot" or " dot(" in text
        category = scopes[0] if scopes else ("attention" if matmul and "lhs_batch_dims" in text else "other")
        ops[name] = {"shape": shape, "operands": re.findall(r"%([\w.-]+)", operands), "category": category,
                     "matmul": matmul}
    return ops


def _nbytes(shape: str) -> int:
    """Bytes of an array type such as f32[1,2,512,64]{3,2,1,0} (0 for tuples and tokens)."""
    m = re.match(r"(pred|[a-z]+)(\d*)\[([\d,]*)\]", shape)
    if not m:
        return 0
    width = 1 if m.group(1) == "pred" else int(m.group(2)) // 8
    return width * int(np.prod([int(d) for d in m.group(3).split(",") if d] or [1]))


def prefill_flops(cfg, T: int, chunk: int) -> dict[str, float]:
    """Multiply-add FLOPs (2 per MAC) of one batch-1 prefill of T tokens in `chunk`-token steps, per
    category. Every layer but the last computes all T queries; the last one its keys and values for all
    and the rest for the last token only. Attention counts the key blocks the blockwise kernel visits
    (whole blocks, the causal mask's zeros included)."""
    D, N, K, H, F, L = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                        cfg.intermediate_size, cfg.num_hidden_layers)
    n = T // chunk
    full, tail = (L - 1) * T + 1, L * T  # tokens through the q/o/MLP path, through k/v
    blocks = n * (n + 1) // 2  # key blocks visited per layer by the chunked queries
    return {"attention": (L - 1) * 2 * 2 * N * H * chunk * chunk * blocks + 2 * 2 * N * H * T,
            "projections": 2 * D * (full * 2 * N * H + tail * 2 * K * H),
            "mlp": 2 * 3 * D * F * full}


def machine_rates(seconds_budget: float = 2.0) -> dict[str, float]:
    """This machine's f32 matmul rate (GFLOP/s, a jitted 1024^3 product) and memory read bandwidth (GB/s,
    a jitted sum over 256 MiB: a pass that writes a fresh 256 MiB result would time the page faults of
    its new buffer instead), best of a few runs."""
    a = jnp.ones((1024, 1024), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    big = jnp.ones((1 << 26,), jnp.float32)
    read = jax.jit(jnp.sum)
    t_mm = time_runs(lambda: mm(a), max(3, int(seconds_budget / 0.2)), reduce=min)
    t_read = time_runs(lambda: read(big), 5, reduce=min)
    return {"matmul_gflops": 2 * 1024 ** 3 / t_mm / 1e9, "memory_gb_s": big.nbytes / t_read / 1e9}


def breakdown(model, T: int, chunk: int, repeats: int, trace_dir: Path) -> dict:
    """Where one prefill of T tokens spends its time: per category, seconds per call (from a trace of
    `repeats` calls), share of the summed op time, FLOPs, bytes and the achieved rates."""
    ids = np.random.RandomState(T).randint(0, model.config.vocab_size, size=(1, T))
    prompt = prepare_prompt(ids, None, chunk, model.config.vocab_size)
    graphdef, params = nnx.split(model)
    fn = jitted_prefill(graphdef, params, resolve_mesh(None), chunk=prompt.chunk, capacity=prompt.ids.shape[1])
    args = (params, prompt.ids, prompt.valid, prompt.positions)
    hlo = _hlo_ops(fn.lower(*args).compile().as_text())
    wall = time_runs(lambda: fn(*args), repeats, reduce=min)
    profile_calls({f"prefill {T} #{i}": (lambda: fn(*args)) for i in range(repeats)}, trace_dir)
    ops = {op: v for (module, op), v in hlo_op_seconds(trace_dir).items() if module == "jit_prefill_step"}
    secs = dict.fromkeys((*CATEGORIES, "other"), 0.0)
    moved = dict.fromkeys(secs, 0.0)  # bytes read and written per call
    attn_dots = 0.0  # attention's matmuls apart from its softmax and masking
    for op, (s, n) in ops.items():
        if op not in hlo:
            continue
        h = hlo[op]
        c = h["category"]
        secs[c] += s / repeats
        moved[c] += n / repeats * (_nbytes(h["shape"]) + sum(_nbytes(hlo[o]["shape"]) for o in h["operands"]
                                                              if o in hlo))
        if c == "attention" and h["matmul"]:
            attn_dots += s / repeats
    found = sum(s for op, (s, _) in ops.items() if op in hlo)
    total = sum(secs.values())
    flops = prefill_flops(model.config, prompt.ids.shape[1], prompt.chunk)
    rows = {}
    for c in secs:
        f = flops.get(c)
        rows[c] = {"seconds": secs[c], "share": secs[c] / total if total else None,
                   "gflop": f / 1e9 if f else None, "gflop_s": f / secs[c] / 1e9 if f and secs[c] else None,
                   "gbytes": moved[c] / 1e9, "gb_s": moved[c] / secs[c] / 1e9 if secs[c] else None}
    rows["attention"]["matmul_seconds"] = attn_dots
    rows["attention"]["softmax_and_mask_seconds"] = secs["attention"] - attn_dots
    return {"tokens": T, "chunk": prompt.chunk, "wall_s_untraced_best": wall, "op_seconds_per_call": total,
            "trace_coverage": found / max(sum(s for s, _ in ops.values()), 1e-12), "categories": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--quick", action="store_true", help="lengths 512 and 1024, one repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=512, help="lkv_jax prefill chunk size")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    ap.add_argument("--breakdown", action="store_true",
                    help="the share of prefill time per part of the model (attention, projections, MLP...), "
                         "from a profiler trace; no torch comparison")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="write a jax.profiler trace of one more call of each measured function to DIR")
    ap.add_argument("--out", default=None,
                    help="JSON path (default runs/bench_prefill.json, or runs/bench_prefill_breakdown.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats = [512, 1024], 1
    if args.breakdown:
        return main_breakdown(args)
    args.out = args.out or "runs/bench_prefill.json"
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
        if args.profile:
            profile_calls({f"lkv_jax.prefill T={T}": run_ours}, args.profile)
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


def main_breakdown(args) -> int:
    """--breakdown: per prompt length, where the prefill time goes; prints a table and writes JSON."""
    from bench_presses import bench_config

    from lkv_jax.models.transformer import Transformer

    model = Transformer(bench_config(), dtype=jnp.float32, rngs=nnx.Rngs(0))
    rates = machine_rates()
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); this machine: f32 matmul "
          f"{rates['matmul_gflops']:.1f} GFLOP/s, memory {rates['memory_gb_s']:.1f} GB/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for T in args.lengths:
            trace_dir = Path(args.profile) / f"breakdown_{T}" if args.profile else Path(tmp) / str(T)
            rows.append(breakdown(model, T, args.chunk, args.repeats, trace_dir))
            r = rows[-1]
            print(f"T={T:6d}  untraced best {r['wall_s_untraced_best'] * 1e3:8.1f} ms, op time "
                  f"{r['op_seconds_per_call'] * 1e3:8.1f} ms per call (trace coverage "
                  f"{100 * r['trace_coverage']:.1f} %)", flush=True)
    print("\n| tokens | part | ms per call | share % | GFLOP | GFLOP/s | GB moved | GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    for r in rows:
        for c, v in r["categories"].items():
            print(f"| {r['tokens']} | {c} | {v['seconds'] * 1e3:.1f} | {100 * v['share']:.1f} | "
                  f"{fmt(v['gflop'], '.1f')} | {fmt(v['gflop_s'], '.1f')} | {v['gbytes']:.2f} | "
                  f"{fmt(v['gb_s'], '.1f')} |")
        a = r["categories"]["attention"]
        print(f"| {r['tokens']} | (attention: matmuls / softmax and masking) | {a['matmul_seconds'] * 1e3:.1f} / "
              f"{a['softmax_and_mask_seconds'] * 1e3:.1f} | | | | | |")
    out = Path(args.out or "runs/bench_prefill_breakdown.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(backend=jax.default_backend(), devices=[str(d) for d in jax.devices()], chunk=args.chunk,
                repeats=args.repeats, machine=rates, method="jax.profiler trace; each XLA op's time attributed "
                "to the named scope of its (root) op; GFLOP counted from shapes; GB = operand + result bytes")
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
