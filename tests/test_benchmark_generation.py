"""benchmarks/generation.py: the default run's generation read from its recipe, and the
projection of the run's whole generation from one measured set of each kind."""

from __future__ import annotations

import pytest

from benchmarks.generation import Workload, run_mix, run_workloads


def test_the_default_runs_generation_is_read_from_its_recipe(tiny_tokenizer):
    sets = run_workloads("default", tiny_tokenizer, limit=3)
    # SPIN: 3 seeds x 2 rounds; GSIL-logistic: 3 seeds x round 1 (round 0 is SPIN's)
    assert (sets["round"].sets, sets["round"].runs) == (9, 6)
    assert not sets["round"].do_sample and len(sets["round"].prompt_ids) == 3
    # DFT (k = 2 samples per prompt at temperature 0.7) and SDFT (one sample): 3 seeds x 2
    # rounds each; the workload takes its decoding from the first of them, DFT
    sampled = sets["round-sampled"]
    assert (sampled.sets, sampled.runs, sampled.temperature) == (12, 6, 0.7)
    assert sampled.do_sample and len(sampled.prompt_ids) == 2 * 3
    assert sampled.prompt_ids[0] == sampled.prompt_ids[1]
    # 6 methods x 3 seeds evaluated, 3 items per task (limit) on 2 tasks, 160 new tokens
    reasoning = sets["reasoning"]
    assert (reasoning.sets, reasoning.runs, reasoning.max_new_tokens) == (18, 0, 160)
    assert len(reasoning.prompt_ids) == 6
    assert set(sets) == {"round", "round-sampled", "reasoning"}


def row(backend: str, workload: str, tokens: int, seconds: float, start: float = 0.0) -> dict:
    return {
        "backend": backend,
        "precision": "fp32",
        "workload": workload,
        "tokens": tokens,
        "seconds": seconds,
        "start_s": start,
    }


def test_the_mix_counts_every_set_and_each_engine_start():
    sets = {
        "round": Workload([[1]], 8, False, 1.0, sets=4, runs=2),
        "reasoning": Workload([[1]], 8, False, 1.0, sets=3, runs=0),
    }
    rows = [
        row("HF generate", "round", 100, 10.0),
        row("HF generate", "reasoning", 1000, 100.0),
        row("vLLM", "round", 100, 2.0, start=30.0),
        row("vLLM", "reasoning", 1000, 20.0, start=30.0),
    ]
    mixes = {m["mix"]: m for m in run_mix(rows, sets, "fp32")}
    tokens = 4 * 100 + 3 * 1000
    hf = mixes["HF generate everywhere"]
    assert hf["minutes"] * 60 == pytest.approx(4 * 10 + 3 * 100)
    assert hf["tokens_per_s"] == pytest.approx(tokens / 340)
    # the evaluation's one engine serves every model; rounds stay with HF
    eval_only = mixes["vLLM evaluates, HF rounds"]
    assert eval_only["minutes"] * 60 == pytest.approx(4 * 10 + 3 * 20 + 30)
    assert eval_only["engine_starts"] == 1
    # every generating run starts its own engine, plus the evaluation's
    everywhere = mixes["vLLM everywhere"]
    assert everywhere["minutes"] * 60 == pytest.approx(4 * 2 + 3 * 20 + 3 * 30)
    assert everywhere["engine_starts"] == 3
    assert everywhere["vs_hf"] == pytest.approx(340 / 158)
    assert run_mix([r for r in rows if r["backend"] != "vLLM"], sets, "fp32") == []
