"""LongBench (Bai et al., 2023): the official jsonl records, prompt templates, generation lengths and
middle truncation, for the 16 English tasks.

Records follow the official schema {"input", "context", "answers", "length", "dataset", "language",
"all_classes", "_id"}, read with `datasets` from `<dir>/<task>.jsonl` (the layout of the official
data.zip), or from that zip on the Hugging Face hub when asked (never in tests). Prompts are built as
the official `pred.py` builds them: `DATASET2PROMPT[task].format(**record)`, truncated in the middle to
`max_length` tokens (first half + last half: both ends hold instructions), a chat template only for the
tasks where the official code applies one.

For question-agnostic evaluation (compress the context before the question is known) a prompt is
split into a context part (template prefix + context) and a question part (the rest of the template
with the question), tokenised separately; the query-aware prompt is their concatenation.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

LONGBENCH_TASKS = (
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique",
    "gov_report", "qmsum", "multi_news", "trec", "triviaqa", "samsum",
    "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
)

# official config/dataset2prompt.json (English tasks; hotpotqa, 2wikimqa and musique share one prompt)
_PASSAGES_QA = "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"  # noqa: E501
DATASET2PROMPT = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the question as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
    "qasper": "You are given a scientific article and a question. Answer the question as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on the above article as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered based on the information in the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",  # noqa: E501
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",  # noqa: E501
    "hotpotqa": _PASSAGES_QA,
    "2wikimqa": _PASSAGES_QA,
    "musique": _PASSAGES_QA,
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",  # noqa: E501
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",  # noqa: E501
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\nNow, write a one-page summary of all the news.\n\nSummary:",  # noqa: E501
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",  # noqa: E501
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other words. The following are some examples.\n\n{context}\n\n{input}",  # noqa: E501
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",  # noqa: E501
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",  # noqa: E501
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer is: ",  # noqa: E501
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}

# official config/dataset2maxlen.json: maximum new tokens per task
DATASET2MAXLEN = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
    "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64,
}

# the official pred.py gives chat models their template except on these few-shot / code tasks
NO_CHAT_TEMPLATE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})

RECORD_FIELDS = ("input", "context", "answers", "length", "dataset", "language", "all_classes", "_id")


def _check_task(task: str) -> None:
    if task not in LONGBENCH_TASKS:
        raise ValueError(f"unknown LongBench task {task!r}; the English tasks are: {', '.join(LONGBENCH_TASKS)}")


def _check_record(record: dict, where: str) -> dict:
    # `datasets` gives every row every column of the file, None where a line lacks the field
    missing = [k for k in ("input", "context", "answers") if record.get(k) is None]
    if missing:
        raise ValueError(f"{where}: record lacks the field(s) {missing} of the LongBench schema {RECORD_FIELDS}")
    if not isinstance(record["answers"], list) or not all(isinstance(a, str) for a in record["answers"]):
        raise ValueError(f"{where}: 'answers' must be a list of strings")
    out = dict(record)
    out.setdefault("all_classes", None)
    if out.get("length") is None:
        out["length"] = len(str(record["context"]).split())
    if out.get("_id") is None:
        out["_id"] = where
    return out


def load_longbench(task: str, data_dir: str | Path | None = None, *, limit: int | None = None,
                   from_hub: bool = False, hub_cache: str | Path | None = None) -> list[dict]:
    """The records of one English LongBench task, read with `datasets` (`load_dataset("json", ...)`).

    From `<data_dir>/<task>.jsonl` (one JSON object per line, official schema) when data_dir is given;
    else, with from_hub=True, from `data/<task>.jsonl` of the official `data.zip` of the `THUDM/LongBench`
    dataset repository (downloaded and extracted once, into the caches). `limit` keeps the first n records.
    """
    _check_task(task)
    if data_dir is not None:
        path = Path(data_dir) / f"{task}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no LongBench file {path} (expected <dir>/<task>.jsonl, the official layout)")
    elif from_hub:
        import datasets
        from huggingface_hub import hf_hub_download

        archive = hf_hub_download("THUDM/LongBench", "data.zip", repo_type="dataset", cache_dir=hub_cache)
        # extracted once, into the datasets cache (of hub_cache when given)
        manager = datasets.DownloadManager(download_config=datasets.DownloadConfig(cache_dir=hub_cache))
        path = Path(manager.extract(archive)) / "data" / f"{task}.jsonl"
    else:
        raise ValueError("give data_dir (a folder with <task>.jsonl files) or from_hub=True")
    return [_check_record(r, f"{path.name}:{i + 1}") for i, r in enumerate(_read_jsonl(path, limit))]


def _read_jsonl(path: Path, limit: int | None) -> list[dict]:
    """The rows of a local JSON-lines file."""
    import datasets

    # a throwaway cache: the rows are held in memory, and nothing accumulates in the user's datasets cache
    with tempfile.TemporaryDirectory() as cache:
        try:
            ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache,
                                       keep_in_memory=True)
        except datasets.exceptions.DatasetGenerationError as e:
            raise ValueError(f"{path}: not JSON lines of one schema ({e.__cause__ or e})") from e
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        return ds.to_list()


def format_prompt(task: str, record: dict) -> str:
    """The official prompt string of a record (no truncation, no chat template)."""
    _check_task(task)
    return DATASET2PROMPT[task].format(**record)


def split_prompt(task: str, record: dict) -> tuple[str, str]:
    """(context part, question part): the template up to and including the context, and the rest of
    the template with the question filled in. Their concatenation is `format_prompt`."""
    _check_task(task)
    template = DATASET2PROMPT[task]
    head, tail = template.split("{context}")
    # record fields may contain braces: fill by replacement, not str.format, on each part
    return head.replace("{input}", record["input"]) + record["context"], tail.replace("{input}", record["input"])


def truncate_middle(ids: Sequence[int] | np.ndarray, max_length: int) -> np.ndarray:
    """Keep the first int(max_length / 2) and the last int(max_length / 2) tokens when longer than
    max_length (official pred.py rule); shorter sequences are returned unchanged. int [T] -> [T']."""
    ids = np.asarray(ids)
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if len(ids) <= max_length:
        return ids
    half = max_length // 2
    return np.concatenate([ids[:half], ids[-half:]])


@dataclasses.dataclass(frozen=True)
class LongBenchPrompt:
    """A tokenised LongBench prompt: context_ids int [Tc] then question_ids int [Tq]; the query-aware
    prompt is their concatenation (at most max_length tokens)."""

    context_ids: np.ndarray
    question_ids: np.ndarray
    truncated: bool


_SPLIT_MARK = "\u2063LKV_SPLIT\u2063"  # invisible separator: marks the context / question boundary


def build_prompt(tokenizer, task: str, record: dict, max_length: int, *,
                 chat_template: bool = False) -> LongBenchPrompt:
    """Tokenise a record's prompt with a Hugging Face tokenizer, split into context and question parts.

    The context part carries the tokenizer's special prefix (BOS) or the chat template's opening; the
    question part the rest (and the chat template's assistant header). When the whole prompt exceeds
    max_length tokens it is truncated in the middle: the first int(max_length/2) tokens and the last
    int(max_length/2) are kept (the question part stays whole as long as it is shorter than half).
    Tokenising the two parts separately may differ from tokenising the whole string at the boundary;
    the official code truncates before applying a chat template, here the template's tokens count
    within max_length (and truncation happens on tokens, without the official decode/re-encode).
    """
    context, question = split_prompt(task, record)
    use_chat = chat_template and task not in NO_CHAT_TEMPLATE_TASKS
    if use_chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": context + _SPLIT_MARK + question}],
                                             tokenize=False, add_generation_prompt=True)
        context, question = text.split(_SPLIT_MARK)
        ctx_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    else:
        ctx_ids = tokenizer(context)["input_ids"]
    q_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    ctx_ids, q_ids = np.asarray(ctx_ids, np.int64), np.asarray(q_ids, np.int64)
    full = np.concatenate([ctx_ids, q_ids])
    if len(full) <= max_length:
        return LongBenchPrompt(ctx_ids, q_ids, False)
    kept = truncate_middle(full, max_length)
    half = max_length // 2
    n_q = min(len(q_ids), half)  # the question part lies within the kept tail when it is short enough
    return LongBenchPrompt(kept[: len(kept) - n_q], kept[len(kept) - n_q:], True)
