"""`lkv convert`: Hugging Face directory <-> converted orbax checkpoint, and GGUF file -> Hugging Face directory."""

from __future__ import annotations

HELP = ("convert a Hugging Face checkpoint to an orbax checkpoint (--to orbax) or back (--to hf); "
        "a .gguf SRC is imported as a Hugging Face directory")


def add_arguments(p) -> None:
    p.add_argument("src", help="source directory (Hugging Face or converted) or a llama.cpp .gguf file")
    p.add_argument("dst", help="output directory")
    p.add_argument("--to", choices=("orbax", "hf"), default="orbax")
    p.add_argument("--max-shard-mb", type=float, default=None, help="shard HF safetensors above this size")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the model in a non-empty DST (its old weights and shard index are removed first)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="parameter dtype of a .gguf import (default float32)")


def run(args) -> int:
    from lkv_jax.output_dirs import check_convert_destination

    # before any branch: every conversion refuses a non-empty DST unless --overwrite
    check_convert_destination(args.src, args.dst, overwrite=args.overwrite)
    if str(args.src).endswith(".gguf"):
        from lkv_jax.checkpoint.gguf import convert_gguf

        out = convert_gguf(args.src, args.dst, dtype=args.dtype or "float32", overwrite=args.overwrite)
        print(f"wrote {out}")
        return 0
    if args.dtype is not None:
        raise ValueError("--dtype applies to a .gguf SRC only; other conversions keep the stored dtype")
    from lkv_jax.checkpoint.orbax_io import convert

    shard = None if args.max_shard_mb is None else int(args.max_shard_mb * 2**20)
    out = convert(args.src, args.dst, to=args.to, max_shard_bytes=shard)
    print(f"wrote {out}")
    return 0
