"""The evaluation runner: model x presses x budgets (or ratios) x tasks -> one JSON per cell.

A cell is one (press, budget-or-ratio, task). Its JSON holds every sample's prediction, score and
generated tokens, the cell score (100 x mean), the eviction overhead measured in the same run (time of
`compress` minus a plain prefill of the same batch, after a warm-up call so compilation is excluded)
and the oracle coverage per layer (`lkv_jax.evaluation.oracle`). A cell whose JSON is complete is read
back, not recomputed, so an interrupted run resumes where it stopped. FullKV (no eviction) is its own
cell per task; it runs first, because its greedy responses define the oracle labels.

Batches are left-padded to a multiple of `pad_multiple` tokens and filled up to `batch_size` rows
(repeating a real row, whose output is dropped) so a task compiles a handful of shapes, not one per
sample. Query-aware mode compresses context + question; question-agnostic mode compresses the context
alone, appends the question on the compressed cache (a glimpse with append) and then generates.

The press cells of a task run batch by batch, all of them on each batch: the batch's prompt is prefilled
once (`compression.shared_prefix`, every slot but the last `prefix_tail`) and every press and budget
starts from it, so a grid of P presses x S budgets costs about one prefill per batch, not P x S. Batches
whose eviction overhead is timed run the whole `compress` instead, so the overhead is the one a user sees.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from lkv_jax.atomic_files import atomic_write_text
from lkv_jax.compression import compress_prompt, shared_prefix
from lkv_jax.decoding import generate_from_cache
from lkv_jax.errors import BudgetError, LkvError
from lkv_jax.evaluation.oracle import coverage, evidence_recall, kept_mask, response_labels, slots_to_positions
from lkv_jax.evaluation.tasks import EvalSample, EvalTask
from lkv_jax.inference import DEFAULT_CHUNK, Prompt, PromptPrefix, glimpse, prefill, prepare_prompt
from lkv_jax.padding import pad_left, pad_right, round_up, trim_at_eos
from lkv_jax.presses.base import accepts_prefix
from lkv_jax.presses.registry import make_press, press_needs

FULL_KV = "fullkv"
MODES = ("query-aware", "question-agnostic")


@dataclasses.dataclass(frozen=True)
class PressSpec:
    """A registered press name plus keyword overrides; `label` names it in files, tables and plots.

    Written "name" or "name:key=value:key=value", e.g. "snapkv:window_size=8" (values are Python
    literals: numbers, True/False/None, quoted strings; anything else is taken as a string).
    "speckv:draft_model=self" makes the evaluated model its own draft (see `SpecKVPress`): its full-cache
    greedy response then scores the prompt, the response-attention oracle that LookaheadKV learns."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    label: str = ""

    @staticmethod
    def parse(text: str) -> PressSpec:
        parts = [p.strip() for p in text.strip().split(":")]
        if not parts[0]:
            raise ValueError(f"empty press name in {text!r}")
        kwargs = []
        for p in parts[1:]:
            if "=" not in p:
                raise ValueError(f"press option {p!r} in {text!r} must read key=value")
            k, v = p.split("=", 1)
            try:
                value = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                value = v
            kwargs.append((k.strip(), value))
        return PressSpec(parts[0].lower(), tuple(kwargs), text.strip())

    @property
    def needs_adapter(self) -> bool:
        return press_needs(self.name) == "adapter"

    def build(self, setting: Setting, adapter=None):
        """The press at one budget or ratio (a press that needs an adapter gets it)."""
        kw = dict(self.kwargs)
        if self.needs_adapter:
            if adapter is None:
                raise ValueError(f"the {self.name} press needs an adapter (--adapter FILE)")
            kw["adapter"] = adapter
        try:
            return make_press(self.name, **setting.press_kwargs(), **kw)
        except (ValueError, TypeError) as e:
            # the message names the cell; the type (BudgetError: skip the cell) is kept
            kind = type(e) if isinstance(e, LkvError) else ValueError
            raise kind(f"press {self.label or self.name} at {setting.label}: {e}") from e


