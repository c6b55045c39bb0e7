"""Evaluation: tasks (LongBench, synthetic), the resumable runner, tables and plots, oracle diagnostics."""

from lkv_jax.evaluation.report import load_cells, markdown_report, write_report
from lkv_jax.evaluation.runner import EvalConfig, PressSpec, Setting, cell_path, run_cell, run_eval
from lkv_jax.evaluation.tasks import EvalSample, EvalTask, longbench_task, synthetic_task

__all__ = [
    "EvalConfig", "EvalSample", "EvalTask", "PressSpec", "Setting", "cell_path", "load_cells", "longbench_task",
    "markdown_report", "run_cell", "run_eval", "synthetic_task", "write_report",
]
