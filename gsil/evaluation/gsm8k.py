"""GSM8K: grade-school math word problems, zero- or k-shot, exact numeric match.

Data: a local JSONL in the GSM8K schema (``question``; ``answer`` = worked solution ending in
``#### N``), or the hub dataset ``openai/gsm8k`` (config ``main``) for online users.

Prompt: the question followed by the same ``Answer: <answer>`` instruction as the reasoning
tasks (``gsil.reasoning_tasks.task_prompt``), formatted by the one chat template function.
k-shot exemplars are drawn from the train split (deterministic in the seed, the same k for
every question) and given as prior user/assistant turns; their solutions have the calculator
annotations ``<<a*b=c>>`` removed and end in ``Answer: N``, the format the model is asked for.

Scoring: :func:`extract_numeric_answer` takes the last ``#### N``, else the last
``Answer: ...`` line's number, else the last number in the text (commas and ``$`` stripped);
it is correct when it equals the gold number exactly.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from gsil.evaluation.results import BenchmarkResult, Decoding, base_settings, proportion_interval
from gsil.generation import generate
from gsil.reasoning_tasks import ANSWER_PREFIX, extract_final_answer, task_prompt

BENCHMARK = "gsm8k"
HUB_NAME = "openai/gsm8k"
HUB_CONFIG = "main"

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?")
_MARKED_ANSWER = re.compile(r"####\s*([^\n]*)")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


@dataclass(frozen=True)
class GSM8KItem:
    """One problem: ``solution`` is the worked answer text, ``answer`` its final number."""

    id: str
    question: str
    solution: str
    answer: str


# --------------------------------------------------------------------------- answers


def normalize_number(text: str) -> str | None:
    """``"$1,234.50"`` -> ``"1234.5"``; ``"72."`` -> ``"72"``; None when not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    # One spelling per value: 72.00 -> "72", 7.2E+2 -> "720", -0 -> "0".
    return format((value + 0).normalize(), "f")


def _last_number(text: str) -> str | None:
    numbers = [normalize_number(match) for match in _NUMBER.findall(text)]
    numbers = [number for number in numbers if number is not None]
    return numbers[-1] if numbers else None


def gold_answer(solution: str) -> str | None:
    """The number after the last ``####`` of a GSM8K solution (None if missing)."""
    marks = _MARKED_ANSWER.findall(solution)
    return _last_number(marks[-1]) if marks else None


def extract_numeric_answer(text: str) -> str | None:
    """The model's final number: last ``#### N``, else the ``Answer:`` line, else last number."""
    marks = [mark for mark in _MARKED_ANSWER.findall(text) if _last_number(mark) is not None]
    if marks:
        return _last_number(marks[-1])
    final = extract_final_answer(text)
    if final is not None and _last_number(final) is not None:
        return _last_number(final)
    return _last_number(text)


def numbers_match(predicted: str | None, gold: str) -> bool:
    """Exact numeric equality (``"72"`` == ``"72.0"``); False for a missing prediction."""
    if predicted is None:
        return False
    a, b = normalize_number(predicted), normalize_number(gold)
    return a is not None and a == b


def exemplar_solution(solution: str) -> str:
    """A GSM8K solution in our answer format: no ``<<calc>>`` notes, ``#### N`` -> ``Answer: N``."""
    text = _CALCULATOR.sub("", solution).rstrip()
    gold = gold_answer(text)
    body = _MARKED_ANSWER.sub("", text).rstrip()
    return f"{body}\n{ANSWER_PREFIX} {gold}"


# --------------------------------------------------------------------------- data


def load_gsm8k(source: str, split: str = "test", limit: int | None = None) -> list[GSM8KItem]:
    """Problems from a local GSM8K-schema JSONL (``split`` ignored) or a hub dataset.

    Raises:
        FileNotFoundError: a local path that does not exist (with the fix).
        ValueError: a malformed row (file and line named) or an unreachable hub dataset.
    """
    path = Path(source)
    if path.suffix.lower() in (".jsonl", ".json") or path.exists():
        rows = _read_local(path)
    else:
        rows = _read_hub(source, split)
    items = []
    for where, row in rows:
        if limit is not None and len(items) >= limit:
            break
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) for k in ("question", "answer")
        ):
            raise ValueError(
                f"{where}: expected string fields 'question' and 'answer' (GSM8K schema)"
            )
        gold = gold_answer(row["answer"])
        if gold is None:
            raise ValueError(f"{where}: 'answer' must end with '#### <number>' (GSM8K schema)")
        item_id = str(row["id"]) if row.get("id") is not None else where
        items.append(GSM8KItem(item_id, row["question"], row["answer"], gold))
    return items


