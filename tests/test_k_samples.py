"""k sampled responses per prompt: the batch layout, the generated set (HF, seeded), ties per
response, and one round of SPIN, GSIL and DFT through ``experiments.run`` with k = 2."""

import json
from dataclasses import replace

import pytest
import torch
from accelerate import Accelerator
from tiny import tiny_demos

import gsil.generation.core as generation_core
import gsil.trainer as trainer
from gsil.batching import GeneratedResponses, build_examples, collate, split_demo_gen
from gsil.data import Demonstration, TokenLimits
from gsil.generation import (
    GenerationSettings,
    SetRequest,
    generate_set,
    read_generated_set,
    settings_path,
)
from gsil.methods import get_method
from gsil.optimization import OptimSettings

SAMPLE = GenerationSettings(max_new_tokens=6, do_sample=True, batch_size=4, backend="hf")


def sampled_set(model, tokenizer, demos, path, num_samples, seed=3):
    """``generate_set`` of :data:`SAMPLE` with ``num_samples`` per prompt, seeded ``seed``."""
    generation = replace(SAMPLE, num_samples=num_samples)
    request = SetRequest(generation, seed, max_prompt_length=64, progress=False)
    return generate_set(model, tokenizer, demos, path, request)


def test_batch_layout_puts_k_blocks_of_samples_after_the_demonstrations(tiny_tokenizer):
    prompts = ["p0", "p1", "p2"]
    gens = ["a0", "b0", "a1", "b1", "a2", "b2"]  # prompt-major: response j of prompt i
    mask = [True, True, False, True, True, True]
    limits = TokenLimits(max_prompt_length=32, max_length=64)
    examples = build_examples(
        tiny_tokenizer,
        prompts,
        ["d0", "d1", "d2"],
        limits,
        generated=GeneratedResponses(gens, num_samples=2, mask=mask),
    )
    assert [len(ex.gen_ids) for ex in examples] == [2, 2, 2]
    assert examples[1].gen_mask == (False, True) and examples[0].gen_mask == (True, True)
    batch = collate(examples, tiny_tokenizer.pad_token_id, with_generations=True)
    assert batch["input_ids"].shape[0] == 3 * (1 + 2)
    # a row's value is its own position: split_demo_gen must give gen[i, j] = row n + j n + i
    demo, gen = split_demo_gen(torch.arange(9.0), 3)
    assert demo.tolist() == [0, 1, 2] and gen.tolist() == [[3, 6], [4, 7], [5, 8]]
    for i, ex in enumerate(examples):
        for j in range(2):
            row = batch["input_ids"][3 + 3 * j + i]
            assert row[: len(ex.prompt_ids) + len(ex.gen_ids[j])].tolist() == [
                *ex.prompt_ids,
                *ex.gen_ids[j],
            ]
    assert batch["gen_mask"].tolist() == [[True, True], [False, True], [True, True]]
    assert batch["gen_token_counts"].tolist() == [[len(g) for g in ex.gen_ids] for ex in examples]
    with pytest.raises(ValueError, match="3 prompts x 2 samples but 5"):
        build_examples(
            tiny_tokenizer,
            prompts,
            ["d0", "d1", "d2"],
            limits,
            generated=GeneratedResponses(gens[:5], num_samples=2),
        )


