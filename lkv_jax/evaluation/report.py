"""Tables and plots from the cell JSONs an evaluation run wrote (`lkv_jax.evaluation.runner`).

    results.md          score per press x setting for every task and on average (FullKV its own row),
                        eviction overhead per press, oracle coverage per press (and per layer)
    scores.png          score against budget (or ratio), one panel per task plus the average
    overhead.png        eviction overhead per press (ms per batch above a plain prefill) against budget
    oracle.png          oracle coverage against budget per press, and per layer at the smallest budget
    summary.json        the numbers of the tables

The average scores come with 95% bootstrap intervals over the samples, and with a `reference` press each
press's paired difference from it (`lkv_jax.evaluation.uncertainty`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from lkv_jax.atomic_files import atomic_write, atomic_write_text
from lkv_jax.evaluation.runner import FULL_KV
from lkv_jax.evaluation.uncertainty import paired_difference, score_interval


def load_cells(out_dir, *, only_last_run: bool = True) -> list[dict]:
    """The complete cell JSONs under out_dir/cells, per-sample records reduced to `sample_scores`
    ({sample id: score in [0, 1]}). With only_last_run,
    and when out_dir/run.json exists, only the cells of the last run's grid (tasks, presses, settings):
    cells left by earlier runs into the same folder stay on disk but out of the tables."""
    grid = None
    run_file = Path(out_dir, "run.json")
    if only_last_run and run_file.is_file():
        grid = json.loads(run_file.read_text())
    cells = []
    for path in sorted(Path(out_dir, "cells").rglob("*.json")):
        try:
            cell = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if not cell.get("complete"):
            continue
        if grid is not None and (cell["task"] not in grid["tasks"] or cell.get("mode") != grid["mode"] or (
                cell["press"] != FULL_KV and (cell["press"] not in grid["presses"]
                                              or cell["setting"] not in grid["settings"]))):
            continue
        cell["sample_scores"] = {r["id"]: float(r["score"]) for r in cell.pop("samples", [])}
        cells.append(cell)
    if not cells:
        raise FileNotFoundError(f"no complete cell under {Path(out_dir) / 'cells'}; run the evaluation first")
    return cells


def _x(cell) -> float:
    return cell["budget"] if cell["budget"] is not None else cell["ratio"]


def _grid(cells: list[dict]) -> dict:
    """tasks, presses (FullKV first), settings (x values, sorted) and the cell lookup."""
    press_cells = [c for c in cells if c["press"] != FULL_KV]
    kinds = {"budget" if c["budget"] is not None else "ratio" for c in press_cells}
    if len(kinds) > 1:
        raise ValueError("the run mixes budgets and ratios; report them from separate output folders")
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    presses = list(dict.fromkeys(c["press"] for c in press_cells))
    xs = sorted({_x(c) for c in press_cells})
    lookup = {(c["task"], c["press"], None if c["press"] == FULL_KV else _x(c)): c for c in cells}
    return {"tasks": tasks, "presses": presses, "xs": xs, "kind": kinds.pop() if kinds else "budget",
            "cell": lookup}


def _get(grid, task, press, x):
    return grid["cell"].get((task, press, None if press == FULL_KV else x))


def score_table(grid) -> dict:
    """{task or "average": {press: {x: score}}} (FullKV repeated at every x); the average is over the
    tasks present for that press and x, only where every task is present."""
    table: dict[str, dict[str, dict]] = {}
    for task in grid["tasks"]:
        rows = {press: {x: c["score"] for x in grid["xs"] or [None] if (c := _get(grid, task, press, x)) is not None}
                for press in [FULL_KV, *grid["presses"]]}
        table[task] = {press: row for press, row in rows.items() if row}
    avg: dict[str, dict] = defaultdict(dict)
    for press in [FULL_KV, *grid["presses"]]:
        for x in grid["xs"] or [None]:
            vals = [table[t].get(press, {}).get(x) for t in grid["tasks"]]
            if vals and all(v is not None for v in vals):
                avg[press][x] = float(np.mean(vals))
    table["average"] = dict(avg)
    return table


def _fmt(v, digits=1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _fmt_interval(v: dict | None, signed: bool = False) -> str:
    """"mean [lo, hi]", signed with the share of replicates above zero for a difference."""
    if v is None:
        return "-"
    f = "+.1f" if signed else ".1f"
    text = f"{v['mean']:{f}} [{v['lo']:{f}}, {v['hi']:{f}}]"
    return text + (f" ({100 * v['p_better']:.0f}%)" if signed else "")


def _md(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _x_label(grid, x) -> str:
    return "full" if x is None else (f"{int(x)}" if grid["kind"] == "budget" else f"{x:g}")


def _task_scores(grid, press, x) -> dict | None:
    """{task: {sample id: score}} of one press and setting, None unless every task has its samples."""
    out = {}
    for task in grid["tasks"]:
        c = _get(grid, task, press, x)
        if c is None or not c.get("sample_scores"):
            return None
        out[task] = c["sample_scores"]
    return out


def interval_tables(grid, reference: str | None = None) -> tuple[dict, dict]:
    """({press: {x: score_interval}}, {press: {x: paired_difference(reference - press)}}) of the average
    over tasks; the second is empty without a reference. FullKV's x is None in both."""
    xs = grid["xs"] or [None]
    intervals: dict[str, dict] = {}
    for press in [FULL_KV, *grid["presses"]]:
        for x in [None] if press == FULL_KV else xs:
            per_task = _task_scores(grid, press, x)
            if per_task is not None:
                intervals.setdefault(press, {})[x] = score_interval({t: list(v.values()) for t, v in per_task.items()})
    diffs: dict[str, dict] = {}
    if reference is not None:
        if reference not in grid["presses"]:
            raise ValueError(f"reference press {reference!r} is not in this run: {grid['presses']}")
        for press in [FULL_KV, *grid["presses"]]:
            if press == reference:
                continue
            for x in xs:
                ref = _task_scores(grid, reference, x)
                other = _task_scores(grid, press, None if press == FULL_KV else x)
                if ref is not None and other is not None:
                    diffs.setdefault(press, {})[x] = paired_difference(ref, other)
    return intervals, diffs


