"""Held-out reasoning-gym tasks: greedy answers, scored by reasoning-gym's own scorer.

Test items come from ``load_reasoning_demonstrations(..., split="test")``, whose item seeds are
disjoint from every training seed (``gsil.reasoning_tasks.split_seed``). The prompt is the
training prompt (question + the ``Answer: <answer>`` instruction) formatted by the one chat
template function; the final answer is parsed with ``extract_final_answer`` and handed to
reasoning-gym's scorer. An item is correct when that score is 1.0.

Items whose reasoning-gym gold disagrees with an exact evaluation of the expression are left
out (as for training; the count is recorded in the settings as ``skipped``): scoring against a
wrong gold would measure the dataset, not the model. Test items need no worked solution, so
any reasoning-gym task whose scorer can read an ``Answer:`` line can be evaluated.

Two benchmarks share this code: ``reasoning``, the families the run trained on, and
``reasoning-heldout``, families it did not train on (forgetting: what training on some
families costs on others). Each result says which (``settings["role"]``: ``trained`` or
``held-out``, also on every task of its breakdown); :func:`check_heldout_tasks` refuses a
held-out family that is also trained.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from gsil.data import Demonstration
from gsil.evaluation.options import DEFAULT_ITEMS_PER_TASK, DEFAULT_REASONING_TASKS, EvalRequest
from gsil.evaluation.results import BenchmarkResult, base_settings, proportion_interval
from gsil.generation import generate
from gsil.reasoning_tasks import extract_final_answer, load_reasoning_demonstrations, score_answer

BENCHMARK = "reasoning"
HELDOUT_BENCHMARK = "reasoning-heldout"
TRAINED, HELD_OUT = "trained", "held-out"  # a result's role


def load_test_items(
    tasks: Sequence[str] = DEFAULT_REASONING_TASKS,
    items_per_task: int = DEFAULT_ITEMS_PER_TASK,
    seed: int = 0,
    split: str = "test",
) -> list[Demonstration]:
    """``items_per_task`` held-out items of each task, deterministic in seed: split ``"test"``
    for results, ``"validation"`` for choosing settings (disjoint item seeds, see
    ``gsil.reasoning_tasks.split_seed``).

    The returned list carries ``.skipped`` (items dropped for a bad gold, by task and reason).
    """
    if items_per_task < 1:
        raise ValueError(f"items_per_task must be >= 1, got {items_per_task}")
    spec = ",".join(tasks)
    return load_reasoning_demonstrations(
        spec, size=items_per_task * len(tasks), seed=seed, split=split, solutions=False
    )


def check_heldout_tasks(trained: Sequence[str], heldout: Sequence[str] | None) -> list[str]:
    """The held-out families, checked: given, and none of them trained.

    Raises:
        ValueError: no held-out families, or some also trained (named, with the fix).
    """
    if not heldout:
        raise ValueError(
            f"{HELDOUT_BENCHMARK} evaluates reasoning-gym families the run did not train on: "
            "name them (--heldout-tasks leg_counting,gcd, or evaluate.heldout_tasks in a recipe)"
        )
    both = [task for task in heldout if task in trained]
    if both:
        raise ValueError(
            f"held-out tasks {both} are also trained ({', '.join(trained)}): a held-out family "
            "is one the run did not train on; remove them from --heldout-tasks"
        )
    return list(heldout)


def score_completions(
    items: Sequence[Demonstration], completions: Sequence[str], progress: bool = True
) -> list[dict[str, Any]]:
    """One record per item: the extracted answer, reasoning-gym's score and the verdict.

    Raises:
        ValueError: when there are not as many completions as items.
    """
    if len(items) != len(completions):
        raise ValueError(f"{len(items)} items but {len(completions)} completions")
    records = []
    pairs = zip(items, completions, strict=True)
    for item, completion in tqdm(pairs, total=len(items), desc="scoring", disable=not progress):
        task = item.meta["task"]
        answer = extract_final_answer(completion)
        score = score_answer(task, answer, item.meta["entry"])
        records.append(
            {
                "id": item.id,
                "task": task,
                "prompt": item.prompt,
                "completion": completion,
                "extracted_answer": answer,
                "gold": str(item.meta["answer"]),
                "score": score,
                "correct": score >= 1.0,
            }
        )
    return records


def summarize(
    records: Sequence[dict[str, Any]], settings: dict[str, Any], role: str = TRAINED
) -> BenchmarkResult:
    """Overall and per-task accuracy, each with a Wilson interval, labelled with ``role``
    (``trained``: the ``reasoning`` benchmark; ``held-out``: ``reasoning-heldout``)."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_task[record["task"]].append(record)
    breakdown = {task: {**_accuracy(rows), "role": role} for task, rows in by_task.items()}
    overall = _accuracy(records)
    return BenchmarkResult(
        benchmark=HELDOUT_BENCHMARK if role == HELD_OUT else BENCHMARK,
        metric="accuracy",
        score=overall["accuracy"],
        n=overall["n"],
        interval=overall["interval"],
        interval_method="wilson",
        breakdown={"tasks": breakdown, "no_answer": overall["no_answer"], "role": role},
        settings={**settings, "role": role},
    )


