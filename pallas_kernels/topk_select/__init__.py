"""Top-n slot selection per row and KV head by Pallas threshold cuts (bisection on order keys) and a
prefix-sum compaction; `lax.top_k` stays the default until the kernel measures faster on hardware.

    slots, kept = select_slots(scores, selectable, protected, n_kept, keep_count, implementation="pallas")
"""

from pallas_kernels.topk_select.op import select_slots

__all__ = ["select_slots"]
