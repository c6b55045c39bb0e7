"""Shared command-line plumbing of the two ablation scripts (model, labels, tasks, budgets, training)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_common_arguments(ap: argparse.ArgumentParser, default_out: str) -> None:
    ap.add_argument("--model", default=None, help="model directory (default: the shipped tiny target)")
    ap.add_argument("--labels", default="runs/demo/labels",
                    help="label dataset (`lkv make-labels`; `make demo` writes the default one)")
    ap.add_argument("--tasks", default="niah_single,niah_multikey,tag_list",
                    help="synthetic tasks, comma separated (default: the demo's, which the tiny target answers)")
    ap.add_argument("--length", type=int, default=1024, help="synthetic context length")
    ap.add_argument("--n-samples", type=int, default=24, help="held-out samples per task (the demo's 24)")
    ap.add_argument("--budgets", default="32,64", help="KV budgets, comma separated")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--bucket", type=int, default=1536, help="training prompt bucket (>= the longest prompt)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=default_out)


def load_inputs(args):
    """(model, tasks, base TrainConfig fields, budgets) from the common arguments."""
    import lkv_jax
    from lkv_jax.data.vocab import load_vocab
    from lkv_jax.evaluation.tasks import synthetic_task
    from lkv_jax.tiny_target import ASSET_DIR

    if not (Path(args.labels) / "meta.json").is_file():
        raise SystemExit(f"no label dataset at {args.labels}: run `make demo` first, or `lkv make-labels`")
    model_dir = Path(args.model) if args.model else ASSET_DIR
    model = lkv_jax.load(model_dir, dtype=args.dtype)
    vocab = load_vocab(model_dir)
    tasks = [synthetic_task(t, n_samples=args.n_samples, length=args.length, seed=1, vocab=vocab)
             for t in args.tasks.split(",")]
    base = dict(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                warmup_steps=max(1, args.steps // 10), buckets=(args.bucket,), dtype=args.dtype,
                checkpoint_every=max(1, args.steps // 3), log_every=5)
    return model, tasks, base, [int(b) for b in args.budgets.split(",")]
