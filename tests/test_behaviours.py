"""Behaviours of a round that had no test: --drop-ties, --average-logps, gradient checkpointing,
LoRA with resume, sampled generation inside rounds, a partial last step; and the implicit
classifier's separation on a trained run.

Every expected value is computed apart from the code under test: log-probs by hand (one
unpadded sequence, a full ``log_softmax``, :func:`test_trainer.response_logps`), losses from the
theory page's formulas, step counts by hand. All on the tiny random Llama (seconds each).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from test_trainer import response_logps
from tiny import Interrupt, interrupting, tiny_demos

from gsil.batching import GeneratedResponses, build_examples
from gsil.data import Demonstration, TokenLimits, encode_prompt
from gsil.estimators import get_estimator
from gsil.generation import GenerationSettings
from gsil.layout import RunLayout
from gsil.methods import get_method
from gsil.optimization import (
    OptimSettings,
    RoundData,
    RoundPlace,
    reference_logps,
    train_round,
)
from gsil.trainer import RoundsSettings, SelfImitation, run_rounds

GREEDY = GenerationSettings(max_new_tokens=6, do_sample=False, batch_size=4, backend="hf")
LENGTHS = dict(max_prompt_length=64, max_length=96)


def read_metrics(run_dir):
    return [json.loads(line) for line in RunLayout(run_dir).metrics.read_text().splitlines()]


def read_generated(run_dir, round_index=0):
    path = RunLayout(run_dir).generated(round_index)
    return [json.loads(line)["generated_response"] for line in path.read_text().splitlines()]


def prepare(model, tokenizer, demos, run_dir, *, drop_ties, generation=GREEDY, seed=0):
    """One round's generation and reference pass (no training), as ``run_rounds`` runs it."""
    objective = get_method("gsil", get_estimator("logistic"), beta=0.5)
    settings = RoundsSettings(
        run_dir=run_dir,
        generation=generation,
        seed=seed,
        optim=OptimSettings(batch_size=4),
        drop_ties=drop_ties,
        **LENGTHS,
    )
    recipe = SelfImitation(tokenizer, demos, objective, settings, Accelerator(cpu=True))
    return recipe.prepare(model, 0)


def by_hand(model, tokenizer, prompt, response, average=False) -> float:
    with torch.no_grad():
        return float(response_logps(model, tokenizer, prompt, response, average=average))


# --------------------------------------------------------------------------- drop_ties


def test_drop_ties_drops_exactly_the_tied_pairs(tiny_model_readonly, tiny_tokenizer, tmp_path):
    """Demonstrations 1, 4 and 6 are made equal to the policy's greedy answer (learnt from a
    first pass): 3 ties are counted, and with --drop-ties exactly those three pairs leave the
    round (the other five, in order, with their own reference log-probs); without it all eight
    stay. Through run_rounds, 5 pairs at micro-batch 2 make 3 steps (2 + 2 + 1)."""
    model, tok = tiny_model_readonly, tiny_tokenizer
    demos = tiny_demos(8)
    prepare(model, tok, demos, tmp_path / "probe", drop_ties=False)
    greedy = read_generated(tmp_path / "probe")
    tied = {1, 4, 6}
    assert all(greedy[i].strip() != demos[i].response for i in range(8))  # no tie by chance
    mixed = [
        Demonstration(prompt=d.prompt, response=greedy[i] if i in tied else d.response, id=d.id)
        for i, d in enumerate(demos)
    ]
    kept = [d for i, d in enumerate(mixed) if i not in tied]

    data, info = prepare(model, tok, mixed, tmp_path / "dropped", drop_ties=True)
    assert read_generated(tmp_path / "dropped") == greedy  # the same answers, so the same ties
    assert (info["ties"], info["num_trained"]) == (3, 5)
    assert [ex.prompt_ids for ex in data.examples] == [
        tuple(encode_prompt(tok, d.prompt, 64)) for d in kept
    ]
    expected = [by_hand(model, tok, d.prompt, d.response) for d in kept]
    torch.testing.assert_close(data.ref_demo_logps, torch.tensor(expected), rtol=0, atol=1e-4)
    assert data.ref_gen_logps.numel() == 5

    data, info = prepare(model, tok, mixed, tmp_path / "kept", drop_ties=False)
    assert (info["ties"], info["num_trained"], len(data.examples)) == (3, 8, 8)

    objective = get_method("gsil", get_estimator("logistic"), beta=0.5)
    summary = run_rounds(
        copy.deepcopy(model),
        tok,
        mixed,
        objective,
        RoundsSettings(
            run_dir=tmp_path / "run",
            rounds=1,
            drop_ties=True,
            optim=OptimSettings(learning_rate=1e-3, batch_size=2, checkpoint_every=0),
            generation=GREEDY,
            **LENGTHS,
        ),
    )
    assert (summary["rounds"][0]["ties"], summary["rounds"][0]["num_trained"]) == (3, 5)
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_drop_ties_with_every_pair_tied_is_refused(tiny_model_readonly, tiny_tokenizer, tmp_path):
    """Every demonstration equal to its greedy answer: counted as 4 ties without --drop-ties;
    with it, nothing is left to contrast, and the error says so and names both ways out."""
    model, tok = tiny_model_readonly, tiny_tokenizer
    demos = tiny_demos(4)
    prepare(model, tok, demos, tmp_path / "probe", drop_ties=False)
    greedy = read_generated(tmp_path / "probe")
    all_tied = [
        Demonstration(prompt=d.prompt, response=g, id=d.id)
        for d, g in zip(demos, greedy, strict=True)
    ]
    _, info = prepare(model, tok, all_tied, tmp_path / "counted", drop_ties=False)
    assert (info["ties"], info["num_trained"]) == (4, 4)
    with pytest.raises(RuntimeError) as raised:
        prepare(model, tok, all_tied, tmp_path / "dropped", drop_ties=True)
    message = str(raised.value)
    assert "every generated response equals its demonstration" in message
    assert "without --drop-ties" in message and "sampled generation" in message