def markdown_report(cells: list[dict], reference: str | None = None) -> tuple[str, dict]:
    """The results tables as markdown, and the same numbers as a dict. reference: a press of the run
    whose paired score difference from every other press (and FullKV) gets its own table."""
    grid = _grid(cells)
    xs = grid["xs"] or [None]
    head = ["press"] + [f"{grid['kind']} {_x_label(grid, x)}" for x in xs]
    scores = score_table(grid)
    mode = {c["mode"] for c in cells}
    parts = [f"# Evaluation results ({', '.join(sorted(mode))})", ""]
    for task in [*grid["tasks"], "average"]:
        rows = [[press] + [_fmt(scores[task].get(press, {}).get(x)) for x in xs]
                for press in [FULL_KV, *grid["presses"]] if press in scores[task]]
        if rows:
            parts += [f"## Score: {task}", "", _md(rows, head), ""]
    intervals, diffs = interval_tables(grid, reference)
    if intervals:
        rows = [[press] + [_fmt_interval(intervals[press].get(None if press == FULL_KV else x)) for x in xs]
                for press in intervals]
        parts += ["## Average score with a 95% bootstrap interval (samples resampled within each task)", "",
                  _md(rows, head), ""]
    if diffs:
        rows = [[press] + [_fmt_interval(diffs[press].get(x), signed=True) for x in xs] for press in diffs]
        parts += [f"## {reference} minus each press: average score difference on the same samples, 95% paired "
                  f"bootstrap interval (share of replicates where {reference} is higher)", "", _md(rows, head), ""]
    overhead, oracle, evidence, distractor = {}, {}, {}, {}
    rows_o, rows_c, rows_e, rows_d = [], [], [], []
    for press in grid["presses"]:
        o_row, c_row, e_row, d_row = [press], [press], [press], [press]
        overhead[press], oracle[press], evidence[press], distractor[press] = {}, {}, {}, {}
        for x in xs:
            cs = [_get(grid, t, press, x) for t in grid["tasks"]]
            cs = [c for c in cs if c is not None]
            ms = [c["timing"].get("overhead_ms") for c in cs if c["timing"].get("overhead_ms") is not None]
            pct = [c["timing"].get("overhead_pct") for c in cs if c["timing"].get("overhead_pct") is not None]
            cov = [c["oracle"]["coverage_mean"] for c in cs if c.get("oracle")]
            ev = [c["evidence"]["recall_mean"] for c in cs if c.get("evidence")]
            # on the tasks with distractor records only, evidence recall beside it on the same tasks
            pairs = [(c["evidence"]["recall_mean"], c["evidence"]["distractor_mean"]) for c in cs
                     if c.get("evidence") and "distractor_mean" in c["evidence"]]
            overhead[press][x] = float(np.mean(ms)) if ms else None
            oracle[press][x] = float(np.mean(cov)) if cov else None
            evidence[press][x] = float(np.mean(ev)) if ev else None
            distractor[press][x] = ({"evidence": float(np.mean([a for a, _ in pairs])),
                                     "distractor": float(np.mean([b for _, b in pairs]))} if pairs else None)
            o_row.append("-" if not ms else f"{np.mean(ms):.2f} ({np.mean(pct):+.0f}%)")
            c_row.append(_fmt(oracle[press][x], 3))
            e_row.append(_fmt(evidence[press][x], 3))
            d = distractor[press][x]
            d_row.append("-" if d is None else f"{d['evidence']:.3f} / {d['distractor']:.3f}")
        rows_o.append(o_row)
        rows_c.append(c_row)
        rows_e.append(e_row)
        rows_d.append(d_row)
    if rows_o:
        parts += ["## Eviction overhead: ms per batch above a plain prefill (% of the prefill)", "",
                  _md(rows_o, head), ""]
    if any(v is not None for row in oracle.values() for v in row.values()):
        parts += ["## Oracle coverage: share of the FullKV response's attention mass on kept entries "
                  "(mean over layers, query heads, samples, tasks)", "", _md(rows_c, head), ""]
    if any(v is not None for row in evidence.values() for v in row.values()):
        parts += ["## Evidence recall: share of the answer records' tokens kept by the best KV head "
                  "(mean over layers, samples, tasks)", "", _md(rows_e, head), ""]
    if any(v is not None for row in distractor.values() for v in row.values()):
        parts += ["## Answer record vs distractors: evidence recall of the answer records / the same measure on "
                  "the look-alike records that do not hold the answer (other keys, other tags; the tasks that "
                  "have them)", "", _md(rows_d, head), ""]
    numbers = {"kind": grid["kind"], "scores": _str_keys(scores), "overhead_ms": _str_keys(overhead),
               "oracle_coverage": _str_keys(oracle), "evidence_recall": _str_keys(evidence),
               "distractor_recall": _str_keys(distractor),
               "score_interval": _str_keys(intervals)}
    if reference is not None:
        numbers["paired_difference"] = {"reference": reference, **_str_keys(diffs)}
    return "\n".join(parts), numbers


