"""`lkv make-labels`: the model's greedy responses to a prompt set and their attention labels."""

from __future__ import annotations

HELP = ("generate the model's own greedy responses to a JSONL prompt set and write the response-attention "
        "labels LookaheadKV trains on (resumable)")


def add_arguments(p) -> None:
    p.add_argument("model", help="Hugging Face model directory (the frozen target model)")
    p.add_argument("prompts", help='JSONL file, one {"prompt_ids": [...]} or {"prompt": "text"} per line')
    p.add_argument("out", help="output dataset directory (rerun with the same arguments to resume)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json for text prompts (default: MODEL/tokenizer.json if present)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="response length limit (default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    p.add_argument("--dtype", default="bfloat16", help="model activation dtype (default bfloat16)")
    p.add_argument("--label-dtype", choices=("float32", "float16"), default="float32",
                   help="storage dtype of the labels (float16 halves the size)")
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk (default 512)")
    p.add_argument("--shard-size", type=int, default=64,
                   help="samples per shard file; a killed run resumes after its last whole shard (default 64)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from pathlib import Path

    from lkv_jax.checkpoint.hf import load_hf
    from lkv_jax.commands.checks import require_positive
    from lkv_jax.lookahead.label_store import make_label_dataset, read_prompts

    require_positive(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, chunk_size=args.chunk_size,
                     shard_size=args.shard_size)
    tok = args.tokenizer
    if tok is None and (Path(args.model) / "tokenizer.json").is_file():
        tok = Path(args.model) / "tokenizer.json"
    prompts = read_prompts(args.prompts, tok)
    model = load_hf(args.model, dtype=args.dtype)
    out = make_label_dataset(model, prompts, args.out, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, label_dtype=args.label_dtype, chunk_size=args.chunk_size,
                             shard_size=args.shard_size, progress=not args.no_progress)
    print(f"wrote {len(prompts)} samples to {out}")
    return 0
