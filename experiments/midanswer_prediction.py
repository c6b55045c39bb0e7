"""Does the prefill-trained LookaheadKV adapter predict mid-answer attention? (issue 20, part 2)

Decoding-time eviction re-scores the cache mid-answer with the adapter trained on prompt-only labels. The
label of an eviction after t answer tokens is the attention that answer tokens t.. pay to the cache as it
stood at t (prompt + answer[:t]); t = 0 is the prefill case the adapter was trained for. For each sample,
cut t and budget k this script measures the share of that future attention each press keeps
(`lkv_jax.evaluation.oracle.coverage`), every press scoring the full cache at t (`lkv_jax.compress` of
prompt + answer[:t]: SnapKV's window and TOVA's last token are then the last generated tokens, LookaheadKV
glimpses after the last token; the same as the decoding-time scorers).

    .venv/bin/python experiments/midanswer_prediction.py                 # SmolLM2, essay summaries (~30 min)
    .venv/bin/python experiments/midanswer_prediction.py --n-samples 16 --cuts 0,64,128,192
    .venv/bin/python experiments/midanswer_prediction.py --quick         # the tiny target, a random adapter

Outputs under --out (resumable: one JSON per sample under samples/, answers.json): summary.json (per task,
press, t, k: mean coverage with a bootstrap interval; LookaheadKV minus each press, paired; each press at t
relative to t=0), results.md (the table), coverage.png (coverage against t per press, a panel per budget).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

REFERENCE = "lookaheadkv"
SHIPPED = Path(__file__).resolve().parent.parent / "lkv_jax" / "assets" / "smollm2_lookahead" / "adapter.safetensors"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures; `quick` is the smoke-sized version on the tiny target."""

    tasks: tuple[str, ...] = ("summary",)
    length: int = 2048  # prompt + max_new_tokens fit in this many tokens
    max_new_tokens: int = 256
    # SmolLM2's full-cache essay summaries run 20-256 tokens (median about 75: most stop at EOS), so cuts
    # past 64 leave one or two samples; a cut past a sample's answer leaves it out of that cell
    cuts: tuple[int, ...] = (0, 16, 32, 48, 64)
    budgets: tuple[int, ...] = (64, 128, 256)
    n_samples: int = 12
    window: int = 64  # SnapKV's default window (the paper's variant: 32)
    answer_batch: int = 4


QUICK = Plan(tasks=("tag_list",), length=256, max_new_tokens=24, cuts=(0, 8, 16), budgets=(16, 32), n_samples=2,
             window=8, answer_batch=2)


