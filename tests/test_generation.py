"""Tests for gsil.generation on the tiny random Llama (fp32, CPU)."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

import gsil.generation as generation
import gsil.generation.core as generation_core
from gsil.data import encode_prompt
from gsil.generation import (
    Decoding,
    GenerationBackendError,
    GenerationResult,
    GenerationSettings,
    SetRequest,
    generate,
    generate_set,
    read_generated_set,
    settings_path,
)
from gsil.generation.common import make_result

# Deliberately not sorted by length, so the longest-first reordering must be undone.
PROMPTS = [
    "Hi",
    "Tell me a long story about a dragon who learns to write Python code.",
    "2+2?",
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    "Explain self-imitation learning in one sentence.",
]
FAST = Decoding(max_new_tokens=12, batch_size=8, backend="hf")


def gen(model, tokenizer, prompts, **changes) -> list[GenerationResult]:
    """``generate`` with :data:`FAST` changed by ``changes``, without a progress bar."""
    return generate(model, tokenizer, prompts, replace(FAST, **changes), progress=False)


def gen_set(model, tokenizer, demos, path, *, seed=0, extra_settings=None, **changes):
    """``generate_set`` with FAST's budget, batch and backend changed by ``changes``."""
    generation = GenerationSettings(
        **{"max_new_tokens": 12, "batch_size": 8, "backend": "hf", **changes}
    )
    request = SetRequest(generation, seed, extra_settings=extra_settings, progress=False)
    return generate_set(model, tokenizer, demos, path, request)


@dataclass
class Demo:
    id: str
    prompt: object
    response: str


def _ids(results: list[GenerationResult]) -> list[tuple[int, ...]]:
    return [result.token_ids for result in results]


def test_greedy_is_deterministic_and_reports_lengths(tiny_model_readonly, tiny_tokenizer):
    first = gen(tiny_model_readonly, tiny_tokenizer, PROMPTS)
    second = gen(tiny_model_readonly, tiny_tokenizer, PROMPTS)

    assert first == second
    assert len(first) == len(PROMPTS)
    for result in first:
        assert isinstance(result, GenerationResult)
        assert result.num_tokens == len(result.token_ids) <= 12
        assert tiny_tokenizer.eos_token_id not in result.token_ids
        assert result.text == tiny_tokenizer.decode(
            list(result.token_ids), skip_special_tokens=True
        )
        # A random model essentially never says eos within 12 tokens: it runs out of budget.
        assert result.truncated == (result.num_tokens == 12)
    assert len(set(_ids(first))) > 1, "different prompts should give different responses"


def test_batched_equals_unbatched_and_order_is_restored(tiny_model_readonly, tiny_tokenizer):
    batched = gen(tiny_model_readonly, tiny_tokenizer, PROMPTS, batch_size=5)
    one_by_one = [
        gen(tiny_model_readonly, tiny_tokenizer, [prompt], batch_size=1)[0] for prompt in PROMPTS
    ]
    # Exact token equality: left padding is masked out and positions start at each prompt's
    # first real token, so in fp32 the padded batch computes the same argmaxes.
    assert _ids(batched) == _ids(one_by_one)
    uneven = gen(tiny_model_readonly, tiny_tokenizer, PROMPTS, batch_size=2)
    assert _ids(uneven) == _ids(one_by_one)


def test_results_follow_the_callers_order(tiny_model_readonly, tiny_tokenizer):
    forward = gen(tiny_model_readonly, tiny_tokenizer, PROMPTS, batch_size=2)
    backward = gen(tiny_model_readonly, tiny_tokenizer, PROMPTS[::-1], batch_size=2)
    assert _ids(backward[::-1]) == _ids(forward)


def test_generation_stops_at_eos_inside_a_batch(tiny_model_readonly, tiny_tokenizer):
    baseline = gen(tiny_model_readonly, tiny_tokenizer, PROMPTS)
    # Declare the third token of the first response an extra end-of-sequence token: that
    # response must stop right before it, while the other rows are unaffected up to it.
    stop_token = baseline[0].token_ids[2]
    model = copy.deepcopy(tiny_model_readonly)
    model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, stop_token]

    stopped = gen(model, tiny_tokenizer, PROMPTS)

    cut = baseline[0].token_ids.index(stop_token)
    assert stopped[0].token_ids == baseline[0].token_ids[:cut]
    assert stopped[0].truncated is False
    for before, after in zip(baseline, stopped, strict=True):
        assert before.token_ids[: after.num_tokens] == after.token_ids
        assert stop_token not in after.token_ids