# --------------------------------------------------------------------------- average_logps

GENERATED = ["no", "maybe so", "1 2 3 4 5 6 7 8", "x"]  # lengths 2 to 15 tokens with the EOS


def tiny_round(tok, count=4, generated=GENERATED):
    demos = tiny_demos(count)
    examples = build_examples(
        tok,
        [d.prompt for d in demos],
        [d.response for d in demos],
        TokenLimits(**LENGTHS),
        generated=GeneratedResponses(generated[:count], num_samples=1),
    )
    return demos, examples


def one_round(model, tok, data, objective, settings, run_dir):
    """train_round on its own; returns the metrics rows and the trained model."""
    run_dir.mkdir(parents=True, exist_ok=True)
    place = RoundPlace(RunLayout(run_dir), round_index=0, seed=0)
    _, trained = train_round(model, data, objective, settings, place, Accelerator(cpu=True))
    return read_metrics(run_dir), trained


def test_average_logps_trains_on_length_averaged_log_probs(tiny_model, tiny_tokenizer, tmp_path):
    """With --average-logps the reference pass stores, and the loss uses, the mean log-prob per
    response token. Reference log-probs set to 0 make the GSIL logit
    ``f = beta * mean log pi + shift`` at the starting weights, so one step over the 4 examples
    has the loss (theory page, section 3, logistic) ``mean_i softplus(-f_demo_i) +
    softplus(f_gen_i)``, computed here by hand; the summed log-probs would give another value."""
    tok, beta, shift = tiny_tokenizer, 0.5, 0.3
    demos, examples = tiny_round(tok)
    demo_avg = [by_hand(tiny_model, tok, d.prompt, d.response, average=True) for d in demos]
    gen_avg = [
        by_hand(tiny_model, tok, d.prompt, g, average=True)
        for d, g in zip(demos, GENERATED, strict=True)
    ]
    demo_sum = [by_hand(tiny_model, tok, d.prompt, d.response) for d in demos]

    accelerator = Accelerator(cpu=True)
    ref_demo, ref_gen = reference_logps(
        tiny_model,
        examples,
        OptimSettings(batch_size=2, average_logps=True),
        pad_id=tok.pad_token_id,
        accelerator=accelerator,
        with_generations=True,
    )
    torch.testing.assert_close(ref_demo, torch.tensor(demo_avg), rtol=0, atol=1e-5)
    torch.testing.assert_close(ref_gen.reshape(-1), torch.tensor(gen_avg), rtol=0, atol=1e-5)

    data = RoundData(
        examples, torch.zeros_like(ref_demo), torch.zeros_like(ref_gen), pad_id=tok.pad_token_id
    )
    objective = get_method("gsil", get_estimator("logistic"), beta=beta, shift=shift)
    settings = OptimSettings(
        learning_rate=1e-3, batch_size=4, average_logps=True, checkpoint_every=0
    )
    (row,), _ = one_round(tiny_model, tok, data, objective, settings, tmp_path)

    def softplus(x):
        return math.log1p(math.exp(-abs(x))) + max(x, 0.0)

    def gsil(demo, gen):
        return sum(
            softplus(-(beta * d + shift)) + softplus(beta * g + shift)
            for d, g in zip(demo, gen, strict=True)
        ) / len(demo)

    assert row["loss"] == pytest.approx(gsil(demo_avg, gen_avg), abs=1e-5)
    assert row["logps/chosen"] == pytest.approx(sum(demo_avg) / 4, abs=1e-5)
    assert row["logps/rejected"] == pytest.approx(sum(gen_avg) / 4, abs=1e-5)
    assert abs(gsil(demo_sum, gen_avg) - row["loss"]) > 0.1  # the check tells the two apart


