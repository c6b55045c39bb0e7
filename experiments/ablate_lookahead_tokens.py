"""Ablation: the number of lookahead tokens (the paper: gains saturate at 32).

    python experiments/ablate_lookahead_tokens.py                      # tiny target, after `make demo`
    python experiments/ablate_lookahead_tokens.py --n 1,2,4,8,16,32,64 --model DIR --labels DIR

For each n it trains an adapter with n lookahead embeddings (everything else equal, same labels),
evaluates LookaheadKV at the budgets on the synthetic tasks, and records accuracy (with a 95% bootstrap
interval, and n=32's paired difference from each other n on the same samples) and eviction overhead
(% of prefill). Writes OUT/ablation.json and one plot OUT/ablation.png; every stage is resumable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ablation_common import add_common_arguments, load_inputs  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="1,2,4,8,16,32,64", help="lookahead token counts, comma separated")
    add_common_arguments(ap, "runs/ablate_lookahead_tokens")
    args = ap.parse_args(argv)
    from lkv_jax.evaluation.ablation import run_ablation, summary_table

    model, tasks, base, budgets = load_inputs(args)
    variants = {f"n={n}": {"n_lookahead": int(n)} for n in args.n.split(",")}
    result = run_ablation(model, args.labels, variants, tasks, base_train=base, budgets=budgets, out_dir=args.out,
                          title="LookaheadKV: number of lookahead tokens",
                          reference="n=32" if "n=32" in variants else None)
    print(summary_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
