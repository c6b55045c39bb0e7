"""`lkv eval`: presses x budgets (or ratios) x tasks on a converted model -> cell JSONs, a markdown
table and PNG plots (see `lkv_jax.evaluation`)."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

HELP = ("evaluate KV-cache eviction: presses x budgets x tasks (synthetic RULER-style, RULER or LongBench) -> "
        "per-cell JSON, results.md, plots; resumable")

EPILOG = """\
tasks:
  synthetic (built-in vocabulary, one task per --lengths entry): niah_single, niah_multikey,
    niah_multivalue, niah_multiquery, vt, fwe, tag_list
  RULER on the evaluation half of the essays, sized in the model's tokenizer (needs its tokenizer.json: the
    model folder's or --tokenizer; --chat-template for instruct models), one task per --lengths entry:
    ruler/<task> for niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery, vt, cwe, fwe
  summary: summarise an evaluation-half essay passage (same tokenizer needs), scored by ROUGE-L against the
    model's own FullKV summary: how much of the full cache's long answer an eviction keeps
  LongBench (needs --longbench-dir with <task>.jsonl, or --longbench-hub): longbench/<task>, e.g.
    longbench/hotpotqa, longbench/gov_report (the 16 English tasks)
presses: registered names (snapkv, pyramidkv, streamingllm, tova, laq, lookaheadkv, ...) with optional
  keyword overrides after colons, e.g. snapkv:window_size=8 (lookaheadkv needs --adapter)
example:
  lkv eval --model tiny --adapter adapter.safetensors --presses lookaheadkv,snapkv,tova \\
      --budgets 16,32,64 --tasks niah_multikey,tag_list --lengths 1024 --out runs/eval
"""


def _comma_separated(convert, what: str):
    """An argparse type: a tuple of the comma-separated items of the text, each through `convert`."""

    def parse(text: str) -> tuple:
        try:
            return tuple(convert(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None

    return parse


_ints, _floats, _names = (_comma_separated(int, "integers"), _comma_separated(float, "numbers"),
                          _comma_separated(str.strip, "names"))


def add_arguments(p) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--model", required=True, help="model directory: Hugging Face or converted by `lkv convert`")
    p.add_argument("--adapter", default=None, help="LookaheadKV adapter file (for the lookaheadkv press)")
    p.add_argument("--presses", type=_names, required=True, help="comma-separated press specs")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--budgets", type=_ints, help="entries kept per layer and KV head, e.g. 16,32,64")
    g.add_argument("--ratios", type=_floats, help="compression ratios (fraction removed), e.g. 0.5,0.75,0.9")
    p.add_argument("--tasks", type=_names, required=True, help="comma-separated task names (see below)")
    p.add_argument("--out", required=True, help="output folder (resumed if it holds finished cells)")
    p.add_argument("--lengths", type=_ints, default=(1024,),
                   help="synthetic context lengths in tokens (RULER: prompt + tokens to generate)")
    p.add_argument("--n-samples", type=int, default=20, help="samples per task (LongBench: first n; 0 = all)")
    p.add_argument("--seed", type=int, default=1234, help="synthetic sample seed (keep it apart from training's)")
    p.add_argument("--question-agnostic", action="store_true",
                   help="compress the context before the question is seen (default: query-aware)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk")
    p.add_argument("--pad-multiple", type=int, default=64, help="pad prompts to a multiple of this (fewer compiles)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--no-oracle", action="store_true", help="skip the oracle coverage diagnostics")
    p.add_argument("--no-overhead", action="store_true", help="skip the timing of compress against prefill")
    p.add_argument("--timing-repeats", type=int, default=3, help="time compress and prefill this many times (best)")
    p.add_argument("--timing-batches", type=int, default=2, help="batches timed per cell (0: all)")
    p.add_argument("--longbench-dir", default=None, help="folder with the official LongBench <task>.jsonl files")
    p.add_argument("--longbench-hub", action="store_true", help="download LongBench from the Hugging Face hub")
    p.add_argument("--tokenizer", default=None, help="Hugging Face tokenizer folder (default: --model)")
    p.add_argument("--max-length", type=int, default=31500, help="LongBench: middle-truncate prompts to this")
    p.add_argument("--chat-template", action="store_true",
                   help="apply the tokenizer's chat template (LongBench; synthetic tasks with a HF tokenizer)")
    p.add_argument("--reference", default=None,
                   help="a press spec of --presses to compare every other press with on the same samples "
                        "(paired bootstrap interval of the score difference in results.md and summary.json)")
    p.add_argument("--no-progress", action="store_true")


def _synthetic_tokenizer(tok_dir: Path, chat_template: bool):
    """(vocab, None) for the built-in word-level vocabulary (or no tokenizer.json at all), else
    (None, HFPromptEncoder) for a real model's Hugging Face tokenizer."""
    from lkv_jax.data.synthetic import HFPromptEncoder
    from lkv_jax.data.vocab import builtin_vocab, load_vocab

    if not (tok_dir / "tokenizer.json").is_file():
        return builtin_vocab(), None
    try:
        return load_vocab(tok_dir), None
    except (ValueError, KeyError):  # not a WordLevel vocabulary: a real model's tokenizer
        return None, HFPromptEncoder(tok_dir, use_chat_template=chat_template)


