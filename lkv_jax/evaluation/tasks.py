"""What the evaluation runner evaluates: tokenised samples with their scoring rule.

The runner is tokeniser-agnostic: a task carries token ids (a context segment and a question segment),
a `decode` back to text and a `score(prediction, sample) -> [0, 1]`. Query-aware evaluation prefills
and compresses context + question; question-agnostic evaluation compresses the context alone and
appends the question on the compressed cache. Builders here turn LongBench records (any Hugging Face
tokenizer), the synthetic RULER-style tasks (built-in vocabulary) and RULER's own tasks (the essays, a
model's tokenizer and chat template) into tasks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class EvalSample:
    """One prompt: context_ids int [Tc], question_ids int [Tq] (may be empty), reference answers, and
    anything the metric needs (`extra`, e.g. LongBench's all_classes)."""

    id: str
    context_ids: np.ndarray
    question_ids: np.ndarray
    answers: tuple[str, ...]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def prompt_ids(self) -> np.ndarray:
        """The query-aware prompt: int [Tc + Tq]."""
        return np.concatenate([self.context_ids, self.question_ids]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """A named list of samples, how many tokens to generate, how to read and score the output.

    score(prediction_text, sample) -> float in [0, 1]; decode(token ids) -> text (special tokens
    dropped); eos_token_ids None means the model config's EOS ids. answers_from_fullkv: the samples carry
    no answers; each sample's answer is the model's own FullKV prediction (the runner fills it in), so
    `score` measures how much of the full cache's answer an eviction keeps (open-ended long answers).
    """

    name: str
    samples: tuple[EvalSample, ...]
    max_new_tokens: int
    score: Callable[[str, EvalSample], float]
    decode: Callable[[Sequence[int]], str]
    eos_token_ids: tuple[int, ...] | None = None
    answers_from_fullkv: bool = False

    def __post_init__(self):
        if not self.samples:
            raise ValueError(f"task {self.name!r} has no samples")
        if self.max_new_tokens < 1:
            raise ValueError(f"task {self.name!r}: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        ids = [s.id for s in self.samples]
        if len(set(ids)) != len(ids):
            raise ValueError(f"task {self.name!r}: sample ids must be unique")
        for s in self.samples:
            if len(s.context_ids) == 0:
                raise ValueError(f"task {self.name!r}, sample {s.id}: empty context")


def longbench_task(task: str, tokenizer, *, data_dir=None, from_hub: bool = False, max_length: int = 31500,
                   chat_template: bool = False, limit: int | None = None,
                   max_new_tokens: int | None = None) -> EvalTask:
    """A LongBench task with a Hugging Face tokenizer: official template, middle truncation to
    max_length prompt tokens (31500 is the official setting for 32K models), official metric and
    generation length (or `max_new_tokens`). samsum also stops at a newline, as the official code."""
    from lkv_jax.data.longbench import DATASET2MAXLEN, build_prompt, load_longbench
    from lkv_jax.data.longbench_metrics import score_sample

    records = load_longbench(task, data_dir, limit=limit, from_hub=from_hub)
    samples = []
    for i, r in enumerate(records):
        p = build_prompt(tokenizer, task, r, max_length, chat_template=chat_template)
        samples.append(EvalSample(id=str(r.get("_id", i)), context_ids=p.context_ids, question_ids=p.question_ids,
                                  answers=tuple(r["answers"]), extra={"all_classes": r.get("all_classes")}))

    def score(prediction: str, sample: EvalSample) -> float:
        return score_sample(task, prediction, sample.answers, sample.extra.get("all_classes"))

    eos = None
    if task == "samsum":
        ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
        eos_id = getattr(tokenizer, "eos_token_id", None)
        eos = tuple(int(e) for e in ([eos_id] if eos_id is not None else []) + ids[-1:])
    return EvalTask(name=f"longbench/{task}", samples=tuple(samples),
                    max_new_tokens=int(max_new_tokens or DATASET2MAXLEN[task]), score=score,
                    decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True), eos_token_ids=eos)


def synthetic_task(task: str, *, n_samples: int, length: int, seed: int = 0, vocab=None, encoder=None,
                   params: dict | None = None) -> EvalTask:
    """A synthetic task (`lkv_jax.data.synthetic`), tokenised with the built-in vocabulary (default, or
    `vocab`) or with a Hugging Face tokenizer (`encoder`: a `synthetic.HFPromptEncoder`, lengths then
    count its tokens). The question is its own segment, so the same samples serve both query-aware and
    question-agnostic runs. `params`: the task function's keywords (e.g. tag_list's n_items), named in
    the task name (`tag_list.n_items=12-1024`) so that other settings never share a name."""
    params = dict(params or {})
    name = task + "".join(f".{k}={v}" for k, v in sorted(params.items()))
    from lkv_jax.data import synthetic
    from lkv_jax.data.vocab import builtin_vocab

    if encoder is None:
        vocab = builtin_vocab() if vocab is None else vocab
        raw = synthetic.generate_samples(task, n_samples, length, seed=seed, **params)
        encode = lambda s: synthetic.encode_builtin(s, vocab, query_aware=False)  # noqa: E731
        # a model's embedding table may be padded past the vocabulary: such ids are no words, drop them
        decode = lambda ids: vocab.decode([i for i in ids if 0 <= int(i) < len(vocab)])  # noqa: E731
        eos = (vocab.eos_id,)
    else:
        raw = synthetic.generate_samples(task, n_samples, length, seed=seed, count=encoder.count, **params)
        encode = lambda s: encoder.encode(s, query_aware=False)  # noqa: E731
        decode = lambda ids: encoder.tokenizer.decode(list(ids), skip_special_tokens=True)  # noqa: E731
        eos = None if encoder.eos_id is None else (int(encoder.eos_id),)
    samples, budget = [], 1
    for i, s in enumerate(raw):
        enc = encode(s)
        extra = {"metric": s.metric, "target": s.target}
        if encoder is None:  # one token per word after BOS: record word offsets are token positions - 1
            extra["evidence_positions"] = evidence_positions(s)
            extra["distractor_positions"] = evidence_positions(s, answer_bearing=False)
        samples.append(EvalSample(id=f"{name}-{length}-{seed}-{i}", context_ids=enc.prompt, question_ids=enc.question,
                                  answers=tuple(s.references), extra=extra))
        # the target's own length plus room for EOS and a little slack
        budget = max(budget, len(enc.target) + 4)
    return EvalTask(name=f"{name}-{length}", samples=tuple(samples), max_new_tokens=budget,
                    score=_string_match_scorer(), decode=decode, eos_token_ids=eos)


def evidence_positions(sample, answer_bearing: bool = True) -> list[int]:
    """Token positions (built-in vocabulary, BOS at 0) of the records the answer is copied from: the
    needles whose text holds one of the references (a variable chain's records hold its names). With
    answer_bearing=False, those of the other records instead: the distractors (other keys, other tags)."""
    out = []
    for offset, text in sample.needles:
        if answer_bearing == any(f" {ref} " in f" {text} " for ref in sample.references):  # whole words only
            out.extend(range(1 + offset, 1 + offset + len(text.split())))
    return out


def _string_match_scorer(postprocess: Callable[[str], str] = str) -> Callable[[str, EvalSample], float]:
    """RULER's scoring of one prediction: `postprocess`, then the sample's metric (`lkv_jax.data.metrics`:
    string_match_all unless the sample names another) against its answers."""
    from lkv_jax.data.metrics import METRICS

    def score(prediction: str, sample: EvalSample) -> float:
        metric = METRICS[sample.extra.get("metric", "string_match_all")]
        return float(metric(postprocess(prediction), list(sample.answers)))

    return score


def ruler_task(name: str, encoder, *, length: int, n_samples: int, seed: int = 0, split: str = "eval") -> EvalTask:
    """A RULER task (`lkv_jax.data.ruler`; name with or without "ruler/") at one length, under `encoder` (a
    `synthetic.HFPromptEncoder`): each prompt + RULER's tokens_to_generate fits in `length` tokens, the
    question segment ends with the chat template's generation prompt and RULER's answer prefix. Scored as
    RULER: its metric (string_match_all) on the post-processed prediction. Task name `ruler/<task>-<length>`."""
    from lkv_jax.data import ruler
    from lkv_jax.data.ruler_chat import ChatPrompts

    task = name.removeprefix("ruler/")
    prompts = ChatPrompts(encoder).prompts(task, length, n_samples, seed=seed, split=split)
    samples = tuple(
        EvalSample(id=f"{task}-{length}-{seed}-{split}-{p.sample.index}", context_ids=p.context_ids,
                   question_ids=p.question_ids, answers=p.sample.references,
                   extra={"metric": p.sample.metric, "target": p.sample.target,
                          "answer_prefix": p.sample.answer_prefix,
                          "evidence_positions": list(p.evidence_positions),
                          "distractor_positions": list(p.distractor_positions)})
        for p in prompts)
    family = ruler.TASKS[task][0]
    eos = None if encoder.eos_id is None else (int(encoder.eos_id),)
    return EvalTask(name=f"ruler/{task}-{length}", samples=samples,
                    max_new_tokens=ruler.FAMILIES[family].tokens_to_generate,
                    score=_string_match_scorer(ruler.postprocess),
                    decode=lambda ids: encoder.tokenizer.decode(list(ids), skip_special_tokens=True),
                    eos_token_ids=eos)


def summary_task(encoder, *, length: int, n_samples: int, seed: int = 0, split: str = "eval",
                 max_new_tokens: int = 128) -> EvalTask:
    """Summarise an essay passage of the evaluation half: a long, open answer. The prompt (chat template
    included) plus `max_new_tokens` fits in `length` tokens of `encoder` (a `synthetic.HFPromptEncoder`);
    the request after the passage is the question segment. Scored by ROUGE-L F (LongBench's, as pltrdy/rouge)
    against the model's own FullKV summary (`answers_from_fullkv`). Task name `summary-<length>`."""
    from lkv_jax.data.longbench_metrics import rouge_l_f
    from lkv_jax.data.request_prompts import summary_requests
    from lkv_jax.data.ruler_chat import ChatPrompts

    chat = ChatPrompts(encoder)  # the chat template's text before and after the user turn
    templated, head, tail = chat.templated, chat.head, chat.tail
    overhead = encoder.count(head + tail) + 8
    reqs = summary_requests(n_samples, min_tokens=(length - max_new_tokens - overhead) * 3 // 4,
                            max_tokens=length - max_new_tokens - overhead, count=encoder.count, seed=seed,
                            split=split)
    tok = encoder.tokenizer
    samples = []
    for i, r in enumerate(reqs):
        passage = r.user[: -len(r.question)]
        context = tok.encode(head + passage, add_special_tokens=not templated).ids
        question = tok.encode(r.question + tail, add_special_tokens=False).ids
        samples.append(EvalSample(id=f"summary-{length}-{seed}-{split}-{i}", context_ids=np.asarray(context, np.int32),
                                  question_ids=np.asarray(question, np.int32), answers=(), extra={"source": r.source}))

    def score(prediction: str, sample: EvalSample) -> float:
        return float(rouge_l_f(prediction, sample.answers[0])) if sample.answers[0].strip() else 0.0

    eos = None if encoder.eos_id is None else (int(encoder.eos_id),)
    return EvalTask(name=f"summary-{length}", samples=tuple(samples), max_new_tokens=max_new_tokens, score=score,
                    decode=lambda ids: tok.decode(list(ids), skip_special_tokens=True), eos_token_ids=eos,
                    answers_from_fullkv=True)
