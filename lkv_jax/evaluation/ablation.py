"""Ablations of the lookahead adapter: train one adapter per variant on the same labels, evaluate
LookaheadKV with each on the same tasks and budgets, and put accuracy and eviction overhead side by side
(JSON + one plot). Used by experiments/ablate_lookahead_tokens.py and ablate_lora_targets.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def run_ablation(model, labels_dir, variants: dict[str, dict], tasks, *, base_train: dict, budgets, out_dir,
                 title: str, reference: str | None = None, progress: bool = True) -> dict:
    """variants: name -> TrainConfig overrides (e.g. {"n_lookahead": 4}); base_train: the shared
    TrainConfig fields. Each variant trains into out_dir/<name>/adapter (resumable) and is evaluated into
    out_dir/<name>/eval (resumable). reference: a variant name; every other row then also gets the paired
    difference of the reference minus it on the same samples (`diff@<budget>`: mean, lo, hi, p_better).
    Returns and writes out_dir/ablation.json; plots out_dir/ablation.png.
    """
    from lkv_jax.evaluation.report import load_cells
    from lkv_jax.evaluation.runner import EvalConfig, PressSpec, run_eval
    from lkv_jax.evaluation.uncertainty import paired_difference, score_interval
    from lkv_jax.lookahead.adapter import count_params
    from lkv_jax.lookahead.training import TrainConfig, train

    if reference is not None and reference not in variants:
        raise ValueError(f"reference variant {reference!r} is not one of {list(variants)}")
    out = Path(out_dir).absolute()
    first = next(iter(variants), None)
    rows, samples = [], {}
    for name, overrides in variants.items():
        cfg = TrainConfig(**{**base_train, **overrides, "data_dir": str(labels_dir),
                             "out_dir": str(out / name / "adapter")})
        adapter = train(cfg, model=model, progress=progress)
        ecfg = EvalConfig(presses=(PressSpec.parse("lookaheadkv"),), budgets=tuple(budgets), oracle=False,
                          timing_repeats=2, timing_batches=1)
        _reuse_full_kv(out / first / "eval", out / name / "eval", tasks)
        run_eval(model, tasks, ecfg, out / name / "eval", adapter=adapter, progress=progress)
        cells = [c for c in load_cells(out / name / "eval") if c["press"] == "lookaheadkv"]
        samples[name] = {b: {c["task"]: c["sample_scores"] for c in cells if c["budget"] == b} for b in budgets}
        row = {"variant": name, "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
               "adapter_params": count_params(adapter)}
        for b in budgets:
            at_b = [c for c in cells if c["budget"] == b]
            row[f"score@{b}"] = float(np.mean([c["score"] for c in at_b])) if at_b else None
            if at_b:  # 95% bootstrap interval over the samples (resampled within each task)
                i = score_interval({t: list(v.values()) for t, v in samples[name][b].items()})
                row[f"score_interval@{b}"] = [i["lo"], i["hi"]]
            pct = [c["timing"].get("overhead_pct") for c in at_b if c["timing"].get("overhead_pct") is not None]
            row[f"overhead_pct@{b}"] = float(np.mean(pct)) if pct else None
        rows.append(row)
    if reference is not None:
        for row in rows:
            for b in budgets:
                if row["variant"] != reference and samples[reference][b] and samples[row["variant"]][b]:
                    row[f"diff@{b}"] = paired_difference(samples[reference][b], samples[row["variant"]][b])
    result = {"title": title, "reference": reference, "budgets": list(budgets), "tasks": [t.name for t in tasks],
              "rows": rows,
              "train": {k: list(v) if isinstance(v, tuple) else v for k, v in base_train.items()}}
    (out / "ablation.json").write_text(json.dumps(result, indent=1))
    plot_ablation(result, out / "ablation.png")
    return result


def _reuse_full_kv(src: Path, dst: Path, tasks) -> None:
    """Copy the first variant's finished FullKV cells into another variant's folder: the adapter does
    not change them, and the runner still checks each copy's fingerprints (model, task) before reusing it."""
    import shutil

    from lkv_jax.evaluation.runner import FULL_KV, cell_path

    if src == dst:
        return
    for task in tasks:
        a, b = cell_path(src, FULL_KV, "full", task.name), cell_path(dst, FULL_KV, "full", task.name)
        if a.is_file() and not b.is_file():
            b.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(a, b)


def plot_ablation(result: dict, path) -> Path:
    """Score per budget (left) and eviction overhead (right) against the variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in result["rows"]]
    x = np.arange(len(names))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for bud in result["budgets"]:
        a.plot(x, [r[f"score@{bud}"] if r[f"score@{bud}"] is not None else np.nan for r in result["rows"]], "o-",
               label=f"budget {bud}")
        band = [r.get(f"score_interval@{bud}") or [np.nan, np.nan] for r in result["rows"]]
        a.fill_between(x, [lo for lo, _ in band], [hi for _, hi in band], alpha=0.15)
        b.plot(x, [r[f"overhead_pct@{bud}"] if r[f"overhead_pct@{bud}"] is not None else np.nan
                   for r in result["rows"]], "o-", label=f"budget {bud}")
    for ax, ylabel in ((a, "score (mean over tasks)"), (b, "eviction overhead, % of prefill")):
        ax.set_xticks(x, names, rotation=30)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(result["title"])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _score_cell(row: dict, budget: int) -> str:
    score, interval = row[f"score@{budget}"], row.get(f"score_interval@{budget}")
    if score is None:
        return "-"
    return f"{score:.1f}" + ("" if interval is None else f" [{interval[0]:.1f}, {interval[1]:.1f}]")


def summary_table(result: dict) -> str:
    """The ablation as a markdown table: scores with their 95% bootstrap interval where the row has one, the
    reference variant's paired difference where the result has a reference, overhead."""
    ref = result.get("reference")
    head = ["variant", "adapter params"] + [f"score@{b}" for b in result["budgets"]] + \
        ([f"{ref} minus it @{b}" for b in result["budgets"]] if ref else []) + \
        [f"overhead %@{b}" for b in result["budgets"]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["variant"], f"{r['adapter_params']:,}"]
        cells += [_score_cell(r, b) for b in result["budgets"]]
        if ref:
            cells += ["-" if (d := r.get(f"diff@{b}")) is None else f"{d['mean']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]"
                      for b in result["budgets"]]
        cells += ["-" if r[f"overhead_pct@{b}"] is None else f"{r[f'overhead_pct@{b}']:+.1f}"
                  for b in result["budgets"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

