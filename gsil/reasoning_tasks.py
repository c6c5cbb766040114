"""Reasoning-gym tasks as demonstrations: worked solutions, one answer format, scoring, seeds.

Every response, whatever the task, ends with a final line ``Answer: <answer>`` (the prompt
asks for it, ``extract_final_answer`` parses it, ``score_answer`` defers to reasoning-gym).

Worked solutions come from ``metadata["answer_cot"]`` when a task has one (gsm_symbolic; its
``#### N`` last line becomes ``Answer: N``), or are built here for arithmetic expression tasks
(basic_arithmetic, chain_sum): each binary operation written out in evaluation order.
Items whose gold answer disagrees with an exact, precedence-correct evaluation are dropped
and counted: reasoning-gym's basic_arithmetic sometimes floors divisions or prints an operand
other than the one it computed with, and a demonstration must never contradict its own gold.
"""

from __future__ import annotations

import ast
import logging
import operator
import re
from collections import Counter
from fractions import Fraction
from functools import cache
from typing import Any

import reasoning_gym

from gsil.demonstrations import DataError, Demonstration, Demonstrations

# the families trained on and evaluated when a recipe names none
DEFAULT_REASONING_TASKS = ("chain_sum", "basic_arithmetic")

logger = logging.getLogger(__name__)

ANSWER_PREFIX = "Answer:"
ANSWER_INSTRUCTION = "End your response with a final line of the form 'Answer: <answer>'."
EXPRESSION_TASKS = ("basic_arithmetic", "chain_sum")
SPLITS = ("train", "validation", "test")
# reasoning-gym draws item i of a dataset seeded s from Random(s + i), so a split's item seeds
# are [base, base + items). Train bases lie in [0, 2**30), test bases in [2**31, 2**31 + 2**30)
# and validation bases in [2**32, 2**32 + 2**30); with fewer than 2**30 items drawn, item seeds
# stay in [0, 2**31), [2**31, 2**32) and [2**32, 2**32 + 2**31): the three sets never meet.
MAX_SEED = 2**30
TEST_SEED_OFFSET = 2**31
VALIDATION_SEED_OFFSET = 2**32
_SPLIT_OFFSETS = {"train": 0, "validation": VALIDATION_SEED_OFFSET, "test": TEST_SEED_OFFSET}

_ANSWER_LINE = re.compile(
    r"^[ \t>#*_]*answer[ \t*_]*:[ \t*_]*(.*?)[ \t*_]*$", re.IGNORECASE | re.MULTILINE
)
_COT_ANSWER_LINE = re.compile(r"^####\s*(.+?)\s*$")
_OPERATORS = {
    ast.Add: ("+", operator.add),
    ast.Sub: ("-", operator.sub),
    ast.Mult: ("*", operator.mul),
    ast.Div: ("/", operator.truediv),  # exact on Fractions
}


def split_seed(seed: int, split: str) -> int:
    """The reasoning-gym base seed for ``split``: ``seed`` for train, ``seed + 2**31`` for test,
    ``seed + 2**32`` for validation (model selection: tuning never sees a test item).

    Item seeds of the three splits are disjoint for every ``0 <= seed < 2**30`` (see
    ``SPLITS``), so no split regenerates another's item by seed.
    """
    if not 0 <= seed < MAX_SEED:
        raise DataError(f"seed must be in [0, 2**30), got {seed}")
    if split not in SPLITS:
        raise DataError(f"reasoning-gym split must be one of {SPLITS}, got {split!r}")
    return seed + _SPLIT_OFFSETS[split]