def build_presses(adapter, window: int, seed: int = 0) -> dict:
    """{name: budget -> press}: the presses compared. RandomPress is the floor; its `seed` is static (a new
    seed compiles anew), so a run keeps one: the samples' different lengths already draw different sets."""
    from lkv_jax.presses import (
        KnormPress,
        LookaheadKVPress,
        RandomPress,
        SnapKVPress,
        StreamingLLMPress,
        TOVAPress,
    )

    paper_window = max(1, window // 2)  # 32 at the default window, as SnapKVPress.paper()
    return {
        "lookaheadkv": lambda k: LookaheadKVPress(adapter, budget=k),
        "snapkv": lambda k: SnapKVPress(window_size=window, budget=k),
        "snapkv-paper": lambda k: SnapKVPress.paper(window_size=paper_window, budget=k),
        "tova": lambda k: TOVAPress(budget=k),
        "knorm": lambda k: KnormPress(budget=k),
        "streamingllm": lambda k: StreamingLLMPress(budget=k),
        "random": lambda k: RandomPress(seed=seed, budget=k),
    }


# ----------------------------------------------------------------------------------------------
# one sample


def cut_rows(prompt, answer, cuts) -> tuple[list[list[int]], list[list[int]], list[bool]]:
    """Per cut t: the cache's tokens (prompt + answer[:t]), the future (answer[t:]) and whether t leaves
    any future token. A cut past the answer keeps its row (fixed batch shapes) cut one token before the
    end and is marked unused."""
    prompt, answer = [int(x) for x in prompt], [int(x) for x in answer]
    if not answer:
        raise ValueError("the answer is empty: no future attention to measure")
    seqs, futures, used = [], [], []
    for t in cuts:
        u = t < len(answer)
        c = t if u else len(answer) - 1
        seqs.append(prompt + answer[:c])
        futures.append(answer[c:])
        used.append(u)
    return seqs, futures, used


def sample_coverage(model, presses: dict, prompt, answer, cuts, budgets, *, length: int, response_length: int,
                    tail: int) -> dict:
    """{press: {t: {k: per-layer coverage list}}} of one sample (cuts past the answer left out).

    length: the cache rows are left-padded to this many tokens (static shapes across samples);
    response_length: the future is right-padded to this; tail: the slots each press prefills after the
    batch's shared prefix (>= the largest window)."""
    from lkv_jax.compression import compress_prompt, shared_prefix
    from lkv_jax.evaluation.oracle import coverage, kept_mask
    from lkv_jax.inference import prepare_prompt
    from lkv_jax.lookahead.labels import compute_labels
    from lkv_jax.padding import pad_left

    seqs, futures, used = cut_rows(prompt, answer, cuts)
    labels = compute_labels(model, seqs, futures, prompt_length=length, response_length=response_length)
    ids, mask = pad_left(seqs, length)
    batch = prepare_prompt(ids, mask, vocab_size=model.config.vocab_size)
    prefix = shared_prefix(model, batch, tail)  # the cache rows' common slots, prefilled once for every press
    out = {name: {} for name in presses}
    for name, make in presses.items():
        for k in budgets:
            kept = compress_prompt(model, batch, make(k), prefix=prefix).kept_positions
            kept = [np.asarray(x) for x in kept]
            for row, t in enumerate(cuts):
                if not used[row]:
                    continue
                n = len(seqs[row])
                masks = [kept_mask(x[row], n) for x in kept]
                out[name].setdefault(str(t), {})[str(k)] = coverage(labels[row], masks).tolist()
    return out


# ----------------------------------------------------------------------------------------------
# the run


def load_target(plan: Plan, args):
    """(model, encoder or vocab, adapter, tasks) for the real model or the tiny target (--quick)."""
    import jax

    import lkv_jax
    from lkv_jax.evaluation.tasks import ruler_task, summary_task, synthetic_task
    from lkv_jax.lookahead import init_adapter, load_adapter

    if args.quick:
        from lkv_jax.tiny_target import ASSET_DIR

        model = lkv_jax.load_hf(ASSET_DIR, dtype="float32")
        adapter = init_adapter(model.config, jax.random.key(0), n_lookahead=8, rank=4)
        tasks = [synthetic_task(t, n_samples=plan.n_samples, length=plan.length, seed=1) for t in plan.tasks]
        return model, adapter, tasks
    from lkv_jax.data.synthetic import HFPromptEncoder

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        from lkv_jax.checkpoint.gguf import convert_gguf
        from lkv_jax.data.installed import smollm2_gguf

        convert_gguf(smollm2_gguf(), model_dir, dtype="float32")
    model = lkv_jax.load_hf(model_dir, dtype="float32")
    encoder = HFPromptEncoder(model_dir)
    adapter = load_adapter(args.adapter, model.config)
    tasks = [summary_task(encoder, length=plan.length, n_samples=plan.n_samples, seed=1,
                          max_new_tokens=plan.max_new_tokens) if t == "summary"
             else ruler_task(t, encoder, length=plan.length, n_samples=plan.n_samples, seed=1) for t in plan.tasks]
    return model, adapter, tasks


def full_cache_answers(model, task, plan: Plan, path: Path) -> dict[str, list[int]]:
    """{sample id: the full cache's greedy answer (token ids, EOS kept)}, saved to `path` batch by batch."""
    from lkv_jax.lookahead.labels import generate_responses

    done = json.loads(path.read_text()) if path.is_file() else {}
    todo = [s for s in task.samples if s.id not in done]
    n_new = min(task.max_new_tokens, plan.max_new_tokens)
    prompt_length = max(len(s.prompt_ids) for s in task.samples)
    for i in range(0, len(todo), plan.answer_batch):
        chunk = todo[i:i + plan.answer_batch]
        answers = generate_responses(model, [s.prompt_ids.tolist() for s in chunk], max_new_tokens=n_new,
                                     eos_token_id=task.eos_token_ids, prompt_length=prompt_length)
        done.update({s.id: [int(x) for x in a] for s, a in zip(chunk, answers, strict=True)})
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(done))
        tmp.replace(path)
    return done