def test_average_logps_leaves_the_sft_loss_a_token_mean(tiny_model, tiny_tokenizer, tmp_path):
    """SFT's loss is the token-mean NLL either way: with --average-logps it must not be divided
    by the length a second time. One step over 4 demonstrations at the starting weights."""
    tok = tiny_tokenizer
    demos, examples = tiny_round(tok)
    nll = [-by_hand(tiny_model, tok, d.prompt, d.response, average=True) for d in demos]
    data = RoundData(examples, None, None, pad_id=tok.pad_token_id)
    objective = get_method("sft")
    for average in (False, True):
        settings = OptimSettings(
            learning_rate=0.0, batch_size=4, average_logps=average, checkpoint_every=0
        )
        (row,), _ = one_round(tiny_model, tok, data, objective, settings, tmp_path / str(average))
        assert row["loss"] == pytest.approx(sum(nll) / 4, abs=1e-5), average


# --------------------------------------------------------------------------- checkpointing


def test_gradient_checkpointing_gives_the_same_steps(tiny_model_readonly, tiny_tokenizer, tmp_path):
    """Four GSIL steps without gradient checkpointing, with it on every decoder layer and on
    every second one: the same losses and gradient norms (1e-5) and the same final weights
    (1e-6). Checkpointing really ran where asked: a checkpointed layer's attention ran twice per
    micro-batch (the forward, then its recomputation in the backward), another once; and it is
    off again after the round."""
    tok = tiny_tokenizer
    _, examples = tiny_round(tok)
    zeros = torch.zeros(len(examples))  # reference 0: a logit far from the shift, real gradients
    data = RoundData(examples, zeros, zeros.clone(), pad_id=tok.pad_token_id)
    objective = get_method("gsil", get_estimator("logistic"), beta=0.1)
    assert len(tiny_model_readonly.model.layers) == 2
    micro_batches = 4
    # layers checkpointed -> runs of layers 0 and 1's attention
    expected_calls = {0: (1, 1), 1: (2, 2), 2: (2, 1)}
    results = {}
    for every in expected_calls:
        model = copy.deepcopy(tiny_model_readonly)
        calls = {0: [], 1: []}
        # a pre-hook inside the layer: the recomputation runs it again (transformers checkpoints
        # the layer's forward, not its __call__, and torch stops recomputing early, before
        # the end of the layer, so neither the layer's hooks nor a post-hook would see it)
        for index, calls_of_layer in calls.items():
            attention = model.model.layers[index].self_attn
            attention.register_forward_pre_hook(lambda *a, c=calls_of_layer: c.append(1))
        settings = OptimSettings(
            learning_rate=1e-2,
            batch_size=2,
            epochs=2,
            checkpoint_every=0,
            gradient_checkpointing=every > 0,
            checkpoint_layers_every=max(every, 1),
        )
        rows, trained = one_round(model, tok, data, objective, settings, tmp_path / f"{every}")
        results[every] = (
            rows,
            {k: v.detach().clone() for k, v in trained.state_dict().items()},
        )
        runs = tuple(len(calls[index]) // micro_batches for index in (0, 1))
        assert runs == expected_calls[every], every
        assert not trained.is_activation_checkpointing
    plain_rows, plain = results[0]
    assert len(plain_rows) == 4
    assert any(not torch.equal(plain[k], tiny_model_readonly.state_dict()[k]) for k in plain)
    for every in (1, 2):
        ckpt_rows, ckpt = results[every]
        assert len(ckpt_rows) == 4
        for plain_row, ckpt_row in zip(plain_rows, ckpt_rows, strict=True):
            for key in ("loss", "grad_norm", "rewards/margins"):
                assert ckpt_row[key] == pytest.approx(plain_row[key], abs=1e-5), key
        for name in plain:
            torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- LoRA and resume


def lora_policy(base):
    from gsil.models import apply_lora

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)  # the same adapter initialisation in every attempt
        return apply_lora(copy.deepcopy(base), rank=4)


