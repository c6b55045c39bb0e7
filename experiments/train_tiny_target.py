"""Train the project's tiny target model on the synthetic tasks (from scratch or from given weights), ship it.

A small Llama-architecture model (default: hidden 128, 4 layers, 4 query / 2 KV heads, ~0.9M parameters)
learns associative recall from densely supervised sequences (`lkv_jax.data.training_stream`) through the
default curriculum (`lkv_jax.tiny_target.DEFAULT_CURRICULUM`): plain copies on a 16-word alphabet
(induction heads form there), then of the whole alphabet; then the task grammar through a length curriculum
256 -> 512 -> 1024, 1,024-token haystacks alternating with a short stage as the learning rate falls; then
key-value recall streams with one-word values that teach it to match a key among look-alike records, and
longer values and haystacks again. Checkpoints go to --workdir every --checkpoint-every steps; rerunning
the same command continues from the last one. At the end the script measures full-KV accuracy per task
with `lkv_jax.generate` and writes a Hugging Face directory (config.json, model.safetensors,
tokenizer.json, README.md model card, accuracy.json, provenance.json) to --out.

    python experiments/train_tiny_target.py --eval-samples 24 --out runs/tt --workdir runs/ttw   # 60 min on 2 cores
    python experiments/train_tiny_target.py --curriculum 128:50:3e-3:8 --out /tmp/tt --workdir /tmp/ttw  # smoke

The shipped model is the first command's output (its exact command is in its model card). `--init` starts
from an exported model's weights instead (a second phase; its card then lists both commands).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    from lkv_jax.tiny_target import ASSET_DIR, DEFAULT_CURRICULUM

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ASSET_DIR), help="HF directory to write (default: the package asset)")
    p.add_argument("--workdir", default="runs/tiny_target", help="checkpoints and metrics (resumable)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initialisation and the training data")
    p.add_argument("--curriculum", default=DEFAULT_CURRICULUM,
                   help="comma-separated length:steps:lr:batch[:symbols[:copy[:haystack[:distinct]]]][:name=value] "
                        "stages; symbols = alphabet size of the data (0: all), copy = fraction of pure copy sequences, "
                        "haystack = fraction of benchmark-shaped haystacks with the questions at the end, distinct = "
                        "fraction of those whose value words occur in one record each, recall = fraction of key-value "
                        "recall streams, recall_words = their longest value (words); the optional fields also as "
                        "name=value (default %(default)s)")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps at the start")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-lengths", default="512,1024", help="context lengths of the final accuracy check")
    p.add_argument("--eval-samples", type=int, default=32, help="held-out samples per task and length")
    p.add_argument("--init", default=None,
                   help="start from this HF directory's weights (a second phase on top of a trained model; the model "
                        "shape options are then ignored) instead of a fresh initialisation from --seed")
    p.add_argument("--skip-training", action="store_true", help="only evaluate and export the last checkpoint")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from flax import nnx

    from lkv_jax.data.training_stream import training_batch
    from lkv_jax.data.vocab import builtin_vocab
    from lkv_jax.pretraining import Trainer, parse_curriculum, run_curriculum, scaled_init, small_llama_config
    from lkv_jax.tiny_target import export, synthetic_accuracy, training_commands

    vocab = builtin_vocab()
    stages = parse_curriculum(args.curriculum)
    cfg = small_llama_config(len(vocab), hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                             num_kv_heads=args.kv_heads, max_position_embeddings=max(4096, 2 * stages[-1].length))
    from lkv_jax.models.transformer import Transformer

    if args.init:
        from lkv_jax.checkpoint.hf import load_hf

        start = load_hf(args.init, dtype="float32")
        if start.config.vocab_size != cfg.vocab_size:
            raise SystemExit(f"--init {args.init}: vocabulary {start.config.vocab_size} is not the built-in "
                             f"vocabulary's {cfg.vocab_size}")
        trainer = Trainer(start)
    else:
        trainer = Trainer(scaled_init(Transformer(cfg, rngs=nnx.Rngs(args.seed)), args.seed))
    workdir = Path(args.workdir)
    ckpt = workdir / "checkpoint"
    # a checkpoint only continues the run that wrote it (the first phase's would silently skip a second one)
    run = {"seed": args.seed, "curriculum": args.curriculum, "warmup": args.warmup,
           "init": str(Path(args.init).resolve()) if args.init else None,
           "shape": None if args.init else [args.hidden, args.layers, args.heads, args.kv_heads]}
    if (workdir / "run.json").exists():
        previous = json.loads((workdir / "run.json").read_text())
        if previous != run:
            raise SystemExit(f"{workdir} holds checkpoints of another run ({previous}); give another --workdir")
    elif ckpt.exists():
        raise SystemExit(f"{workdir} holds a checkpoint without run.json (an older run?); give another --workdir")
    command = "python experiments/train_tiny_target.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.skip_training and (workdir / "command.txt").exists():  # the card names the command that trained it
        command = (workdir / "command.txt").read_text().strip()
    note = trainer.restore(ckpt)
    print(f"{trainer.model.num_params()} parameters; "
          + (f"resumed at step {note['step']}" if note else f"starting from {args.init or 'scratch'}"), flush=True)

    def batches(step, stage):
        # the data of a step depends only on (seed, step): a resumed run sees what the first run would have
        return training_batch(np.random.default_rng([args.seed, step]), stage.batch, stage.length, vocab,
                              symbols=stage.symbols, p_copy=stage.copy, p_haystack=stage.haystack,
                              p_distinct=stage.distinct, p_recall=stage.recall, recall_words=stage.recall_words)

    def stage_end(stage, tr):
        # held-out stream at the stage's length with the full alphabet
        held_out = training_batch(np.random.default_rng([args.seed, 10**9, stage.length]), 16, stage.length, vocab)
        metrics = tr.evaluate(*held_out)
        print(json.dumps({"stage_end": stage.length, "symbols": stage.symbols, "step": tr.step, **metrics}),
              flush=True)
        with open(workdir / "stages.jsonl", "a") as f:
            f.write(json.dumps({"length": stage.length, "symbols": stage.symbols, "step": tr.step, **metrics}) + "\n")

    if not args.skip_training:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "run.json").write_text(json.dumps(run, indent=2) + "\n")
        (workdir / "command.txt").write_text(command + "\n")
        log = lambda s: print(s, flush=True)
        for _ in run_curriculum(trainer, stages, batches, warmup=args.warmup, log_every=args.log_every,
                                checkpoint=ckpt, checkpoint_every=args.checkpoint_every, log=log,
                                on_stage_end=stage_end):
            pass
    model = trainer.model
    results = {}
    for L in [int(x) for x in args.eval_lengths.split(",")]:
        results[L] = synthetic_accuracy(model, vocab, length=L, n=args.eval_samples)
        print(json.dumps({"eval_length": L, **results[L]}), flush=True)
    earlier = tuple(training_commands(args.init)) if args.init else ()
    if args.init and not earlier:
        earlier = (f"(weights from {args.init}; how they were made is not recorded there)",)
    out = export(model, vocab, args.out, command=command.strip(), results=results, n_samples=args.eval_samples,
                 earlier=earlier)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
