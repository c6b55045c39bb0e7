"""The on-disk label dataset: prompts, the model's greedy responses and their attention labels.

Layout (ArrayRecord, grain's random-access format, read through `grain.sources.ArrayRecordDataSource`):

    out_dir/meta.json                    settings, shapes, the prompts' sha256, shard_size; once every
                                         shard is written, each sample's prompt length (for bucketing)
    out_dir/shards/00003.array_record    samples [3 * shard_size, 4 * shard_size), one record each:
                                         msgpack of prompt_ids int32 [T], response_ids int32 [R] and
                                         labels [n_layers, N, T]

A shard is written under a temporary name and renamed once whole, so a killed `lkv make-labels` resumes
with the shards it has not finished; a shard that does not read back (checksums) is made again. meta.json
records a hash of the prompts, and a resume checks the prompts stored in the finished shards: a rerun
with another prompts file is refused instead of passing the old samples off as the new prompts' labels.
Labels are stored float32 by default; float16 halves the size (relative error ~1e-3, and masses below
~6e-8 flush to zero: fine for top-k, not for exact KL).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from flax import serialization

from lkv_jax.atomic_files import atomic_write, atomic_write_text
from lkv_jax.errors import DataError, InputError
from lkv_jax.output_dirs import claim_output_dir
from lkv_jax.padding import length_bucket

LABEL_DTYPES = ("float32", "float16")
SHARDS = "shards"
DEFAULT_SHARD_SIZE = 64
# one record per group: grain reads records at random
_WRITER_OPTIONS = "group_size:1"
# what a truncated, garbage or corrupted shard raises (riegeli checks every chunk's hash), or its records
_UNREADABLE = (RuntimeError, ValueError, KeyError, TypeError)
FIELDS = ("prompt_ids", "response_ids", "labels")


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
    settings = {k: v for k, v in old.items() if k not in ("prompts_sha256", "prompt_lengths")}
    if settings != {k: v for k, v in new.items() if k != "prompts_sha256"}:
        raise DataError(f"{out} holds a label dataset made with other settings ({settings}); use a new directory")


def shard_path(out_dir, shard: int) -> Path:
    return Path(out_dir) / SHARDS / f"{shard:05d}.array_record"


def shard_ranges(n_samples: int, shard_size: int) -> list[range]:
    """The sample indices of each shard."""
    return [range(s, min(s + shard_size, n_samples)) for s in range(0, n_samples, shard_size)]


def encode_sample(sample: dict, label_dtype: str = "float32") -> bytes:
    """One sample (a dict of `FIELDS`) as an ArrayRecord record: msgpack of its three arrays."""
    return serialization.msgpack_serialize({
        "prompt_ids": np.asarray(sample["prompt_ids"], np.int32),
        "response_ids": np.asarray(sample["response_ids"], np.int32),
        "labels": np.asarray(sample["labels"], np.float32).astype(label_dtype)})


def decode_sample(record: bytes) -> dict:
    """A record -> {prompt_ids int32 [T], response_ids int32 [R], labels float32 [n_layers, N, T]}."""
    sample = serialization.msgpack_restore(record)
    return {k: sample[k].astype(np.float32) if k == "labels" else sample[k] for k in FIELDS}


def write_shard(path, samples, label_dtype: str = "float32") -> None:
    """Write a shard's samples atomically: a kill leaves no file or a complete one."""
    from array_record.python.array_record_module import ArrayRecordWriter

    def write(tmp: Path) -> None:
        writer = ArrayRecordWriter(str(tmp), _WRITER_OPTIONS)
        try:
            for s in samples:
                writer.write(encode_sample(s, label_dtype))
        finally:
            writer.close()

    atomic_write(path, write)


def unreadable(path, error) -> DataError:
    return DataError(f"{path} is unreadable ({type(error).__name__}: {error}); rerun `lkv make-labels` with the "
                     "same arguments to make it again")


