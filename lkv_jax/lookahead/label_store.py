"""The on-disk label dataset: prompts, the model's greedy responses and their attention labels.

Layout (random access, what grain's `MapDataset.source` needs):

    out_dir/meta.json               n_samples, n_layers, n_heads, label dtype, generation settings
    out_dir/samples/00000012.npz    prompt_ids int32 [T], response_ids int32 [R], labels [n_layers, N, T]
    out_dir/index.json              per sample: prompt and response lengths (written when complete)

One file per sample, written atomically (temporary name, then rename), so an interrupted run resumes
by skipping the samples whose file exists. Labels are stored float32 by default; float16 halves the
size (relative error ~1e-3, and masses below ~6e-8 flush to zero: fine for top-k, not for exact KL).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np

LABEL_DTYPES = ("float32", "float16")

# np.load parses each .npy header with ast.literal_eval, and CPython 3.11's AST construction is not
# thread-safe: grain's reader threads occasionally died with "SystemError: AST constructor recursion depth
# mismatch" (CPython gh-106905). Reads are small; one at a time costs little.
_READ_LOCK = threading.Lock()


def read_prompts(path, tokenizer_path=None) -> list[list[int]]:
    """Prompts from a JSONL file: one object per line, {"prompt_ids": [int, ...]} or {"prompt": text}.

    Text prompts need `tokenizer_path` (a Hugging Face tokenizer.json); they are encoded as given
    (apply the chat template before writing the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file at {path}")
    tok = None
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e})") from None
        if "prompt_ids" in obj:
            ids = obj["prompt_ids"]
            if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
                raise ValueError(f"{path}:{n}: prompt_ids must be a non-empty list of ints")
        elif "prompt" in obj:
            if tokenizer_path is None:
                raise ValueError(f"{path}:{n}: text prompts need a tokenizer (--tokenizer tokenizer.json)")
            if tok is None:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(str(tokenizer_path))
            ids = tok.encode(obj["prompt"]).ids
            if not ids:
                raise ValueError(f"{path}:{n}: the prompt encodes to no tokens")
        else:
            raise ValueError(f"{path}:{n}: each line needs 'prompt_ids' or 'prompt'")
        prompts.append([int(i) for i in ids])
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def sample_path(out_dir, index: int) -> Path:
    return Path(out_dir) / "samples" / f"{index:08d}.npz"


def write_sample(out_dir, index: int, prompt_ids, response_ids, labels, label_dtype: str = "float32") -> None:
    """Write one sample atomically (a crash leaves either no file or a complete one)."""
    path = sample_path(out_dir, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, prompt_ids=np.asarray(prompt_ids, np.int32), response_ids=np.asarray(response_ids, np.int32),
             labels=np.asarray(labels, np.float32).astype(label_dtype))
    os.replace(tmp, path)


def write_index(out_dir, n_samples: int) -> None:
    """Record every sample's lengths (used for length bucketing) once all samples exist."""
    rows = []
    for i in range(n_samples):
        with np.load(sample_path(out_dir, i)) as z:
            rows.append({"prompt_len": int(z["prompt_ids"].shape[0]), "response_len": int(z["response_ids"].shape[0])})
    tmp = Path(out_dir) / "index.json.tmp"
    tmp.write_text(json.dumps(rows))
    os.replace(tmp, Path(out_dir) / "index.json")


class LabelDataset:
    """Random-access reader (a grain data source): `ds[i]` -> dict with prompt_ids int32 [T],
    response_ids int32 [R] and labels float32 [n_layers, N, T]."""

    def __init__(self, directory):
        self.dir = Path(directory)
        meta = self.dir / "meta.json"
        index = self.dir / "index.json"
        if not meta.is_file():
            raise FileNotFoundError(f"{self.dir} is not a label dataset (no meta.json); run `lkv make-labels`")
        if not index.is_file():
            raise FileNotFoundError(f"{self.dir} is incomplete (no index.json); rerun `lkv make-labels` to finish it")
        self.meta = json.loads(meta.read_text())
        self.index = json.loads(index.read_text())

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        with _READ_LOCK, np.load(sample_path(self.dir, i)) as z:
            sample = {"prompt_ids": z["prompt_ids"], "response_ids": z["response_ids"], "labels": z["labels"]}
        sample["labels"] = sample["labels"].astype(np.float32)
        return sample

    @property
    def prompt_lengths(self) -> np.ndarray:
        return np.asarray([r["prompt_len"] for r in self.index], np.int64)


def length_bucket(n: int, chunk_size: int) -> int:
    """Padded length for n tokens: a power of two >= 16 up to chunk_size, then a multiple of chunk_size."""
    if n <= chunk_size:
        return min(max(16, 1 << (n - 1).bit_length()), -(-chunk_size // 8) * 8)
    return -(-n // chunk_size) * chunk_size


def make_label_dataset(model, prompts, out_dir, *, max_new_tokens: int = 512, batch_size: int = 8,
                       label_dtype: str = "float32", eos_token_id=None, chunk_size: int = 512,
                       progress: bool = True) -> Path:
    """Generate greedy responses and labels for `prompts` (token-id lists) into `out_dir`.

    Resumable: samples whose file exists are skipped. Batches group prompts of similar length (less
    padding). Returns the dataset directory.
    """
    from tqdm import tqdm

    from lkv_jax.lookahead.labels import compute_labels, generate_responses

    if label_dtype not in LABEL_DTYPES:
        raise ValueError(f"label_dtype must be one of {LABEL_DTYPES}, got {label_dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    meta = {"n_samples": len(prompts), "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
            "n_kv_heads": cfg.num_key_value_heads, "hidden_size": cfg.hidden_size, "label_dtype": label_dtype,
            "max_new_tokens": max_new_tokens}
    meta_path = out / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old != meta:
            raise ValueError(f"{out} holds a label dataset made with other settings ({old}); use a new directory")
    else:
        meta_path.write_text(json.dumps(meta, indent=1))
    todo = [i for i in range(len(prompts)) if not sample_path(out, i).is_file()]
    todo.sort(key=lambda i: len(prompts[i]))
    bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="labels", unit="sample",
               disable=not progress)
    for s in range(0, len(todo), batch_size):
        batch = todo[s: s + batch_size]
        ps = [prompts[i] for i in batch]
        # static shapes (a full batch, bucketed lengths) so that few batches compile anew; filler rows
        # repeat the last prompt and are dropped
        filled = ps + [ps[-1]] * (batch_size - len(ps))
        T = length_bucket(max(len(p) for p in ps), chunk_size)
        responses = generate_responses(model, filled, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                       chunk_size=chunk_size, prompt_length=T)
        R = length_bucket(max(len(r) for r in responses), chunk_size)
        labels = compute_labels(model, filled, responses, chunk_size=chunk_size, prompt_length=T,
                                response_length=R)
        for i, p, r, lab in zip(batch, ps, responses, labels, strict=False):
            write_sample(out, i, p, r, lab, label_dtype)
        bar.update(len(batch))
    bar.close()
    write_index(out, len(prompts))
    return out
