"""MT-Bench: 80 two-turn questions, answered turn by turn, graded 1-10 by a judge.

Questions come from a local file in FastChat's ``question.jsonl`` schema (``question_id``,
``category``, ``turns`` = two strings, optional ``reference``) or from the hub
(``HuggingFaceH4/mt_bench_prompts``: ``prompt_id``, ``category``, ``prompt``, ``reference``).

Answers: turn 1 is generated for every question, then turn 2 with the conversation so far
(question 1, the model's own answer 1, question 2) as chat history, through the one chat
template function.

Grading is single-answer, 1-10, with our own judge prompt (:func:`judge_messages`) asking for
the rating as ``[[N]]`` (:func:`parse_rating` also accepts a few near misses). A judge is any
callable ``messages -> reply text`` with a ``name``: :class:`OpenAICompatibleJudge` (any
``/chat/completions`` endpoint, configured by ``GSIL_JUDGE_BASE_URL``, ``GSIL_JUDGE_MODEL``,
``GSIL_JUDGE_API_KEY``), :class:`LocalModelJudge` (a local HF model), or a test fake. The
judge's name is recorded with every score. Without a judge, answers are generated and the
result says that scoring needs one; no score is made up.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gsil.evaluation.results import BenchmarkResult, Decoding, base_settings, mean_interval
from gsil.generation import generate

BENCHMARK = "mtbench"
HUB_NAME = "HuggingFaceH4/mt_bench_prompts"
ENV_BASE_URL, ENV_MODEL, ENV_API_KEY = (
    "GSIL_JUDGE_BASE_URL",
    "GSIL_JUDGE_MODEL",
    "GSIL_JUDGE_API_KEY",
)
NO_JUDGE_NOTE = (
    "answers generated but not scored: MT-Bench scoring needs a judge. Set "
    f"{ENV_BASE_URL} and {ENV_MODEL} (and {ENV_API_KEY} if the endpoint needs one) for an "
    "OpenAI-compatible endpoint, or pass --judge-model SPEC for a local model"
)
Messages = list[dict[str, str]]
Judge = Callable[[Messages], str]

JUDGE_SYSTEM = "You are a careful and impartial reviewer of answers written by AI assistants."
_JUDGE_TASK = (
    "Grade the assistant's answer marked below. Consider whether it is correct, helpful, "
    "relevant to what was asked, sufficiently detailed and clearly written.{reference_clause} "
    "Do not favour an answer for being long. First explain your judgement in a few "
    "sentences; then give a rating from 1 (useless) to 10 (excellent) in exactly this form: "
    "[[N]], for example [[6]]."
)
_REFERENCE_CLAUSE = (
    " A reference answer is given: check the assistant's answer against it, and treat a "
    "wrong result as a serious flaw."
)
_RATING_PATTERNS = (
    re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]"),  # [[7]], [[7.5]], [[7/10]]
    re.compile(r"(?:rating|score)\s*(?:is|:)?\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE),
    re.compile(r"(\d+(?:\.\d+)?)\s*/\s*10\b"),  # 7/10
)


@dataclass(frozen=True)
class MTBenchQuestion:
    """One two-turn question; ``reference`` holds reference answers when the source has them."""

    question_id: str
    category: str
    turns: tuple[str, str]
    reference: tuple[str, ...] = ()


# --------------------------------------------------------------------------- questions


def load_questions(source: str = HUB_NAME, limit: int | None = None) -> list[MTBenchQuestion]:
    """Questions from a local ``question.jsonl`` or a hub dataset (the first ``limit``).

    Raises:
        FileNotFoundError: a local path that does not exist (with the fix).
        ValueError: a malformed row (file and line named), or an unreachable hub dataset.
    """
    path = Path(source)
    if path.suffix.lower() in (".jsonl", ".json") or path.exists():
        rows = _read_local(path)
    else:
        rows = _read_hub(source)
    questions = []
    for where, row in rows[:limit]:
        turns = row.get("turns", row.get("prompt")) if isinstance(row, dict) else None
        if not (
            isinstance(turns, list) and len(turns) == 2 and all(isinstance(t, str) for t in turns)
        ):
            raise ValueError(f"{where}: expected 'turns' (or 'prompt'): a list of two strings")
        question_id = row.get("question_id", row.get("prompt_id"))
        reference = tuple(r for r in (row.get("reference") or []) if isinstance(r, str) and r)
        questions.append(
            MTBenchQuestion(
                question_id=str(question_id if question_id is not None else where),
                category=str(row.get("category", "unknown")),
                turns=(turns[0], turns[1]),
                reference=reference,
            )
        )
    return questions


def _read_local(path: Path) -> list[tuple[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such MT-Bench question file; give FastChat's question.jsonl "
            "(fields question_id, category, turns) or the hub name "
            f"{HUB_NAME!r} when online"
        )
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    rows.append((f"{path} line {line_number}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{path} line {line_number}: invalid JSON ({err.msg})"
                    ) from None
    return rows


def _read_hub(name: str) -> list[tuple[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as err:  # offline or unknown name
        raise ValueError(
            f"could not load MT-Bench questions from the hub ({name!r}): {err}. Offline, pass "
            "a local FastChat question.jsonl instead (--mtbench question.jsonl)."
        ) from err
    return [(f"{name} row {index}", dict(row)) for index, row in enumerate(dataset)]


# --------------------------------------------------------------------------- judging


def judge_messages(question: MTBenchQuestion, answers: Sequence[str], turn: int) -> Messages:
    """Our judge prompt for ``answers[turn - 1]``; turn 2 shows the whole conversation."""
    reference = question.reference[turn - 1] if len(question.reference) >= turn else None
    parts = [_JUDGE_TASK.format(reference_clause=_REFERENCE_CLAUSE if reference else "")]
    if turn == 1:
        parts += [
            f"[Question]\n{question.turns[0]}",
            f"[Assistant's answer to grade]\n{answers[0]}",
        ]
    else:
        parts += [
            f"[First question]\n{question.turns[0]}",
            f"[Assistant's first answer (context only)]\n{answers[0]}",
            f"[Follow-up question]\n{question.turns[1]}",
            f"[Assistant's answer to the follow-up: grade this one]\n{answers[1]}",
        ]
    if reference:
        parts.append(f"[Reference answer]\n{reference}")
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


def parse_rating(text: str | None) -> float | None:
    """The 1-10 rating in a judge reply: the last ``[[N]]``, else ``Rating: N`` or ``N/10``.

    Returns None when there is no rating or it lies outside [1, 10].
    """
    if not text:
        return None
    for pattern in _RATING_PATTERNS:
        matches = pattern.findall(text)
        if matches:
            rating = float(matches[-1])
            return rating if 1.0 <= rating <= 10.0 else None
    return None


def judge_name(judge: Judge) -> str:
    """The name recorded with scores: ``judge.name``, else the callable's own name."""
    return str(getattr(judge, "name", None) or getattr(judge, "__name__", None) or repr(judge))