def _str_keys(d):
    if isinstance(d, dict):
        return {("full" if k is None else str(k)): _str_keys(v) for k, v in d.items()}
    return d


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path) -> Path:
    """Write the figure as a PNG at `path` (atomically) and close it."""
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)


def _budget_axis(ax, grid) -> None:
    """Budgets on a log-2 axis labelled with the budgets themselves (not powers of two)."""
    if grid["kind"] == "budget" and len(grid["xs"]) > 1:
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
    if grid["xs"]:
        ax.set_xticks(grid["xs"], [_x_label(grid, x) for x in grid["xs"]])


def plot_scores(cells: list[dict], path) -> Path:
    """Score against budget (ratio): one panel per task and one for the average (with its 95% bootstrap
    interval as a band); FullKV dashed."""
    plt = _plt()
    grid = _grid(cells)
    scores = score_table(grid)
    panels = [*grid["tasks"], "average"] if len(grid["tasks"]) > 1 else grid["tasks"]
    n = len(panels)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    intervals, _ = interval_tables(grid)
    for ax, task in zip(axes.flat, panels, strict=False):
        for press in grid["presses"]:
            row = scores[task].get(press, {})
            xs = [x for x in grid["xs"] if x in row]
            if xs:
                line, = ax.plot(xs, [row[x] for x in xs], marker="o", label=press)
                band = intervals.get(press, {})
                if task == "average" and all(x in band for x in xs):  # the 95% bootstrap interval
                    ax.fill_between(xs, [band[x]["lo"] for x in xs], [band[x]["hi"] for x in xs],
                                    color=line.get_color(), alpha=0.12)
        full = scores[task].get(FULL_KV, {})
        if full:
            ax.axhline(next(iter(full.values())), color="black", linestyle="--", linewidth=1, label="FullKV")
        _budget_axis(ax, grid)
        ax.set_title(task)
        ax.set_xlabel(grid["kind"])
        ax.set_ylabel("score")
        ax.set_ylim(-3, 103)  # scores are 0-100: a shared scale makes panels comparable
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    return _save(plt, fig, path)


