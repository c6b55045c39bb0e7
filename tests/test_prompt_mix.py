"""The real model's training prompt set: a third of each kind, chat-templated, in the length range, seeded."""

from __future__ import annotations

from collections import Counter

import pytest

from lkv_jax.data.prompt_mix import training_prompts
from lkv_jax.data.synthetic import HFPromptEncoder


def test_training_prompts_mix_three_kinds_in_the_chat_template(bpe_tokenizer_dir):
    enc = HFPromptEncoder(bpe_tokenizer_dir)
    prompts = training_prompts(enc, 10, lengths=(1024,), seed=3)
    assert Counter(p["kind"] for p in prompts) == {"retrieval": 4, "essay": 3, "code": 3}
    for p in prompts:
        text = enc.tokenizer.decode(p["prompt_ids"], skip_special_tokens=False)
        assert text.startswith("<|im_start|>user\n")
        assert 512 <= len(p["prompt_ids"]) <= 1024
        if p["kind"] == "retrieval":  # RULER's answer prefix opens the assistant turn
            assert "<|im_end|>\n<|im_start|>assistant\n" in text and not text.endswith("assistant\n")
        else:
            assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    again = training_prompts(enc, 10, lengths=(1024,), seed=3)
    assert [p["prompt_ids"] for p in again] == [p["prompt_ids"] for p in prompts]
    with pytest.raises(ValueError, match="at least 3 prompts"):
        training_prompts(enc, 2)
