"""`lkv convert`: Hugging Face directory <-> converted orbax checkpoint."""

from __future__ import annotations

HELP = "convert a Hugging Face checkpoint to an orbax checkpoint (--to orbax) or back (--to hf)"


def add_arguments(p) -> None:
    p.add_argument("src", help="source directory (Hugging Face or converted)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--to", choices=("orbax", "hf"), default="orbax")
    p.add_argument("--max-shard-mb", type=float, default=None, help="shard HF safetensors above this size")


def run(args) -> int:
    from lkv_jax.checkpoint.orbax_io import convert

    shard = None if args.max_shard_mb is None else int(args.max_shard_mb * 2**20)
    out = convert(args.src, args.dst, to=args.to, max_shard_bytes=shard)
    print(f"wrote {out}")
    return 0