class OpenAICompatibleJudge:
    """A judge behind any OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 120.0,
        max_tokens: int = 512,
        retries: int = 2,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.retries = retries
        self.name = f"{model} @ {self.base_url}"

    def __call__(self, messages: Messages) -> str:
        """The judge's reply; greedy (temperature 0) so that grading is repeatable."""
        body = {"model": self.model, "messages": messages, "temperature": 0.0,
                "max_tokens": self.max_tokens}  # fmt: skip
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            f"{self.base_url}/chat/completions", json.dumps(body).encode(), headers, method="POST"
        )
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    reply = json.loads(response.read().decode("utf-8"))
                return reply["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as err:
                # Client errors (bad key, unknown model) will not heal by retrying.
                if err.code < 500 or attempt == self.retries:
                    detail = err.read().decode("utf-8", "replace")[:300]
                    raise RuntimeError(f"judge {self.name}: HTTP {err.code}: {detail}") from err
            except (urllib.error.URLError, TimeoutError) as err:
                if attempt == self.retries:
                    raise RuntimeError(f"judge {self.name}: unreachable ({err})") from err
            except (KeyError, IndexError, json.JSONDecodeError) as err:
                raise RuntimeError(f"judge {self.name}: unexpected reply ({err})") from err
            time.sleep(2**attempt)
        raise AssertionError("unreachable")


class LocalModelJudge:
    """A local HF causal LM as judge (greedy, through the chat template)."""

    def __init__(self, model: Any, tokenizer: Any, name: str, max_new_tokens: int = 256) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_new_tokens = max_new_tokens

    def __call__(self, messages: Messages) -> str:
        return self.judge_batch([messages], progress=False)[0]

    def judge_batch(self, batch: Sequence[Messages], progress: bool = True) -> list[str]:
        """Replies to many judge prompts in batched generation."""
        outputs = generate(self.model, self.tokenizer, list(batch),
                           max_new_tokens=self.max_new_tokens, progress=progress)  # fmt: skip
        return [out.text for out in outputs]


def local_model_judge(spec: str, max_new_tokens: int = 256) -> LocalModelJudge:
    """Load ``spec`` with ``gsil.models.load_model`` as a :class:`LocalModelJudge`."""
    from gsil.models import load_model

    model, tokenizer = load_model(spec)
    return LocalModelJudge(model, tokenizer, f"local:{spec}", max_new_tokens)


def judge_from_env(environ: Mapping[str, str] = os.environ) -> OpenAICompatibleJudge | None:
    """The endpoint judge configured by ``GSIL_JUDGE_*``; None when neither URL nor model is set.

    Raises:
        ValueError: when only one of the base URL and the model is set.
    """
    base_url, model = environ.get(ENV_BASE_URL), environ.get(ENV_MODEL)
    if not base_url and not model:
        return None
    if not (base_url and model):
        raise ValueError(f"set both {ENV_BASE_URL} and {ENV_MODEL} to use an endpoint judge")
    return OpenAICompatibleJudge(base_url, model, environ.get(ENV_API_KEY))


# --------------------------------------------------------------------------- evaluation


def generate_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[MTBenchQuestion],
    decoding: Decoding,
    progress: bool = True,
) -> list[tuple[str, str]]:
    """Both turns' answers per question; turn 2 sees question 1 and answer 1 as history."""
    kwargs = decoding.generate_kwargs(progress)
    first = generate(
        model, tokenizer, [[{"role": "user", "content": q.turns[0]}] for q in questions], **kwargs
    )
    histories = [
        [
            {"role": "user", "content": q.turns[0]},
            {"role": "assistant", "content": answer.text},
            {"role": "user", "content": q.turns[1]},
        ]
        for q, answer in zip(questions, first, strict=True)
    ]
    second = generate(model, tokenizer, histories, **kwargs)
    return [(a.text, b.text) for a, b in zip(first, second, strict=True)]