def covers(record: dict, presses, plan: Plan) -> bool:
    """Whether a saved sample holds every cell this plan asks for (a rerun with other cuts, budgets or
    presses computes the sample again)."""
    cov = record["coverage"]
    return all(str(k) in cov.get(p, {}).get(str(t), {}) for p in presses for t in plan.cuts
               if t < record["answer_tokens"] for k in plan.budgets)


def run(plan: Plan, args) -> dict:
    """{task name: {sample id: its record (coverage per press, t, k, per layer)}}, computing what is missing."""
    from tqdm import tqdm

    from lkv_jax.padding import round_up

    out = Path(args.out).absolute()
    model, adapter, tasks = load_target(plan, args)
    results = {}
    for task in tasks:
        tdir = out / task.name
        (tdir / "samples").mkdir(parents=True, exist_ok=True)
        answers = full_cache_answers(model, task, plan, tdir / "answers.json")
        # one padded shape for every sample of the task: one compilation per press and budget
        length = round_up(max(len(s.prompt_ids) for s in task.samples) + max(plan.cuts), 64)
        response_length = round_up(max(len(a) for a in answers.values()), 8)
        results[task.name] = per_sample = {}
        presses = build_presses(adapter, plan.window)
        for s in tqdm(task.samples, desc=f"{task.name} samples", file=sys.stdout):
            path = tdir / "samples" / f"{s.id}.json"
            if not (path.is_file() and covers(json.loads(path.read_text()), presses, plan)):
                cov = sample_coverage(model, presses, s.prompt_ids, answers[s.id], plan.cuts, plan.budgets,
                                      length=length, response_length=response_length, tail=plan.window)
                rec = {"id": s.id, "prompt_tokens": len(s.prompt_ids), "answer_tokens": len(answers[s.id]),
                       "coverage": cov}
                path.with_suffix(".tmp").write_text(json.dumps(rec))
                path.with_suffix(".tmp").replace(path)
            per_sample[s.id] = json.loads(path.read_text())
    return results


# ----------------------------------------------------------------------------------------------
# the report


def summarise(results: dict, plan: Plan) -> dict:
    """Per task, press, t, k: mean coverage (0-100) with a bootstrap interval over samples; LookaheadKV
    minus each press (paired); each press at t minus itself at t=0 (paired, same samples) and the ratio."""
    from lkv_jax.evaluation.uncertainty import paired_difference, score_interval

    summary = {"plan": dataclasses.asdict(plan), "tasks": {}}
    for task, samples in results.items():
        # per press, t, k: {sample id: coverage averaged over layers}
        cov = {}
        for sid, rec in samples.items():
            for press, by_t in rec["coverage"].items():
                for t, by_k in by_t.items():
                    for k, layers in by_k.items():
                        if int(t) not in plan.cuts or int(k) not in plan.budgets:
                            continue  # a cell of an earlier run with other cuts or budgets
                        cov.setdefault(press, {}).setdefault(t, {}).setdefault(k, {})[sid] = float(np.mean(layers))
        rows = []
        for press, by_t in cov.items():
            for t, by_k in by_t.items():
                for k, vals in by_k.items():
                    row = {"press": press, "t": int(t), "k": int(k), "n": len(vals),
                           **score_interval({task: list(vals.values())})}
                    if press != REFERENCE and REFERENCE in cov:
                        row["reference_minus"] = paired_difference({task: cov[REFERENCE][t][k]}, {task: vals})
                    base = by_t.get(str(plan.cuts[0]), {}).get(k, {})
                    common = sorted(set(vals) & set(base))
                    if int(t) != plan.cuts[0] and common:
                        row["minus_t0"] = paired_difference({task: {i: vals[i] for i in common}},
                                                            {task: {i: base[i] for i in common}})
                        row["ratio_t0"] = float(np.mean([vals[i] for i in common]) / np.mean([base[i] for i in common]))
                    rows.append(row)
        summary["tasks"][task] = {"n_samples": len(samples), "rows": rows,
                                  "answer_tokens": [rec["answer_tokens"] for rec in samples.values()]}
    return summary