def test_make_result_cuts_at_eos_and_ignores_padding(tiny_tokenizer):
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    ids = tiny_tokenizer("ok", add_special_tokens=False)["input_ids"]
    finished = make_result([*ids, eos, pad, pad], tiny_tokenizer, [eos], 5)
    assert finished == GenerationResult("ok", tuple(ids), len(ids), False)
    cut_off = make_result([*ids, *ids], tiny_tokenizer, [eos], 4)
    assert cut_off.truncated and cut_off.text == "okok" and cut_off.num_tokens == 4


def test_sampling_is_reproducible_per_seed(tiny_model_readonly, tiny_tokenizer):
    settings = dict(do_sample=True, temperature=1.5, top_p=0.95)
    torch.manual_seed(123)
    global_state = torch.get_rng_state()

    first = gen(tiny_model_readonly, tiny_tokenizer, PROMPTS, seed=7, **settings)
    again = gen(tiny_model_readonly, tiny_tokenizer, PROMPTS, seed=7, **settings)
    other = gen(tiny_model_readonly, tiny_tokenizer, PROMPTS, seed=8, **settings)
    greedy = gen(tiny_model_readonly, tiny_tokenizer, PROMPTS)

    assert _ids(first) == _ids(again)
    assert _ids(first) != _ids(other)
    assert _ids(first) != _ids(greedy)
    assert torch.equal(torch.get_rng_state(), global_state), "caller's RNG state was disturbed"


def test_generation_restores_training_mode(tiny_model, tiny_tokenizer):
    tiny_model.train()
    gen(tiny_model, tiny_tokenizer, PROMPTS[:2])
    assert tiny_model.training


def test_generate_matches_data_prompt_encoding(tiny_model_readonly, tiny_tokenizer):
    """The hf backend feeds exactly encode_prompt's ids (checked by greedy-continuing them)."""
    prompt_ids = encode_prompt(tiny_tokenizer, PROMPTS[1])
    with torch.no_grad():
        output = tiny_model_readonly.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=tiny_tokenizer.pad_token_id,
            eos_token_id=tiny_tokenizer.eos_token_id,
        )
    expected = tuple(output[0, len(prompt_ids) :].tolist())
    assert gen(tiny_model_readonly, tiny_tokenizer, [PROMPTS[1]])[0].token_ids == expected


def test_generate_set_writes_rows_and_reuses_matching_file(
    tiny_model_readonly, tiny_tokenizer, tmp_path, monkeypatch
):
    demos = [Demo(f"d{i}", prompt, f"demo answer {i}") for i, prompt in enumerate(PROMPTS)]
    path = tmp_path / "round-1" / "generated.jsonl"

    responses = gen_set(tiny_model_readonly, tiny_tokenizer, demos, path)

    rows = read_generated_set(path)
    assert [row["id"] for row in rows] == [demo.id for demo in demos]
    assert [row["generated_response"] for row in rows] == responses
    expected = gen(tiny_model_readonly, tiny_tokenizer, PROMPTS)
    assert responses == [result.text for result in expected]
    assert [row["num_tokens"] for row in rows] == [result.num_tokens for result in expected]
    assert [row["truncated"] for row in rows] == [result.truncated for result in expected]
    assert rows[3]["prompt"] == PROMPTS[3] and rows[0]["demo_response"] == "demo answer 0"
    assert not any(row["tie"] for row in rows)
    assert json.loads(settings_path(path).read_text())["settings"]["max_new_tokens"] == 12
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "generated.jsonl",
        "generated.settings.json",
    ]

    # Same request: served from disk, the model is not run.
    def must_not_generate(*args, **kwargs):
        raise AssertionError("regenerated although the saved set matches")

    monkeypatch.setattr(generation_core, "generate_from_ids", must_not_generate)
    reused = gen_set(tiny_model_readonly, tiny_tokenizer, demos, path, batch_size=2)
    assert reused == responses