def open_shard(path, n_records: int):
    """An ArrayRecordReader of a shard (reads its footer only); DataError naming the file unless it opens
    and holds n_records records."""
    from array_record.python.array_record_module import ArrayRecordReader

    problem = None
    try:
        reader = ArrayRecordReader(str(path))
        if reader.ok() and reader.num_records() == n_records:
            return reader
        problem = ValueError(f"not an ArrayRecord file of {n_records} records")
        reader.close()  # (raises for a file that did not open)
    except _UNREADABLE as e:
        problem = problem or e
    raise unreadable(path, problem)


def read_shard(path, n_records: int) -> list[dict]:
    """Every sample of a shard, each chunk's hash checked; DataError naming the file if any fails."""
    reader = open_shard(path, n_records)
    try:
        return [decode_sample(r) for r in reader.read_all()]
    except _UNREADABLE as e:
        raise unreadable(path, e) from None
    finally:
        reader.close()


def refuse_npz_layout(directory: Path) -> None:
    """Labels written one .npz per sample (samples/, index.json) are not read: say how to make them anew."""
    if (directory / "samples").is_dir() or (directory / "index.json").is_file():
        raise DataError(f"{directory} holds labels in the one-.npz-per-sample layout of older lkv versions, which "
                        "this version does not read; make them again with `lkv make-labels` into a new directory")


