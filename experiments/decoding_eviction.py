"""Decoding-time eviction (issue 20, parts 3 and 4): does LookaheadKV, re-run on the cache mid-answer, keep
what the rest of a long answer needs better than the other scorers, at the same peak cache size, and what
does it cost per generated token?

    .venv/bin/python experiments/decoding_eviction.py --model tiny      # the tiny target
    .venv/bin/python experiments/decoding_eviction.py --model smollm2   # SmolLM2-135M-Instruct
    .venv/bin/python experiments/decoding_eviction.py --quick           # a smoke run
    ... --report-only                                                   # tables and plot of the cells so far

Measured on 2 CPU cores shared with other jobs (load average 7-10): tiny 18 min (adapter 3, evaluation 12,
cost 3); SmolLM2 about 2 hours; --quick 1 min of CPU (4-5 min of wall time under that load).

Methods, all at the same peak cache size P (entries per layer and KV head):
  fullkv                the full cache (its peak is the prompt plus the answer);
  prefill-<press>       prefill-only eviction: the prompt is compressed to P - max_new_tokens entries, so
                        prompt + answer never exceed P (skipped where that is < 1);
  decode-<press>        decoding-time eviction: the prompt compressed by the press to B = P - N, then
                        `DecodingPress(press, budget=B, interval=N)` re-scores and evicts back to B every
                        time the cache holds P entries (SnapKV, Knorm, StreamingLLM, LookaheadKV).
Budgets B are fractions of the final length (prompt + the full cache's answer, the task's mean): by default
1/8, 1/4 (the issue's aim) and 1/2.

Per sample: the task score; agreement with the full cache's own answer: ROUGE-L of the texts and the number of
tokens until the first divergence from the full cache's tokens (its whole length where they agree). Per cell:
the means with bootstrap intervals; LookaheadKV minus each other decoding-time scorer on the same samples,
with paired bootstrap intervals (`lkv_jax.evaluation.uncertainty`).

Cost (part 4): milliseconds per generated token of one prompt decoding `--cost-new-tokens` tokens from the
same compressed cache, without decoding-time eviction (the cache grows) and with it at N = 64 and 256,
side by side in one run (one warm-up call each, compilation excluded, alternating repeats, median); and the
peak memory: the compiled decode loop's `memory_analysis()` and the cache's own bytes
(capacity x layers x 2 x KV heads x head dim x dtype size).

Outputs under --out (each cell is one JSON, cells/<model>/<task>/<method>/peak=<P>.json, skipped when it
is already there for the same inputs, so a killed run resumes): results.json (every cell, the aggregates,
the paired differences and the cost), results.md (tables), scores.png (score and agreement against the
peak cache memory, one column per task).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_ADAPTER = ROOT / "lkv_jax" / "assets" / "smollm2_lookahead" / "adapter.safetensors"
# the converted SmolLM2 of `make demo-real` (experiments/real_model.py), reused when it is there
REAL_MODEL_DIRS = (ROOT / "runs" / "real" / "model", Path("/work/main/runs/real/model"))
DECODING_SCORERS = ("snapkv", "knorm", "streamingllm", "lookaheadkv")
PREFILL_PRESSES = ("lookaheadkv", "snapkv")
REFERENCE = "decode-lookaheadkv"
RESULTS_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run evaluates. tasks: task keys of `build_tasks`; fractions: budgets B as fractions of the
    final length; interval: N of the quality runs; snapkv_window: SnapKV's window (<= interval);
    keep_recent: the DecodingPress's `keep_recent` (None: its default)."""

    tasks: tuple[str, ...]
    length: int
    samples: int
    batch_size: int
    fractions: tuple[float, ...] = (0.125, 0.25, 0.5)
    interval: int = 64
    snapkv_window: int = 64
    keep_recent: int | None = None
    cost_intervals: tuple[int, ...] = (64, 256)
    cost_new_tokens: int = 512
    cost_repeats: int = 3
    pad_multiple: int = 64
    summary_new_tokens: int = 256


PLANS = {
    # tiny target: answers of 40-90 tokens after 512-token contexts (it copies no long record list: asked to
    # repeat 30 records it agreed with them for 0-8 words), so N is small enough to evict several times per answer
    "tiny": Plan(tasks=("tag_list", "tag_list.n_items=12"), length=512, samples=24, batch_size=8, interval=16,
                 snapkv_window=8, cost_intervals=(64, 256), cost_new_tokens=512, cost_repeats=7),
    "smollm2": Plan(tasks=("summary", "niah_multivalue"), length=2048, samples=8, batch_size=4, interval=64,
                    snapkv_window=64, cost_new_tokens=512, cost_repeats=3),
    "quick": Plan(tasks=("tag_list",), length=128, samples=2, batch_size=2, fractions=(0.25,), interval=8,
                  snapkv_window=4, cost_intervals=(8,), cost_new_tokens=24, cost_repeats=1, pad_multiple=16),
}


