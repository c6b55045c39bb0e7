"""RULER samples as a chat model reads them: token ids of a context segment and a question segment.

RULER wraps the task template in the model's template and appends the answer prefix after it
(`scripts/data/prepare.py`: `model_template.format(task_template=...) + answer_prefix`; the chat templates of
`scripts/data/template.py` end with the assistant header), so the assistant turn starts with the answer
prefix. Here the model template is the tokenizer's own chat template (`HFPromptEncoder.render`, one user
turn with the generation prompt), rendered once around a marker:

    context  = chat head + sample.context                       -> context_ids   [Tc]
    question = sample.question + chat tail + answer prefix      -> question_ids  [Tq]

The query-aware prompt is context_ids + question_ids; question-agnostic evaluation compresses context_ids
alone. Without a chat template (RULER's `base`), head and tail are empty and the tokenizer's post-processor
adds its special tokens (BOS) to the context. The two segments are encoded separately, exactly as the model
reads them, and the length search counts that.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lkv_jax.data import ruler
from lkv_jax.data.ruler import RulerSample

_USER = "\u0000USER\u0000"  # stands for the user turn while the chat template is rendered


@dataclasses.dataclass(frozen=True)
class RulerPrompt:
    """A RulerSample encoded: context_ids int32 [Tc], question_ids int32 [Tq] and their texts; the token
    positions (into context_ids) of the evidence and distractor strings (`RulerSample.evidence`)."""

    sample: RulerSample
    context_text: str
    question_text: str
    context_ids: np.ndarray
    question_ids: np.ndarray
    evidence_positions: tuple[int, ...] = ()
    distractor_positions: tuple[int, ...] = ()

    @property
    def text(self) -> str:
        """The whole prompt text, ending with the answer prefix."""
        return self.context_text + self.question_text

    @property
    def prompt_ids(self) -> np.ndarray:
        """The query-aware prompt: int32 [Tc + Tq]."""
        return np.concatenate([self.context_ids, self.question_ids]).astype(np.int32)


def covered_tokens(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], n_chars: int) -> tuple[int, ...]:
    """Indices of the tokens (char offsets [start, end)) that overlap any char span [a, b)."""
    if not spans:
        return ()
    mask = np.zeros(n_chars + 1, np.int64)
    for a, b in spans:
        mask[a:b] = 1
    covered = np.concatenate([[0], np.cumsum(mask)])
    off = np.asarray(offsets, np.int64).reshape(-1, 2)
    hit = (off[:, 1] > off[:, 0]) & (covered[off[:, 1]] - covered[off[:, 0]] > 0)
    return tuple(int(i) for i in np.flatnonzero(hit))


class ChatPrompts:
    """RULER prompts under one tokenizer and chat template (`synthetic.HFPromptEncoder`)."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.templated = encoder.chat_template is not None
        self.head, self.tail = encoder.render(_USER).split(_USER) if self.templated else ("", "")

    def texts(self, sample: RulerSample) -> tuple[str, str]:
        """(context text, question text): chat head + context; question + chat tail + answer prefix."""
        return self.head + sample.context, sample.question + self.tail + sample.answer_prefix

    def _encode(self, sample: RulerSample):
        context, question = self.texts(sample)
        tok = self.encoder.tokenizer
        # a chat template writes BOS itself; without one the post-processor adds it
        return context, question, tok.encode(context, add_special_tokens=not self.templated), \
            tok.encode(question, add_special_tokens=False)

    def count(self, sample: RulerSample) -> int:
        """Prompt tokens of a sample as the model reads it (context + question segments): a `ruler.Counter`."""
        _, _, c, q = self._encode(sample)
        return len(c.ids) + len(q.ids)

    def encode(self, sample: RulerSample) -> RulerPrompt:
        """A sample's token ids, with the evidence and distractor token positions in the context."""
        context, question, c, q = self._encode(sample)

        def positions(strings: tuple[str, ...]) -> tuple[int, ...]:
            spans = []
            for s in strings:
                i = sample.context.find(s)
                if i >= 0:
                    spans.append((len(self.head) + i, len(self.head) + i + len(s)))
            return covered_tokens(c.offsets, spans, len(context))

        return RulerPrompt(sample, context, question, np.asarray(c.ids, np.int32), np.asarray(q.ids, np.int32),
                           positions(sample.evidence), positions(sample.distractors))

    def prompts(self, task: str, length: int, n: int, *, seed: int = 0, split: str = "eval",
                random_start: bool = False) -> list[RulerPrompt]:
        """n encoded samples of a RULER task, each sized so prompt + tokens_to_generate <= length tokens."""
        samples = ruler.generate_samples(task, length, n, count=self.count, seed=seed, split=split,
                                         random_start=random_start)
        return [self.encode(s) for s in samples]


def ruler_prompts(encoder, *, tasks: tuple[str, ...] = tuple(ruler.TASKS), lengths: tuple[int, ...] = ruler.LENGTHS,
                  n_per_task: int = 1, seed: int = 0, split: str = "train", random_start: bool = True
                  ) -> list[RulerPrompt]:
    """RULER-style retrieval training prompts from the training half of the essays.

    encoder: a `synthetic.HFPromptEncoder` (tokenizer.json + chat template). For each task x length,
    n_per_task prompts (ids `prompt.sample.task/length/index`), with the essay haystack starting at a random
    word (`random_start`) so prompts differ in text. Evaluation uses split="eval" and its own seed, so a
    training prompt shares no essay sentence and no needle draw with an evaluation prompt.
    Returns RulerPrompt: context_ids [Tc] + question_ids [Tq] is the prompt ending with the answer prefix;
    `prompt.sample.target` is an answer that scores 1, `prompt.sample.references` what the metric looks for.
    """
    chat = ChatPrompts(encoder)
    return [p for task in tasks for length in lengths
            for p in chat.prompts(task, length, n_per_task, seed=seed, split=split, random_start=random_start)]
