"""The project's tiny target model: its default shape and curriculum, the full-KV accuracy check on the
synthetic tasks, and export as a Hugging Face directory (what `lkv_jax/assets/tiny_target/` holds).

    model = lkv_jax.load_hf(lkv_jax.tiny_target.ASSET_DIR)
    vocab = lkv_jax.data.vocab.load_vocab(lkv_jax.tiny_target.ASSET_DIR)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lkv_jax.checkpoint.hf import save_hf
from lkv_jax.data.metrics import METRICS
from lkv_jax.data.synthetic import TASKS, encode_builtin, generate_samples
from lkv_jax.data.vocab import BUILTIN_DIR
from lkv_jax.models.transformer import Transformer
from lkv_jax.padding import pad_left, trim_at_eos

ASSET_DIR = BUILTIN_DIR  # the shipped model; its tokenizer.json is the built-in vocabulary
# the shipped model's curriculum, length:steps:lr:batch[:symbols[:copy[:haystack[:distinct]]]][:name=value]
# (lkv_jax.pretraining), one command, 60 min on 2 CPU cores (model card). Three parts:
# - copying: pure copies on a 16-word alphabet only until induction heads form (on the whole alphabet they
#   do not form in 1,000 steps), then at once pure copies of the whole alphabet (a warm-up kept on few words
#   leaves those words copied better than the rest for thousands of steps);
# - finding records: 256/512-token copies and benchmark-shaped haystacks, then 1,024-token haystacks
#   alternating with a 256-token stage as the learning rate falls;
# - matching keys: key-value recall streams with one-word values (every supervised word is then a key match:
#   without them the model copied whatever follows a `:`, picking a random record among look-alike ones,
#   niah_multikey at chance), then longer values, haystacks and copies mixed back in.
DEFAULT_CURRICULUM = (
    "128:300:3e-3:16:16:0.8,128:400:3e-3:16:0:0.8,256:500:2e-3:16:0:0.6:0.3,512:500:1.5e-3:8:0:0.3:0.6,"
    "1024:600:8e-4:4:0:0.1:0.9,256:400:6e-4:16:0:0.6:0.5,1024:600:4e-4:4:0:0.1:0.9,"
    "64:2000:1e-3:32:recall=1:recall_words=1,256:600:6e-4:16:copy=0.2:haystack=0.5:recall=0.5,"
    "1024:600:3e-4:4:copy=0.1:haystack=0.9:recall=0.2"
)
EVAL_TASKS = tuple(TASKS)


def predict(model: Transformer, vocab, samples, *, press=None, batch_size: int = 8) -> list[str]:
    """Greedy answers (text, up to EOS) to query-aware built-in-vocab prompts, with a full cache
    (press=None) or a compressed one."""
    from lkv_jax.generation import generate

    out = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        ids, mask = pad_left([encode_builtin(s, vocab).prompt for s in chunk], pad=vocab.pad_id)
        n_new = max(s.max_new_tokens for s in chunk)
        tokens = generate(model, ids, n_new, press, attention_mask=mask, eos_token_id=vocab.eos_id,
                          pad_token_id=vocab.pad_id)
        for row in tokens:
            row = trim_at_eos(row, (vocab.eos_id,), keep_eos=False)
            # ids past the vocabulary (the embedding table is padded) are no words: dropped, as the evaluator does
            out.append(vocab.decode([i for i in row if i < len(vocab)]))
    return out


def synthetic_accuracy(model: Transformer, vocab, *, tasks=EVAL_TASKS, length: int = 1024, n: int = 16,
                       seed: int = 1234, press=None, batch_size: int = 8) -> dict:
    """Per task: RULER score (0-100, the task's metric) and exact-match rate of greedy answers on n samples
    at one context length. Seed 1234 is kept away from training, which draws its own stream."""
    result = {}
    for task in tasks:
        samples = generate_samples(task, n, length, seed=seed)
        preds = predict(model, vocab, samples, press=press, batch_size=batch_size)
        fn = METRICS[samples[0].metric]
        pairs = list(zip(preds, samples, strict=True))
        result[task] = {"score": round(100.0 * float(np.mean([fn(p, s.references) for p, s in pairs])), 2),
                        "exact": round(100.0 * float(np.mean([p == s.target for p, s in pairs])), 2)}
    result["average"] = {k: round(float(np.mean([result[t][k] for t in tasks])), 2) for k in ("score", "exact")}
    return result


def accuracy_table(results: dict[int, dict]) -> str:
    """Markdown table: one row per task, score / exact per context length."""
    lengths = sorted(results)
    tasks = [t for t in next(iter(results.values())) if t != "average"] + ["average"]
    head = "| task | " + " | ".join(f"{L} tokens: score / exact" for L in lengths) + " |"
    rows = [head, "|" + " --- |" * (len(lengths) + 1)]
    for t in tasks:
        rows.append(f"| {t} | " + " | ".join(f"{results[L][t]['score']:.1f} / {results[L][t]['exact']:.1f}"
                                            for L in lengths) + " |")
    return "\n".join(rows)


def training_commands(directory: str | Path) -> list[str]:
    """The commands that made an exported model, in order (`provenance.json`; for a directory exported before
    that file existed, the indented command under "Made with:" in its model card). Empty if unknown."""
    directory = Path(directory)
    if (directory / "provenance.json").exists():
        return list(json.loads((directory / "provenance.json").read_text())["commands"])
    card = (directory / "README.md").read_text().splitlines() if (directory / "README.md").exists() else []
    for i, line in enumerate(card):
        if line.startswith("Made with") and i + 2 < len(card) and card[i + 2].startswith("    python "):
            return [card[i + 2].strip()]
    return []


def export(model: Transformer, vocab, directory: str | Path, *, command: str, results: dict[int, dict],
           n_samples: int, notes: str = "", earlier: tuple[str, ...] = ()) -> Path:
    """Write the HF directory: config.json, model.safetensors, tokenizer.json (+ config), accuracy.json,
    provenance.json and a README.md model card with the commands that made the model (`earlier` ones first:
    the phases whose output this one started from) and its full-KV accuracies."""
    directory = Path(directory)
    save_hf(model, directory)
    vocab.save(directory)
    (directory / "accuracy.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2) + "\n")
    commands = [*earlier, command]
    (directory / "provenance.json").write_text(json.dumps({"commands": commands}, indent=2) + "\n")
    made_with = ("Made with:" if len(commands) == 1 else
                 f"Made in {len(commands)} phases, each starting from the weights the previous one wrote:")
    cfg = model.config
    card = f"""# lkv_jax tiny target model

A {model.num_params() / 1e6:.2f}M-parameter Llama-architecture model (hidden {cfg.hidden_size},
{cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query / {cfg.num_key_value_heads} KV heads,
head dim {cfg.head_dim}, vocabulary {cfg.vocab_size} with {len(vocab)} words in use), trained from scratch
by lkv_jax on the RULER-style synthetic tasks of `lkv_jax.data.synthetic` (built-in word-level vocabulary,
`tokenizer.json` here). It exists to make KV-cache eviction measurable on a laptop CPU: its answers must be
copied from records hidden in the middle of the prompt, several tokens each.

{made_with}

{chr(10).join('    ' + c for c in commands)}

Full-KV accuracy (greedy `lkv_jax.generate`, query-aware prompts, {n_samples} held-out samples per task,
seed 1234; score = RULER string_match_all x 100, exact = whole answer right):

{accuracy_table(results)}

Load it with `lkv_jax.load_hf(path)` and `lkv_jax.data.vocab.load_vocab(path)`, `path` being this directory
(`lkv_jax.tiny_target.ASSET_DIR` for the copy shipped in the package).
{notes}"""
    (directory / "README.md").write_text(card)
    return directory