@dataclasses.dataclass(frozen=True)
class Setting:
    """A budget (entries kept per layer and KV head) or a compression ratio (fraction removed)."""

    kind: str  # "budget" | "ratio"
    value: float

    @property
    def label(self) -> str:
        return f"budget={int(self.value)}" if self.kind == "budget" else f"ratio={self.value:g}"

    def press_kwargs(self) -> dict:
        return {"budget": int(self.value)} if self.kind == "budget" else {"compression_ratio": float(self.value)}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """presses: what to compare with FullKV; budgets or ratios: the settings (one kind per run);
    mode: "query-aware" (question in the compressed prompt, the paper's setting) or
    "question-agnostic" (kvpress's default); oracle: coverage diagnostics (needs FullKV responses);
    measure_overhead: time compress against a plain prefill of the same batch (best of
    `timing_repeats` runs each, after a warm-up run per new shape) on the first `timing_batches`
    batches of each cell (0: every batch). share_prefill: prefill each batch once for every press and
    budget (all slots but the last `prefix_tail`, at least the largest press window); False runs each
    cell's own `compress` (the same results up to float rounding, P x S prefills)."""

    presses: tuple[PressSpec, ...]
    budgets: tuple[int, ...] = ()
    ratios: tuple[float, ...] = ()
    mode: str = "query-aware"
    batch_size: int = 4
    chunk_size: int = DEFAULT_CHUNK
    pad_multiple: int = 64
    oracle: bool = True
    measure_overhead: bool = True
    timing_repeats: int = 3
    timing_batches: int = 2
    share_prefill: bool = True
    prefix_tail: int = 64

    def __post_init__(self):
        if bool(self.budgets) == bool(self.ratios):
            raise ValueError("give budgets or ratios (exactly one of the two)")
        if any(int(b) < 1 for b in self.budgets):
            raise ValueError(f"budgets must be positive, got {self.budgets}")
        if any(not 0.0 <= r < 1.0 for r in self.ratios):
            raise ValueError(f"ratios must lie in [0, 1), got {self.ratios}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.batch_size < 1 or self.pad_multiple < 1 or self.timing_repeats < 1 or self.timing_batches < 0:
            raise ValueError("batch_size, pad_multiple and timing_repeats must be >= 1, timing_batches >= 0")
        if self.prefix_tail < 1:
            raise ValueError(f"prefix_tail must be >= 1, got {self.prefix_tail}")
        labels = [p.label or p.name for p in self.presses]
        if len(set(labels)) != len(labels) or FULL_KV in labels:
            raise ValueError(f"press labels must be distinct and not {FULL_KV!r}: {labels}")

    @property
    def settings(self) -> tuple[Setting, ...]:
        if self.budgets:
            return tuple(Setting("budget", int(b)) for b in self.budgets)
        return tuple(Setting("ratio", float(r)) for r in self.ratios)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


def cell_path(out_dir, press_label: str, setting_label: str, task_name: str) -> Path:
    """out_dir/cells/<press>/<setting>/<task>.json (FullKV: setting "full")."""
    return Path(out_dir) / "cells" / _safe(press_label) / _safe(setting_label) / f"{_safe(task_name)}.json"


def task_fingerprint(task: EvalTask) -> str:
    """A digest of the task's token ids, sample ids and generation length: a finished cell is reused
    only for exactly the same inputs (another seed or tokenizer recomputes it)."""
    h = hashlib.sha1(f"{task.name}|{task.max_new_tokens}|{task.eos_token_ids}".encode())
    for s in task.samples:
        h.update(s.id.encode())
        h.update(np.asarray(s.context_ids, np.int64).tobytes())
        h.update(b"|")
        h.update(np.asarray(s.question_ids, np.int64).tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """A digest of the model's config and a per-tensor checksum of its weights (sums rounded to 6
    significant digits, so the same checkpoint on another machine still matches)."""
    h = hashlib.sha1(repr(model.config).encode())
    for leaf in jax.tree_util.tree_leaves(nnx.state(model)):
        h.update(f"{leaf.shape}:{float(jax.numpy.sum(leaf.astype(np.float32))):.6g}".encode())
    return h.hexdigest()[:16]


def adapter_fingerprint(adapter) -> str | None:
    """A digest of every adapter tensor (None without an adapter)."""
    if adapter is None:
        return None
    h = hashlib.sha1()
    for leaf in jax.tree_util.tree_leaves(adapter):
        h.update(np.asarray(leaf, np.float32).tobytes())
    return h.hexdigest()[:16]


# Part of every cell's fingerprint: bump it when a change alters what a press keeps or how the answers are
# decoded, so that cells computed before are recomputed, not reused.
RESULTS_VERSION = 2


def _read_complete(path: Path, fingerprint: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        cell = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    ok = cell.get("complete") and all(cell.get(k) == v for k, v in fingerprint.items())
    return cell if ok else None


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")  # a cell is complete or absent


def _batches(samples: tuple[EvalSample, ...], batch_size: int, agnostic: bool) -> list[list[EvalSample]]:
    """Sorted by length (less padding); question-agnostic batches share one question length (the
    question is appended as one [B, Q] block)."""
    order = sorted(samples, key=lambda s: (len(s.question_ids) if agnostic else 0, len(s.prompt_ids), s.id))
    out: list[list[EvalSample]] = []
    for s in order:
        if out and len(out[-1]) < batch_size and (not agnostic or len(out[-1][0].question_ids) == len(s.question_ids)):
            out[-1].append(s)
        else:
            out.append([s])
    return out


def _padded(rows: list[np.ndarray], batch_size: int, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token rows to a multiple of `multiple` and repeat row 0 up to batch_size rows."""
    rows = rows + [rows[0]] * (batch_size - len(rows))
    return pad_left(rows, round_up(max(len(r) for r in rows), multiple))


def _timed(fn) -> tuple[Any, float]:
    """fn()'s result, once ready, and the milliseconds it took."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, 1000.0 * (time.perf_counter() - start)


def _batch_prompt(model, batch: list[EvalSample], cfg: EvalConfig) -> Prompt:
    """The prepared prompt [batch_size, T] a batch is compressed as (the context alone if agnostic)."""
    agnostic = cfg.mode == "question-agnostic"
    rows = [s.context_ids if agnostic else s.prompt_ids for s in batch]
    ids, mask = _padded(rows, cfg.batch_size, cfg.pad_multiple)
    return prepare_prompt(ids, mask, cfg.chunk_size, model.config.vocab_size)


def _batch_prefix(model, prompt: Prompt, cfg: EvalConfig, presses) -> PromptPrefix | None:
    """The batch's shared prefix for `presses` (None when sharing is off or the prompt is too short)."""
    if not cfg.share_prefill or not presses:
        return None
    tail = round_up(max([cfg.prefix_tail, *(p.window for p in presses)]), 8)
    T = prompt.ids.shape[1]
    return shared_prefix(model, prompt, tail) if tail < T else None


def _run_batch(model, batch: list[EvalSample], task: EvalTask, press, cfg: EvalConfig, eos: tuple[int, ...],
               pad_id: int, *, measure: bool, warm_up: bool, oracle: OracleLabels | None,
               prompt: Prompt | None = None, prefix: PromptPrefix | None = None) -> tuple[list[dict], dict]:
    """Compress (or fully prefill), append the question if agnostic, generate, score, and (measure)
    time compress against a plain prefill: best of `timing_repeats` alternating runs, after one warm-up
    run of each when the shape is new (compilation excluded). `prompt`: the batch's `_batch_prompt` (made
    here if None); `prefix`: its `_batch_prefix`, which compression starts from unless the batch is timed.

    Returns per-sample records and the batch's timings {compress_ms, prefill_ms} (ms for the whole
    padded batch; empty when not measured)."""
    agnostic = cfg.mode == "question-agnostic"
    B, n_real = cfg.batch_size, len(batch)
    prompt = _batch_prompt(model, batch, cfg) if prompt is None else prompt
    ids, mask = prompt.ids, prompt.valid
    Q = len(batch[0].question_ids) if agnostic else 0
    room = Q + task.max_new_tokens
    timing: dict[str, float] = {}

    def run_prefill(extra):
        return prefill(model, ids, mask, chunk_size=cfg.chunk_size, extra_capacity=extra)

    def run_compress():
        # a timed batch compresses from scratch: the overhead reported is the one `compress` costs
        shared = None if measure or not accepts_prefix(press) else prefix
        return compress_prompt(model, prompt, press, prefix=shared)

    # (what this batch needs, the plain-prefill baseline it is timed against)
    main = (lambda: run_prefill(room)) if press is None else run_compress
    base = None if press is None else (lambda: run_prefill(0))
    if measure and warm_up:
        _timed(main)
        if base is not None:
            _timed(base)
    best_main = best_base = float("inf")
    for _ in range(cfg.timing_repeats if measure else 1):
        # alternate the two so a change of load on the machine hits both alike
        out, ms = _timed(main)
        best_main = min(best_main, ms)
        if measure and base is not None:
            best_base = min(best_base, _timed(base)[1])
    if measure:
        if press is None:
            timing["prefill_ms"] = best_main
        else:
            timing["compress_ms"], timing["prefill_ms"] = best_main, best_base

    kept_positions = None
    if press is None:
        cache, logits = out
    else:
        # room to decode, rounded up so budgets of one bucket share one compiled greedy loop
        n_slots = out.cache.capacity(0)
        cache, logits = out.cache.grow(round_up(n_slots + room, cfg.pad_multiple) - n_slots), out.logits
        kept_positions = [np.asarray(k) for k in out.kept_positions]
    if agnostic and Q:
        q_rows = [s.question_ids for s in batch] + [batch[0].question_ids] * (B - n_real)
        g = glimpse(model, cache, np.asarray(q_rows, np.int32), append=True)
        cache, logits = g.cache, g.logits[:, -1]
    tokens = generate_from_cache(model, cache, logits, task.max_new_tokens, eos_token_id=eos, pad_token_id=pad_id)

    records = []
    for i, s in enumerate(batch):
        generated = trim_at_eos(tokens[i], eos, keep_eos=True)
        prediction = task.decode(trim_at_eos(tokens[i], eos, keep_eos=False))
        records.append({"id": s.id, "prediction": prediction, "answers": list(s.answers),
                        "score": float(task.score(prediction, s)), "n_prompt": len(s.prompt_ids),
                        "n_context": len(s.context_ids), "n_question": len(s.question_ids),
                        "generated_ids": generated})
    if press is not None:
        labels = oracle.labels(model, batch, cfg) if oracle is not None else None
        for i, s in enumerate(batch):
            n_all = len(s.prompt_ids)
            n_compressed = len(s.context_ids) if agnostic else n_all  # what the press saw
            kept = [kept_mask(layer_kept[i], n_compressed) for layer_kept in kept_positions]  # per layer [K, n]
            if s.extra.get("evidence_positions"):  # the records lie in the context
                records[i]["evidence_recall"] = evidence_recall(kept, s.extra["evidence_positions"]).tolist()
            if s.extra.get("distractor_positions"):  # records that look alike but do not hold the answer
                records[i]["distractor_recall"] = evidence_recall(kept, s.extra["distractor_positions"]).tolist()
            if labels is not None:
                # the question (agnostic runs: appended after compression) is always present
                padded = [np.pad(m, ((0, 0), (0, n_all - n_compressed))) for m in kept]
                always = np.arange(n_all) >= n_compressed
                records[i]["oracle_coverage"] = coverage(labels[i], padded, always).tolist()
    return records, timing


class OracleLabels:
    """The FullKV responses of a task and, computed on first use, each sample's response-attention label
    (float32 [n_layers, N, n_prompt] in position space), kept in memory up to `max_bytes` so the cells
    of every press and budget share one computation."""

    def __init__(self, responses: dict[str, list[int]], max_bytes: int = 1 << 30):
        self.responses = responses
        self.max_bytes = max_bytes
        self.cache: dict[str, np.ndarray] = {}
        self.bytes = 0

    def labels(self, model, batch: list[EvalSample], cfg: EvalConfig) -> list[np.ndarray]:
        if all(s.id in self.cache for s in batch):
            return [self.cache[s.id] for s in batch]
        B = cfg.batch_size
        ids, mask = _padded([s.prompt_ids for s in batch], B, cfg.pad_multiple)
        prompt = prepare_prompt(ids, mask, cfg.chunk_size, model.config.vocab_size)
        resp = [self.responses[s.id] for s in batch]
        resp = resp + [resp[0]] * (B - len(resp))
        r_ids, r_mask = pad_right(resp, round_up(max(len(r) for r in resp), 16))  # few shapes, few compiles
        labels = slots_to_positions(response_labels(model, prompt, r_ids, r_mask), np.asarray(prompt.valid))
        for s, lab in zip(batch, labels, strict=False):
            if self.bytes + lab.nbytes <= self.max_bytes:
                self.cache[s.id] = lab
                self.bytes += lab.nbytes
        return labels[: len(batch)]


def _summary(records: list[dict], timings: list[dict]) -> dict:
    out: dict[str, Any] = {"score": 100.0 * float(np.mean([r["score"] for r in records]))}
    tm: dict[str, Any] = {"n_batches": len(timings)}
    for key in ("compress_ms", "prefill_ms"):
        vals = [t[key] for t in timings if key in t]
        tm[key] = float(np.mean(vals)) if vals else None
    if tm["compress_ms"] is not None and tm["prefill_ms"] is not None:
        tm["overhead_ms"] = tm["compress_ms"] - tm["prefill_ms"]
        tm["overhead_pct"] = 100.0 * tm["overhead_ms"] / tm["prefill_ms"]
    out["timing"] = tm
    # per-layer means over the samples that have the measure: {name_per_layer: [...], name_mean: float}
    for group, name, key in (("evidence", "recall", "evidence_recall"), ("evidence", "distractor", "distractor_recall"),
                             ("oracle", "coverage", "oracle_coverage")):
        rows = [r[key] for r in records if key in r]
        if rows and (group in out or name != "distractor"):  # distractor recall only beside evidence recall
            per_layer = np.mean(np.asarray(rows), axis=0)
            out.setdefault(group, {}).update({f"{name}_per_layer": per_layer.tolist(),
                                              f"{name}_mean": float(per_layer.mean())})
    return out


@dataclasses.dataclass
class _Cell:
    """One cell of a task being computed: what it is, where it goes, what it has gathered so far."""

    spec: PressSpec | None
    setting: Setting | None
    press: Any
    path: Path
    fingerprint: dict
    records: list = dataclasses.field(default_factory=list)
    timings: list = dataclasses.field(default_factory=list)
    warmed: set = dataclasses.field(default_factory=set)

    @property
    def label(self) -> str:
        return FULL_KV if self.spec is None else (self.spec.label or self.spec.name)

    @property
    def setting_label(self) -> str:
        return "full" if self.spec is None else self.setting.label


def _plan_cell(model, task: EvalTask, press_spec: PressSpec | None, setting: Setting | None, cfg: EvalConfig,
               out_dir, adapter, model_fp: str | None) -> tuple[_Cell, dict | None]:
    """The cell and, when its JSON is already complete for the same inputs, that JSON."""
    named = _Cell(press_spec, setting, None, Path(), {})  # its label and setting label name the file
    path = cell_path(out_dir, named.label, named.setting_label, task.name)
    # what makes a finished cell reusable: same inputs, mode, model and (LookaheadKV) adapter
    uses_adapter = press_spec is not None and press_spec.needs_adapter
    fingerprint = {"fingerprint": task_fingerprint(task), "results_version": RESULTS_VERSION, "mode": cfg.mode,
                   "model_fingerprint": model_fp if model_fp is not None else model_fingerprint(model),
                   "adapter_fingerprint": adapter_fingerprint(adapter) if uses_adapter else None}
    done = _read_complete(path, fingerprint)
    press = None if press_spec is None or done is not None else press_spec.build(setting, adapter)
    return _Cell(press_spec, setting, press, path, fingerprint), done


def _task_eos(model, task: EvalTask) -> tuple[tuple[int, ...], int]:
    """(EOS ids, padding id) generation stops at / pads with."""
    cfg_model = model.config
    eos = task.eos_token_ids if task.eos_token_ids is not None else tuple(cfg_model.eos_token_id or ())
    eos = tuple(int(e) for e in eos)
    pad_id = cfg_model.pad_token_id if cfg_model.pad_token_id is not None else (eos[0] if eos else 0)
    return eos, int(pad_id)


def _compute_cells(model, task: EvalTask, cells: list[_Cell], cfg: EvalConfig, *, oracle: OracleLabels | None,
                   progress=None) -> list[dict]:
    """Run every batch of the task through every cell (one shared prefill per batch), write each cell's
    JSON as soon as its last batch is done, return the cell dicts."""
    eos, pad_id = _task_eos(model, task)
    agnostic = cfg.mode == "question-agnostic"
    presses = [c.press for c in cells if c.press is not None and accepts_prefix(c.press)]
    batches = list(_batches(task.samples, cfg.batch_size, agnostic))
    finished: dict[int, dict] = {}
    for b, batch in enumerate(batches):
        prompt = _batch_prompt(model, batch, cfg)
        prefix = _batch_prefix(model, prompt, cfg, presses) if len(presses) > 1 else None
        # a new padded shape compiles: a measured batch runs it once untimed first
        shape = (round_up(max(len(s.context_ids if agnostic else s.prompt_ids) for s in batch), cfg.pad_multiple),
                 len(batch[0].question_ids) if agnostic else 0)
        for k, cell in enumerate(cells):
            if progress is not None:
                progress.set_postfix_str(f"{task.name} {cell.label} {cell.setting_label}", refresh=False)
            measure = cfg.measure_overhead and (cfg.timing_batches == 0 or len(cell.timings) < cfg.timing_batches)
            recs, tm = _run_batch(model, batch, task, cell.press, cfg, eos, pad_id, measure=measure,
                                  warm_up=shape not in cell.warmed, oracle=oracle if cfg.oracle else None,
                                  prompt=prompt, prefix=prefix)
            if measure:
                cell.warmed.add(shape)
                cell.timings.append(tm)
            cell.records.extend(recs)
            if b == len(batches) - 1:  # written as soon as it is whole: a run killed later keeps it
                finished[k] = _finish_cell(task, cell, cfg)
            if progress is not None:
                progress.update(len(batch))
        del prefix
    return [finished[k] if k in finished else _finish_cell(task, cell, cfg) for k, cell in enumerate(cells)]


def _finish_cell(task: EvalTask, cell: _Cell, cfg: EvalConfig) -> dict:
    order = {s.id: i for i, s in enumerate(task.samples)}
    records = sorted(cell.records, key=lambda r: order[r["id"]])
    spec, setting = cell.spec, cell.setting
    out = {"complete": True, "press": cell.label, "press_name": None if spec is None else spec.name,
           "press_kwargs": {} if spec is None else dict(spec.kwargs), "setting": cell.setting_label,
           "budget": None if setting is None or setting.kind != "budget" else int(setting.value),
           "ratio": None if setting is None or setting.kind != "ratio" else float(setting.value),
           "task": task.name, **cell.fingerprint, "n_samples": len(records), "batch_size": cfg.batch_size,
           **_summary(records, cell.timings), "samples": records}
    _write_json(cell.path, out)
    return out


def run_cell(model, task: EvalTask, press_spec: PressSpec | None, setting: Setting | None, cfg: EvalConfig,
             out_dir, *, adapter=None, oracle: OracleLabels | None = None, progress=None,
             model_fp: str | None = None) -> dict:
    """Run (or read back) one cell; press_spec None is FullKV. Returns the cell dict (as written).
    `model_fp`: the model's `model_fingerprint`, when the caller computed it already."""
    cell, done = _plan_cell(model, task, press_spec, setting, cfg, out_dir, adapter, model_fp)
    if done is not None:
        if progress is not None:
            progress.update(len(task.samples))
        return done
    return _compute_cells(model, task, [cell], cfg, oracle=oracle, progress=progress)[0]


def _answered_by_fullkv(task: EvalTask, full: dict, out_dir) -> tuple[EvalTask, dict]:
    """The task with each sample's answer set to FullKV's own prediction, and the FullKV cell rescored
    against it (its own answer: 100 wherever it answered anything) and written back."""
    predictions = {r["id"]: r["prediction"] for r in full["samples"]}
    samples = tuple(dataclasses.replace(s, answers=(predictions[s.id],)) for s in task.samples)
    task = dataclasses.replace(task, samples=samples)
    by_id = {s.id: s for s in samples}
    records = [{**r, "answers": [predictions[r["id"]]], "score": float(task.score(r["prediction"], by_id[r["id"]]))}
               for r in full["samples"]]
    full = {**full, "samples": records, "score": 100.0 * float(np.mean([r["score"] for r in records]))}
    _write_json(cell_path(out_dir, FULL_KV, "full", task.name), full)
    return task, full


def _buildable(spec: PressSpec, setting: Setting, adapter, bar) -> bool:
    """Whether the press exists at this setting; a cell that cannot (a budget below the entries the press
    always keeps, `BudgetError`) is skipped with a note and the grid goes on. Any other error is raised."""
    try:
        spec.build(setting, adapter)
    except BudgetError as e:
        bar.write(f"lkv eval: skipping {e}")
        return False
    return True


def run_eval(model, tasks: list[EvalTask], cfg: EvalConfig, out_dir, *, adapter=None, progress: bool = True,
             ) -> list[dict]:
    """Every cell of the grid (FullKV, then each press x setting, per task), resumable; returns the
    cell dicts. Write the table and plots afterwards with `lkv_jax.evaluation.report.write_report`."""
    from tqdm.auto import tqdm

    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be distinct: {names}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = sum(len(t.samples) for t in tasks) * (1 + len(cfg.presses) * len(cfg.settings))
    model_fp = model_fingerprint(model)
    bar = tqdm(total=total, desc="lkv eval", unit="sample", disable=not progress)
    cells = []
    try:
        for task in tasks:
            if task.answers_from_fullkv:  # FullKV's answers are the references: scored once they exist
                full = run_cell(model, dataclasses.replace(task, score=lambda p, s: 0.0), None, None, cfg, out_dir,
                                progress=bar, model_fp=model_fp)
                task, full = _answered_by_fullkv(task, full, out_dir)
            else:
                full = run_cell(model, task, None, None, cfg, out_dir, progress=bar, model_fp=model_fp)
            cells.append(full)
            oracle = OracleLabels({r["id"]: r["generated_ids"] for r in full["samples"]}) if cfg.oracle else None
            slots: list[dict | _Cell] = []  # in grid order: finished cells' dicts, or cells to compute
            for spec in cfg.presses:
                for setting in cfg.settings:
                    if not _buildable(spec, setting, adapter, bar):
                        bar.update(len(task.samples))
                        continue
                    cell, done = _plan_cell(model, task, spec, setting, cfg, out_dir, adapter, model_fp)
                    if done is not None:
                        bar.update(len(task.samples))
                    slots.append(done if done is not None else cell)
            pending = [c for c in slots if isinstance(c, _Cell)]
            computed = iter(_compute_cells(model, task, pending, cfg, oracle=oracle, progress=bar) if pending else [])
            cells.extend(next(computed) if isinstance(c, _Cell) else c for c in slots)
    finally:
        bar.close()
    _write_json(out_dir / "run.json", {"tasks": names, "presses": [p.label or p.name for p in cfg.presses],
                                       "settings": [s.label for s in cfg.settings], "mode": cfg.mode,
                                       "batch_size": cfg.batch_size})
    return cells
