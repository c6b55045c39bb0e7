"""Experiment entry scripts explain themselves (--help) and the ablation report renders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lkv_jax.evaluation.ablation import plot_ablation, summary_table

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["demo.py", "ablate_lookahead_tokens.py", "ablate_lora_targets.py", "train_lookahead.py", "eval.py",
           "train_tiny_target.py", "run_config.py", "launch_tpu_vm.py", "bench_prefill.py", "bench_presses.py",
           "bench_lookahead.py", "bench_kernel.py", "midanswer_prediction.py", "decoding_eviction.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_explains_the_script(script):
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--help"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) > 5, out.stdout  # a description, not just a usage line


def test_ablation_table_and_plot(tmp_path):
    result = {"title": "t", "budgets": [32, 64], "tasks": ["a"], "rows": [
        {"variant": "n=1", "adapter_params": 1234, "score@32": 10.0, "score@64": 20.0, "overhead_pct@32": 1.5,
         "overhead_pct@64": None},
        {"variant": "n=2", "adapter_params": 2345, "score@32": None, "score@64": 25.5, "overhead_pct@32": -0.5,
         "overhead_pct@64": 2.0, "score_interval@64": [20.25, 30.0]}]}
    table = summary_table(result).splitlines()
    assert table[0] == "| variant | adapter params | score@32 | score@64 | overhead %@32 | overhead %@64 |"
    assert table[2] == "| n=1 | 1,234 | 10.0 | 20.0 | +1.5 | - |"
    assert table[3] == "| n=2 | 2,345 | - | 25.5 [20.2, 30.0] | -0.5 | +2.0 |"
    path = plot_ablation(result, tmp_path / "a.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # with a reference variant: its paired difference from every other row, after the scores
    result["reference"] = "n=2"
    result["rows"][0]["diff@64"] = {"mean": 5.5, "lo": -1.0, "hi": 12.25, "p_better": 0.9}
    table = summary_table(result).splitlines()
    assert table[0] == ("| variant | adapter params | score@32 | score@64 | n=2 minus it @32 | n=2 minus it @64 "
                        "| overhead %@32 | overhead %@64 |")
    assert table[2] == "| n=1 | 1,234 | 10.0 | 20.0 | - | +5.5 [-1.0, +12.2] | +1.5 | - |"
    assert table[3] == "| n=2 | 2,345 | - | 25.5 [20.2, 30.0] | - | - | -0.5 | +2.0 |"


def test_ablation_variants_share_the_first_variants_full_kv_cells(tmp_path):
    from types import SimpleNamespace

    from lkv_jax.evaluation.ablation import _reuse_full_kv
    from lkv_jax.evaluation.runner import FULL_KV, cell_path

    tasks = [SimpleNamespace(name="niah_single-1024"), SimpleNamespace(name="tag_list-1024")]
    src, dst = tmp_path / "n=1" / "eval", tmp_path / "n=2" / "eval"
    cell_path(src, FULL_KV, "full", tasks[0].name).parent.mkdir(parents=True)
    cell_path(src, FULL_KV, "full", tasks[0].name).write_text('{"complete": true}')
    cell_path(dst, FULL_KV, "full", tasks[1].name).parent.mkdir(parents=True)
    cell_path(dst, FULL_KV, "full", tasks[1].name).write_text('{"own": 1}')
    _reuse_full_kv(src, dst, tasks)
    assert cell_path(dst, FULL_KV, "full", tasks[0].name).read_text() == '{"complete": true}'
    assert cell_path(dst, FULL_KV, "full", tasks[1].name).read_text() == '{"own": 1}'  # its own cell kept


def test_ablation_refuses_an_unknown_reference_before_training(tmp_path):
    from lkv_jax.evaluation.ablation import run_ablation

    with pytest.raises(ValueError, match="reference variant 'n=32' is not one of"):
        run_ablation(None, tmp_path / "labels", {"n=1": {"n_lookahead": 1}}, [], base_train={}, budgets=[32],
                     out_dir=tmp_path / "out", title="t", reference="n=32")
    assert not (tmp_path / "out").exists()


def test_decoding_eviction_quick_run(tmp_path):
    """The decoding-time eviction script end to end on the tiny target: every cell, aggregate and paired
    difference is written, and at a budget above prompt + answer every method reproduces the full cache's
    answer token for token (the issue's semantics), which the agreement metrics must then report."""
    import json

    out = tmp_path / "dec"
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / "decoding_eviction.py"), "--quick",
                          "--out", str(out), "--budgets", "48,512",
                          "--methods", "prefill-lookaheadkv,decode-snapkv,decode-lookaheadkv"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| decode-lookaheadkv |" in (out / "results.md").read_text()
    (task,) = result["tasks"]
    assert task["peaks"] == [48 + 8, 512 + 8]
    methods = {a["method"] for a in result["aggregates"]}
    assert methods == {"fullkv", "prefill-lookaheadkv", "decode-snapkv", "decode-lookaheadkv"}
    assert len(list((out / "cells" / "quick" / task["name"]).glob("*/*.json"))) == 1 + 2 * 3
    # the paired differences: LookaheadKV against the other decoding scorer, prefill-only and the full cache,
    # on the task score and the agreement, at each peak
    assert sorted((d["other"], d["metric"], d["peak"]) for d in result["paired"]) == sorted(
        (o, m, p) for o in ("decode-snapkv", "prefill-lookaheadkv", "fullkv") for m in ("score", "agreement_rouge_l")
        for p in (56, 520))
    full = {r["id"]: r for r in result["cells"][f"{task['name']}|fullkv|None"]["samples"]}
    for key, cell in result["cells"].items():
        if cell["peak"] != 520:
            continue
        for r in cell["samples"]:  # budget 512 > prompt + answer: the full cache's own answer
            assert r["prediction"] == full[r["id"]]["prediction"], key
            assert r["divergence_tokens"] == r["full_answer_tokens"] > 0, key
            assert r["agreement_rouge_l"] == pytest.approx(1.0, abs=1e-6), key  # ROUGE-L F has a 1e-8 guard
    rows = result["cost"]["rows"]
    assert {"fullkv", "prefill-only", "decode-lookaheadkv N=8", "decode-snapkv N=8"} <= set(rows)
    assert all(r["ms_per_token"] > 0 for r in rows.values())
    # the cache bytes: slots x layers (4) x 2 x KV heads (2) x head dim (32) x 4 bytes; slots B + N, and for
    # LookaheadKV its 4 lookahead tokens' scratch (the --quick adapter's)
    B = result["cost"]["budget"]
    assert rows["decode-snapkv N=8"]["cache_bytes"] == (B + 8) * 4 * 2 * 2 * 32 * 4
    assert rows["decode-lookaheadkv N=8"]["cache_bytes"] == (B + 8 + 4) * 4 * 2 * 2 * 32 * 4
