"""Train a LookaheadKV adapter: labels (if not made yet), then training, resumable end to end.

    # 1. the target model's own greedy responses and their attention labels (resumable)
    python experiments/train_lookahead.py labels MODEL_DIR prompts.jsonl data/labels --max-new-tokens 512
    # 2. train the lookahead embeddings + selective LoRA (resumes from RUN_DIR/checkpoints)
    python experiments/train_lookahead.py train MODEL_DIR data/labels runs/lkv --steps 2000 --lr 5e-4
    # 3. use it
    python -c "import lkv_jax; from lkv_jax.lookahead import load_adapter; \\
               press = lkv_jax.presses.LookaheadKVPress(load_adapter('runs/lkv/adapter.safetensors'), budget=128)"

prompts.jsonl holds one {"prompt_ids": [...]} or {"prompt": "chat-templated text"} per line (text needs
MODEL_DIR/tokenizer.json or --tokenizer). Each subcommand is exactly `lkv make-labels` / `lkv train`;
`--help` after it lists every option (optimizer, LoRA rank/alpha/targets, buckets, checkpointing).
Outputs: RUN_DIR/metrics.jsonl (loss, label-mass recall at budgets 64/128/256, lr, grad norm),
RUN_DIR/checkpoints/<step> (orbax: adapter, optimizer, data iterator), RUN_DIR/adapter.safetensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lkv_jax.cli import main as lkv_main  # noqa: E402
from lkv_jax.distributed import maybe_initialize_distributed  # noqa: E402

SUBCOMMANDS = {"labels": "make-labels", "train": "train"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    maybe_initialize_distributed()  # several hosts (LKV_DISTRIBUTED=1, set by launch_tpu_vm.py)
    return lkv_main([SUBCOMMANDS[argv[0]], *argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
