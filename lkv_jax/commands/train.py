"""`lkv train`: train a lookahead adapter on a label dataset (resumes from its checkpoints).

The arguments are `TrainConfig`'s fields: positional ones and flags (--name-with-dashes unless the field
names its flag), with the help text, choices and parsing the field's metadata gives."""

from __future__ import annotations

import dataclasses

HELP = "train a LookaheadKV adapter (lookahead embeddings + selective LoRA) on a `lkv make-labels` dataset"


def _parse(field: dataclasses.Field):
    """The string -> value conversion of a field's argument: given, or the default's type (a tuple's
    items comma separated)."""
    if "parse" in field.metadata:
        return field.metadata["parse"]
    if isinstance(field.default, tuple):
        item = type(field.default[0])
        return lambda text: tuple(item(x.strip()) for x in text.split(",") if x.strip())
    return type(field.default)


def _fields():
    from lkv_jax.lookahead.training import TrainConfig

    return dataclasses.fields(TrainConfig)


def add_arguments(p) -> None:
    fields = _fields()
    for f in sorted((f for f in fields if "position" in f.metadata), key=lambda f: f.metadata["position"]):
        p.add_argument(f.name, metavar=f.metadata["metavar"], help=f.metadata["help"])
    for f in fields:
        if "position" in f.metadata:
            continue
        shown = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        help_text = f.metadata["help"] + (f" (default {shown})" if f.default is not None else "")
        p.add_argument(f.metadata.get("flag", "--" + f.name.replace("_", "-")), dest=f.name, type=_parse(f),
                       default=f.default, choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"),
                       help=help_text.strip())
    p.add_argument("--stop-after", type=int, default=None, help="stop at this step (resume later with the same args)")
    p.add_argument("--restart", action="store_true",
                   help="start over: move an existing run in OUT to OUT/previous-runs/<n>/ (e.g. to rerun a "
                        "diverged run with a lower --lr); without it an existing run is resumed")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args):
    from lkv_jax.lookahead.training import TrainConfig

    return TrainConfig(**{f.name: getattr(args, f.name) for f in _fields()})


def run(args) -> int:
    from pathlib import Path

    from lkv_jax.lookahead.training import train

    cfg = config_from_args(args)
    train(cfg, progress=not args.no_progress, stop_after=args.stop_after, restart=args.restart)
    print(f"adapter: {Path(cfg.out_dir) / 'adapter.safetensors'}; metrics: {Path(cfg.out_dir) / 'metrics.jsonl'}")
    return 0
