"""lkv_jax against NVIDIA kvpress, side by side on the same weights: prefill + press time, and the kept entries.

    python experiments/bench_kvpress.py                        # 4K and 16K tokens, five presses, budget 128
    python experiments/bench_kvpress.py --quick                # 512 and 1K tokens, two repeats
    python experiments/bench_kvpress.py --presses snapkv,tova --lengths 8192 --repeats 5 --out runs/kv.json
    python experiments/bench_kvpress.py --no-install           # exit 2 (saying how to create it) without the venv

kvpress 0.5.5 pins transformers < 5.3, so it lives in its own venv, `.venv-kvpress/` at the project root, created
on demand (torch==2.13.0 first: the CPU wheel; an unpinned torch pulls a 5.5 GB CUDA build). Its side runs there
as a subprocess (`kvpress_worker.py`) that loads the model once and answers requests, so the two sides alternate
run by run and the machine's load hits both alike.

Model: the benchmark Llama of `bench_presses.py` (8 layers, hidden 512, 8 heads, 2 KV heads, float32, random
init), saved once per run as a Hugging Face directory (safetensors) that transformers loads for kvpress. Per
press and prompt length: kvpress's pipeline prefill step (the press as a context manager around
`model.model(..., past_key_values=DynamicCache())`, sdpa; eager for ObservedAttention, which needs the attention
weights) against `lkv_jax.compress(model, ids, press)` with the same kvpress default settings and the same kept
count (`budget` for lkv_jax, the `compression_ratio` giving exactly that count for kvpress); best of --repeats
after one warm-up each, alternating the two sides; torch uses --threads threads. lkv_jax's `compress` also
returns the last token's logits, which kvpress's prefill step does not compute.

Before timing, once per press at --check-length tokens, both sides compress the same prompt and the kept
indices are compared per layer and KV head (with the scores, so that a difference can be told apart as a
near-tie or a real disagreement). Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from bench_presses import bench_config  # noqa: E402

from lkv_jax.checkpoint.hf import save_hf  # noqa: E402
from lkv_jax.compression import compress  # noqa: E402
from lkv_jax.models.transformer import Transformer  # noqa: E402
from lkv_jax.presses import make_press  # noqa: E402

DEFAULT_VENV = ROOT / ".venv-kvpress"
WORKER = ROOT / "experiments" / "kvpress_worker.py"
TORCH_PIN, KVPRESS_PIN = "torch==2.13.0", "kvpress==0.5.5"
# the presses compared, lkv_jax registry names (the worker maps them to kvpress classes)
PRESSES = ("snapkv", "streamingllm", "tova", "knorm", "observed-attention")
EAGER = frozenset({"observed-attention"})
# kvpress scores that are padding for always-kept entries (SnapKV's window, TOVA's last token): not compared
PROTECTED_TAIL = {"snapkv": 64, "tova": 1, "knorm": 0, "observed-attention": 0}


class KvpressUnavailable(RuntimeError):
    """The kvpress venv is absent (and may not be created) or broken."""


# ---------------------------------------------------------------------------------------------------------
# budget <-> kvpress compression_ratio

def kvpress_n_kept(n_tokens: int, compression_ratio: float) -> int:
    """Entries kvpress 0.5.5 keeps per layer and KV head (`kvpress.utils.compute_n_kept`)."""
    if compression_ratio >= 1.0:
        return 0
    return max(1, int(n_tokens * (1 - compression_ratio)))


def ratio_for_budget(budget: int, n_tokens: int) -> float:
    """The kvpress compression_ratio in [0, 1) that keeps exactly `budget` of `n_tokens` entries (everything when
    budget >= n_tokens). 1 - budget / n_tokens can land one float step off (int(T * (1 - r)) = budget - 1), so it
    is nudged by ulps until kvpress's own formula gives the budget."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if budget >= n_tokens:
        return 0.0
    r = 1.0 - budget / n_tokens
    for _ in range(64):
        # unclamped: kvpress's max(1, .) would hide a ratio at which lkv_jax's int(T * (1 - r)) keeps 0
        n = int(n_tokens * (1 - r))
        if n == budget:
            return r
        r = math.nextafter(r, -math.inf if n < budget else math.inf)
    raise ArithmeticError(f"no compression_ratio keeps {budget} of {n_tokens}")  # pragma: no cover


# ---------------------------------------------------------------------------------------------------------
# the kvpress venv and its worker

