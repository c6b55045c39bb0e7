"""`lkv train`: train a lookahead adapter on a label dataset (resumes from its checkpoints)."""

from __future__ import annotations

HELP = "train a LookaheadKV adapter (lookahead embeddings + selective LoRA) on a `lkv make-labels` dataset"


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def add_arguments(p) -> None:
    from lkv_jax.lookahead.training import TrainConfig

    d = TrainConfig(data_dir="", out_dir="")
    p.add_argument("model", help="Hugging Face model directory (the frozen base model)")
    p.add_argument("data", help="label dataset directory written by `lkv make-labels`")
    p.add_argument("out", help="run directory: checkpoints/, metrics.jsonl, adapter.safetensors "
                               "(an existing run there is resumed)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.learning_rate, help=f"peak learning rate (default {d.learning_rate})")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--end-lr-ratio", type=float, default=d.end_lr_ratio, help="final lr / peak lr of the cosine")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip-norm", type=float, default=d.clip_norm, help="global gradient-norm clip")
    p.add_argument("--n-lookahead", type=int, default=d.n_lookahead)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--targets", default=",".join(d.targets), help="LoRA projections, comma separated")
    p.add_argument("--buckets", default=",".join(map(str, d.buckets)), help="prompt length buckets")
    p.add_argument("--labels", choices=("dataset", "on-the-fly"), default=d.labels,
                   help="read stored labels, or recompute them from the stored responses in each step")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--dtype", default=d.dtype, help="base model activation dtype")
    p.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                   help="run the step over a device mesh of these axis sizes (e.g. 4,2,1 on 8 chips; the batch "
                        "size must be divisible by DATA); default: one device")
    p.add_argument("--stop-after", type=int, default=None, help="stop at this step (resume later with the same args)")
    p.add_argument("--restart", action="store_true",
                   help="start over: move an existing run in OUT to OUT/previous-runs/<n>/ (e.g. to rerun a "
                        "diverged run with a lower --lr); without it an existing run is resumed")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args):
    from lkv_jax.lookahead.training import TrainConfig

    return TrainConfig(
        data_dir=args.data, out_dir=args.out, model_dir=args.model, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lr, warmup_steps=args.warmup_steps, end_lr_ratio=args.end_lr_ratio,
        weight_decay=args.weight_decay, clip_norm=args.clip_norm, n_lookahead=args.n_lookahead, rank=args.rank,
        alpha=args.alpha, targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        buckets=_ints(args.buckets), seed=args.seed, labels=args.labels, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, log_every=args.log_every, dtype=args.dtype,
        mesh=_ints(args.mesh) if args.mesh else None)


def run(args) -> int:
    from pathlib import Path

    from lkv_jax.lookahead.training import train

    cfg = config_from_args(args)
    train(cfg, progress=not args.no_progress, stop_after=args.stop_after, restart=args.restart)
    print(f"adapter: {Path(cfg.out_dir) / 'adapter.safetensors'}; metrics: {Path(cfg.out_dir) / 'metrics.jsonl'}")
    return 0