# ----------------------------------------------------------------------------------------------
# model, tasks, adapter


def load_model(which: str, out: Path, model_dir: str | None):
    """(model, encoder or vocab, model directory) of `tiny` (the shipped tiny target) or `smollm2`."""
    import lkv_jax

    if which == "tiny":
        from lkv_jax.data.vocab import load_vocab
        from lkv_jax.tiny_target import ASSET_DIR

        path = Path(model_dir) if model_dir else ASSET_DIR
        return lkv_jax.load(path, dtype="float32"), load_vocab(path), path
    from lkv_jax.data.synthetic import HFPromptEncoder

    path = Path(model_dir) if model_dir else next((d for d in REAL_MODEL_DIRS if (d / "config.json").is_file()), None)
    if path is None:  # convert the installed GGUF, as `make demo-real` does
        from lkv_jax.checkpoint.gguf import convert_gguf
        from lkv_jax.data.installed import smollm2_gguf

        path = out / "model"
        if not (path / "config.json").is_file():
            convert_gguf(smollm2_gguf(), path, dtype="float32")
    return lkv_jax.load_hf(path, dtype="float32"), HFPromptEncoder(path), path


def build_tasks(which: str, plan: Plan, tokens) -> list:
    """The plan's tasks: synthetic ones (built-in vocabulary, `name.key=value` passes task keywords) on the
    tiny target; summary and RULER niah_multivalue on a real model."""
    from lkv_jax.evaluation.tasks import ruler_task, summary_task, synthetic_task

    tasks = []
    for key in plan.tasks:
        if which == "smollm2":
            if key == "summary":
                tasks.append(summary_task(tokens, length=plan.length, n_samples=plan.samples, seed=1,
                                          max_new_tokens=plan.summary_new_tokens))
            else:
                tasks.append(ruler_task(key, tokens, length=plan.length, n_samples=plan.samples, seed=1))
        else:
            name, *kv = key.split(".")
            params = {k: int(v) for k, v in (p.split("=") for p in kv)}
            tasks.append(synthetic_task(name, n_samples=plan.samples, length=plan.length, seed=1, vocab=tokens,
                                        params=params))
    return tasks


def tiny_adapter(model, vocab, out: Path, quick: bool):
    """A LookaheadKV adapter of the tiny target, trained as experiments/demo.py trains one (labels of the
    model's own answers to synthetic prompts, seeds disjoint from the evaluation's), written to
    OUT/adapter/adapter.safetensors and reused. --quick: an untrained adapter (a smoke run only)."""
    import jax

    from lkv_jax.lookahead import init_adapter, load_adapter

    if quick:
        return init_adapter(model.config, jax.random.key(0), n_lookahead=4, rank=2), "untrained (--quick)"
    path = out / "adapter" / "adapter.safetensors"
    if path.is_file():
        return load_adapter(path, model.config), str(path)
    from lkv_jax.data.synthetic import encode_builtin, generate_samples
    from lkv_jax.lookahead.data_pipeline import PREFILL_CHUNK
    from lkv_jax.lookahead.label_store import make_label_dataset
    from lkv_jax.lookahead.training import TrainConfig, train
    from lkv_jax.padding import round_up

    prompts = []
    for task, params in (("niah_single", {}), ("niah_multikey", {}), ("tag_list", {}), ("tag_list", {"n_items": 12})):
        for length in (480, 1000):  # prompts (question included) fit the 512 and 1024 buckets
            for s in generate_samples(task, 20, length, seed=10_000, **params):
                prompts.append(encode_builtin(s, vocab, query_aware=True).prompt.tolist())
    labels = make_label_dataset(model, prompts, out / "labels", max_new_tokens=96, batch_size=8,
                                eos_token_id=vocab.eos_id)
    bucket = round_up(max(len(p) for p in prompts), PREFILL_CHUNK)
    cfg = TrainConfig(data_dir=str(labels), out_dir=str(out / "adapter"), steps=300, batch_size=4, learning_rate=2e-3,
                      warmup_steps=30, n_lookahead=32, buckets=tuple(sorted({512, bucket})), checkpoint_every=100,
                      log_every=10, dtype="float32")
    train(cfg, model=model)
    return load_adapter(path, model.config), str(path)


# ----------------------------------------------------------------------------------------------
# methods and cells


@dataclasses.dataclass(frozen=True)
class Method:
    """kind: "full" | "prefill" | "decode"; press: the registered press name (None for the full cache)."""

    kind: str
    press: str | None = None

    @property
    def name(self) -> str:
        return "fullkv" if self.kind == "full" else f"{self.kind}-{self.press}"


FULL = Method("full")
METHODS = (*(Method("prefill", p) for p in PREFILL_PRESSES), *(Method("decode", s) for s in DECODING_SCORERS))