def test_generate_set_regenerates_when_settings_change(
    tiny_model_readonly, tiny_tokenizer, tmp_path, monkeypatch
):
    demos = [Demo(f"d{i}", prompt, "x") for i, prompt in enumerate(PROMPTS[:3])]
    path = tmp_path / "generated.jsonl"
    gen_set(tiny_model_readonly, tiny_tokenizer, demos, path)

    calls = []
    real_generate = generation_core.generate_from_ids

    def counting_generate(*args, **kwargs):
        calls.append(kwargs)
        return real_generate(*args, **kwargs)

    settings = {"max_new_tokens": 5}
    expected = [r.text for r in gen(tiny_model_readonly, tiny_tokenizer, PROMPTS[:3], **settings)]
    monkeypatch.setattr(generation_core, "generate_from_ids", counting_generate)
    shorter = gen_set(tiny_model_readonly, tiny_tokenizer, demos, path, **settings)
    assert len(calls) == 1
    assert all(row["num_tokens"] <= 5 for row in read_generated_set(path))
    assert shorter == expected

    gen_set(tiny_model_readonly, tiny_tokenizer, demos, path, **settings)
    assert len(calls) == 1, "an unchanged request must reuse the file"
    gen_set(tiny_model_readonly, tiny_tokenizer, demos, path, seed=1, do_sample=True, **settings)
    assert len(calls) == 2, "switching to sampling must regenerate"
    gen_set(
        tiny_model_readonly, tiny_tokenizer, demos[:2], path, seed=1, do_sample=True, **settings
    )
    assert len(calls) == 3, "different demonstrations must regenerate"
    gen_set(
        tiny_model_readonly,
        tiny_tokenizer,
        demos[:2],
        path,
        seed=1,
        do_sample=True,
        extra_settings={"round": 2},
        **settings,
    )
    assert len(calls) == 4, "a different policy tag must regenerate"


def test_generate_set_marks_ties_with_the_demonstration(
    tiny_model_readonly, tiny_tokenizer, tmp_path
):
    texts = [r.text for r in gen(tiny_model_readonly, tiny_tokenizer, PROMPTS[:2])]
    demos = [Demo("same", PROMPTS[0], f"  {texts[0]}\n"), Demo("different", PROMPTS[1], "no")]
    gen_set(tiny_model_readonly, tiny_tokenizer, demos, tmp_path / "g.jsonl")
    assert [row["tie"] for row in read_generated_set(tmp_path / "g.jsonl")] == [True, False]


def test_empty_prompt_list_gives_empty_result(tiny_model_readonly, tiny_tokenizer):
    assert gen(tiny_model_readonly, tiny_tokenizer, []) == []


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_without_vllm_is_a_clear_error(tiny_model_readonly, tiny_tokenizer):
    with pytest.raises(GenerationBackendError, match="needs vllm"):
        gen(tiny_model_readonly, tiny_tokenizer, PROMPTS[:1], backend="vllm")


def test_auto_backend_falls_back_to_hf_without_vllm_or_gpu():
    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        assert generation.resolve_backend("auto") == "hf"
    assert generation.resolve_backend("hf") == "hf"
    with pytest.raises(ValueError, match="unknown generation backend"):
        generation.resolve_backend("tgi")


