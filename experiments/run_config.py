"""Run a stage of the LookaheadKV pipeline from a ready config (experiments/configs/<model>.json).

    python experiments/run_config.py experiments/configs/llama-3.1-8b.json labels   # lkv make-labels
    python experiments/run_config.py experiments/configs/llama-3.1-8b.json train    # lkv train
    python experiments/run_config.py experiments/configs/llama-3.1-8b.json eval     # lkv eval
    python experiments/run_config.py experiments/configs/llama-3.1-8b.json all --dry-run

A config names the converted model, the prompt file, the label / run / eval directories, and the
options of each stage (the `lkv` flags without their dashes). Every stage is resumable, so rerunning
the same command continues where it stopped. On a multi-host TPU slice (LKV_DISTRIBUTED=1, set by
experiments/launch_tpu_vm.py) it calls jax.distributed.initialize() first; give the training mesh of the
slice with --mesh DATA,FSDP,TENSOR (its product = the slice's chip count, e.g. 4,4,1 on a v5p-32).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STAGES = ("labels", "train", "eval")


def flags(options: dict) -> list[str]:
    """{"max-new-tokens": 512, "chat-template": True} -> ["--max-new-tokens", "512", "--chat-template"]."""
    out = []
    for key, value in options.items():
        if value is False or value is None:
            continue
        out.append(f"--{key}")
        if value is not True:
            out.append(str(value))
    return out


def stage_argv(cfg: dict, stage: str, mesh: str | None = None) -> list[str]:
    """The `lkv` command line of one stage (`mesh` overrides the train stage's mesh)."""
    if stage == "labels":
        return ["make-labels", cfg["model"], cfg["prompts"], cfg["labels"], *flags(cfg.get("make-labels", {}))]
    if stage == "train":
        train = {**cfg.get("train", {}), **({"mesh": mesh} if mesh else {})}
        return ["train", cfg["model"], cfg["labels"], cfg["run"], *flags(train)]
    if stage == "eval":
        ev = dict(cfg.get("eval", {}))
        return ["eval", "--model", cfg["model"], "--adapter", str(Path(cfg["run"]) / "adapter.safetensors"),
                "--out", cfg["eval_out"], *flags(ev)]
    raise ValueError(f"stage must be one of {STAGES} or 'all', got {stage!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="JSON config, e.g. experiments/configs/llama-3.1-8b.json")
    ap.add_argument("stage", choices=(*STAGES, "all"))
    ap.add_argument("--dry-run", action="store_true", help="print the lkv commands, run nothing")
    ap.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                    help="device mesh of the train stage (lkv train --mesh); default: the config's, else one device")
    args = ap.parse_args(argv)
    cfg = json.loads(Path(args.config).read_text())
    stages = STAGES if args.stage == "all" else (args.stage,)
    commands = [stage_argv(cfg, s, args.mesh) for s in stages]
    if args.dry_run:
        for c in commands:
            print(shlex.join(["lkv", *c]))
        return 0
    from lkv_jax.distributed import maybe_initialize_distributed

    maybe_initialize_distributed()
    from lkv_jax.cli import main as lkv

    for c in commands:
        rc = lkv(c)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