def make_press(name: str, budget: int, plan: Plan, adapter):
    """A prompt press at `budget`; SnapKV with the plan's window."""
    from lkv_jax.presses.registry import make_press as registry_press

    kw = {"window_size": plan.snapkv_window} if name == "snapkv" else {}
    if name == "lookaheadkv":
        kw["adapter"] = adapter
    return registry_press(name, budget=budget, **kw)


def decoding_press(scorer, budget: int, interval: int, keep_recent: int | None):
    from lkv_jax.decoding_press import DecodingPress

    kw = {} if keep_recent is None else {"keep_recent": keep_recent}
    return DecodingPress(scorer, budget=budget, interval=interval, **kw)


def cache_bytes(config, capacity: int, dtype_bytes: int = 4) -> int:
    """Bytes of a cache of `capacity` entries per layer and KV head, one sequence: keys and values."""
    return capacity * config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * dtype_bytes


def first_divergence(tokens: list[int], reference: list[int]) -> int:
    """Tokens until the first one that differs from `reference` (its whole length where they agree)."""
    n = min(len(tokens), len(reference))
    for i in range(n):
        if tokens[i] != reference[i]:
            return i
    return n


def agreement_rouge(prediction: str, reference: str) -> float:
    """ROUGE-L F of the prediction against the full cache's answer (1 when both are empty)."""
    from lkv_jax.data.longbench_metrics import rouge_score

    if not prediction.strip() and not reference.strip():
        return 1.0
    return float(rouge_score(prediction, reference))


def _batches(samples, batch_size: int):
    order = sorted(samples, key=lambda s: (len(s.prompt_ids), s.id))
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]


def buildable(method: Method, peak: int, task, plan: Plan, adapter) -> bool:
    """Whether the method exists at this peak: a prefill-only budget P - max_new_tokens of at least 1 that
    holds the press's protected entries (SnapKV's window), a decoding budget P - N that holds them plus
    keep_recent (`BudgetError` otherwise)."""
    from lkv_jax.errors import BudgetError

    budget = peak - (task.max_new_tokens if method.kind == "prefill" else plan.interval)
    if budget < 1:
        return False
    try:
        press = make_press(method.press, budget, plan, adapter)
        if method.kind == "decode":
            decoding_press(press, budget, plan.interval, plan.keep_recent)
    except BudgetError:
        return False
    return True


def generate_batch(model, task, batch, plan: Plan, method: Method, peak: int | None, adapter, interval: int):
    """Greedy answers [len(batch)] (token lists, EOS kept) of one batch under `method` at `peak`."""
    import numpy as np

    import lkv_jax
    from lkv_jax.decoding import decoding_ids
    from lkv_jax.padding import pad_left, round_up, trim_at_eos

    eos, pad = decoding_ids(model.config, task.eos_token_ids)
    rows = [s.prompt_ids for s in batch]
    rows = rows + [rows[0]] * (plan.batch_size - len(rows))  # a full batch: one compiled shape per length bucket
    ids, mask = pad_left(rows, round_up(max(len(r) for r in rows), plan.pad_multiple))
    kw = dict(attention_mask=mask, eos_token_id=eos, pad_token_id=pad)
    if method.kind == "full":
        tokens = lkv_jax.generate(model, ids, task.max_new_tokens, **kw)
    elif method.kind == "prefill":
        press = make_press(method.press, peak - task.max_new_tokens, plan, adapter)
        tokens = lkv_jax.generate(model, ids, task.max_new_tokens, press=press, **kw)
    else:
        budget = peak - interval
        press = make_press(method.press, budget, plan, adapter)
        tokens = lkv_jax.generate(model, ids, task.max_new_tokens, press=press,
                                  decoding_press=decoding_press(press, budget, interval, plan.keep_recent), **kw)
    tokens = np.asarray(tokens)
    return [trim_at_eos(tokens[i], eos, keep_eos=True) for i in range(len(batch))], eos


def cell_path(out: Path, model_name: str, task_name: str, method: Method, peak: int | None) -> Path:
    from lkv_jax.evaluation.runner import _safe

    leaf = "full.json" if peak is None else f"peak={peak}.json"
    return out / "cells" / model_name / _safe(task_name) / method.name / leaf


