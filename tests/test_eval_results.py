"""Tests for gsil.evaluation.results: intervals, result files and the paired comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from gsil.evaluation.results import (
    BenchmarkResult,
    EvalDecoding,
    compare_results,
    load_records,
    mean_interval,
    paired_bootstrap_interval,
    prompt_format,
    proportion_interval,
    write_result,
)


def _write_records(path, scores, ids=None):
    ids = ids or [f"item{i}" for i in range(len(scores))]
    rows = [
        {"id": i, "prompt": "p", "completion": "c", "score": s}
        for i, s in zip(ids, scores, strict=True)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_wilson_interval_matches_the_closed_form():
    low, high = proportion_interval(5, 10)
    # Wilson for p=0.5, n=10, z=1.959964: 0.5 +- z*sqrt(0.025 + z^2/400)/(1 + z^2/10)
    z = stats.norm.ppf(0.975)
    half = z * np.sqrt(0.25 / 10 + z**2 / 400) / (1 + z**2 / 10)
    assert (low, high) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-9)
    assert proportion_interval(0, 0) == (0.0, 1.0)
    assert proportion_interval(0, 20)[0] == 0.0 and proportion_interval(20, 20)[1] == 1.0


def test_mean_interval_is_a_t_interval():
    values = [3.0, 7.0, 8.0, 5.0, 9.0]
    low, high = mean_interval(values)
    half = stats.t.ppf(0.975, 4) * np.std(values, ddof=1) / np.sqrt(5)
    assert (low, high) == pytest.approx((6.4 - half, 6.4 + half))
    assert mean_interval([4.0, 4.0, 4.0]) == (4.0, 4.0)
    assert all(np.isnan(mean_interval([4.0])))


def test_paired_bootstrap_covers_the_mean_difference():
    rng = np.random.default_rng(1)
    differences = rng.normal(0.3, 1.0, size=400)
    low, high = paired_bootstrap_interval(differences)
    assert low < differences.mean() < high
    assert 0.1 < high - low < 0.4  # about 2 * 1.96 / sqrt(400)


def test_compare_known_difference_and_mcnemar(tmp_path):
    a = [1] * 30 + [0] * 10 + [1] * 5 + [0] * 55  # a right on 35
    b = [0] * 30 + [1] * 10 + [1] * 5 + [0] * 55  # b right on 15; discordant 30 vs 10
    result = compare_results(
        _write_records(tmp_path / "a.jsonl", a), _write_records(tmp_path / "b.jsonl", b)
    )
    assert result["n"] == 100
    assert result["mean_a"] == pytest.approx(0.35) and result["mean_b"] == pytest.approx(0.15)
    assert result["difference"] == pytest.approx(0.20)
    low, high = result["interval"]
    assert 0.05 < low < 0.20 < high < 0.35
    assert result["mcnemar"]["a_only"] == 30 and result["mcnemar"]["b_only"] == 10
    assert result["mcnemar"]["p_value"] == pytest.approx(stats.binomtest(30, 40).pvalue)
    assert result["mcnemar"]["p_value"] < 0.01


def test_compare_pairs_by_id_not_by_order(tmp_path):
    a = _write_records(tmp_path / "a.jsonl", [1, 0, 0], ["x", "y", "z"])
    b = _write_records(tmp_path / "b.jsonl", [0, 0, 1], ["z", "y", "x"])  # same verdicts, reordered
    result = compare_results(a, b)
    assert result["difference"] == 0.0 and result["mcnemar"]["a_only"] == 0


def test_compare_identical_files_gives_zero(tmp_path):
    path = _write_records(tmp_path / "a.jsonl", [1, 0, 1, 1, 0])
    result = compare_results(path, path)
    assert result["difference"] == 0.0
    assert result["interval"] == [0.0, 0.0]
    assert result["mcnemar"]["p_value"] == 1.0


def test_compare_ratings_has_no_mcnemar(tmp_path):
    a = _write_records(tmp_path / "a.jsonl", [7.0, 8.0, 6.5])
    b = _write_records(tmp_path / "b.jsonl", [5.0, 8.0, 6.0])
    result = compare_results(a, b)
    assert result["difference"] == pytest.approx((2 + 0 + 0.5) / 3)
    assert "mcnemar" not in result


def test_compare_counts_correct_answers_not_partial_credit(tmp_path):
    # reasoning-gym scores some near answers 0.5; the headline accuracy counts `correct`
    # answers only, so the paired test does too (and McNemar's applies)
    def write(path, rows):
        path.write_text(
            "".join(
                json.dumps({"id": f"i{k}", "score": s, "correct": c}) + "\n"
                for k, (s, c) in enumerate(rows)
            )
        )
        return path

    a = write(tmp_path / "a.jsonl", [(1.0, True), (0.5, False), (0.0, False), (1.0, True)])
    b = write(tmp_path / "b.jsonl", [(1.0, True), (0.0, False), (0.5, False), (0.0, False)])
    result = compare_results(a, b)
    assert result["mean_a"] == 0.5 and result["mean_b"] == 0.25
    assert result["difference"] == 0.25
    assert result["mcnemar"]["a_only"] == 1 and result["mcnemar"]["b_only"] == 0
    assert result["differing"] == 0.25


def test_compare_mismatched_items_raise(tmp_path):
    a = _write_records(tmp_path / "a.jsonl", [1, 0, 1], ["q1", "q2", "q3"])
    b = _write_records(tmp_path / "b.jsonl", [1, 0, 1], ["q1", "q2", "q4"])
    with pytest.raises(ValueError, match=r"different items.*q3.*q4"):
        compare_results(a, b)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        compare_results(a, tmp_path / "nope.json")


def test_compare_unscored_records_raise(tmp_path):
    a = _write_records(tmp_path / "a.jsonl", [None, None])
    with pytest.raises(ValueError, match="no score"):
        compare_results(a, a)


def test_write_result_and_compare_through_result_json(tmp_path):
    records = [
        {"id": f"i{k}", "prompt": "p", "completion": "c", "score": float(k % 2)} for k in range(6)
    ]
    result = BenchmarkResult("toy", "accuracy", 0.5, 6, [0.2, 0.8], "wilson")
    path = write_result(result, records, tmp_path / "eval")
    saved = json.loads(path.read_text())
    assert saved["records_path"] == "toy.records.jsonl" and saved["score"] == 0.5
    assert load_records(path) == records
    assert not list((tmp_path / "eval").glob(".*tmp"))  # no temp files left behind
    assert compare_results(path, path)["n"] == 6


def test_prompt_format_hashes_the_template(tiny_tokenizer):
    first = prompt_format(tiny_tokenizer)
    assert first["chat_template"] == tiny_tokenizer.chat_template
    other = type("Tok", (), {"chat_template": tiny_tokenizer.chat_template + " "})()
    assert prompt_format(other)["chat_template_sha256"] != first["chat_template_sha256"]


def test_decoding_settings_hide_sampling_knobs_when_greedy():
    greedy = EvalDecoding(max_new_tokens=5, batch_size=2, temperature=0.7, top_k=3)
    assert greedy.to_settings() == {
        "max_new_tokens": 5,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "seed": None,
        "max_prompt_length": None,
    }
    sampled = EvalDecoding(max_new_tokens=5, batch_size=2, do_sample=True, temperature=0.7, seed=3)
    assert sampled.to_settings() == {
        "max_new_tokens": 5,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 1.0,
        "seed": 3,
        "max_prompt_length": None,
    }
    assert EvalDecoding(**{**vars(sampled), "top_k": 4}).to_settings()["top_k"] == 4
