"""The main job on an embedded default: a tiny model through the real checkpoint path, then generation
with a full and a compressed KV cache.

    make demo            # or: .venv/bin/python experiments/demo.py

Writes a tiny random Llama as a Hugging Face directory, loads it back with `lkv_jax.load_hf`, converts
it to an orbax checkpoint and back, and generates greedily from a full cache and from a
StreamingLLM-compressed one, printing the tokens and the cache sizes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lkv_jax  # noqa: E402
from lkv_jax.config import ModelConfig  # noqa: E402
from lkv_jax.models.transformer import Transformer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="output directory")
    ap.add_argument("--prompt-len", type=int, default=256)
    args = ap.parse_args(argv)
    out = Path(args.out).absolute()
    cfg = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, eos_token_id=(2,))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    lkv_jax.save_hf(model, out / "tiny-random-hf")
    model = lkv_jax.load_hf(out / "tiny-random-hf", dtype="float32")
    lkv_jax.convert(out / "tiny-random-hf", out / "tiny-random-orbax")
    model = lkv_jax.load(out / "tiny-random-orbax")
    print(f"model: {model.num_params():,} parameters, loaded from {out / 'tiny-random-orbax'}")
    ids = np.random.RandomState(0).randint(3, cfg.vocab_size, size=(2, args.prompt_len))
    for name, press in [("full KV", None), ("StreamingLLM budget 64", lkv_jax.presses.StreamingLLMPress(budget=64))]:
        t0 = time.perf_counter()
        tokens = lkv_jax.generate(model, ids, max_new_tokens=16, press=press)
        jax.block_until_ready(tokens)
        print(f"{name:>24}: {tokens[0].tolist()}  ({time.perf_counter() - t0:.2f}s incl. compile)")
    kept = lkv_jax.compress(model, ids, lkv_jax.presses.StreamingLLMPress(budget=64)).kept_positions[0]
    print(f"compressed cache keeps {kept.shape[-1]} of {args.prompt_len} entries per layer and KV head; "
          f"layer 0, head 0 positions: {np.asarray(kept[0, 0]).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