def run_cell(model, task, plan: Plan, method: Method, peak: int | None, adapter, *, out: Path, model_name: str,
             fingerprint: dict, full: dict | None, progress, report_only: bool = False) -> dict | None:
    """One (task, method, peak) cell, read back when its JSON holds the same inputs. `full`: the task's full
    cache cell (None for the full cache itself), the reference of the agreement metrics. report_only: None
    instead of computing a missing cell."""
    path = cell_path(out, model_name, task.name, method, peak)
    interval = plan.interval
    fp = {**fingerprint, "method": method.name, "peak": peak,
          "interval": interval if method.kind == "decode" else None,
          "keep_recent": plan.keep_recent if method.kind == "decode" else None,
          "snapkv_window": plan.snapkv_window if method.press == "snapkv" else None}
    if path.is_file():
        try:
            cell = json.loads(path.read_text())
        except json.JSONDecodeError:
            cell = {}
        if cell.get("complete") and all(cell.get(k) == v for k, v in fp.items()):
            progress.update(len(task.samples))
            return cell
    if report_only:
        progress.update(len(task.samples))
        return None
    progress.set_postfix_str(f"{task.name} {method.name} P={peak}", refresh=True)
    full_by_id = {r["id"]: r for r in full["samples"]} if full is not None else None
    records = []
    t0 = time.perf_counter()
    for batch in _batches(task.samples, plan.batch_size):
        answers, eos = generate_batch(model, task, batch, plan, method, peak, adapter, interval)
        for s, toks in zip(batch, answers, strict=True):
            text = task.decode([t for t in toks if t not in eos])
            rec = {"id": s.id, "n_prompt": len(s.prompt_ids), "generated_ids": toks, "prediction": text}
            if full_by_id is not None:
                ref = full_by_id[s.id]
                rec["agreement_rouge_l"] = agreement_rouge(text, ref["prediction"])
                rec["divergence_tokens"] = first_divergence(toks, ref["generated_ids"])
                rec["full_answer_tokens"] = len(ref["generated_ids"])
            records.append(rec)
        progress.update(len(batch))
    order = {s.id: i for i, s in enumerate(task.samples)}
    records.sort(key=lambda r: order[r["id"]])
    cell = {"complete": True, **fp, "task": task.name, "kind": method.kind, "press": method.press,
            "budget": None if peak is None else (peak - task.max_new_tokens if method.kind == "prefill"
                                                 else peak - interval),
            "max_new_tokens": task.max_new_tokens, "seconds": time.perf_counter() - t0, "samples": records}
    path.parent.mkdir(parents=True, exist_ok=True)
    from lkv_jax.atomic_files import atomic_write_text

    atomic_write_text(path, json.dumps(cell, indent=1) + "\n")
    return cell


def score_cell(cell: dict, task, full: dict | None) -> dict:
    """The cell with each sample's task score (against the full cache's answer where the task has none) and
    the full cache's own agreement (itself: ROUGE-L 1, divergence = its length)."""
    by_id = {s.id: s for s in task.samples}
    if full is None:
        full = cell
    full_text = {r["id"]: r["prediction"] for r in full["samples"]}
    samples = []
    for r in cell["samples"]:
        s = by_id[r["id"]]
        if task.answers_from_fullkv:
            s = dataclasses.replace(s, answers=(full_text[r["id"]],))
        r = {**r, "score": float(task.score(r["prediction"], s))}
        if cell is full:
            r.update(agreement_rouge_l=agreement_rouge(r["prediction"], r["prediction"]),
                     divergence_tokens=len(r["generated_ids"]), full_answer_tokens=len(r["generated_ids"]))
        samples.append(r)
    return {**cell, "samples": samples}


# ----------------------------------------------------------------------------------------------
# aggregates


def aggregate(cell: dict, task_name: str, config) -> dict:
    import numpy as np

    from lkv_jax.evaluation.uncertainty import score_interval

    recs = cell["samples"]
    final = float(np.mean([r["n_prompt"] + len(r["generated_ids"]) for r in recs]))
    peak = cell["peak"] if cell["peak"] is not None else final
    return {"task": task_name, "method": cell["method"], "peak": cell["peak"], "budget": cell.get("budget"),
            "peak_entries": peak, "peak_cache_mib": cache_bytes(config, 1) * peak / 2**20,
            "score": score_interval({task_name: [r["score"] for r in recs]}),
            "agreement_rouge_l": score_interval({task_name: [r["agreement_rouge_l"] for r in recs]}),
            "divergence_tokens": float(np.mean([r["divergence_tokens"] for r in recs])),
            "full_answer_tokens": float(np.mean([r["full_answer_tokens"] for r in recs])),
            "answer_tokens": float(np.mean([len(r["generated_ids"]) for r in recs])), "n_samples": len(recs)}


def paired(cells: dict, tasks, peaks: dict) -> list[dict]:
    """LookaheadKV minus every other decoding-time scorer (and the full cache), per task and peak, on the
    task score and on the agreement ROUGE-L: {task, peak, other, metric, mean, lo, hi, p_better}."""
    from lkv_jax.evaluation.uncertainty import paired_difference

    out = []
    for task in tasks:
        for peak in peaks[task.name]:
            ref = cells.get((task.name, REFERENCE, peak))
            if ref is None:
                continue
            others = [f"decode-{s}" for s in DECODING_SCORERS if f"decode-{s}" != REFERENCE]
            for other in [*others, "prefill-lookaheadkv", "fullkv"]:
                cell = cells.get((task.name, other, None if other == "fullkv" else peak))
                if cell is None:
                    continue
                for metric in ("score", "agreement_rouge_l"):
                    a = {task.name: {r["id"]: r[metric] for r in ref["samples"]}}
                    b = {task.name: {r["id"]: r[metric] for r in cell["samples"]}}
                    out.append({"task": task.name, "peak": peak, "other": other, "metric": metric,
                                **paired_difference(a, b)})
    return out


