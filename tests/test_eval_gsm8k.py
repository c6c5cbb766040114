"""Tests for gsil.evaluation.gsm8k: answer extraction, exact match, k-shot prompts, errors."""

from __future__ import annotations

import json

import pytest

from gsil.evaluation.gsm8k import (
    build_messages,
    evaluate_gsm8k,
    exemplar_solution,
    extract_numeric_answer,
    load_gsm8k,
    numbers_match,
    score_completions,
    select_exemplars,
    summarize,
)
from gsil.evaluation.results import Decoding

TEST_ROWS = [
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
        "many clips in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
        "<<48+24=72>>72 clips altogether in April and May.\n#### 72",
    },
    {
        "question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes "
        "of babysitting. How much did she earn?",
        "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she "
        "earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
    },
    {
        "question": "A shop sold 1,200 pens on Monday and 850 on Tuesday. How many in total?",
        "answer": "1200 + 850 = <<1200+850=2050>>2050\n#### 2,050",
    },
]
TRAIN_ROWS = [
    {
        "question": f"Tom has {n} apples and eats 1. How many are left?",
        "answer": f"{n} - 1 = <<{n}-1={n - 1}>>{n - 1}\n#### {n - 1}",
    }
    for n in range(2, 12)
]


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def test_file(tmp_path):
    return _write(tmp_path / "test.jsonl", TEST_ROWS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the total is 72 clips.\n#### 72", "72"),
        ("He pays $1,234.50 in total.", "1234.5"),
        ("Step: 3 + 4 = 7\nAnswer: 18 apples.", "18"),
        ("**Answer:** $2,050", "2050"),
        ("First 5, then 6, finally 10.", "10"),
        ("#### 72\nThen some rambling about 5 cats.", "72"),
        ("The answer is -3.", "-3"),
        ("No digits here.", None),
    ],
)
def test_extract_numeric_answer(text, expected):
    assert extract_numeric_answer(text) == expected


def test_numbers_match_is_numeric_and_exact():
    assert numbers_match("72.0", "72") and numbers_match("2,050", "2050")
    assert not numbers_match("72.5", "72") and not numbers_match(None, "72")


def test_gold_solutions_score_100_and_wrong_ones_0(test_file):
    items = load_gsm8k(test_file)
    assert [item.answer for item in items] == ["72", "10", "2050"]
    gold = summarize(score_completions(items, [i.solution for i in items], progress=False), {})
    assert gold.score == 1.0 and gold.n == 3
    ours = [exemplar_solution(i.solution) for i in items]  # "Answer: N" format
    assert summarize(score_completions(items, ours, progress=False), {}).score == 1.0
    wrong = ["#### 71", "Answer: 10.5", "The total is 2049 pens."]
    result = summarize(score_completions(items, wrong, progress=False), {})
    assert result.score == 0.0 and result.interval[0] == 0.0


def test_exemplar_solution_uses_our_answer_format():
    text = exemplar_solution(TEST_ROWS[0]["answer"])
    assert "<<" not in text and "####" not in text
    assert text.endswith("\nAnswer: 72")


def test_k_shot_exemplars_are_deterministic_prior_turns(tmp_path):
    train = load_gsm8k(_write(tmp_path / "train.jsonl", TRAIN_ROWS))
    first = select_exemplars(train, 3, seed=0)
    assert first == select_exemplars(train, 3, seed=0)
    assert first != select_exemplars(train, 3, seed=1)
    excluded = select_exemplars(train, 9, seed=0, exclude_questions={train[0].question})
    assert train[0] not in excluded
    messages = build_messages("Q?", first)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3 + ["user"]
    assert messages[1]["content"].endswith(f"Answer: {first[0].answer}")
    assert messages[-1]["content"].startswith("Q?")


def test_missing_file_and_bad_rows_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl.*'question' and 'answer'"):
        load_gsm8k(str(tmp_path / "missing.jsonl"))
    bad = _write(tmp_path / "bad.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1.*####"):
        load_gsm8k(bad)


def test_local_k_shot_needs_a_train_file(test_file, tiny_model_readonly, tiny_tokenizer):
    with pytest.raises(ValueError, match="--gsm8k-train"):
        evaluate_gsm8k(tiny_model_readonly, tiny_tokenizer, source=test_file, shots=2)


def test_evaluate_gsm8k_k_shot_on_tiny_model(
    tmp_path, test_file, tiny_model_readonly, tiny_tokenizer
):
    train = _write(tmp_path / "train.jsonl", TRAIN_ROWS)
    result, records = evaluate_gsm8k(
        tiny_model_readonly,
        tiny_tokenizer,
        source=test_file,
        train_source=train,
        shots=2,
        limit=2,
        decoding=Decoding(max_new_tokens=4),
        progress=False,
    )
    assert result.n == 2 and len(records) == 2
    assert len(records[0]["prompt"]) == 5  # two exemplar pairs, then the question
    assert records[0]["prompt"][:4] == records[1]["prompt"][:4]  # the same shots for every item
    assert result.settings["shots"] == 2 and len(result.settings["exemplar_ids"]) == 2