def task_names(spec: str) -> list[str]:
    """``"gsm_symbolic, basic_arithmetic"`` -> ``["gsm_symbolic", "basic_arithmetic"]``."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names or len(set(names)) != len(names):
        raise DataError(
            f"'rg:{spec}': give distinct task names separated by commas, e.g. 'rg:gsm_symbolic,chain_sum'"
        )
    return names


def split_size(size: int, parts: int) -> list[int]:
    """``size`` split evenly over ``parts``; the first ones take the remainder."""
    return [size // parts + (1 if i < size % parts else 0) for i in range(parts)]


def task_prompt(question: str) -> str:
    """The question followed by the instruction fixing the answer format."""
    return f"{question}\n\n{ANSWER_INSTRUCTION}"


def load_reasoning_demonstrations(
    spec: str, *, size: int, seed: int = 0, split: str = "train", solutions: bool = True
) -> Demonstrations:
    """``size`` demonstrations spread evenly over the tasks in ``spec``, deterministic in ``seed``.

    Items without a valid worked solution are skipped, and more items are drawn in their place;
    ``.skipped`` counts them as ``"<task>:<reason>"``. ``solutions=False`` (test items, where
    only the question and reasoning-gym's scorer are needed) also admits tasks that have no
    worked solutions: their items come with an empty response (items of tasks that have them
    are checked and skipped as before).
    """
    base_seed = split_seed(seed, split)
    names = task_names(spec)
    demos: list[Demonstration] = []
    skipped: Counter[str] = Counter()
    for name, wanted in zip(names, split_size(size, len(names)), strict=True):
        available = 2 * wanted + 16  # headroom to replace dropped items
        try:
            dataset = reasoning_gym.create_dataset(name, size=available, seed=base_seed)
        except Exception as err:
            raise DataError(f"reasoning-gym task {name!r}: {err}") from err
        kept = 0
        for index in range(available):
            if kept == wanted:
                break
            entry = dataset[index]
            if solutions or has_worked_solutions(name, entry):
                response, reason = worked_solution(name, entry)
            else:
                response, reason = "", "ok"
            if response is None:
                skipped[f"{name}:{reason}"] += 1
                continue
            item_id = f"rg:{name}:{split}:{seed}:{index}"
            meta = {"location": item_id, "task": name, "answer": entry["answer"], "entry": entry}
            demos.append(Demonstration(task_prompt(entry["question"]), response, item_id, meta))
            kept += 1
        if kept < wanted:
            skipped[f"{name}:too_few_valid_items"] += wanted - kept
            logger.warning(
                "%s: only %d of %d items have valid worked solutions", name, kept, wanted
            )
    return Demonstrations(demos, skipped)


def has_worked_solutions(task: str, entry: dict[str, Any]) -> bool:
    """Whether :func:`worked_solution` can write one for ``entry`` (an ``answer_cot``, or an
    arithmetic expression task)."""
    cot = entry.get("metadata", {}).get("answer_cot")
    return (isinstance(cot, str) and bool(cot.strip())) or task in EXPRESSION_TASKS


def worked_solution(task: str, entry: dict[str, Any]) -> tuple[str | None, str]:
    """The worked solution ending in ``Answer: <gold>``, or ``(None, reason)`` to drop the item."""
    gold = str(entry["answer"])
    cot = entry.get("metadata", {}).get("answer_cot")
    if isinstance(cot, str) and cot.strip():
        lines = cot.rstrip().splitlines()
        marker = _COT_ANSWER_LINE.match(lines[-1].strip())
        if marker is None:
            return f"{cot.rstrip()}\n{ANSWER_PREFIX} {gold}", "ok"
        if not _same_number(marker.group(1), gold):
            return None, "cot_disagrees_with_gold"
        return "\n".join([*lines[:-1], f"{ANSWER_PREFIX} {gold}"]), "ok"
    if task in EXPRESSION_TASKS:
        expression = entry["metadata"]["expression"]
        try:
            value, steps = evaluate_with_steps(expression)
        except (ValueError, ZeroDivisionError):
            return None, "unevaluable_expression"
        if not _same_number(_format_number(value), gold):
            return None, "gold_disagrees_with_evaluation"
        intro = (
            "Evaluate step by step: parentheses first, then * and / before + and -, left to right."
        )
        return "\n".join([intro, *steps, f"{ANSWER_PREFIX} {gold}"]), "ok"
    raise DataError(
        f"reasoning-gym task {task!r} has no worked solutions (no metadata['answer_cot']) and no "
        f"builder here; use tasks with an answer_cot (e.g. gsm_symbolic) or one of {EXPRESSION_TASKS}"
    )


def evaluate_with_steps(expression: str) -> tuple[Fraction, list[str]]:
    """Exact value of an arithmetic expression and one ``a op b = c`` line per operation.

    Python's parser gives the usual precedence; ``/`` is exact division (no flooring).
    """
    steps: list[str] = []

    def visit(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            value = visit(node.operand)
            result = -value if isinstance(node.op, ast.USub) else value
            if not isinstance(node.operand, ast.Constant):  # "-(x)" is a step; "-5" is a number
                steps.append(f"-({_format_number(value)}) = {_format_number(result)}")
            return result
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = visit(node.left), visit(node.right)
            symbol, apply = _OPERATORS[type(node.op)]
            result = apply(left, right)
            steps.append(
                f"{_format_number(left)} {symbol} {_format_number(right)} = {_format_number(result)}"
            )
            return result
        raise ValueError(f"unsupported syntax in {expression!r}")

    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as err:
        raise ValueError(f"cannot parse {expression!r}") from err
    return visit(tree.body), steps


def _format_number(value: Fraction) -> str:
    return (
        str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    )


def _same_number(text: str, gold: str) -> bool:
    try:
        return Fraction(text.replace(",", "")) == Fraction(gold.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return text.strip() == gold.strip()


def extract_final_answer(text: str) -> str | None:
    """The answer on the last ``Answer: ...`` line of ``text``, or None if there is none.

    Tolerates markdown around it (``**Answer:** 42``) and one trailing period.
    """
    answers = [match for match in _ANSWER_LINE.findall(text) if match.strip()]
    if not answers:
        return None
    answer = answers[-1].strip()
    return answer[:-1].rstrip() if answer.endswith(".") and len(answer) > 1 else answer


@cache
def _scorer(task_name: str) -> Any:
    try:
        return reasoning_gym.get_score_answer_fn(task_name)
    except ValueError as err:
        raise DataError(f"reasoning-gym task {task_name!r}: {err}") from err


def score_answer(task_name: str, answer: str | None, entry: dict[str, Any]) -> float:
    """reasoning-gym's own score (1.0 = correct) of ``answer`` for ``entry``; 0.0 for None."""
    if answer is None:
        return 0.0
    return float(_scorer(task_name)(answer, entry))