def test_k_sampled_responses_differ_repeat_with_the_seed_and_are_cached(
    tiny_model_readonly, tiny_tokenizer, tmp_path, monkeypatch
):
    demos = tiny_demos(5)
    path = tmp_path / "a" / "generated.jsonl"
    responses = sampled_set(tiny_model_readonly, tiny_tokenizer, demos, path, 2)
    rows = read_generated_set(path)
    assert len(responses) == len(rows) == 10
    assert [(row["id"], row["sample"]) for row in rows] == [
        (demo.id, j) for demo in demos for j in range(2)
    ]
    assert [row["generated_response"] for row in rows] == responses
    # each prompt's two samples differ (drawn apart), and a rerun with the seed repeats them
    for i in range(5):
        assert responses[2 * i] != responses[2 * i + 1], demos[i].prompt
    again = sampled_set(tiny_model_readonly, tiny_tokenizer, demos, tmp_path / "b.jsonl", 2)
    assert again == responses
    other_seed = sampled_set(
        tiny_model_readonly, tiny_tokenizer, demos, tmp_path / "c.jsonl", 2, seed=4
    )
    assert other_seed != responses
    assert json.loads(settings_path(path).read_text())["settings"]["num_samples"] == 2

    calls = []
    real = generation_core.generate_from_ids
    monkeypatch.setattr(
        generation_core, "generate_from_ids", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    assert sampled_set(tiny_model_readonly, tiny_tokenizer, demos, path, 2) == responses
    assert not calls, "the same request (k included) must reuse the file"
    one = sampled_set(tiny_model_readonly, tiny_tokenizer, demos, path, 1)
    assert len(calls) == 1 and len(one) == 5, "another k must regenerate"
    assert [row["sample"] for row in read_generated_set(path)] == [0] * 5


def test_more_than_one_sample_needs_sampling():
    with pytest.raises(ValueError, match="do-sample"):
        GenerationSettings(num_samples=2)
    with pytest.raises(ValueError, match=">= 1"):
        GenerationSettings(num_samples=0, do_sample=True)
    with pytest.raises(ValueError, match="do_sample"):
        replace(SAMPLE, num_samples=2, do_sample=False)


@pytest.mark.parametrize("drop_ties", [False, True])
def test_ties_are_counted_and_dropped_per_response(
    tiny_model, tiny_tokenizer, tmp_path, monkeypatch, drop_ties
):
    demos = [Demonstration(prompt=f"q{i}", response=f"r{i}", id=f"d{i}") for i in range(3)]
    # prompt 0: both samples tie; prompt 1: sample 1 ties; prompt 2: none
    fake = [" r0", "r0\n", "x", "r1", "y", "z"]
    monkeypatch.setattr(trainer, "generate_set", lambda *a, **kw: list(fake))
    generation = GenerationSettings(max_new_tokens=4, do_sample=True, num_samples=2)
    settings = trainer.RoundsSettings(
        run_dir=tmp_path,
        generation=generation,
        seed=0,
        max_prompt_length=32,
        max_length=64,
        optim=OptimSettings(batch_size=2),
        drop_ties=drop_ties,
    )
    recipe = trainer.SelfImitation(
        tiny_tokenizer, demos, get_method("spin"), settings, Accelerator(cpu=True)
    )
    data, info = recipe.prepare(tiny_model, 0)
    assert info["ties"] == 3
    assert data.ref_gen_logps.shape == (len(data.examples), 2)
    if not drop_ties:
        assert info["num_trained"] == 3 and all(ex.gen_mask is None for ex in data.examples)
        return
    assert info["num_trained"] == 2 and data.ids == ["d1", "d2"]
    assert [ex.gen_mask for ex in data.examples] == [(True, False), (True, True)]
    kept = [ex.gen_ids[0] for ex in data.examples]
    assert kept == [
        tuple(tiny_tokenizer("x")["input_ids"]) + (tiny_tokenizer.eos_token_id,),
        tuple(tiny_tokenizer("y")["input_ids"]) + (tiny_tokenizer.eos_token_id,),
    ]


# --------------------------------------------------------------------------- one round, k = 2


@pytest.fixture
def cli_inputs(tiny_model, tiny_tokenizer, tmp_path):
    """The tiny model on disk and 6 demonstrations, two of whose responses are exactly one of
    the samples round 0 will draw (seed 0): 2 ties, one response each.

    The samples are drawn here in fp32, so the run must generate in fp32 too (``--precision
    fp32``): under bf16 autocast the logits round differently and a sampled token can flip."""
    from gsil.models import save_model

    model_dir = save_model(tiny_model, tiny_tokenizer, tmp_path / "tiny-model")
    demos = [Demonstration(prompt=f"double {i}", response=f"{2 * i}", id=str(i)) for i in range(6)]
    drawn = sampled_set(tiny_model, tiny_tokenizer, demos, tmp_path / "drawn.jsonl", 2, seed=0)
    answers = [d.response for d in demos]
    answers[1], answers[4] = drawn[2 * 1 + 1], drawn[2 * 4 + 0]  # sample 1 of 1, sample 0 of 4
    assert all(answer.strip() for answer in answers)
    data = tmp_path / "demos.jsonl"
    rows = [{"question": d.prompt, "answer": a} for d, a in zip(demos, answers, strict=True)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return model_dir, data


@pytest.mark.parametrize("method", ["spin", "gsil", "dft"])
def test_one_round_with_two_samples_per_prompt(method, cli_inputs, tmp_path):
    from experiments.run import main

    model_dir, data = cli_inputs
    summary = main(
        [
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--prompt-field",
            "question",
            "--response-field",
            "answer",
            "--num-demos",
            "6",
            "--batch-size",
            "6",
            "--epochs",
            "4",
            "--max-new-tokens",
            "6",
            "--max-prompt-length",
            "64",
            "--max-length",
            "96",
            "--gen-batch-size",
            "4",
            "--output-dir",
            str(tmp_path / "runs"),
            "--name",
            method,
            "--lr",
            "1e-2",
            "--beta",
            "0.5",
            "--checkpoint-every",
            "0",
            "--method",
            method,
            "--num-samples",
            "2",
            "--do-sample",
            "--drop-ties",
            # the precision the fixture drew the planted ties in: "auto" is bf16 on a CPU with
            # AVX-512 BF16/AMX, whose samples here differ from fp32's for 4 of the seeds 0-7
            "--precision",
            "fp32",
        ]
    )
    run_dir = tmp_path / "runs" / method
    assert json.loads((run_dir / "config.json").read_text())["generation"]["num_samples"] == 2
    rows = read_generated_set(run_dir / "round_0" / "generated.jsonl")
    assert len(rows) == 12 and [row["sample"] for row in rows] == [0, 1] * 6
    ties = [(n // 2, row["sample"]) for n, row in enumerate(rows) if row["tie"]]
    assert ties == [(1, 1), (4, 0)]  # (prompt, sample): the two planted ties, nothing else
    (round_summary,) = summary["rounds"]
    assert round_summary["ties"] == 2 and round_summary["num_trained"] == 6
    reference = torch.load(run_dir / "round_0" / "reference_logps.pt")
    assert reference["gen"].shape == (6, 2)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # one step per epoch over all 6 prompts (each step sees the same examples), as with k = 1
    assert len(metrics) == 4
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    if method == "dft":  # DFT raises the demonstrations' likelihood while pushing samples down
        assert metrics[-1]["logps/chosen"] > metrics[0]["logps/chosen"]
        assert metrics[-1]["logps/rejected"] < metrics[0]["logps/rejected"]
    else:
        assert metrics[-1]["rewards/margins"] > metrics[0]["rewards/margins"]
        # a tied pair is never won (equal sequences, equal rewards): every pair is won at the
        # end only because --drop-ties left the two tied responses out of the loss
        assert metrics[-1]["rewards/accuracies"] == 1.0