def grade(
    questions: Sequence[MTBenchQuestion],
    answers: Sequence[tuple[str, str]],
    judge: Judge | None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One record per (question, turn): prompt, answer, and -- with a judge -- its rating."""
    records, prompts = [], []
    for question, pair in zip(questions, answers, strict=True):
        for turn in (1, 2):
            history = [{"role": "user", "content": question.turns[0]}]
            if turn == 2:
                history += [{"role": "assistant", "content": pair[0]},
                            {"role": "user", "content": question.turns[1]}]  # fmt: skip
            records.append({
                "id": f"{question.question_id}:turn{turn}", "question_id": question.question_id,
                "category": question.category, "turn": turn, "prompt": history,
                "completion": pair[turn - 1], "judge": None, "judge_output": None, "score": None,
            })  # fmt: skip
            prompts.append(judge_messages(question, pair, turn))
    if judge is None:
        return records
    name = judge_name(judge)
    if hasattr(judge, "judge_batch"):
        replies: list[str | Exception] = list(judge.judge_batch(prompts, progress=progress))
    else:
        replies = []
        for prompt in tqdm(prompts, desc="judging", disable=not progress):
            try:
                replies.append(judge(prompt))
            except Exception as err:  # one failed call must not discard the rest
                replies.append(err)
    if replies and all(isinstance(reply, Exception) for reply in replies):
        raise RuntimeError(f"every call to judge {name} failed; first error: {replies[0]}")
    for record, reply in zip(records, replies, strict=True):
        record["judge"] = name
        if isinstance(reply, Exception):
            record["judge_error"] = str(reply)
        else:
            record["judge_output"] = reply
            record["score"] = parse_rating(reply)
    return records


def summarize(
    records: Sequence[dict[str, Any]], judge: str | None, settings: dict[str, Any]
) -> BenchmarkResult:
    """Mean rating with a t interval, per turn and per category; or 'not scored'."""
    rated = [record for record in records if record["score"] is not None]
    if judge is None:
        return BenchmarkResult(BENCHMARK, "mean rating (1-10)", None, len(records), None,
                               "none", settings=settings, note=NO_JUDGE_NOTE)  # fmt: skip

    def stats_of(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        ratings = [row["score"] for row in rows]
        mean = float(np.mean(ratings)) if ratings else None
        return {"mean": mean, "n": len(ratings), "interval": list(mean_interval(ratings))}

    by_turn, by_category = defaultdict(list), defaultdict(list)
    for record in rated:
        by_turn[f"turn{record['turn']}"].append(record)
        by_category[record["category"]].append(record)
    overall = stats_of(rated)
    return BenchmarkResult(
        benchmark=BENCHMARK,
        metric=f"mean rating (1-10, judge: {judge})",
        score=overall["mean"],
        n=overall["n"],
        interval=overall["interval"],
        interval_method="student t",
        breakdown={
            "turns": {key: stats_of(rows) for key, rows in sorted(by_turn.items())},
            "categories": {key: stats_of(rows) for key, rows in sorted(by_category.items())},
            # Replies without a parsable rating and failed calls are left out of the mean.
            "unparsed": sum(r["score"] is None and "judge_error" not in r for r in records),
            "judge_errors": sum("judge_error" in r for r in records),
        },
        settings=settings,
    )


def evaluate_mtbench(
    model: Any,
    tokenizer: Any,
    *,
    source: str = HUB_NAME,
    limit: int | None = None,
    decoding: Decoding | None = None,
    judge: Judge | None = None,
    progress: bool = True,
) -> tuple[BenchmarkResult, list[dict[str, Any]]]:
    """Answer the first ``limit`` questions turn by turn and grade them with ``judge``."""
    decoding = decoding or Decoding(max_new_tokens=512)
    questions = load_questions(source, limit)
    answers = generate_answers(model, tokenizer, questions, decoding, progress)
    records = grade(questions, answers, judge, progress)
    name = judge_name(judge) if judge is not None else None
    settings = base_settings(tokenizer, decoding, source=source, judge=name,
                             judge_prompt=_JUDGE_TASK, judge_system=JUDGE_SYSTEM)  # fmt: skip
    return summarize(records, name, settings), records