# ----------------------------------------------------------------------------------------------
# cost


def compiled_memory(fn, *args) -> dict | None:
    """The compiled program's memory (`jax.jit(...).lower(...).compile().memory_analysis()`): arguments,
    outputs, temporaries and their sum less aliased bytes, in bytes (None where the backend gives none);
    args[0] are the parameters, whose bytes are reported apart."""
    import jax

    try:
        stats = fn.lower(*args).compile().memory_analysis()
    except Exception as e:  # noqa: BLE001 -- a backend without the analysis: report why, keep the run
        return {"error": f"{type(e).__name__}: {e}"}
    if stats is None:
        return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
    out = {k: int(getattr(stats, k, 0) or 0) for k in keys}
    out["peak_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"] + out["temp_size_in_bytes"]
                         - out["alias_size_in_bytes"])
    # the model's weights are an argument of every configuration: what the cache and the loop add is the rest
    params = sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(args[0]))
    out["params_bytes"] = params
    out["peak_minus_params_bytes"] = out["peak_bytes"] - params
    return out


@dataclasses.dataclass
class _Loop:
    """One configuration of the cost measurement: the jitted decode loop, a function making its arguments
    afresh (the evicting loop donates its cache), and the cache slots it holds (per layer and KV head)."""

    fn: object
    make_args: object
    capacity: int