def markdown(summary: dict) -> str:
    """The table: one line per press and cut t, a column per budget (coverage % [95% interval]), then
    LookaheadKV minus the press per budget, then the press at t relative to t=0."""
    lines = []
    for task, data in summary["tasks"].items():
        budgets = sorted({r["k"] for r in data["rows"]})
        lens = data["answer_tokens"]
        lines += [f"### {task}: {data['n_samples']} samples, answers {min(lens)}-{max(lens)} tokens", "",
                  "| press | t | n | " + " | ".join(f"coverage@{k}" for k in budgets) + " | "
                  + " | ".join(f"{REFERENCE} minus it @{k}" for k in budgets) + " | "
                  + " | ".join(f"vs t=0 @{k}" for k in budgets) + " |",
                  "|---" * (3 + 3 * len(budgets)) + "|"]
        by = {(r["press"], r["t"], r["k"]): r for r in data["rows"]}
        presses = list(dict.fromkeys(r["press"] for r in data["rows"]))
        cuts = sorted({r["t"] for r in data["rows"]})
        for press in presses:
            for t in cuts:
                cells = [by.get((press, t, k)) for k in budgets]
                if not any(cells):
                    continue
                n = max(c["n"] for c in cells if c)
                cov = [f"{c['mean']:.1f} [{c['lo']:.1f}, {c['hi']:.1f}]" if c else "-" for c in cells]
                diff = [f"{c['reference_minus']['mean']:+.1f} [{c['reference_minus']['lo']:+.1f}, "
                        f"{c['reference_minus']['hi']:+.1f}]" if c and "reference_minus" in c else "-" for c in cells]
                rel = [f"x{c['ratio_t0']:.3f} ({c['minus_t0']['mean']:+.1f} [{c['minus_t0']['lo']:+.1f}, "
                       f"{c['minus_t0']['hi']:+.1f}])" if c and "ratio_t0" in c else "-" for c in cells]
                lines.append(f"| {press} | {t} | {n} | " + " | ".join(cov + diff + rel) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Path:
    """Coverage against t per press, one panel per budget (a row of panels per task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"])
    budgets = sorted({r["k"] for d in summary["tasks"].values() for r in d["rows"]})
    fig, axes = plt.subplots(len(tasks), len(budgets), figsize=(4 * len(budgets), 3.4 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        rows = summary["tasks"][task]["rows"]
        presses = list(dict.fromkeys(r["press"] for r in rows))
        for j, k in enumerate(budgets):
            ax = axes[i][j]
            for press in presses:
                pts = sorted((r["t"], r["mean"], r["lo"], r["hi"]) for r in rows if r["press"] == press and r["k"] == k)
                if not pts:
                    continue
                t, m, lo, hi = (np.array(x) for x in zip(*pts, strict=True))
                ax.errorbar(t, m, yerr=[m - lo, hi - m], marker="o", capsize=3, label=press,
                            linewidth=2.5 if press == REFERENCE else 1.2)
            ax.set(title=f"{task}, budget {k}", xlabel="answer tokens in the cache (t)",
                   ylabel="future attention kept (%)")
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output directory (resumable; default runs/midanswer[-quick])")
    ap.add_argument("--quick", action="store_true", help="the tiny target with a random adapter (seconds)")
    ap.add_argument("--n-samples", type=int, default=None, help="samples per task (default 12)")
    ap.add_argument("--tasks", default=None, help="comma separated: summary, niah_multivalue, ... (default summary)")
    ap.add_argument("--cuts", default=None, help="answer tokens in the cache, comma separated (default 0,16,32,48,64)")
    ap.add_argument("--budgets", default=None, help="entries kept per layer and KV head (default 64,128,256)")
    ap.add_argument("--model-dir", default="/work/main/runs/real/model",
                    help="SmolLM2 as a Hugging Face directory (converted from the installed GGUF if absent)")
    ap.add_argument("--adapter", default=str(SHIPPED), help="the LookaheadKV adapter (default: the shipped one)")
    args = ap.parse_args(argv)

    plan = QUICK if args.quick else Plan()
    if args.n_samples:
        plan = dataclasses.replace(plan, n_samples=args.n_samples)
    if args.tasks:
        plan = dataclasses.replace(plan, tasks=tuple(args.tasks.split(",")))
    if args.cuts:
        plan = dataclasses.replace(plan, cuts=tuple(int(x) for x in args.cuts.split(",")))
    if args.budgets:
        plan = dataclasses.replace(plan, budgets=tuple(int(x) for x in args.budgets.split(",")))
    args.out = args.out or ("runs/midanswer-quick" if args.quick else "runs/midanswer")
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)

    summary = summarise(run(plan, args), plan)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = markdown(summary)
    (out / "results.md").write_text(table)
    plot(summary, out / "coverage.png")
    print(table)
    print(f"wrote {out / 'summary.json'}, {out / 'results.md'}, {out / 'coverage.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
