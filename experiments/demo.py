"""The main job, end to end on the embedded default (`make demo`): LookaheadKV on the project's tiny target.

    make demo                                  # or: .venv/bin/python experiments/demo.py
    .venv/bin/python experiments/demo.py --quick    # a smaller grid, for a smoke run

On the shipped tiny target model (`lkv_jax/assets/tiny_target/`, a small Llama trained by
experiments/train_tiny_target.py on the synthetic tasks) it:
  1. generates synthetic training prompts (RULER-style tasks, seeds disjoint from the evaluation's);
  2. makes labels: the model's own greedy responses and their attention on the prompt (`lkv make-labels`);
  3. trains the LookaheadKV adapter (lookahead embeddings + selective LoRA) on them (`lkv train`);
  4. evaluates FullKV, LookaheadKV, SnapKV (window inside and outside the budget), PyramidKV,
     StreamingLLM, TOVA and LAQ at small budgets on held-out samples (`lkv eval`), with the oracle
     coverage diagnostics and the eviction overhead, and as a reference the response-attention oracle
     (the model's own full-cache answer scores the prompt: what LookaheadKV learns to predict);
  5. prints the results tables (scores with 95% bootstrap intervals, LookaheadKV's paired difference from
     every other press) and writes runs/demo/eval/{results.md, summary.json, scores.png, overhead.png,
     oracle.png}.
Every stage is resumable: rerunning continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# the tasks where the shipped tiny target answers something with a full cache (see its model card),
# tag_list being the long-answer one
TASKS = ("niah_single", "niah_multikey", "tag_list")


@dataclasses.dataclass(frozen=True)
class DemoSize:
    n_train_prompts: int = 192
    train_length: int = 1024
    label_new_tokens: int = 48
    steps: int = 300
    n_lookahead: int = 32  # the paper's
    eval_samples: int = 24
    eval_length: int = 1024
    budgets: tuple[int, ...] = (32, 64, 128)


SIZES = {"default": DemoSize(), "quick": DemoSize(n_train_prompts=16, label_new_tokens=24, steps=20, n_lookahead=16,
                                                  eval_samples=4, budgets=(32, 64))}


def training_prompts(vocab, n: int, length: int, seed: int) -> list[list[int]]:
    """Query-aware prompts (context + question) of the demo tasks, cycling through them."""
    from lkv_jax.data.synthetic import encode_builtin, generate_samples

    per_task = -(-n // len(TASKS))
    prompts = []
    for task in TASKS:
        for s in generate_samples(task, per_task, length, seed=seed):
            prompts.append(encode_builtin(s, vocab, query_aware=True).prompt.tolist())
    return prompts[:n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="output directory (resumable)")
    ap.add_argument("--model", default=None, help="model directory (default: the shipped tiny target)")
    ap.add_argument("--quick", action="store_true", help="a smaller grid for a smoke run")
    args = ap.parse_args(argv)

    import lkv_jax
    from lkv_jax.data.vocab import load_vocab
    from lkv_jax.evaluation.report import write_report
    from lkv_jax.evaluation.runner import EvalConfig, PressSpec, run_eval
    from lkv_jax.evaluation.tasks import synthetic_task
    from lkv_jax.lookahead.data_pipeline import PREFILL_CHUNK
    from lkv_jax.lookahead.label_store import make_label_dataset
    from lkv_jax.lookahead.training import TrainConfig, train
    from lkv_jax.padding import round_up
    from lkv_jax.tiny_target import ASSET_DIR

    size = SIZES["quick" if args.quick else "default"]
    out = Path(args.out).absolute()
    model_dir = Path(args.model) if args.model else ASSET_DIR
    t0 = time.perf_counter()
    model = lkv_jax.load(model_dir, dtype="float32")
    vocab = load_vocab(model_dir)
    print(f"[demo] model {model_dir} ({model.num_params():,} parameters)", flush=True)

    prompts = training_prompts(vocab, size.n_train_prompts, size.train_length, seed=10_000)
    labels = make_label_dataset(model, prompts, out / "labels", max_new_tokens=size.label_new_tokens, batch_size=8,
                                eos_token_id=vocab.eos_id)
    print(f"[demo] labels: {len(prompts)} prompts -> {labels}  ({time.perf_counter() - t0:.0f}s)", flush=True)

    longest = max(len(p) for p in prompts)
    bucket = round_up(longest, PREFILL_CHUNK)  # training buckets above 512 are whole prefill chunks
    cfg = TrainConfig(data_dir=str(labels), out_dir=str(out / "adapter"), steps=size.steps, batch_size=4,
                      learning_rate=2e-3, warmup_steps=max(1, size.steps // 10), n_lookahead=size.n_lookahead,
                      buckets=(bucket,), checkpoint_every=max(1, size.steps // 3), log_every=5, dtype="float32")
    adapter = train(cfg, model=model)
    print(f"[demo] adapter trained: {out / 'adapter' / 'adapter.safetensors'}  ({time.perf_counter() - t0:.0f}s)",
          flush=True)

    tasks = [synthetic_task(t, n_samples=size.eval_samples, length=size.eval_length, seed=1, vocab=vocab)
             for t in TASKS]
    presses = ("lookaheadkv", "snapkv:window_size=8", "snapkv:window_size=8:window_outside=True",
               "pyramidkv:window_size=8", "streamingllm", "tova", "laq:window_size=8")
    # overhead timed on each cell's first batch (best of 2, after a warm-up): enough for a table, cheap
    # the model as its own draft: its full-cache answer scores the prompt, the response-attention oracle that
    # LookaheadKV learns to predict (an upper reference, not a deployable press: it decodes the answer first)
    oracle = PressSpec("speckv", (("draft_model", "self"), ("window_size", 1), ("kernel_size", 1),
                                  ("reduction", "mean"), ("n_draft_tokens", size.label_new_tokens)), "response-oracle")
    ecfg = EvalConfig(presses=tuple(PressSpec.parse(p) for p in presses) + (oracle,), budgets=size.budgets,
                      batch_size=4, timing_repeats=2, timing_batches=1)
    run_eval(model, tasks, ecfg, out / "eval", adapter=adapter)
    paths = write_report(out / "eval", reference="lookaheadkv")
    print((out / "eval" / "results.md").read_text())
    print(f"[demo] done in {time.perf_counter() - t0:.0f}s; plots: {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