def _ruler_encoder(tok_dir: Path, chat_template: bool):
    """The HFPromptEncoder RULER tasks need: a real model's tokenizer.json (not the built-in word vocabulary)."""
    from lkv_jax.data.synthetic import HFPromptEncoder
    from lkv_jax.data.vocab import load_vocab

    if not (tok_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"RULER tasks need the model's Hugging Face tokenizer: no tokenizer.json in {tok_dir}; "
                                "pass --tokenizer DIR")
    try:
        load_vocab(tok_dir)
    except (ValueError, KeyError):  # not the built-in WordLevel vocabulary: a real model's tokenizer
        return HFPromptEncoder(tok_dir, use_chat_template=chat_template)
    raise ValueError(f"RULER tasks need a real model's tokenizer; {tok_dir} holds the built-in word vocabulary")


def build_tasks(args) -> list:
    """The EvalTasks named by --tasks."""
    from lkv_jax.evaluation.tasks import longbench_task, ruler_task, summary_task, synthetic_task

    tasks, tokenizer, vocab, encoder, ruler_encoder = [], None, None, None, None
    limit = args.n_samples or None
    for name in args.tasks:
        if name.startswith(("longbench/", "longbench:")):
            if tokenizer is None:
                try:
                    from transformers import AutoTokenizer
                except ImportError as e:
                    raise ValueError("LongBench tasks need transformers for the model's tokenizer: "
                                     "pip install -e '.[hf]'") from e

                src = args.tokenizer or args.model
                try:
                    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
                except (OSError, ValueError) as e:
                    raise FileNotFoundError(f"no Hugging Face tokenizer in {src} ({e}); pass --tokenizer") from e
            if args.longbench_dir is None and not args.longbench_hub:
                raise ValueError("LongBench tasks need --longbench-dir DIR (or --longbench-hub)")
            tasks.append(longbench_task(name.split("/", 1)[-1].split(":", 1)[-1], tokenizer,
                                        data_dir=args.longbench_dir, from_hub=args.longbench_hub,
                                        max_length=args.max_length, chat_template=args.chat_template, limit=limit))
        elif name.startswith("ruler/") or name == "summary":
            if ruler_encoder is None:
                ruler_encoder = _ruler_encoder(Path(args.tokenizer or args.model), args.chat_template)
            make = summary_task if name == "summary" else functools.partial(ruler_task, name)
            tasks += [make(ruler_encoder, length=length, n_samples=args.n_samples or 20, seed=args.seed)
                      for length in args.lengths]
        else:
            if vocab is None and encoder is None:
                vocab, encoder = _synthetic_tokenizer(Path(args.tokenizer or args.model), args.chat_template)
            for length in args.lengths:
                tasks.append(synthetic_task(name, n_samples=args.n_samples or 20, length=length, seed=args.seed,
                                            vocab=vocab, encoder=encoder))
    return tasks


def run(args) -> int:
    import lkv_jax
    from lkv_jax.commands.checks import require_positive
    from lkv_jax.evaluation.report import write_report
    from lkv_jax.evaluation.runner import EvalConfig, PressSpec, run_eval
    from lkv_jax.output_dirs import claim_output_dir

    require_positive(batch_size=args.batch_size, chunk_size=args.chunk_size, pad_multiple=args.pad_multiple)
    cfg = EvalConfig(presses=tuple(PressSpec.parse(p) for p in args.presses), budgets=args.budgets or (),
                     ratios=args.ratios or (), mode="question-agnostic" if args.question_agnostic else "query-aware",
                     batch_size=args.batch_size, chunk_size=args.chunk_size, pad_multiple=args.pad_multiple,
                     oracle=not args.no_oracle, measure_overhead=not args.no_overhead,
                     timing_repeats=args.timing_repeats, timing_batches=args.timing_batches)
    if args.reference is not None and args.reference not in [p.label for p in cfg.presses]:
        raise ValueError(f"--reference {args.reference!r} must be one of --presses {list(args.presses)}")
    model = lkv_jax.load(args.model, dtype=args.dtype)  # Hugging Face or converted (orbax) directory
    adapter = None
    if args.adapter:
        from lkv_jax.lookahead import load_adapter

        adapter = load_adapter(args.adapter, model.config)
    tasks = build_tasks(args)
    claim_output_dir(args.out, "eval")  # after every other check: refuses a model's directory or another run
    run_eval(model, tasks, cfg, args.out, adapter=adapter, progress=not args.no_progress)
    paths = write_report(args.out, reference=args.reference)
    print(paths["table"].read_text())
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0