@pytest.mark.parametrize(
    "interrupt_after_calls",
    [
        3,
        4,  # at the start of round 1 (the adapters are made there from the seed alone)
        6,
    ],
)
def test_lora_run_resumed_equals_the_uninterrupted_one(
    tiny_model_readonly, tiny_tokenizer, tmp_path, interrupt_after_calls
):
    """A 2-round LoRA GSIL run (a round: 8 demos, micro-batch 2, accumulation 2, so 2 steps of
    2 objective calls), interrupted in round 0 after its first checkpoint (after 3 calls), at
    the very start of round 1 before any checkpoint of it (4), or in round 1 after its first
    checkpoint (6), then resumed: the same final merged weights, bit for bit, and one metrics
    row per step."""
    objective = get_method("gsil", get_estimator("logistic"), beta=0.5)
    kwargs = dict(
        rounds=2,
        lora_rank=4,
        generation=GREEDY,
        seed=3,
        **LENGTHS,
        optim=OptimSettings(
            learning_rate=5e-2, epochs=1, batch_size=2, grad_accum=2, checkpoint_every=1
        ),
    )
    demos = tiny_demos(8)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_rounds(
        lora_policy(tiny_model_readonly),
        tiny_tokenizer,
        demos,
        objective,
        RoundsSettings(run_dir=straight, **kwargs),
    )
    with pytest.raises(Interrupt):
        run_rounds(
            lora_policy(tiny_model_readonly),
            tiny_tokenizer,
            demos,
            interrupting(objective, interrupt_after_calls),
            RoundsSettings(run_dir=resumed, **kwargs),
        )
    run_rounds(
        lora_policy(tiny_model_readonly),
        tiny_tokenizer,
        demos,
        objective,
        RoundsSettings(run_dir=resumed, resume=True, **kwargs),
    )
    expected = load_file(str(RunLayout(straight).model(1) / "model.safetensors"))
    actual = load_file(str(RunLayout(resumed).model(1) / "model.safetensors"))
    assert expected.keys() == actual.keys() and not any("lora" in key for key in actual)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)
    assert [m["step"] for m in read_metrics(resumed)] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- sampled generation


def test_sampled_generation_in_rounds_is_seeded(tiny_model_readonly, tiny_tokenizer, tmp_path):
    """Two rounds with do_sample: the same seed gives the same sets in both rounds, another
    seed or greedy decoding other sets; the sidecar records the sampling and round t's seed
    (seed + t)."""
    sampled = GenerationSettings(
        max_new_tokens=6, do_sample=True, temperature=1.0, batch_size=4, backend="hf"
    )
    objective = get_method("gsil", get_estimator("logistic"), beta=0.5)
    optim = OptimSettings(learning_rate=1e-2, batch_size=8, checkpoint_every=0)

    def run(name, seed, generation=sampled):
        run_rounds(
            copy.deepcopy(tiny_model_readonly),
            tiny_tokenizer,
            tiny_demos(8),
            objective,
            RoundsSettings(
                run_dir=tmp_path / name,
                rounds=2,
                optim=optim,
                generation=generation,
                seed=seed,
                **LENGTHS,
            ),
        )
        return [read_generated(tmp_path / name, t) for t in (0, 1)]

    first, again, other, greedy = run("a", 5), run("b", 5), run("c", 6), run("g", 5, GREEDY)
    assert first == again
    for t in (0, 1):
        assert sum(x != y for x, y in zip(first[t], other[t], strict=True)) >= 4, t
        assert sum(x != y for x, y in zip(first[t], greedy[t], strict=True)) >= 4, t
        sidecar = json.loads(RunLayout(tmp_path / "a").generated_settings(t).read_text())
        settings = sidecar["settings"]
        assert settings["do_sample"] is True and settings["seed"] == 5 + t
        assert settings["temperature"] == 1.0