def measure_cost(model, task, plan: Plan, adapter, budget: int, log) -> dict:
    """Per generated token, one prompt: decoding `cost_new_tokens` tokens (no EOS) from the prompt compressed
    by LookaheadKV to `budget`, without decoding-time eviction (the cache grows to budget + n) and with it at
    each of the plan's intervals (LookaheadKV and SnapKV scorers); the full cache as a reference. Only the
    jitted decode loop is timed (its arguments are made before the clock starts): a warm-up call each
    (compilation excluded), then `cost_repeats` rounds alternating between the configurations; the best of
    them (and the median)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from lkv_jax.compression import compress
    from lkv_jax.decoding import jitted_greedy_loop
    from lkv_jax.decoding_press import jitted_evicting_loop, pack
    from lkv_jax.inference import prefill
    from lkv_jax.sharding import entry_mesh

    n = plan.cost_new_tokens
    sample = max(task.samples, key=lambda s: len(s.prompt_ids))
    ids = np.asarray(sample.prompt_ids, np.int32)[None]
    config = model.config
    config.check_length(ids.shape[1] + n + 64)
    graphdef, params = nnx.split(model)
    mesh = entry_mesh(model, None, batch=1)
    plain = jitted_greedy_loop(graphdef, params, mesh, max_new_tokens=n, eos=(), pad=0)
    evicting = jitted_evicting_loop(graphdef, params, mesh, max_new_tokens=n, eos=(), pad=0)
    full_cache, full_logits = prefill(model, ids, extra_capacity=n - 1)
    comp = {"lookaheadkv": compress(model, ids, make_press("lookaheadkv", budget, plan, adapter))}
    grown = comp["lookaheadkv"].cache.grow(n - 1)
    loops = {"fullkv": _Loop(plain, lambda: (params, full_cache, full_logits), ids.shape[1] + n - 1),
             "prefill-only": _Loop(plain, lambda: (params, grown, comp["lookaheadkv"].logits), budget + n - 1)}
    for N in plan.cost_intervals:
        for scorer in ("lookaheadkv", "snapkv"):
            if scorer == "snapkv" and plan.snapkv_window > N:
                continue
            sc = make_press(scorer, budget, plan, adapter)
            if scorer not in comp:
                comp[scorer] = compress(model, ids, sc)
            dp = decoding_press(sc, budget, N, plan.keep_recent)

            def make(dp=dp, c=comp[scorer]):
                # the loop donates its cache: a copy, so that no buffer of the compressed cache is deleted
                cache, fill = pack(jax.tree.map(jnp.copy, c.cache), dp.slots)
                return params, dp, cache, jnp.asarray(fill, jnp.int32), c.logits

            loops[f"decode-{scorer} N={N}"] = _Loop(evicting, make, dp.slots)
    times: dict[str, list[float]] = {k: [] for k in loops}

    def timed(loop: _Loop) -> float:
        args = loop.make_args()
        jax.block_until_ready(args)
        t = time.perf_counter()
        jax.block_until_ready(loop.fn(*args))
        return 1000.0 * (time.perf_counter() - t)

    for name, loop in loops.items():
        timed(loop)  # compile
        log(f"cost: {name} compiled")
    for _ in range(plan.cost_repeats):
        for name, loop in loops.items():  # alternating: a change of load hits every configuration alike
            times[name].append(timed(loop))
    rows = {}
    for name, loop in loops.items():
        # the best of the repeats, as the evaluation runner times its overhead: on a shared machine the other
        # load only ever adds time, so the minimum is the least disturbed estimate (the median is kept too)
        ms = min(times[name])
        rows[name] = {"ms_per_token": ms / n, "ms_per_token_median": statistics.median(times[name]) / n,
                      "ms_all": times[name],
                      "cache_capacity": loop.capacity, "cache_bytes": cache_bytes(config, loop.capacity),
                      "compiled_memory": compiled_memory(loop.fn, *loop.make_args())}
    base_ms = rows["prefill-only"]["ms_per_token"]
    for r in rows.values():
        r["ratio_to_prefill_only"] = r["ms_per_token"] / base_ms
    return {"task": task.name, "n_prompt": int(ids.shape[1]), "new_tokens": n, "budget": budget, "batch": 1,
            "repeats": plan.cost_repeats, "rows": rows, "platform": jax.default_backend()}


# ----------------------------------------------------------------------------------------------
# report


def write_plot(aggs: list[dict], tasks, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(tasks), figsize=(5.2 * len(tasks), 7), squeeze=False)
    for j, task in enumerate(tasks):
        rows = [a for a in aggs if a["task"] == task.name]
        methods = sorted({a["method"] for a in rows if a["method"] != "fullkv"})
        for i, (metric, label) in enumerate((("score", "task score"), ("agreement_rouge_l", "ROUGE-L vs full cache"))):
            ax = axes[i][j]
            for m in methods:
                pts = sorted((a["peak_cache_mib"], a[metric]["mean"]) for a in rows if a["method"] == m)
                style = "-o" if m.startswith("decode") else "--s"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=m, lw=2.2 if m == REFERENCE else 1.2)
            for a in rows:
                if a["method"] == "fullkv":
                    ax.axhline(a[metric]["mean"], color="k", ls=":", lw=1)
                    ax.plot([a["peak_cache_mib"]], [a[metric]["mean"]], "k*", ms=10, label="fullkv")
            ax.set_xscale("log")
            ax.set(xlabel="peak KV cache per sequence (MiB)", ylabel=label, title=task.name)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ci(x: dict) -> str:
    return f"{x['mean']:.1f} [{x['lo']:.1f}, {x['hi']:.1f}]"


def write_markdown(result: dict, path: Path) -> Path:
    aggs, lines = result["aggregates"], []
    lines.append(f"# Decoding-time eviction: {result['model']}\n")
    lines.append(f"Adapter: {result['adapter']}. Interval N = {result['plan']['interval']} (quality runs); "
                 f"budgets B = {', '.join(str(f) for f in result['plan']['fractions'])} of the final length; "
                 f"peak P = B + N for decode-*, the prompt press keeps P - max_new_tokens for prefill-*. "
                 f"{result['plan']['samples']} samples per task; 95% bootstrap intervals. decode-lookaheadkv's "
                 f"cache also allocates {result['lookahead_scratch_slots']} scratch slots for its glimpse (empty "
                 f"between evictions; counted in the cost table's slots, not in P).\n")
    for task in result["tasks"]:
        rows = [a for a in aggs if a["task"] == task["name"]]
        peaks = sorted({a["peak"] for a in rows if a["peak"] is not None})
        full = next((a for a in rows if a["method"] == "fullkv"), None)
        lines.append(f"## {task['name']} (max_new_tokens {task['max_new_tokens']}, final length "
                     f"{task['final_length']:.0f}, full cache answer {full['answer_tokens']:.0f} tokens)\n"
                     if full else f"## {task['name']}\n")
        budgets = dict(zip(task["peaks"], task["budgets"], strict=True))
        for metric, title in (("score", "task score"), ("agreement_rouge_l", "ROUGE-L against the full cache's answer"),
                              ("divergence_tokens", "tokens until the first divergence from the full cache")):
            lines.append(f"**{title}**\n")
            lines.append("| method | " + " | ".join(f"P={p} (B={budgets[p]})" for p in peaks) + " |")
            lines.append("| --- |" + " --- |" * len(peaks))
            for m in ["fullkv", *sorted({a["method"] for a in rows} - {"fullkv"})]:
                cells = []
                for p in peaks:
                    a = next((a for a in rows if a["method"] == m and (a["peak"] == p or m == "fullkv")), None)
                    if a is None:
                        cells.append("-")
                    elif metric == "divergence_tokens":
                        cells.append(f"{a[metric]:.1f}")
                    else:
                        cells.append(_ci(a[metric]))
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
    if result["paired"]:
        lines.append(f"## {REFERENCE} minus each other method (paired bootstrap, points of 100)\n")
        lines.append("| task | peak | other | metric | difference [95% CI] | P(better) |")
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for d in result["paired"]:
            lines.append(f"| {d['task']} | {d['peak']} | {d['other']} | {d['metric']} | "
                         f"{d['mean']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}] | {d['p_better']:.2f} |")
        lines.append("")
    cost = result.get("cost")
    if cost:
        lines.append(f"## Cost per generated token ({cost['task']}, one prompt of {cost['n_prompt']} tokens, "
                     f"{cost['new_tokens']} new tokens, B = {cost['budget']}, best of {cost['repeats']}, "
                     f"{cost['platform']})\n")
        lines.append("| configuration | ms / token | (median) | vs prefill-only | cache slots | cache MiB "
                     "| compiled loop MiB (weights excluded) |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for name, r in cost["rows"].items():
            mem = r.get("compiled_memory")
            mem_s = (f"{mem['peak_minus_params_bytes'] / 2**20:.2f}" if isinstance(mem, dict) and "peak_bytes" in mem
                     else "-")
            lines.append(f"| {name} | {r['ms_per_token']:.3f} | {r['ms_per_token_median']:.3f} | "
                         f"{100 * (r['ratio_to_prefill_only'] - 1):+.1f}% | "
                         f"{r['cache_capacity']} | {r['cache_bytes'] / 2**20:.2f} | {mem_s} |")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------------------------
# main


def budgets_for(final_length: float, fractions, interval: int) -> list[int]:
    """Budgets B (multiples of 8, at least 8) at the given fractions of the final length; peaks B + N."""
    return sorted({max(8, int(round(final_length * f / 8)) * 8) for f in fractions})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    ap.add_argument("--out", default=None, help="output directory (resumable; default runs/decoding/<model>)")
    ap.add_argument("--quick", action="store_true", help="a seconds-long smoke run on the tiny target")
    ap.add_argument("--model-dir", default=None, help="model directory (default: the shipped tiny target / the "
                                                      "converted SmolLM2 of make demo-real)")
    ap.add_argument("--adapter", default=None, help="LookaheadKV adapter file (default: the shipped SmolLM2 one / "
                                                    "OUT/adapter, trained first on the tiny target)")
    ap.add_argument("--samples", type=int, default=None, help="samples per task")
    ap.add_argument("--length", type=int, default=None, help="context length of the tasks")
    ap.add_argument("--tasks", default=None, help="comma separated task keys (tiny: tag_list, "
                                                 "tag_list.n_items=12, ...; smollm2: summary, niah_multivalue, ...)")
    ap.add_argument("--fractions", default=None, help="budgets as fractions of the final length, comma separated")
    ap.add_argument("--budgets", default=None, help="explicit budgets B, comma separated (instead of --fractions)")
    ap.add_argument("--interval", type=int, default=None, help="N of the quality runs")
    ap.add_argument("--keep-recent", type=int, default=None, help="DecodingPress keep_recent (default: its own)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--summary-new-tokens", type=int, default=None, help="max_new_tokens of the summary task")
    ap.add_argument("--cost-new-tokens", type=int, default=None)
    ap.add_argument("--cost-repeats", type=int, default=None)
    ap.add_argument("--methods", default=None,
                    help="comma separated methods besides fullkv (default: all of "
                         + ", ".join(m.name for m in METHODS) + ")")
    ap.add_argument("--no-cost", action="store_true", help="skip the cost measurement")
    ap.add_argument("--report-only", action="store_true",
                    help="write results.json/md and the plot from the cells already computed (and the cost file "
                         "if there is one); compute nothing but the full-cache cells")
    ap.add_argument("--stage", choices=("all", "adapter"), default="all",
                    help="adapter: only train the tiny target's adapter (OUT/adapter) and stop")
    args = ap.parse_args(argv)
    if args.quick:
        args.model = "tiny"
    plan = PLANS["quick" if args.quick else args.model]
    overrides = {"samples": args.samples, "length": args.length, "interval": args.interval,
                 "keep_recent": args.keep_recent, "batch_size": args.batch_size,
                 "summary_new_tokens": args.summary_new_tokens, "cost_new_tokens": args.cost_new_tokens,
                 "cost_repeats": args.cost_repeats}
    plan = dataclasses.replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    if args.tasks:
        plan = dataclasses.replace(plan, tasks=tuple(args.tasks.split(",")))
    if args.fractions:
        plan = dataclasses.replace(plan, fractions=tuple(float(x) for x in args.fractions.split(",")))
    out = Path(args.out or f"runs/decoding/{args.model}").absolute()
    out.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    from lkv_jax.evaluation.runner import adapter_fingerprint, model_fingerprint, task_fingerprint
    from lkv_jax.lookahead import load_adapter

    t0 = time.perf_counter()

    def log(msg):
        print(f"[decoding] {msg}  ({time.perf_counter() - t0:.0f}s)", flush=True)

    methods = METHODS
    if args.methods:
        known = {m.name: m for m in METHODS}
        unknown = [m for m in args.methods.split(",") if m not in known]
        if unknown:
            ap.error(f"unknown methods {unknown}; known: {', '.join(known)}")
        methods = tuple(known[m] for m in args.methods.split(","))
    model, tokens, model_dir = load_model(args.model, out, args.model_dir)
    if args.adapter:
        adapter, adapter_name = load_adapter(args.adapter, model.config), args.adapter
    elif args.model == "smollm2":
        adapter, adapter_name = load_adapter(SHIPPED_ADAPTER, model.config), str(SHIPPED_ADAPTER)
    else:
        adapter, adapter_name = tiny_adapter(model, tokens, out, args.quick)
    log(f"model {model_dir} ({model.num_params():,} parameters), adapter {adapter_name}")
    if args.stage == "adapter":
        return 0
    tasks = build_tasks(args.model, plan, tokens)
    model_fp, adapter_fp = model_fingerprint(model), adapter_fingerprint(adapter)
    model_name = "quick" if args.quick else args.model
    n_cells = len(tasks) * (1 + len(plan.fractions if not args.budgets else args.budgets.split(",")) * len(methods))
    bar = tqdm(total=sum(len(t.samples) for t in tasks) * n_cells // len(tasks), desc="decoding eval", unit="sample")
    cells: dict[tuple, dict] = {}
    aggs, task_info, peaks = [], [], {}
    fps = {task.name: {"task_fingerprint": task_fingerprint(task), "model_fingerprint": model_fp,
                       "adapter_fingerprint": adapter_fp, "results_version": RESULTS_VERSION} for task in tasks}
    fulls, budgets = {}, {}
    for task in tasks:  # the full cache first: its answers are the references, its length sets the budgets
        full = run_cell(model, task, plan, FULL, None, adapter, out=out, model_name=model_name,
                        fingerprint=fps[task.name], full=None, progress=bar, report_only=False)
        fulls[task.name] = full = score_cell(full, task, None)
        cells[(task.name, "fullkv", None)] = full
        aggs.append(aggregate(full, task.name, model.config))
        final = aggs[-1]["peak_entries"]
        budgets[task.name] = ([int(b) for b in args.budgets.split(",")] if args.budgets
                              else budgets_for(final, plan.fractions, plan.interval))
        peaks[task.name] = [b + plan.interval for b in budgets[task.name]]
        task_info.append({"name": task.name, "max_new_tokens": task.max_new_tokens, "final_length": final,
                          "budgets": budgets[task.name], "peaks": peaks[task.name], "n_samples": len(task.samples)})
        log(f"{task.name}: final length {final:.0f}, budgets {budgets[task.name]}, peaks {peaks[task.name]}")
    # the middle budget (a quarter of the final length by default) of every task first, then its neighbours:
    # a run stopped early has the headline comparison
    n_b = max(len(b) for b in budgets.values())
    for i in sorted(range(n_b), key=lambda i: (abs(i - n_b // 2), i)):
        for task in tasks:
            if i >= len(peaks[task.name]):
                continue
            peak = peaks[task.name][i]
            for method in methods:
                if not buildable(method, peak, task, plan, adapter):
                    bar.write(f"[decoding] skipping {task.name} {method.name} at P={peak}: its budget cannot hold "
                              "what the press always keeps")
                    bar.update(len(task.samples))
                    continue
                cell = run_cell(model, task, plan, method, peak, adapter, out=out, model_name=model_name,
                                fingerprint=fps[task.name], full=fulls[task.name], progress=bar,
                                report_only=args.report_only)
                if cell is None:
                    continue
                cell = score_cell(cell, task, fulls[task.name])
                cells[(task.name, method.name, peak)] = cell
                aggs.append(aggregate(cell, task.name, model.config))
    bar.close()
    result = {"model": args.model if not args.quick else "tiny (quick)", "model_dir": str(model_dir),
              "adapter": adapter_name,
              "lookahead_scratch_slots": make_press("lookaheadkv", 64, plan, adapter).suffix_slots,
              "plan": dataclasses.asdict(plan), "tasks": task_info, "aggregates": aggs,
              "paired": paired(cells, tasks, peaks),
              "cells": {f"{k[0]}|{k[1]}|{k[2]}": {kk: v for kk, v in c.items() if kk != "samples"} | {
                  "samples": [{kk: v for kk, v in r.items() if kk != "generated_ids"} for r in c["samples"]]}
                  for k, c in cells.items()}}
    if not args.no_cost or args.report_only:
        cost_path = out / f"cost-{model_name}.json"
        cost_key = hashlib.sha1(json.dumps([model_fp, adapter_fp, dataclasses.asdict(plan)]).encode()).hexdigest()[:16]
        cost = json.loads(cost_path.read_text()) if cost_path.is_file() else None
        if (cost is None or cost.get("key") != cost_key) and not args.report_only:
            budget = task_info[0]["budgets"][len(task_info[0]["budgets"]) // 2]  # the middle budget (~1/4)
            cost = {"key": cost_key, **measure_cost(model, tasks[0], plan, adapter, budget, log)}
            cost_path.write_text(json.dumps(cost, indent=1) + "\n")
        if cost is not None:
            result["cost"] = cost
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, out / "results.md")
    write_plot(aggs, tasks, out / "scores.png")
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'scores.png'}")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
