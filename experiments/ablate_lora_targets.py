"""Ablation: where the selective LoRA goes (the paper: LoRA in all layers is worth its <1.3% TTFT cost).

    python experiments/ablate_lora_targets.py                          # tiny target, after `make demo`
    python experiments/ablate_lora_targets.py --model DIR --labels DIR --budgets 64,128

Variants: no LoRA (lookahead embeddings only), attention only (q, k, v, o), all seven projections
(q, k, v, o, gate, up, down). Each trains on the same labels; LookaheadKV is evaluated at the budgets
(scores with 95% bootstrap intervals, and "all" minus each other variant on the same samples).
Writes OUT/ablation.json and OUT/ablation.png; every stage is resumable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ablation_common import add_common_arguments, load_inputs  # noqa: E402

VARIANTS = {
    "none": {"targets": ()},
    "attention": {"targets": ("q", "k", "v", "o")},
    "all": {"targets": ("q", "k", "v", "o", "gate", "up", "down")},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-lookahead", type=int, default=32, help="lookahead tokens of every variant (the paper's 32)")
    add_common_arguments(ap, "runs/ablate_lora_targets")
    args = ap.parse_args(argv)
    from lkv_jax.evaluation.ablation import run_ablation, summary_table

    model, tasks, base, budgets = load_inputs(args)
    base["n_lookahead"] = args.n_lookahead
    result = run_ablation(model, args.labels, VARIANTS, tasks, base_train=base, budgets=budgets, out_dir=args.out,
                          title="LookaheadKV: LoRA targets", reference="all")
    print(summary_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
