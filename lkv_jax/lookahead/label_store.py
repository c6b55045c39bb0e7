"""The on-disk label dataset: prompts, the model's greedy responses and their attention labels.

Layout (random access, what grain's `MapDataset.source` needs):

    out_dir/meta.json               n_samples, n_layers, n_heads, label dtype, generation settings
    out_dir/samples/00000012.npz    prompt_ids int32 [T], response_ids int32 [R], labels [n_layers, N, T]
    out_dir/index.json              per sample: prompt and response lengths (written when complete)

One file per sample, written atomically (temporary name, then rename), so an interrupted run resumes
by skipping the samples whose file exists and reads (an unreadable one is made again). meta.json records
a hash of the prompts: a rerun with another prompts file is refused instead of passing the old samples
off as the new prompts' labels. Labels are stored float32 by default; float16 halves the
size (relative error ~1e-3, and masses below ~6e-8 flush to zero: fine for top-k, not for exact KL).
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np

from lkv_jax.atomic_files import atomic_write, atomic_write_text
from lkv_jax.errors import DataError, InputError
from lkv_jax.output_dirs import claim_output_dir

LABEL_DTYPES = ("float32", "float16")
# what reading a truncated, garbage or half-overwritten .npz raises
_UNREADABLE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)

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
            raise DataError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object like {{\"prompt_ids\": [...]}}, "
                            f"got {type(obj).__name__}")
        if "prompt_ids" in obj:
            ids = obj["prompt_ids"]
            if not isinstance(ids, list) or not ids or not all(_is_int(i) for i in ids):
                raise DataError(f"{path}:{n}: prompt_ids must be a non-empty list of ints")
        elif "prompt" in obj:
            if not isinstance(obj["prompt"], str):
                raise DataError(f"{path}:{n}: prompt must be a string, got {type(obj['prompt']).__name__}")
            if tokenizer_path is None:
                raise DataError(f"{path}:{n}: text prompts need a tokenizer (--tokenizer tokenizer.json)")
            if tok is None:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(str(tokenizer_path))
            ids = tok.encode(obj["prompt"]).ids
            if not ids:
                raise DataError(f"{path}:{n}: the prompt encodes to no tokens")
        else:
            raise DataError(f"{path}:{n}: each line needs 'prompt_ids' or 'prompt'")
        prompts.append([int(i) for i in ids])
    if not prompts:
        raise DataError(f"{path} holds no prompts")
    return prompts


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def prompts_hash(prompts) -> str:
    """sha256 of the prompts' token ids (what a label dataset was made from)."""
    return hashlib.sha256(json.dumps([[int(i) for i in p] for p in prompts]).encode()).hexdigest()


def sample_path(out_dir, index: int) -> Path:
    return Path(out_dir) / "samples" / f"{index:08d}.npz"


def write_sample(out_dir, index: int, prompt_ids, response_ids, labels, label_dtype: str = "float32") -> None:
    """Write one sample atomically (a crash leaves either no file or a complete one)."""
    path = sample_path(out_dir, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"prompt_ids": np.asarray(prompt_ids, np.int32), "response_ids": np.asarray(response_ids, np.int32),
              "labels": np.asarray(labels, np.float32).astype(label_dtype)}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    atomic_write(path, write)


def read_sample(path, fields=("prompt_ids", "response_ids", "labels")) -> dict:
    """The arrays `fields` of one sample file; DataError naming the file if it is missing or unreadable."""
    try:
        with _READ_LOCK, np.load(path) as z:
            return {k: z[k] for k in fields}
    except _UNREADABLE as e:
        raise DataError(f"{path} is unreadable ({type(e).__name__}: {e}); rerun `lkv make-labels` with the same "
                        "arguments to make it again") from None