class LabelDataset:
    """Random-access reader (a grain data source): `ds[i]` -> dict with prompt_ids int32 [T],
    response_ids int32 [R] and labels float32 [n_layers, N, T]. Opening it checks that every shard is
    there and opens (one line naming a damaged one, before any training step compiles)."""

    def __init__(self, directory):
        import grain

        self.dir = Path(directory)
        refuse_npz_layout(self.dir)
        if not (self.dir / "meta.json").is_file():
            raise FileNotFoundError(f"{self.dir} is not a label dataset (no meta.json); run `lkv make-labels`")
        self.meta = _read_json(self.dir / "meta.json")
        if "prompt_lengths" not in self.meta:
            raise FileNotFoundError(f"{self.dir} is incomplete; rerun `lkv make-labels` to finish it")
        self.shard_size = int(self.meta["shard_size"])
        shards = shard_ranges(len(self.meta["prompt_lengths"]), self.shard_size)
        for k, rows in enumerate(shards):
            if not shard_path(self.dir, k).is_file():
                raise FileNotFoundError(f"{self.dir} is incomplete (shard {shard_path(self.dir, k).name} is "
                                        "missing); rerun `lkv make-labels` to finish it")
            open_shard(shard_path(self.dir, k), len(rows)).close()
        self.source = grain.sources.ArrayRecordDataSource([str(shard_path(self.dir, k)) for k in range(len(shards))])

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        try:
            return decode_sample(self.source[i])
        except _UNREADABLE as e:
            raise unreadable(shard_path(self.dir, i // self.shard_size), e) from None

    @property
    def prompt_lengths(self) -> np.ndarray:
        return np.asarray(self.meta["prompt_lengths"], np.int64)


def _read_json(path: Path):
    """The JSON in `path`; DataError naming the file if it is not JSON."""
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); was the dataset directory damaged?") from None


def shards_to_make(out: Path, prompts, shard_size: int) -> list[int]:
    """Shards that must be (re)made: missing, or unreadable (reported in one line on stderr). Raises
    DataError if a finished shard holds other prompts than `prompts`."""
    todo, broken = [], []
    for k, rows in enumerate(shard_ranges(len(prompts), shard_size)):
        path = shard_path(out, k)
        try:
            samples = read_shard(path, len(rows)) if path.is_file() else None
        except DataError:
            samples = None
            broken.append(path.name)
        if samples is None:
            todo.append(k)
        for i, s in zip(rows, samples or (), strict=False):
            if s["prompt_ids"].tolist() != list(prompts[i]):
                raise DataError(f"{path} holds the labels of another prompt than prompt {i + 1}; use a new "
                                "directory for these prompts")
    if broken:
        print(f"lkv make-labels: {len(broken)} unreadable shard file(s) are made again: {', '.join(broken[:5])}"
              + (" ..." if len(broken) > 5 else ""), file=sys.stderr)
    return todo


def label_samples(model, prompts, *, max_new_tokens: int, batch_size: int, eos_token_id, chunk_size: int,
                  on_batch=lambda n: None) -> list[dict]:
    """Greedy responses and labels for `prompts`, in batches of similar length: one dict of `FIELDS` per prompt.

    Batches have static shapes (a full batch, bucketed lengths) so that few of them compile anew; filler
    rows repeat the last prompt and are dropped. `on_batch(n)` is called after each batch of n prompts."""
    from lkv_jax.lookahead.labels import compute_labels, generate_responses

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    samples: list[dict] = [{} for _ in prompts]
    for s in range(0, len(order), batch_size):
        batch = order[s: s + batch_size]
        ps = [prompts[i] for i in batch]
        filled = ps + [ps[-1]] * (batch_size - len(ps))
        T = length_bucket(max(len(p) for p in ps), chunk_size)
        responses = generate_responses(model, filled, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                       chunk_size=chunk_size, prompt_length=T)
        R = length_bucket(max(len(r) for r in responses), chunk_size)
        labels = compute_labels(model, filled, responses, chunk_size=chunk_size, prompt_length=T,
                                response_length=R)
        for i, p, r, lab in zip(batch, ps, responses, labels, strict=False):
            samples[i] = {"prompt_ids": p, "response_ids": r, "labels": lab}
        on_batch(len(batch))
    return samples


def make_label_dataset(model, prompts, out_dir, *, max_new_tokens: int = 512, batch_size: int = 8,
                       label_dtype: str = "float32", eos_token_id=None, chunk_size: int = 512,
                       shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True) -> Path:
    """Generate greedy responses and labels for `prompts` (token-id lists) into `out_dir`, `shard_size`
    samples per shard file.

    Resumable: finished shards are kept (an unreadable one is made again), the others are made. Refuses
    (OutputDirError) an out_dir that holds a model or another command's output, and (DataError) one made
    from other prompts or settings, or in the older one-.npz-per-sample layout. Batches group prompts of
    similar length within a shard (less padding). Returns the dataset directory.
    """
    from tqdm import tqdm

    if label_dtype not in LABEL_DTYPES:
        raise ValueError(f"label_dtype must be one of {LABEL_DTYPES}, got {label_dtype!r}")
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens), ("chunk_size", chunk_size),
                        ("shard_size", shard_size)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    cfg = model.config
    check_prompts(prompts, cfg.vocab_size)
    cfg.check_length(max(len(p) for p in prompts) + max_new_tokens)  # prompt + response positions
    out = claim_output_dir(out_dir, "make-labels", subdirs=(SHARDS,))  # (refuses a symlinked shards/)
    refuse_npz_layout(out)
    meta = {"n_samples": len(prompts), "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
            "n_kv_heads": cfg.num_key_value_heads, "hidden_size": cfg.hidden_size, "label_dtype": label_dtype,
            "max_new_tokens": max_new_tokens, "shard_size": shard_size, "prompts_sha256": prompts_hash(prompts)}
    meta_path = out / "meta.json"
    if meta_path.is_file():
        check_same_dataset(_read_json(meta_path), meta, out)
    todo = shards_to_make(out, prompts, shard_size)
    atomic_write_text(meta_path, json.dumps(meta, indent=1))  # incomplete (no prompt lengths) until the end
    shards = shard_ranges(len(prompts), shard_size)
    bar = tqdm(total=len(prompts), initial=len(prompts) - sum(len(shards[k]) for k in todo), desc="labels",
               unit="sample", disable=not progress)
    for k in todo:
        samples = label_samples(model, [prompts[i] for i in shards[k]], max_new_tokens=max_new_tokens,
                                batch_size=batch_size, eos_token_id=eos_token_id, chunk_size=chunk_size,
                                on_batch=bar.update)
        write_shard(shard_path(out, k), samples, label_dtype)
    bar.close()
    atomic_write_text(meta_path, json.dumps({**meta, "prompt_lengths": [len(p) for p in prompts]}, indent=1))
    return out
