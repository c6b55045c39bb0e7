"""`lkv generate`: greedy generation from a full or press-compressed KV cache.

Text in and out when the model directory holds a `tokenizer.json` (read with the `tokenizers` library);
token ids in and out otherwise (`--prompt-ids "1 2 3"`).
"""

from __future__ import annotations

import json
from pathlib import Path

HELP = "greedy generation with a KV-cache press (e.g. --press snapkv --compression-ratio 0.5)"

EPILOG = """\
presses: registered names (lkv_jax.presses.PRESSES: snapkv, snapkv-paper, pyramidkv, streamingllm, tova,
  knorm, observed-attention, random, expected-attention, laq, speckv, adakv-snapkv, lookaheadkv, ...)
  with optional keyword overrides after colons, e.g. snapkv:window_size=32:kernel_size=7:pooling=max;
  speckv needs --draft-model, lookaheadkv needs --adapter. Without --press the cache is not compressed.
examples:
  lkv generate --model DIR --press snapkv --compression-ratio 0.5 --prompt "Summarise: ..."
  lkv generate --model DIR --press tova --budget 64 --prompt-ids "1 15 27 3" --max-new-tokens 16
decoding-time eviction (long answers in bounded memory): --decoding-press snapkv|tova|knorm|streamingllm|lookaheadkv
  with --decoding-budget B [--decoding-interval N --keep-recent W]: whenever the cache holds B + N entries it is
  evicted back to B; the prompt must fit in B (or be compressed to it by --press), e.g.
  lkv generate --model DIR --press lookaheadkv --budget 256 --adapter A --decoding-press lookaheadkv \
      --decoding-budget 256 --decoding-interval 64 --prompt "..." --max-new-tokens 1024
"""


def add_arguments(p) -> None:
    import argparse

    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", required=True, help="model directory: Hugging Face or converted by `lkv convert`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs tokenizer.json in the model directory)")
    src.add_argument("--prompt-ids", help='prompt token ids, e.g. "1 15 27" (commas also accepted)')
    p.add_argument("--press", default=None, help="press name[:key=value...]; default: full KV cache")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--compression-ratio", type=float, default=None, help="fraction of the prompt removed")
    amount.add_argument("--budget", type=int, default=None, help="entries kept per layer and KV head")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--draft-model", default=None, help="draft model directory (speckv)")
    p.add_argument("--adapter", default=None, help="LookaheadKV adapter file (lookaheadkv)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: as stored)")
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk size")
    p.add_argument("--decoding-press", default=None, help="scorer name[:key=value...] for decoding-time eviction")
    p.add_argument("--decoding-budget", type=int, default=None, help="entries per layer and KV head while decoding")
    p.add_argument("--decoding-interval", type=int, default=64, help="evict every this many new entries")
    p.add_argument("--keep-recent", type=int, default=8, help="last generated tokens always kept")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of plain text")


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-ids must be integers separated by spaces, got {text!r}") from None
    if not ids:
        raise ValueError("--prompt-ids is empty")
    return ids


def build_press(args, model):
    """The press the arguments describe (None for full KV)."""
    if args.press is None:
        if args.compression_ratio is not None or args.budget is not None:
            raise ValueError("--compression-ratio / --budget need a --press")
        return None
    return _registered_press(args, model, args.press, compression_ratio=args.compression_ratio, budget=args.budget)


def build_decoding_press(args, model):
    """The decoding-time eviction the arguments describe (None without --decoding-press)."""
    if args.decoding_press is None:
        if args.decoding_budget is not None:
            raise ValueError("--decoding-budget needs a --decoding-press")
        return None
    if args.decoding_budget is None:
        raise ValueError("--decoding-press needs --decoding-budget")
    from lkv_jax.decoding_press import DecodingPress

    scorer = _registered_press(args, model, args.decoding_press)
    return DecodingPress(scorer, budget=args.decoding_budget, interval=args.decoding_interval,
                         keep_recent=args.keep_recent)


def _registered_press(args, model, text: str, **amount):
    """A registered press from `name[:key=value...]`, with the draft model or adapter it needs."""
    from lkv_jax.evaluation.runner import PressSpec
    from lkv_jax.presses.registry import make_press, press_needs

    spec = PressSpec.parse(text)
    kwargs = dict(spec.kwargs)
    needs = press_needs(spec.name)
    if needs == "draft_model":
        if args.draft_model is None:
            raise ValueError(f"the {spec.name} press needs --draft-model DIR")
        from lkv_jax.checkpoint.orbax_io import load

        kwargs["draft_model"] = load(args.draft_model, dtype=args.dtype)
    if needs == "adapter":
        if args.adapter is None:
            raise ValueError(f"the {spec.name} press needs --adapter FILE")
        from lkv_jax.lookahead import load_adapter

        kwargs["adapter"] = load_adapter(args.adapter, model.config)
    try:
        return make_press(spec.name, **amount, **kwargs)
    except TypeError as e:
        raise ValueError(f"press {text}: {e}") from e


def run(args) -> int:
    import numpy as np

    from lkv_jax.checkpoint.orbax_io import load
    from lkv_jax.commands.checks import check_token_ids, require_positive
    from lkv_jax.generation import generate
    from lkv_jax.padding import trim_at_eos

    model_dir = Path(args.model)
    tok_file = model_dir / "tokenizer.json"
    tokenizer = None
    if tok_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tok_file))
    if args.prompt is not None:
        if tokenizer is None:
            raise ValueError(f"{model_dir} has no tokenizer.json: give the prompt as --prompt-ids")
        ids = tokenizer.encode(args.prompt).ids
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
    else:
        ids = parse_ids(args.prompt_ids)
    require_positive(max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size)
    model = load(model_dir, dtype=args.dtype)  # Hugging Face or converted (orbax) directory
    check_token_ids(ids, model.config.vocab_size, "--prompt-ids" if args.prompt is None else "--prompt")
    press = build_press(args, model)
    decoding_press = build_decoding_press(args, model)
    tokens = generate(model, np.asarray([ids], np.int32), args.max_new_tokens, press=press,
                      chunk_size=args.chunk_size, decoding_press=decoding_press)[0]
    out = trim_at_eos(tokens, model.config.eos_token_id)
    text = tokenizer.decode(out, skip_special_tokens=True) if tokenizer is not None else None
    if args.json:
        print(json.dumps({"prompt_ids": ids, "tokens": out, "text": text, "press": args.press,
                          "compression_ratio": args.compression_ratio, "budget": args.budget,
                          "decoding_press": args.decoding_press, "decoding_budget": args.decoding_budget,
                          "decoding_interval": args.decoding_interval, "keep_recent": args.keep_recent}))
    elif args.prompt is not None:
        print(text)
    else:
        print(" ".join(str(t) for t in out))
    return 0