def sample_is_intact(path) -> bool:
    """Whether a sample file opens and every member passes its CRC check (reads the whole file)."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None and {"prompt_ids.npy", "response_ids.npy", "labels.npy"} <= set(z.namelist())
    except _UNREADABLE:
        return False


def write_index(out_dir, n_samples: int) -> None:
    """Record every sample's lengths (used for length bucketing) once all samples exist."""
    rows = []
    for i in range(n_samples):
        z = read_sample(sample_path(out_dir, i), ("prompt_ids", "response_ids"))
        rows.append({"prompt_len": int(z["prompt_ids"].shape[0]), "response_len": int(z["response_ids"].shape[0])})
    atomic_write_text(Path(out_dir) / "index.json", json.dumps(rows))


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
        self.meta = _read_json(meta)
        self.index = _read_json(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        sample = read_sample(sample_path(self.dir, i))
        sample["labels"] = sample["labels"].astype(np.float32)
        return sample

    def check_files(self) -> None:
        """Raise DataError naming the first sample file that is missing or does not open (cheap: reads the
        zip directories and the prompt ids only; a damaged member surfaces when the sample is read)."""
        for i in range(len(self)):
            read_sample(sample_path(self.dir, i), ("prompt_ids",))

    @property
    def prompt_lengths(self) -> np.ndarray:
        return np.asarray([r["prompt_len"] for r in self.index], np.int64)


def length_bucket(n: int, chunk_size: int) -> int:
    """Padded length for n tokens: a power of two >= 16 up to chunk_size, then a multiple of chunk_size."""
    if n <= chunk_size:
        return min(max(16, 1 << (n - 1).bit_length()), -(-chunk_size // 8) * 8)
    return -(-n // chunk_size) * chunk_size


def check_prompts(prompts, vocab_size: int) -> None:
    """Raise InputError unless there are prompts and every token id lies in [0, vocab_size)."""
    if not prompts:
        raise InputError("no prompts")
    for n, p in enumerate(prompts):
        bad = [i for i in p if not 0 <= int(i) < vocab_size]
        if bad:
            raise InputError(f"prompt {n + 1}: token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})")


def check_same_dataset(old: dict, new: dict, out: Path) -> None:
    """Raise DataError if the dataset in `out` (meta `old`) was made from other prompts or settings."""
    if not isinstance(old, dict):
        raise DataError(f"{out / 'meta.json'} is not a label dataset's meta.json (not a JSON object)")
    if "prompts_sha256" in old and old["prompts_sha256"] != new["prompts_sha256"]:
        raise DataError(f"{out} holds labels made from other prompts (the prompts' hash differs); use a new "
                        "directory for these prompts")
    settings = {k: v for k, v in old.items() if k != "prompts_sha256"}
    if settings != {k: v for k, v in new.items() if k != "prompts_sha256"}:
        raise DataError(f"{out} holds a label dataset made with other settings ({settings}); use a new directory")


def samples_to_make(out: Path, prompts) -> list[int]:
    """Indices whose sample must be (re)made: missing, or unreadable (reported in one line on stderr).
    Raises DataError if an existing sample holds another prompt (a dataset from before the prompts' hash)."""
    todo, broken = [], []
    for i, prompt in enumerate(prompts):
        path = sample_path(out, i)
        if not path.is_file():
            todo.append(i)
        elif not sample_is_intact(path):
            todo.append(i)
            broken.append(path.name)
        elif read_sample(path, ("prompt_ids",))["prompt_ids"].tolist() != list(prompt):
            raise DataError(f"{path} holds the labels of another prompt than prompt {i + 1}; use a new directory "
                            "for these prompts")
    if broken:
        print(f"lkv make-labels: {len(broken)} unreadable sample file(s) are made again: {', '.join(broken[:5])}"
              + (" ..." if len(broken) > 5 else ""), file=sys.stderr)
    return todo


def _read_json(path: Path):
    """The JSON in `path`; DataError naming the file if it is not JSON."""
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); was the dataset directory damaged?") from None


def make_label_dataset(model, prompts, out_dir, *, max_new_tokens: int = 512, batch_size: int = 8,
                       label_dtype: str = "float32", eos_token_id=None, chunk_size: int = 512,
                       progress: bool = True) -> Path:
    """Generate greedy responses and labels for `prompts` (token-id lists) into `out_dir`.

    Resumable: samples whose file exists and reads are skipped (an unreadable one is made again). Refuses
    (OutputDirError) an out_dir that holds a model or another command's output, and (DataError) one made
    from other prompts or settings. Batches group prompts of similar length (less padding). Returns the
    dataset directory.
    """
    from tqdm import tqdm

    from lkv_jax.lookahead.labels import compute_labels, generate_responses

    if label_dtype not in LABEL_DTYPES:
        raise ValueError(f"label_dtype must be one of {LABEL_DTYPES}, got {label_dtype!r}")
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens), ("chunk_size", chunk_size)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    cfg = model.config
    check_prompts(prompts, cfg.vocab_size)
    cfg.check_length(max(len(p) for p in prompts) + max_new_tokens)  # prompt + response positions
    out = claim_output_dir(out_dir, "make-labels", subdirs=("samples",))  # (refuses a symlinked samples/)
    meta = {"n_samples": len(prompts), "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
            "n_kv_heads": cfg.num_key_value_heads, "hidden_size": cfg.hidden_size, "label_dtype": label_dtype,
            "max_new_tokens": max_new_tokens, "prompts_sha256": prompts_hash(prompts)}
    meta_path = out / "meta.json"
    if meta_path.is_file():
        check_same_dataset(_read_json(meta_path), meta, out)
    todo = samples_to_make(out, prompts)
    atomic_write_text(meta_path, json.dumps(meta, indent=1))  # (a dataset from before the hash gets it)
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