# --------------------------------------------------------------------------- partial last step


def test_partial_last_step_averages_over_its_real_examples(tiny_model, tiny_tokenizer, tmp_path):
    """5 demonstrations, micro-batch 2, accumulation 2: each epoch is a step of 4 examples and
    a last step of 1 (its second micro-batch a zero-weight filler), so 2 epochs make 4 steps.
    At learning rate 0 the weights stay the starting ones, so by hand: the last step's loss is
    ONE example's token-mean NLL (not halved by the filler), 4 x loss_1 + loss_2 is the sum of
    all five, its token count is that example's, and its gradient norm is the norm of that
    example's gradient alone."""
    tok = tiny_tokenizer
    demos = tiny_demos(5)
    start = copy.deepcopy(tiny_model)
    run_rounds(
        tiny_model,
        tok,
        demos,
        get_method("sft"),
        RoundsSettings(
            run_dir=tmp_path,
            rounds=1,
            **LENGTHS,
            optim=OptimSettings(
                learning_rate=0.0, batch_size=2, grad_accum=2, epochs=2, checkpoint_every=0
            ),
        ),
    )
    rows = read_metrics(tmp_path)
    assert [(m["step"], m["epoch"]) for m in rows] == [(1, 0.5), (2, 1.0), (3, 1.5), (4, 2.0)]
    nll = [-by_hand(start, tok, d.prompt, d.response, average=True) for d in demos]
    for full, last in (rows[0], rows[1]), (rows[2], rows[3]):
        assert 4 * full["loss"] + last["loss"] == pytest.approx(sum(nll), abs=1e-4)
        (alone,) = [i for i, value in enumerate(nll) if abs(value - last["loss"]) < 1e-5]
        prompt, response = demos[alone].prompt, demos[alone].response
        (example,) = build_examples(tok, [prompt], [response], TokenLimits(**LENGTHS))
        assert last["tokens"] == len(example.prompt_ids) + len(example.demo_ids)
        start.zero_grad()
        (-response_logps(start, tok, prompt, response, average=True)).backward()
        grads = [p.grad.double() for p in start.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        assert last["grad_norm"] == pytest.approx(norm, rel=1e-4)


# --------------------------------------------------------------------------- implicit classifier


def test_implicit_classifier_separates_demonstrations_from_reference_samples(
    tiny_model, tiny_tokenizer, tmp_path
):
    """Two GSIL rounds at lr 1e-2 (test_run_cli's run) that separate demonstrations from the
    reference's own samples (the last step's margin is large): scored on the same prompts, the
    last round's implicit classifier must rank demonstrations above fresh samples of what it
    was trained against (round 1's reference, round 0's policy). Threshold: under no
    separation the AUC of 6 against 6 has mean 1/2 and standard deviation
    sqrt((6 + 6 + 1) / (12 * 6 * 6)) = 0.17, so 0.5 + 1.645 * 0.17 = 0.79 (one-sided 5%)."""
    from analysis.implicit import implicit_logits
    from experiments.run import main
    from gsil.models import save_model

    model_dir = save_model(tiny_model, tiny_tokenizer, tmp_path / "tiny-model")
    data = tmp_path / "demos.jsonl"
    rows = [{"question": f"double {i}", "answer": f"{2 * i}"} for i in range(6)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    main(
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
            "2",
            "--max-new-tokens",
            "6",
            "--max-prompt-length",
            "64",
            "--max-length",
            "96",
            "--output-dir",
            str(tmp_path / "runs"),
            "--name",
            "tiny",
            "--lr",
            "1e-2",
            "--gen-batch-size",
            "4",
            "--checkpoint-every",
            "0",
            "--beta",
            "0.5",
            "--rounds",
            "2",
        ]
    )
    run_dir = tmp_path / "runs" / "tiny"
    assert read_metrics(run_dir)[-1]["rewards/margins"] > 1.0  # training did separate them
    threshold = 0.5 + 1.645 * math.sqrt(13 / (12 * 36))
    assert implicit_logits(run_dir, num_items=6)["auc"] > threshold
