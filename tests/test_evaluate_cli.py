"""Smoke tests of ``python -m experiments.evaluate`` (in-process) and of default output paths."""

from __future__ import annotations

import json

import pytest

from experiments.evaluate import main
from gsil.evaluation.humaneval import load_problems
from gsil.evaluation.runner import (
    EvalOptions,
    EvalRequest,
    default_out_dir,
    evaluate_model,
    parse_benchmarks,
)


@pytest.fixture
def round_model_dir(tmp_path, tiny_model_readonly, tiny_tokenizer):
    """The tiny model saved where a training run puts a round's policy."""
    model_dir = tmp_path / "runs" / "toy" / "round_1" / "model"
    tiny_model_readonly.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    return model_dir


def test_default_out_dir(round_model_dir, tmp_path):
    assert default_out_dir(round_model_dir) == round_model_dir.parent / "eval"
    other = tmp_path / "plain"
    other.mkdir()
    assert default_out_dir(other) == other / "eval"
    assert str(default_out_dir("HuggingFaceTB/SmolLM2-360M")).endswith(
        "HuggingFaceTB--SmolLM2-360M"
    )


def test_cli_on_tiny_model_writes_under_the_round(round_model_dir, tmp_path, capsys):
    questions = tmp_path / "question.jsonl"
    questions.write_text(
        json.dumps({"question_id": 1, "category": "w", "turns": ["Hi", "More"]}) + "\n"
    )
    argv = [
        "--model",
        str(round_model_dir),
        "--benchmarks",
        "reasoning,mtbench",
        "--limit",
        "1",
        "--max-new-tokens",
        "4",
        "--mtbench",
        str(questions),
        "--no-progress",
    ]
    assert main(argv) == 0
    eval_dir = round_model_dir.parent / "eval"
    reasoning = json.loads((eval_dir / "reasoning.json").read_text())
    assert reasoning["n"] == 2 and reasoning["settings"]["model"] == str(round_model_dir)
    assert len((eval_dir / "reasoning.records.jsonl").read_text().splitlines()) == 2
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert set(summary) == {"reasoning", "mtbench"} and summary["mtbench"]["score"] is None
    out = capsys.readouterr().out
    assert "reasoning: accuracy" in out and "needs a judge" in out


def test_cli_scores_given_humaneval_completions(tmp_path, capsys):
    problems = load_problems()
    rows = [
        {"task_id": "HumanEval/0", "completion": problems["HumanEval/0"]["canonical_solution"]},
        {"task_id": "HumanEval/1", "completion": problems["HumanEval/1"]["canonical_solution"]},
        {"task_id": "HumanEval/2", "completion": "    return -1.0\n"},
    ]
    completions = tmp_path / "samples.jsonl"
    completions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = [
        "--benchmarks",
        "humaneval",
        "--completions",
        str(completions),
        "--limit",
        "3",
        "--no-progress",
    ]
    assert main(argv) == 0
    result = json.loads((tmp_path / "eval" / "humaneval.json").read_text())
    assert result["score"] == pytest.approx(2 / 3) and result["n"] == 3
    assert result["interval_method"] == "wilson" and result["interval"][0] < 2 / 3
    records = [json.loads(line) for line in (tmp_path / "eval" / "humaneval.records.jsonl").open()]
    assert [r["score"] for r in records] == [1.0, 1.0, 0.0]
    # A second scoring of the same items, with other outcomes: B solves only HumanEval/2
    # (A: 1, 1, 0; B: 0, 0, 1), so by hand mean(A) - mean(B) = 2/3 - 1/3 = 1/3, A alone
    # passes 2 items and B alone 1; the exact two-sided McNemar p of 2 against 1 of 3
    # discordant pairs is 2 * P(Binomial(3, 1/2) >= 2) = 2 * 4/8 = 1.
    other = [
        {"task_id": "HumanEval/0", "completion": "    return None\n"},
        {"task_id": "HumanEval/1", "completion": "    return []\n"},
        {"task_id": "HumanEval/2", "completion": problems["HumanEval/2"]["canonical_solution"]},
    ]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in other))
    argv_b = [
        "--benchmarks",
        "humaneval",
        "--completions",
        str(tmp_path / "b" / "samples.jsonl"),
        "--limit",
        "3",
        "--no-progress",
    ]
    assert main(argv_b) == 0
    records_b = (tmp_path / "b" / "eval" / "humaneval.records.jsonl").read_text().splitlines()
    assert [json.loads(line)["score"] for line in records_b] == [0.0, 0.0, 1.0]
    result_a = tmp_path / "eval" / "humaneval.json"
    result_b = tmp_path / "b" / "eval" / "humaneval.json"
    for first, second, sign in ((result_a, result_b, 1), (result_b, result_a, -1)):
        capsys.readouterr()
        assert main(["--compare", str(first), str(second)]) == 0
        comparison = json.loads(capsys.readouterr().out)
        assert comparison["n"] == 3
        assert comparison["difference"] == pytest.approx(sign / 3)
        assert (comparison["mean_a"], comparison["mean_b"]) == pytest.approx((2 / 3, 1 / 3)[::sign])
        only = (2, 1)[::sign]
        assert (comparison["mcnemar"]["a_only"], comparison["mcnemar"]["b_only"]) == only
        assert comparison["mcnemar"]["p_value"] == pytest.approx(1.0)
        low, high = comparison["interval"]
        assert -1 <= low <= sign / 3 <= high <= 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--benchmarks", "humaneval", "--completions", "gone.jsonl"],
            "gone.jsonl: no such completions file",
        ),
        (["--model", "M", "--benchmarks", "gsm8k", "--gsm8k", "gone.jsonl"], None),
        (["--benchmarks", "bogus"], "unknown benchmark"),
        (["--benchmarks", "reasoning"], "give a model"),
        (["--compare", "a.json", "b.json"], "a.json: no such result file"),
    ],
)
def test_cli_errors_name_the_problem(argv, message, tmp_path, monkeypatch, capsys, round_model_dir):
    monkeypatch.chdir(tmp_path)
    argv = [str(round_model_dir) if arg == "M" else arg for arg in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (message or "gone.jsonl: no such GSM8K file") in err


def test_evaluate_model_accepts_a_loaded_pair(tiny_model_readonly, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="out_dir is required"):
        evaluate_model(
            (tiny_model_readonly, tiny_tokenizer), "reasoning", None, EvalRequest(limit=1)
        )
    with pytest.raises(ValueError, match="unknown benchmark"):
        parse_benchmarks("reasoning,humanevil")


def test_humaneval_sampling_on_tiny_model(tiny_model_readonly, tiny_tokenizer, tmp_path):
    options = EvalOptions(humaneval_samples=2, temperature=0.7, max_new_tokens=4)
    results = evaluate_model(
        (tiny_model_readonly, tiny_tokenizer),
        "humaneval",
        tmp_path,
        EvalRequest(options, limit=2, progress=False),
    )
    result = results["humaneval"]
    assert result.n == 2 and result.breakdown["samples"] == 4 and result.score == 0.0
    assert set(result.breakdown["pass_at_k"]) == {"pass@1", "pass@2"}
    assert result.settings["decoding"]["temperature"] == 0.7
    assert result.settings["samples_per_task"] == 2
    records = [json.loads(line) for line in (tmp_path / "humaneval.records.jsonl").open()]
    assert [r["id"] for r in records] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2
