"""The training prompts of a real chat model's LookaheadKV adapter: three kinds in equal parts.

- retrieval: RULER's tasks on the training half of the essays (`ruler_chat.ruler_prompts`, split "train",
  haystacks starting at random words), ending with RULER's answer prefix as the evaluation prompts do;
- essay: open requests over training-half essay passages (`request_prompts`, kind "essay");
- code: questions about the Python standard library's own source (`request_prompts`, kind "code").

Every prompt is the model's chat template around one user turn, with the generation prompt, as token ids of
the model's tokenizer; the model's own greedy responses to them are the labels (`lkv make-labels`).
"""

from __future__ import annotations

import numpy as np

from lkv_jax.data import ruler
from lkv_jax.data.request_prompts import request_prompts
from lkv_jax.data.ruler_chat import ruler_prompts

KINDS = ("retrieval", "essay", "code")


def chat_ids(encoder, user: str) -> list[int]:
    """Token ids of one user turn under the encoder's chat template, with the generation prompt."""
    templated = encoder.chat_template is not None
    # a chat template writes BOS itself; without one the tokenizer's post-processor adds it
    return encoder.tokenizer.encode(encoder.render(user), add_special_tokens=not templated).ids


def training_prompts(encoder, n: int, *, lengths: tuple[int, ...] = (1024, 2048), seed: int = 0) -> list[dict]:
    """`n` prompts, a third of each kind, lengths spread over [min(lengths) / 2, max(lengths)] tokens.

    encoder: a `synthetic.HFPromptEncoder` (the model's tokenizer.json and chat template). Returns dicts
    {"prompt_ids": [int], "kind": str, "source": str}, shuffled by `seed` (deterministic)."""
    if n < len(KINDS):
        raise ValueError(f"need at least {len(KINDS)} prompts (one per kind), got {n}")
    per_kind = [n // 3 + (i < n % 3) for i in range(3)]
    out: list[dict] = []
    # retrieval: every RULER task at every length, as many rounds as it takes
    tasks = tuple(ruler.TASKS)
    n_per = -(-per_kind[0] // (len(tasks) * len(lengths)))
    for p in ruler_prompts(encoder, tasks=tasks, lengths=lengths, n_per_task=n_per, seed=seed)[: per_kind[0]]:
        out.append({"prompt_ids": p.prompt_ids.tolist(), "kind": "retrieval",
                    "source": f"ruler {p.sample.task} {p.sample.length}"})
    lo, hi = min(lengths) // 2, max(lengths)
    for kind, count in zip(("essay", "code"), per_kind[1:], strict=True):
        for r in request_prompts(kind, count, min_tokens=lo, max_tokens=hi - 32, count=encoder.count, seed=seed):
            out.append({"prompt_ids": chat_ids(encoder, r.user), "kind": kind, "source": r.source})
    order = np.random.default_rng(seed).permutation(len(out))
    return [out[i] for i in order]
