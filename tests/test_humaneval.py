"""Tests for gsil.evaluation.humaneval (scoring, parsing, post-processing, hostile completions)."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from gsil.evaluation.humaneval import (
    HUMANEVAL_STOP,
    HumanEvalResults,
    build_program,
    build_prompts,
    evaluate_completions,
    extract_code_block,
    load_completions,
    load_problems,
    postprocess,
    truncate_completion,
)
from gsil.evaluation.options import EvalOptions

PROBLEMS = load_problems()
REPO = Path(__file__).resolve().parents[1]


def _procs_with(marker: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    out.append(int(entry))
            except OSError:
                pass
    return out


def test_problems_and_prompts() -> None:
    assert len(PROBLEMS) == 164
    prompts = build_prompts()
    assert [p["task_id"] for p in prompts] == list(PROBLEMS)
    assert prompts[0]["model_input"] == PROBLEMS["HumanEval/0"]["prompt"]
    chat = build_prompts(chat=True)[0]["model_input"]
    assert "```python\n" + PROBLEMS["HumanEval/0"]["prompt"] in chat


def test_canonical_solutions_pass_all() -> None:
    rows = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in PROBLEMS.items()]
    t0 = time.monotonic()
    res = evaluate_completions(rows, EvalOptions(humaneval_workers=2), progress=False)
    wall = time.monotonic() - t0
    print(f"\ncanonical: {res.summary()} wall={wall:.1f}s")
    failed = [
        (r["task_id"], r["status"], r["stderr_tail"][-300:]) for r in res.records if not r["passed"]
    ]
    assert failed == []
    assert res.score == 1.0 and res.n == 164 and res.n_samples == 164
    lo, hi = res.ci95()
    assert 0.97 < lo < 1.0 and hi == pytest.approx(1.0)


def test_empty_completions_pass_none() -> None:
    rows = [{"task_id": t, "completion": ""} for t in PROBLEMS]
    t0 = time.monotonic()
    res = evaluate_completions(rows, EvalOptions(humaneval_workers=2), progress=False)
    print(f"\nempty: {res.summary()} wall={time.monotonic() - t0:.1f}s")
    assert sum(r["passed"] for r in res.records) == 0
    assert res.score == 0.0


def test_hostile_completions_are_contained(tmp_path: Path) -> None:
    marker = f"gsil-he-hostile-{uuid.uuid4().hex}"
    canary_dir = tmp_path / "canary"
    canary_dir.mkdir()
    canary = canary_dir / "keep.txt"
    canary.write_text("original")
    repo_file = REPO / f".gsil-he-canary-{uuid.uuid4().hex}"
    sleeper = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)"
    bodies = {
        "infinite_loop": "    while True:\n        pass\n",
        "sleep_ignoring_sigterm": (
            "    import os, signal, sys\n"
            "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            f"    os.execv(sys.executable, [sys.executable, '-c', {sleeper!r}, {marker!r}])\n"
        ),
        "fork_bomb": "    import os\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n",
        "daemon": (
            "    import os, sys\n"
            "    if os.fork() == 0:\n"
            "        os.setsid()\n"
            "        if os.fork() == 0:\n"
            f"            os.execv(sys.executable, [sys.executable, '-c', {sleeper!r}, {marker!r}])\n"
            "        os._exit(0)\n"
            "    return None\n"
        ),
        "huge_alloc": "    x = bytearray(64 * 1024**3)\n    return x\n",
        "write_outside": (
            f"    open({str(canary_dir / 'new.txt')!r}, 'w').write('pwned')\n"
            f"    open({str(repo_file)!r}, 'w').write('pwned')\n"
        ),
        "delete_outside": f"    import os\n    os.remove({str(canary)!r})\n",
        "os_exit_in_function": "    import os\n    os._exit(0)\n",
        "sys_exit_in_function": "    import sys\n    sys.exit(0)\n",
        "sys_exit_top_level": "    pass\n\nimport sys\nsys.exit(0)\n",
        "os_exit_top_level": "    pass\n\nimport os\nos._exit(0)\n",
        "stdout_flood": "    import sys\n    while True:\n        sys.stdout.write('A' * 65536)\n",
    }
    rows = [{"task_id": "HumanEval/0", "completion": b} for b in bodies.values()]
    t0 = time.monotonic()
    options = EvalOptions(humaneval_timeout_s=3.0, humaneval_workers=2)
    res = evaluate_completions(rows, options, progress=False)
    wall = time.monotonic() - t0
    statuses = {name: r["status"] for name, r in zip(bodies, res.records, strict=True)}
    print(f"\nhostile statuses ({wall:.1f}s): {statuses}")
    try:
        assert all(not r["passed"] for r in res.records), statuses
        assert res.score == 0.0
        assert statuses["infinite_loop"] == "timeout"
        assert statuses["sleep_ignoring_sigterm"] == "timeout"
        assert statuses["fork_bomb"] in ("process_limit", "timeout")
        assert statuses["os_exit_in_function"] == "early_exit"
        assert statuses["sys_exit_top_level"] == "early_exit"
        assert statuses["stdout_flood"] in ("output_limit", "timeout")
        assert wall < 60
        assert canary.read_text() == "original"
        assert sorted(p.name for p in canary_dir.iterdir()) == ["keep.txt"]
        assert not repo_file.exists()
        time.sleep(0.2)
        assert _procs_with(marker) == []
    finally:
        repo_file.unlink(missing_ok=True)
        for pid in _procs_with(marker):
            os.kill(pid, signal.SIGKILL)


def test_wrong_completion_fails_and_right_one_passes() -> None:
    rows = [
        {"task_id": "HumanEval/2", "completion": "    return number % 1.0\n"},
        {"task_id": "HumanEval/2", "completion": "    return 0.5\n"},
    ]
    res = evaluate_completions(rows, progress=False)
    assert [r["passed"] for r in res.records] == [True, False]
    assert [r["status"] for r in res.records] == ["passed", "failed"]


def test_pass_at_k_uses_unbiased_estimator() -> None:
    good = {"HumanEval/2": "    return number % 1.0\n", "HumanEval/23": "    return len(string)\n"}
    rows = []
    # task 2: 2 of 4 samples correct; task 23: 1 of 4 correct
    for tid, n_good in (("HumanEval/2", 2), ("HumanEval/23", 1)):
        rows += [{"task_id": tid, "completion": good[tid]}] * n_good
        rows += [{"task_id": tid, "completion": "    return None\n"}] * (4 - n_good)
    res = evaluate_completions(rows, k=(1, 2, 5), progress=False)
    assert res.n == 2 and res.n_samples == 8
    assert res.pass_at_k["pass@1"] == pytest.approx(np.mean([2 / 4, 1 / 4]))
    # pass@2 = 1 - C(n-c, 2) / C(n, 2)
    assert res.pass_at_k["pass@2"] == pytest.approx(np.mean([1 - 1 / 6, 1 - 3 / 6]))
    assert "pass@5" not in res.pass_at_k  # fewer than 5 samples per task


def test_unknown_task_rejected() -> None:
    with pytest.raises(ValueError, match="HumanEval/999"):
        evaluate_completions([{"task_id": "HumanEval/999", "completion": ""}], progress=False)


def test_ci95_is_the_wilson_interval_of_the_tasks_passed() -> None:
    results = HumanEvalResults(records=[], pass_at_k={"pass@1": 0.5}, n_tasks=100, n_samples=100)
    ref = binomtest(50, 100).proportion_ci(0.95, method="wilson")
    assert results.ci95() == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_load_completions(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps({"task_id": "HumanEval/0", "completion": "    pass\n", "extra": 1})
        + "\n\n"
        + json.dumps({"task_id": "HumanEval/1", "completion": ""})
        + "\n"
    )
    rows = load_completions(good)
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    assert rows[0]["extra"] == 1

    cases = {
        "{not json": "line 2: invalid JSON",
        json.dumps(["a"]): "line 2: expected a JSON object",
        json.dumps({"task_id": "HumanEval/0"}): "line 2: missing key 'completion'",
        json.dumps(
            {"task_id": "HumanEval/0", "completion": 3}
        ): "line 2: 'completion' must be a string",
        json.dumps(
            {"task_id": "HumanEval/9999", "completion": ""}
        ): "line 2: unknown task_id 'HumanEval/9999'",
    }
    first = json.dumps({"task_id": "HumanEval/0", "completion": ""})
    for bad, msg in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(first + "\n" + bad + "\n")
        with pytest.raises(ValueError, match=msg):
            load_completions(path)


def test_truncate_completion() -> None:
    text = "    return x + 1\n\n\ndef other():\n    pass\n"
    assert truncate_completion(text) == "    return x + 1"
    for stop in HUMANEVAL_STOP:
        assert truncate_completion("    return 1" + stop + "junk") == "    return 1"
    assert truncate_completion("    return 1\n") == "    return 1"
    # indented defs / comments inside the function are kept
    inner = "    def helper(y):\n        # comment\n        return y\n    return helper(1)"
    assert truncate_completion(inner) == inner


def test_postprocess_base_model_continuation() -> None:
    prompt = PROBLEMS["HumanEval/2"]["prompt"]
    assert postprocess(prompt, "    return number % 1.0\n\nprint(truncate_number(3.5))") == (
        "    return number % 1.0"
    )
    assert postprocess(prompt, prompt + "    return number % 1.0\n# test\n") == (
        "    return number % 1.0"
    )


def _run_one(task_id: str, completion: str) -> bool:
    res = evaluate_completions([{"task_id": task_id, "completion": completion}], progress=False)
    return res.records[0]["passed"]


def test_postprocess_chat_fenced_full_function_passes() -> None:
    prob = PROBLEMS["HumanEval/0"]
    raw = (
        "Sure! Here is the implementation:\n\n```python\n"
        "from typing import List\nimport itertools\n\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        '    """Check closeness.\n\n    >>> has_close_elements([1.0], 0.5)\n    False\n    """\n'
        "    return any(_dist(a, b) < threshold for a, b in itertools.combinations(numbers, 2))\n\n\n"
        "def _dist(a, b):\n    return abs(a - b)\n\n\n"
        "if __name__ == '__main__':\n    print(has_close_elements([1.0, 2.0], 0.5))\n"
        "```\nThis works because ..."
    )
    completion = postprocess(prob["prompt"], raw)
    assert "def has_close_elements" not in completion  # repeated signature stripped
    assert "Check closeness" not in completion  # repeated docstring stripped
    assert "__main__" not in completion
    assert completion.startswith("    return any(")
    assert "def _dist" in completion and "import itertools" in completion
    compile(build_program(prob, completion), "<test>", "exec")
    assert _run_one("HumanEval/0", completion)


def test_postprocess_chat_body_only_block() -> None:
    prob = PROBLEMS["HumanEval/2"]
    raw = "```python\nreturn number % 1.0\n```"
    completion = postprocess(prob["prompt"], raw)
    assert completion == "    return number % 1.0"
    assert _run_one("HumanEval/2", completion)


def test_extract_code_block() -> None:
    text = "a\n```text\nnope\n```\n```python\ndef f():\n    return 1\n```\n"
    assert extract_code_block(text) == "def f():\n    return 1\n"
    assert extract_code_block("no fences here") is None
    assert extract_code_block("```python\ndef g(): pass") == "def g(): pass"  # unterminated
    two = "```python\nx = 1\n```\n```python\ndef target(a):\n    return a\n```"
    assert extract_code_block(two, "target").startswith("def target")


def test_build_program_convention() -> None:
    prob = PROBLEMS["HumanEval/0"]
    prog = build_program(prob, "BODY")
    assert prog == prob["prompt"] + "BODY\n" + prob["test"] + "\ncheck(has_close_elements)"
    assert textwrap.dedent(prob["test"]) in prog