def venv_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def install_commands(venv: Path) -> list[str]:
    """Shell commands that create the kvpress venv (torch pinned first, so kvpress pulls no CUDA build)."""
    py = venv_python(venv)
    return [f"python3 -m venv {venv}", f"{py} -m pip install {TORCH_PIN}", f"{py} -m pip install {KVPRESS_PIN}"]


def ensure_venv(venv: Path, *, install: bool) -> Path:
    """The kvpress venv's python; creates the venv when absent and `install`, else raises KvpressUnavailable
    with the commands that create it."""
    venv = Path(venv)
    py = venv_python(venv)
    if py.exists() and subprocess.run([str(py), "-c", "import kvpress"], capture_output=True).returncode == 0:
        return py
    how = "\n".join("    " + c for c in install_commands(venv))
    if not install:
        raise KvpressUnavailable(f"kvpress venv not found at {venv}; create it with\n{how}")
    print(f"creating the kvpress venv at {venv} (torch CPU wheel first, then kvpress; a few minutes):\n{how}",
          flush=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    for pin in (TORCH_PIN, KVPRESS_PIN):
        subprocess.run([str(py), "-m", "pip", "install", "-q", pin], check=True)
    return py


class KvpressWorker:
    """The kvpress side as a subprocess speaking JSON lines (see kvpress_worker.py)."""

    def __init__(self, python: Path, model_dir: Path, threads: int, omp_wait_policy: str | None = "PASSIVE"):
        env = dict(os.environ)
        if omp_wait_policy:
            env["OMP_WAIT_POLICY"] = omp_wait_policy
        self.env = {k: env[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in env}
        self.proc = subprocess.Popen([str(python), str(WORKER), str(model_dir), "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)

    def request(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise KvpressUnavailable(f"the kvpress worker exited (status {self.proc.wait()}); see its stderr above")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"kvpress worker, {op}: {out['error']}")
        return out

    def close(self):
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---------------------------------------------------------------------------------------------------------
# memory guard for eager attention

def eager_attention_bytes(n_heads: int, n_tokens: int) -> int:
    """Peak extra bytes of transformers' eager attention in one layer: float32 scores and probabilities
    [N, T, T] plus the [T, T] causal mask."""
    return (2 * n_heads + 1) * n_tokens * n_tokens * 4


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------------------
# kept-entry check

def compare_kept(name: str, kv_indices, kv_scores, lkv_positions, lkv_scores) -> dict:
    """Per layer and KV head, kvpress's kept indices against lkv_jax's kept positions (both [K][n] lists /
    arrays). Where they differ, `tie_explained` says whether every swapped pair's kvpress scores lie within the
    largest score difference between the two implementations (a rounding-level near-tie, not a disagreement)."""
    n_heads = n_diff = 0
    per_layer, max_score_diff, swap_gaps = [], 0.0, []
    tail = PROTECTED_TAIL.get(name)
    for ki, ks, lp, ls in zip(kv_indices, kv_scores, lkv_positions, lkv_scores, strict=True):
        ks, ls = np.asarray(ks, np.float64), np.asarray(ls, np.float64)
        if tail is not None:
            S = ks.shape[-1] - tail
            max_score_diff = max(max_score_diff, float(np.abs(ks[:, :S] - ls[:, :S]).max()))
        layer_diff = 0
        for h, (a, b) in enumerate(zip(ki, np.asarray(lp), strict=True)):
            a, b = set(map(int, a)), set(int(x) for x in b if x >= 0)
            n_heads += 1
            only_kv, only_lkv = sorted(a - b), sorted(b - a)
            layer_diff += len(only_kv)
            if only_kv:
                # the weakest entry only kvpress kept against the strongest only lkv_jax kept, in kvpress's scores
                swap_gaps.append(float(min(ks[h][only_kv]) - max(ks[h][only_lkv])) if only_lkv else math.inf)
        n_diff += layer_diff
        per_layer.append(layer_diff)
    n_kept = len(kv_indices[0][0])
    out = dict(press=name, n_kept=n_kept, heads=n_heads, entries=n_heads * n_kept, differing_entries=n_diff,
               differing_per_layer=per_layer, same=n_diff == 0,
               max_score_diff=max_score_diff if tail is not None else None)
    if n_diff:
        out["max_swap_gap"] = max(abs(g) for g in swap_gaps)
        out["tie_explained"] = tail is not None and out["max_swap_gap"] <= 2 * max_score_diff
    return out


# ---------------------------------------------------------------------------------------------------------

def prompt_ids(n_tokens: int, vocab: int) -> np.ndarray:
    """int32 [1, T] random token ids, the same for a given length on both sides."""
    return np.random.RandomState(n_tokens).randint(3, vocab, size=(1, n_tokens)).astype(np.int32)


def _lkv_seconds(model, ids, press) -> float:
    t0 = time.perf_counter()
    out = compress(model, ids, press)
    jax.block_until_ready(out.cache.keys)
    return time.perf_counter() - t0


def run(lengths, presses=PRESSES, budget: int = 128, repeats: int = 3, out=None, *, venv=DEFAULT_VENV,
        install: bool = True, check_length: int | None = 512, threads: int = 2, model_dir=None,
        omp_wait_policy: str | None = "PASSIVE") -> dict:
    """Time kvpress and lkv_jax prefill + press side by side (see the module docstring); returns
    {"meta", "check", "rows"} and writes it as JSON to `out` when given. check_length=None skips the kept-entry
    check; model_dir keeps the exported Hugging Face directory there (default: a temporary one). torch's
    OpenMP threads wait passively by default: on a shared, oversubscribed CPU the default spin-waiting barriers
    made 2-thread torch 2-5x slower here, which would flatter lkv_jax (None: leave the environment as it is).
    Raises KvpressUnavailable when the kvpress venv is absent and `install` is False."""
    presses = list(presses)
    unknown = [p for p in presses if p not in PRESSES]
    if unknown:
        raise ValueError(f"no kvpress counterpart for {unknown}; choose from {', '.join(PRESSES)}")
    python = ensure_venv(Path(venv), install=install)
    cfg = bench_config()
    model = Transformer(cfg, dtype=np.float32, rngs=nnx.Rngs(0))
    with contextlib.ExitStack() as stack:
        if model_dir is None:
            model_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench_kvpress_"))
        save_hf(model, model_dir)  # once: every length and press of both sides reads these weights
        worker = KvpressWorker(python, Path(model_dir), threads, omp_wait_policy)
        stack.callback(worker.close)
        hello = worker.request("hello")
        print(f"kvpress {hello['kvpress']} (torch {hello['torch']}, transformers {hello['transformers']}, "
              f"{hello['threads']} threads) against lkv_jax on {jax.default_backend()}; model 8 layers / hidden 512 "
              f"/ 8 heads / 2 KV heads, float32; budget {budget}", flush=True)

        checks = []
        if check_length:
            ids = prompt_ids(check_length, cfg.vocab_size)
            worker.request("prompt", ids=ids[0].tolist())
            ratio = ratio_for_budget(budget, check_length)
            for name in presses:
                kv = worker.request("kept", press=name, ratio=ratio)
                res = compress(model, ids, make_press(name, budget=budget))
                lkv_pos = [np.asarray(p)[0] for p in res.kept_positions]
                lkv_scores = [np.asarray(s)[0] for s in res.scores]
                c = compare_kept(name, kv["indices"], kv["scores"], lkv_pos, lkv_scores)
                c.update(tokens=check_length, ratio=ratio)
                checks.append(c)
                verdict = "same" if c["same"] else (f"{c['differing_entries']} of {c['entries']} differ "
                                                    f"(per layer {c['differing_per_layer']}, "
                                                    f"{'near-tie' if c.get('tie_explained') else 'NOT a tie'})")
                print(f"check T={check_length} {name:20s} kept entries: {verdict}; max |score diff| "
                      f"{c['max_score_diff']}", flush=True)

        rows = []
        avail = available_bytes()
        load_avg = os.getloadavg() if hasattr(os, "getloadavg") else None
        for T in lengths:
            ids = prompt_ids(T, cfg.vocab_size)
            worker.request("prompt", ids=ids[0].tolist())
            ratio = ratio_for_budget(budget, T)
            for name in presses:
                press = make_press(name, budget=budget)
                row = dict(tokens=T, press=name, budget=budget, kvpress_ratio=ratio,
                           attn="eager" if name in EAGER else "sdpa")
                need = eager_attention_bytes(cfg.num_attention_heads, T) if name in EAGER else 0
                skip_kv = avail is not None and need > 0.8 * avail
                if skip_kv:
                    row["kvpress_skipped"] = (f"eager attention needs ~{need / 2**30:.1f} GiB per layer, "
                                              f"{avail / 2**30:.1f} GiB available")
                # warm-up (compilation, first-call allocations), then alternate, swapping the order every repeat
                _lkv_seconds(model, ids, press)
                kv_times, lkv_times = [], []
                if not skip_kv:
                    worker.request("time", press=name, ratio=ratio)
                for r in range(repeats):
                    order = ("kv", "lkv") if r % 2 == 0 else ("lkv", "kv")
                    for side in order:
                        if side == "lkv":
                            lkv_times.append(_lkv_seconds(model, ids, press))
                        elif not skip_kv:
                            res = worker.request("time", press=name, ratio=ratio)
                            if res["n_kept"] != budget:
                                raise RuntimeError(f"kvpress kept {res['n_kept']}, not {budget}")
                            kv_times.append(res["seconds"])
                row.update(lkv_jax_s=min(lkv_times), lkv_jax_runs_s=lkv_times,
                           kvpress_s=min(kv_times) if kv_times else None, kvpress_runs_s=kv_times,
                           kvpress_over_lkv_jax=min(kv_times) / min(lkv_times) if kv_times else None)
                rows.append(row)
                print(_row_line(row), flush=True)

        meta = dict(backend=jax.default_backend(), jax=jax.__version__, kvpress_env=hello, threads=threads,
                    worker_env=worker.env, cpu_count=os.cpu_count(), load_avg_start=load_avg,
                    budget=budget, repeats=repeats, lengths=list(lengths), presses=presses, check_length=check_length,
                    model="Llama 8 layers, hidden 512, 8 heads / 2 KV heads, head_dim 64, vocab 32000, float32, "
                          "random init (bench_presses.bench_config, nnx.Rngs(0))",
                    timing=f"best of {repeats} after one warm-up each, sides alternated")
    result = dict(meta=meta, check=checks, rows=rows)
    print()
    print(format_table(rows))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    return result


def _row_line(r: dict) -> str:
    kv = f"{r['kvpress_s'] * 1e3:9.1f} ms" if r["kvpress_s"] is not None else "  skipped   "
    ratio = f"{r['kvpress_over_lkv_jax']:5.2f}x" if r["kvpress_over_lkv_jax"] is not None else "  -"
    return f"T={r['tokens']:6d} {r['press']:20s} kvpress {kv}  lkv_jax {r['lkv_jax_s'] * 1e3:9.1f} ms  {ratio}"


def format_table(rows) -> str:
    """Markdown table: press, tokens, kvpress ms, lkv_jax ms, kvpress / lkv_jax."""
    lines = ["| press | tokens | kvpress ms | lkv_jax ms | kvpress / lkv_jax |", "|---|---|---|---|---|"]
    for r in rows:
        kv = f"{r['kvpress_s'] * 1e3:.1f}" if r.get("kvpress_s") is not None else \
            f"skipped ({r.get('kvpress_skipped', 'n/a')})"
        ratio = f"{r['kvpress_over_lkv_jax']:.2f}" if r.get("kvpress_over_lkv_jax") is not None else "-"
        lines.append(f"| {r['press']} | {r['tokens']} | {kv} | {r['lkv_jax_s'] * 1e3:.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--presses", default=",".join(PRESSES), help="comma-separated, from: " + ", ".join(PRESSES))
    ap.add_argument("--budget", type=int, default=128, help="entries kept per layer and KV head")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="512 and 1K tokens, two repeats")
    ap.add_argument("--check-length", type=int, default=512, help="prompt length of the kept-entry check (0: skip)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on the kvpress side")
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY of the kvpress worker ('' leaves the environment's)")
    ap.add_argument("--venv", default=str(DEFAULT_VENV), help="the kvpress venv (created when absent)")
    ap.add_argument("--no-install", action="store_true", help="exit 2 instead of creating an absent kvpress venv")
    ap.add_argument("--model-dir", default=None, help="keep the exported Hugging Face directory here")
    ap.add_argument("--out", default="runs/bench_kvpress.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.repeats = [512, 1024], 2
    presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    try:
        run(args.lengths, presses, args.budget, args.repeats, args.out, venv=args.venv, install=not args.no_install,
            check_length=args.check_length or None, threads=args.threads, model_dir=args.model_dir,
            omp_wait_policy=args.omp_wait_policy or None)
    except KvpressUnavailable as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