def _read_local(path: Path) -> list[tuple[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such GSM8K file; give a JSONL with 'question' and 'answer' fields "
            f"(e.g. GSM8K's test.jsonl) or the hub name {HUB_NAME!r} when online"
        )
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path.name}:{line_number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {line_number}: invalid JSON ({err.msg})") from None
    return rows


def _read_hub(name: str, split: str) -> list[tuple[str, Any]]:
    import datasets

    config = HUB_CONFIG if name in (HUB_NAME, "gsm8k") else None
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, unknown name or split: one piece of advice
        raise ValueError(
            f"could not load GSM8K from the hub ({name!r}, split {split!r}): {err}. Offline, "
            "pass local JSONL files instead (--gsm8k test.jsonl --gsm8k-train train.jsonl)."
        ) from err
    return [(f"gsm8k:{split}:{index}", dict(row)) for index, row in enumerate(dataset)]


def select_exemplars(
    train: Sequence[GSM8KItem], shots: int, seed: int, exclude_questions: set[str] = frozenset()
) -> list[GSM8KItem]:
    """``shots`` train problems, the same for every question, deterministic in ``seed``.

    Questions in ``exclude_questions`` (the test set) are never exemplars, even if a user
    passes the same file twice.
    """
    pool = [item for item in train if item.question not in exclude_questions]
    if shots > len(pool):
        raise ValueError(f"{shots} shots asked but only {len(pool)} train problems available")
    return random.Random(seed).sample(pool, shots)


def build_messages(question: str, exemplars: Sequence[GSM8KItem]) -> list[dict[str, str]]:
    """Chat messages: each exemplar as a user/assistant pair, then the question."""
    messages = []
    for shot in exemplars:
        messages.append({"role": "user", "content": task_prompt(shot.question)})
        messages.append({"role": "assistant", "content": exemplar_solution(shot.solution)})
    messages.append({"role": "user", "content": task_prompt(question)})
    return messages


# --------------------------------------------------------------------------- evaluation


def score_completions(
    items: Sequence[GSM8KItem],
    completions: Sequence[str],
    prompts: Sequence[Any] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One record per item: extracted number, gold, ``score`` (1.0/0.0) and ``correct``."""
    if len(items) != len(completions):
        raise ValueError(f"{len(items)} items but {len(completions)} completions")
    records = []
    for index, (item, completion) in enumerate(
        tqdm(
            zip(items, completions, strict=True),
            total=len(items),
            desc="scoring",
            disable=not progress,
        )
    ):
        predicted = extract_numeric_answer(completion)
        correct = numbers_match(predicted, item.answer)
        records.append(
            {
                "id": item.id,
                "prompt": prompts[index] if prompts is not None else item.question,
                "completion": completion,
                "extracted_answer": predicted,
                "gold": item.answer,
                "score": float(correct),
                "correct": correct,
            }
        )
    return records


def summarize(records: Sequence[dict[str, Any]], settings: dict[str, Any]) -> BenchmarkResult:
    """Accuracy with a Wilson interval."""
    correct = sum(bool(record["correct"]) for record in records)
    n = len(records)
    return BenchmarkResult(
        benchmark=BENCHMARK,
        metric="accuracy",
        score=correct / n if n else None,
        n=n,
        interval=list(proportion_interval(correct, n)),
        interval_method="wilson",
        breakdown={
            "correct": correct,
            "no_number": sum(record["extracted_answer"] is None for record in records),
        },
        settings=settings,
    )


def evaluate_gsm8k(
    model: Any,
    tokenizer: Any,
    *,
    source: str = HUB_NAME,
    train_source: str | None = None,
    shots: int = 0,
    limit: int | None = None,
    seed: int = 0,
    decoding: Decoding | None = None,
    progress: bool = True,
) -> tuple[BenchmarkResult, list[dict[str, Any]]]:
    """Generate answers to GSM8K test problems (k-shot when ``shots > 0``) and score them.

    ``train_source`` defaults to ``source`` when that is a hub name (its train split); a local
    test file needs an explicit train file for ``shots > 0``.
    """
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    decoding = decoding or Decoding(max_new_tokens=384)
    items = load_gsm8k(source, "test", limit)
    exemplars: list[GSM8KItem] = []
    if shots:
        if train_source is None:
            if Path(source).suffix.lower() in (".jsonl", ".json") or Path(source).exists():
                raise ValueError(
                    f"{shots}-shot GSM8K draws exemplars from the train split: pass a train "
                    "JSONL (--gsm8k-train train.jsonl) alongside the local test file"
                )
            train_source = source
        train = load_gsm8k(train_source, "train")
        exemplars = select_exemplars(train, shots, seed, {item.question for item in items})
    prompts = [build_messages(item.question, exemplars) for item in items]
    outputs = generate(model, tokenizer, prompts, **decoding.generate_kwargs(progress))
    records = score_completions(items, [out.text for out in outputs], prompts, progress)
    for record, out in zip(records, outputs, strict=True):
        record.update(num_tokens=out.num_tokens, truncated=out.truncated)
    settings = base_settings(
        tokenizer,
        decoding,
        source=source,
        train_source=train_source,
        shots=shots,
        exemplar_ids=[shot.id for shot in exemplars],
        data_seed=seed,
    )
    return summarize(records, settings), records