def _accuracy(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    correct = sum(bool(row["correct"]) for row in rows)
    n = len(rows)
    return {
        "accuracy": correct / n if n else None,
        "n": n,
        "correct": correct,
        "interval": list(proportion_interval(correct, n)),
        "mean_score": sum(row["score"] for row in rows) / n if n else None,
        # Answers without an "Answer:" line: a format failure rather than a wrong answer.
        "no_answer": sum(row["extracted_answer"] is None for row in rows),
    }


def evaluate_reasoning(
    model: Any, tokenizer: Any, request: EvalRequest, role: str = TRAINED
) -> tuple[BenchmarkResult, list[dict[str, Any]]]:
    """Generate answers to held-out items (``options.split``: test or validation) and score
    them. ``role`` says whether the run trained on these families (``trained``, the
    ``reasoning`` benchmark: ``options.tasks``) or not (``held-out``, ``reasoning-heldout``:
    ``options.heldout_tasks``, checked by :func:`check_heldout_tasks`); ``request.limit``
    items per task (default :data:`DEFAULT_ITEMS_PER_TASK`), drawn with ``request.seed``.

    Returns:
        ``(result, records)``; write them with ``gsil.evaluation.results.write_result``.
    """
    if role not in (TRAINED, HELD_OUT):
        raise ValueError(f"role must be {TRAINED!r} or {HELD_OUT!r}, got {role!r}")
    options, seed, progress = request.options, request.seed, request.progress
    tasks = options.reasoning_tasks()
    if role == HELD_OUT:
        tasks = check_heldout_tasks(tasks, options.heldout_tasks)
    items_per_task, split = request.items_per_task, options.split
    decoding = request.decoding(HELDOUT_BENCHMARK if role == HELD_OUT else BENCHMARK)
    items = load_test_items(tasks, items_per_task, seed, split)
    outputs = generate(
        model,
        tokenizer,
        [item.prompt for item in items],
        decoding,
        max_prompt_length=decoding.max_prompt_length,
        progress=progress,
    )
    records = score_completions(items, [out.text for out in outputs], progress)
    for record, out in zip(records, outputs, strict=True):
        record.update(num_tokens=out.num_tokens, truncated=out.truncated)
    settings = base_settings(
        tokenizer,
        decoding,
        tasks=list(tasks),
        items_per_task=items_per_task,
        data_seed=seed,
        split=split,
        skipped=dict(getattr(items, "skipped", {})),
    )
    result = summarize(records, settings, role)
    result.breakdown["truncated"] = sum(out.truncated for out in outputs)
    return result, records