def test_each_ranks_vllm_engine_is_shown_only_the_ranks_gpu(monkeypatch):
    """vLLM's engine process uses the first GPU it sees: on rank r it must see rank r's GPU,
    numbered as CUDA_VISIBLE_DEVICES numbers it, and this process's setting comes back after."""
    from gsil.generation.vllm_engine import _only_visible, visible_device_id

    assert visible_device_id(None, 3) == "3"
    assert visible_device_id("", 1) == "1"
    assert visible_device_id("4,6,7", 1) == "6"
    assert visible_device_id(" 4, 6 ", 0) == "4"
    assert visible_device_id("GPU-aa,GPU-bb", 1) == "GPU-bb"
    with pytest.raises(ValueError, match="not among CUDA_VISIBLE_DEVICES"):
        visible_device_id("4,6", 2)

    import os

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    with _only_visible("6"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,6"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(RuntimeError), _only_visible("1"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
        raise RuntimeError("engine start failed")
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    with _only_visible(None):  # CPU: left alone
        assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_vllm_runs_eagerly_on_cpus_unless_told_otherwise(monkeypatch):
    from gsil.generation.vllm_engine import eager_mode

    monkeypatch.delenv("GSIL_VLLM_EAGER", raising=False)
    assert eager_mode(None, on_gpu=False) is True
    assert eager_mode(None, on_gpu=True) is False
    monkeypatch.setenv("GSIL_VLLM_EAGER", "0")  # compile on a CPU (long generation)
    assert eager_mode(None, on_gpu=False) is False
    assert eager_mode(True, on_gpu=False) is True  # an explicit argument wins
    monkeypatch.setenv("GSIL_VLLM_EAGER", "1")
    assert eager_mode(None, on_gpu=True) is True
    monkeypatch.setenv("GSIL_VLLM_EAGER", "yes")
    with pytest.raises(ValueError, match="GSIL_VLLM_EAGER='yes'"):
        eager_mode(None, on_gpu=False)


# --------------------------------------------------------------------------- top-k


def test_top_k_one_samples_the_most_likely_token(tiny_model_readonly, tiny_tokenizer):
    """Sampling from the top 1 token is greedy decoding whatever the seed and temperature;
    without top-k the same sampling differs from greedy (test_sampling_is_reproducible_per_seed)."""
    settings = dict(do_sample=True, temperature=1.5, top_p=0.95)
    greedy = gen(tiny_model_readonly, tiny_tokenizer, PROMPTS)
    for seed in (7, 8):
        top1 = gen(tiny_model_readonly, tiny_tokenizer, PROMPTS, seed=seed, top_k=1, **settings)
        assert _ids(top1) == _ids(greedy)
    unrestricted = gen(tiny_model_readonly, tiny_tokenizer, PROMPTS, seed=7, **settings)
    assert _ids(unrestricted) != _ids(greedy)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        gen(tiny_model_readonly, tiny_tokenizer, PROMPTS[:1], top_k=-1, **settings)


def test_generate_set_regenerates_for_another_top_k(
    tiny_model_readonly, tiny_tokenizer, tmp_path, monkeypatch
):
    demos = [Demo(f"d{i}", prompt, "x") for i, prompt in enumerate(PROMPTS[:3])]
    path = tmp_path / "generated.jsonl"
    sampled = dict(do_sample=True, temperature=1.5, seed=3)
    gen_set(tiny_model_readonly, tiny_tokenizer, demos, path, **sampled)
    # no top-k: the sidecar has no top_k entry, as sets written before the option existed
    assert "top_k" not in json.loads(settings_path(path).read_text())["settings"]

    calls = []  # the decoding of each generation
    real_generate = generation_core.generate_from_ids

    def counting_generate(model, tokenizer, prompt_ids, decoding, **kwargs):
        calls.append(decoding)
        return real_generate(model, tokenizer, prompt_ids, decoding, **kwargs)

    monkeypatch.setattr(generation_core, "generate_from_ids", counting_generate)
    gen_set(tiny_model_readonly, tiny_tokenizer, demos, path, top_k=5, **sampled)
    assert len(calls) == 1 and calls[0].top_k == 5, "another top-k must regenerate"
    assert json.loads(settings_path(path).read_text())["settings"]["top_k"] == 5
    gen_set(tiny_model_readonly, tiny_tokenizer, demos, path, top_k=5, **sampled)
    assert len(calls) == 1, "the same top-k reuses the set"
    gen_set(tiny_model_readonly, tiny_tokenizer, demos, path, top_k=50, **sampled)
    assert len(calls) == 2
    gen_set(tiny_model_readonly, tiny_tokenizer, demos, path)
    assert len(calls) == 3, "greedy decoding regenerates"
    assert "top_k" not in json.loads(settings_path(path).read_text())["settings"]


def test_vllm_sampling_params_carry_top_k(monkeypatch, tiny_tokenizer):
    """The vLLM engine's SamplingParams (a recording stand-in for vllm's): top_k as asked when
    sampling, 0 (no top-k) when greedy."""
    import sys
    import types

    from gsil.generation.vllm_engine import VLLMEngine

    made = []
    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **kwargs: made.append(kwargs) or kwargs
    fake_inputs = types.ModuleType("vllm.inputs")
    fake_inputs.TokensPrompt = dict
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.inputs", fake_inputs)

    eos = tiny_tokenizer.eos_token_id
    completion = types.SimpleNamespace(token_ids=[eos], finish_reason="stop")
    engine = VLLMEngine.__new__(VLLMEngine)  # no engine started: only generate() is exercised
    engine.tokenizer, engine.eos_ids = tiny_tokenizer, [eos]
    engine.llm = types.SimpleNamespace(
        generate=lambda requests, sampling, use_tqdm: [
            types.SimpleNamespace(outputs=[completion]) for _ in requests
        ]
    )
    engine.generate(
        [[1, 2]],
        Decoding(max_new_tokens=8, batch_size=1, do_sample=True, temperature=0.7, top_k=50),
    )
    engine.generate([[1, 2]], Decoding(max_new_tokens=8, batch_size=1, top_k=50))
    assert [params["top_k"] for params in made] == [50, 0]
    assert made[0]["temperature"] == 0.7 and made[1]["temperature"] == 0.0


def test_top_k_setting_is_checked_and_reaches_the_round(
    tiny_model, tiny_tokenizer, tmp_path, monkeypatch
):
    from accelerate import Accelerator

    from gsil import trainer
    from gsil.data import Demonstration
    from gsil.methods import get_method
    from gsil.optimization import OptimSettings

    with pytest.raises(ValueError, match=r"top_k \(--top-k\) must be >= 0"):
        GenerationSettings(top_k=-1, do_sample=True)
    with pytest.raises(ValueError, match="top_k=50 applies to sampling: add --do-sample"):
        GenerationSettings(top_k=50)

    seen = []

    class Stop(Exception):
        pass

    def fake_generate_set(model, tokenizer, demos, path, request, accelerator=None):
        seen.append(request)
        raise Stop

    monkeypatch.setattr(trainer, "generate_set", fake_generate_set)
    settings = trainer.RoundsSettings(
        run_dir=tmp_path,
        generation=GenerationSettings(max_new_tokens=4, do_sample=True, top_k=50),
        seed=0,
        max_prompt_length=32,
        max_length=64,
        optim=OptimSettings(batch_size=1),
    )
    recipe = trainer.SelfImitation(
        tiny_tokenizer,
        [Demonstration(prompt="q", response="r", id="d0")],
        get_method("spin"),
        settings,
        Accelerator(cpu=True),
    )
    with pytest.raises(Stop):
        recipe.prepare(tiny_model, 0)
    assert seen[0].decoding.top_k == 50


# --------------------------------------------------------------------------- cached sets


FIXTURE_SETS = Path(__file__).parent / "fixtures" / "generated_sets"
FIXTURE_PROMPTS = [
    "Hi",
    "Tell me a long story about a dragon.",
    "2+2?",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
]


@pytest.mark.parametrize(
    ("name", "generation", "seed", "max_prompt_length"),
    [
        ("greedy", dict(max_new_tokens=8, batch_size=2), 5, 64),
        (
            "sampled",
            dict(
                max_new_tokens=8,
                batch_size=3,
                do_sample=True,
                temperature=0.7,
                top_p=0.9,
                top_k=20,
                num_samples=2,
            ),
            4,
            None,
        ),
    ],
)
def test_sets_cached_by_earlier_versions_are_reused(
    tiny_tokenizer, tmp_path, monkeypatch, name, generation, seed, max_prompt_length
):
    """A set and sidecar written by gsil before ``SetRequest`` (tests/fixtures/generated_sets:
    the tiny tokenizer, these demonstrations and settings) still match the same request."""
    shutil.copytree(FIXTURE_SETS / name, tmp_path / name)
    path = tmp_path / name / "generated.jsonl"

    def must_not_generate(*args, **kwargs):
        raise AssertionError("regenerated although the cached set matches")

    monkeypatch.setattr(generation_core, "generate_from_ids", must_not_generate)
    demos = [Demo(f"d{i}", prompt, f"answer {i}") for i, prompt in enumerate(FIXTURE_PROMPTS)]
    request = SetRequest(
        GenerationSettings(backend="hf", **generation),
        seed,
        max_prompt_length,
        extra_settings={"round": 1, "mixed_precision": "no"},
        progress=False,
    )
    responses = generate_set(None, tiny_tokenizer, demos, path, request)
    assert responses == [row["generated_response"] for row in read_generated_set(path)]
    assert len(responses) == len(demos) * request.generation.num_samples
