r"""Evaluate KV-cache eviction presses on a converted model: a thin CLI over `lkv eval`.

    python experiments/eval.py --model DIR --adapter FILE --presses lookaheadkv,snapkv,tova \
        --budgets 16,32,64 --tasks niah_multikey,tag_list --lengths 1024 --out runs/eval

Writes one JSON per (press, budget, task) cell under OUT/cells (finished cells are not recomputed when
the command is run again), OUT/results.md (the score table, eviction overhead, oracle coverage) and
OUT/scores.png, OUT/overhead.png, OUT/oracle.png. Run with --help for every option.
"""

from __future__ import annotations

import argparse
import sys

from lkv_jax.commands import evaluate
from lkv_jax.distributed import maybe_initialize_distributed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="experiments/eval.py", description=__doc__)
    evaluate.add_arguments(parser)
    parser.description = __doc__
    args = parser.parse_args(argv)
    maybe_initialize_distributed()  # several hosts (LKV_DISTRIBUTED=1, set by launch_tpu_vm.py)
    return int(evaluate.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