def plot_overhead(cells: list[dict], path) -> Path:
    """Eviction overhead (ms per batch above a plain prefill, mean over tasks) per press, per setting."""
    plt = _plt()
    grid = _grid(cells)
    _, numbers = markdown_report(cells)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    n_p, n_x = max(len(grid["presses"]), 1), max(len(grid["xs"]), 1)
    width = 0.8 / n_x
    for j, x in enumerate(grid["xs"]):
        vals = [numbers["overhead_ms"].get(p, {}).get(str(x)) for p in grid["presses"]]
        ax.bar(np.arange(n_p) + j * width, [0.0 if v is None else v for v in vals], width,
               label=f"{grid['kind']} {_x_label(grid, x)}")
    ax.set_xticks(np.arange(n_p) + 0.4 - width / 2, grid["presses"], rotation=20, ha="right")
    ax.set_ylabel("ms per batch over prefill")
    ax.set_title("eviction overhead")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_oracle(cells: list[dict], path) -> Path | None:
    """Oracle coverage against budget per press, and per layer at the smallest setting; None when the
    run has no oracle numbers."""
    grid = _grid(cells)
    if not any(c.get("oracle") for c in cells):
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    x0 = grid["xs"][0]
    for press in grid["presses"]:
        cs = {x: [c for t in grid["tasks"] if (c := _get(grid, t, press, x)) is not None and c.get("oracle")]
              for x in grid["xs"]}
        xs = [x for x in grid["xs"] if cs[x]]
        if xs:
            a1.plot(xs, [np.mean([c["oracle"]["coverage_mean"] for c in cs[x]]) for x in xs], marker="o", label=press)
        if cs.get(x0):
            per_layer = np.mean([c["oracle"]["coverage_per_layer"] for c in cs[x0]], axis=0)
            a2.plot(np.arange(len(per_layer)), per_layer, marker=".", label=press)
    _budget_axis(a1, grid)
    a1.set_xlabel(grid["kind"])
    a1.set_ylabel("coverage of response attention")
    a1.set_ylim(0, 1.02)
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    a2.set_xlabel("layer")
    a2.xaxis.set_major_locator(MaxNLocator(integer=True))
    a2.set_ylim(0, 1.02)
    a2.set_title(f"per layer at {grid['kind']} {_x_label(grid, x0)}")
    a2.grid(alpha=0.3)
    return _save(plt, fig, path)


def write_report(out_dir, reference: str | None = None) -> dict[str, Path]:
    """Write results.md, summary.json and the PNG plots into out_dir; returns their paths. reference: a
    press of the run to compare every other one with on the same samples (see `markdown_report`)."""
    out_dir = Path(out_dir)
    cells = load_cells(out_dir)
    text, numbers = markdown_report(cells, reference)
    paths = {"table": out_dir / "results.md", "summary": out_dir / "summary.json"}
    atomic_write_text(paths["table"], text)  # a symlink there is replaced, never written through
    atomic_write_text(paths["summary"], json.dumps(numbers, indent=1) + "\n")
    has_press = any(c["press"] != FULL_KV for c in cells)
    if has_press:
        paths["scores_plot"] = plot_scores(cells, out_dir / "scores.png")
        paths["overhead_plot"] = plot_overhead(cells, out_dir / "overhead.png")
        oracle = plot_oracle(cells, out_dir / "oracle.png")
        if oracle is not None:
            paths["oracle_plot"] = oracle
    return paths
