"""The round loop end to end on a tiny random model (seconds)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import Interrupt, interrupting, tiny_demos

from gsil.estimators import get_estimator
from gsil.generation import GenerationSettings
from gsil.layout import RunLayout
from gsil.methods import get_method
from gsil.trainer import OptimSettings, RoundsSettings, run_rounds

GENERATION = GenerationSettings(max_new_tokens=6, do_sample=False, batch_size=4)


def demos(count=8):
    return tiny_demos(count)


def optim(**overrides):
    base = dict(learning_rate=1e-2, epochs=2, batch_size=2, grad_accum=2, checkpoint_every=1)
    return OptimSettings(**{**base, **overrides})


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir, round_index):
    return load_file(str(run_dir / f"round_{round_index}" / "model" / "model.safetensors"))


def test_two_round_gsil_run_end_to_end(tiny_model, tiny_tokenizer, tmp_path):
    objective = get_method("gsil", get_estimator("logistic"), beta=0.5, shift=0.0)
    summary = run_rounds(
        tiny_model,
        tiny_tokenizer,
        demos(),
        objective,
        RoundsSettings(
            run_dir=tmp_path,
            rounds=2,
            optim=optim(),
            generation=GENERATION,
            max_prompt_length=64,
            max_length=96,
            seed=0,
        ),
    )
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    metrics = read_metrics(tmp_path)
    # 8 examples / batch 2 = 4 micro-batches = 2 steps per epoch, 2 epochs, 2 rounds
    assert [m["step"] for m in metrics] == list(range(1, 9))
    for key in [
        "loss",
        "loss/chosen",
        "loss/rejected",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "classifier_logits/chosen",
        "classifier_logits/rejected",
        "grad_norm",
        "learning_rate",
        "epoch",
    ]:
        assert all(torch.isfinite(torch.tensor(m[key])) for m in metrics), key
    # at the first step the policy is the reference, so rewards are ~0 and f = shift
    assert abs(metrics[0]["rewards/chosen"]) < 1e-4 and abs(metrics[0]["rewards/rejected"]) < 1e-4
    # training separates demonstrations from own samples
    assert metrics[-1]["rewards/margins"] > metrics[0]["rewards/margins"]
    for round_index in (0, 1):
        round_dir = tmp_path / f"round_{round_index}"
        assert (round_dir / "generated.jsonl").exists()
        assert (round_dir / "reference_logps.pt").exists()
        assert (round_dir / "model" / "config.json").exists()
    # round 1's reference is round 0's trained policy: its stored demo log-probs differ
    ref0 = torch.load(tmp_path / "round_0" / "reference_logps.pt")["demo"]
    ref1 = torch.load(tmp_path / "round_1" / "reference_logps.pt")["demo"]
    assert not torch.allclose(ref0, ref1)
    assert not (tmp_path / "checkpoint").exists()


def response_logps(model, tokenizer, prompt, response, *, average=False):
    """``log pi(response | prompt)`` by hand: one unpadded sequence, a full ``log_softmax``.

    Independent of :mod:`gsil.logprobs` and of the trainer's batching (its padding, its chunks);
    the token ids are the trainer's own (``build_examples``: the chat prompt, the response and
    its EOS). Summed over the response tokens, or their mean with ``average``. Keeps the graph.
    """
    from gsil.batching import build_examples
    from gsil.data import TokenLimits

    (example,) = build_examples(tokenizer, [prompt], [response], TokenLimits(64, 96))
    ids = torch.tensor([example.prompt_ids + example.demo_ids])
    logits = model(input_ids=ids).logits[0].double()
    start = len(example.prompt_ids)
    targets = ids[0, start:, None]
    total = logits[start - 1 : -1].log_softmax(-1).gather(1, targets).sum()
    return total / len(example.demo_ids) if average else total


def subset_matching(values, size, target, atol=1e-5):
    """The index sets of ``size`` values whose mean is ``target``: which examples a step saw."""
    from itertools import combinations

    return [
        set(subset)
        for subset in combinations(range(len(values)), size)
        if abs(sum(values[i] for i in subset) / size - target) < atol
    ]


@pytest.mark.parametrize("method", ["spin", "sft"])
def test_spin_and_sft_runs(method, tiny_model, tiny_tokenizer, tmp_path):
    """SPIN and SFT against by-hand log-probs of the starting policy and of the trained one.

    One round, 8 demos, micro-batch 2, accumulation 2: 2 steps per epoch, 2 epochs. The first
    step runs at the starting weights on 4 of the 8 examples, so its statistics are means of
    by-hand values over one 4-subset. SPIN (theory page, section 4): at theta = ref every margin
    is 0 and the loss softplus(0) = log 2; its reference log-probs are the starting policy's;
    the trained policy lowers the SPIN objective ``mean softplus(-beta (Delta_demo -
    Delta_gen))`` recomputed by hand from the saved model. SFT: the loss is the token-mean NLL,
    and it needs neither generations nor reference log-probs.
    """
    import copy
    import math

    from gsil.models import load_model

    start = copy.deepcopy(tiny_model)
    data, beta = demos(), 0.5
    objective = get_method(method, beta=beta)
    run_rounds(
        tiny_model,
        tiny_tokenizer,
        data,
        objective,
        RoundsSettings(
            run_dir=tmp_path,
            rounds=1,
            optim=optim(),
            generation=GENERATION,
            max_prompt_length=64,
            max_length=96,
        ),
    )
    metrics = read_metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    run = RunLayout(tmp_path)
    trained, _ = load_model(str(run.model(0)), dtype="float32")
    with torch.no_grad():
        start_demo = [
            float(response_logps(start, tiny_tokenizer, d.prompt, d.response)) for d in data
        ]
    if method == "sft":
        assert not run.generated(0).exists() and not run.reference_logps(0).exists()
        with torch.no_grad():
            nll = [
                -float(response_logps(start, tiny_tokenizer, d.prompt, d.response, average=True))
                for d in data
            ]
        assert subset_matching(nll, 4, metrics[0]["loss"])  # the token-mean NLL of 4 demos
        assert metrics[-1]["loss"] < metrics[0]["loss"]
        assert metrics[-1]["logps/chosen"] > metrics[0]["logps/chosen"]
        return
    rows = [json.loads(line) for line in run.generated(0).read_text().splitlines()]
    assert [row["demo_response"] for row in rows] == [d.response for d in data]
    generated = [row["generated_response"] for row in rows]
    with torch.no_grad():
        start_gen = [
            float(response_logps(start, tiny_tokenizer, d.prompt, g))
            for d, g in zip(data, generated, strict=True)
        ]
        end_demo = [
            float(response_logps(trained, tiny_tokenizer, d.prompt, d.response)) for d in data
        ]
        end_gen = [
            float(response_logps(trained, tiny_tokenizer, d.prompt, g))
            for d, g in zip(data, generated, strict=True)
        ]
    reference = torch.load(run.reference_logps(0))
    torch.testing.assert_close(reference["demo"], torch.tensor(start_demo), rtol=0, atol=1e-4)
    gen_reference = reference["gen"].reshape(-1)  # (n,) or (n, k = 1)
    torch.testing.assert_close(gen_reference, torch.tensor(start_gen), rtol=0, atol=1e-4)
    first = metrics[0]
    # the same 4 pairs explain the first step's demo and generation log-probs
    seen = subset_matching(start_demo, 4, first["logps/chosen"], atol=1e-4)
    assert any(s in subset_matching(start_gen, 4, first["logps/rejected"], atol=1e-4) for s in seen)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
    assert metrics[-1]["rewards/margins"] > first["rewards/margins"]
    margins = [
        beta * ((ed - sd) - (eg - sg))
        for ed, sd, eg, sg in zip(end_demo, start_demo, end_gen, start_gen, strict=True)
    ]
    spin_after = sum(math.log1p(math.exp(-m)) for m in margins) / len(margins)
    assert spin_after < math.log(2) - 0.05, spin_after
    assert sum(m > 0 for m in margins) >= 6, margins  # most pairs are now ranked right


@pytest.mark.parametrize("interrupt_after_calls", [3, 10])  # round 0 mid-epoch; round 1
def test_resume_after_interruption_gives_identical_weights(
    tiny_model_readonly, tiny_tokenizer, tmp_path, interrupt_after_calls
):
    import copy

    objective = get_method("gsil", get_estimator("brier"), beta=0.5, shift=0.5)
    kwargs = dict(
        rounds=2,
        optim=optim(optimizer="rmsprop", warmup_steps=1),
        generation=GENERATION,
        max_prompt_length=64,
        max_length=96,
        seed=3,
    )
    straight = tmp_path / "straight"
    run_rounds(
        copy.deepcopy(tiny_model_readonly),
        tiny_tokenizer,
        demos(),
        objective,
        RoundsSettings(run_dir=straight, **kwargs),
    )
    resumed = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        run_rounds(
            copy.deepcopy(tiny_model_readonly),
            tiny_tokenizer,
            demos(),
            interrupting(objective, interrupt_after_calls),
            RoundsSettings(run_dir=resumed, **kwargs),
        )
    assert (resumed / "checkpoint" / "trainer_state.json").exists()
    run_rounds(
        copy.deepcopy(tiny_model_readonly),
        tiny_tokenizer,
        demos(),
        objective,
        RoundsSettings(run_dir=resumed, resume=True, **kwargs),
    )
    expected, actual = final_weights(straight, 1), final_weights(resumed, 1)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)
    # metrics have one row per step, with no duplicates from the interrupted attempt
    steps = [m["step"] for m in read_metrics(resumed)]
    assert steps == list(range(1, 9))
    assert read_metrics(resumed)[-1]["loss"] == read_metrics(straight)[-1]["loss"]


def test_bf16_autocast_reference_matches_first_training_forward(
    tiny_model, tiny_tokenizer, tmp_path
):
    from accelerate import Accelerator

    objective = get_method("gsil", get_estimator("logistic"), beta=1.0)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    run_rounds(
        tiny_model,
        tiny_tokenizer,
        demos(4),
        objective,
        RoundsSettings(
            run_dir=tmp_path,
            rounds=1,
            optim=optim(epochs=1, grad_accum=1),
            generation=GENERATION,
            max_prompt_length=64,
            max_length=96,
        ),
        accelerator=accelerator,
    )
    first = read_metrics(tmp_path)[0]
    # the reference pass ran under the same autocast as the policy's first forward
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6


def test_lora_rounds_merge_adapters_into_the_next_reference(tiny_model, tiny_tokenizer, tmp_path):
    from gsil.models import apply_lora

    initial = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    policy = apply_lora(tiny_model, rank=4)
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    objective = get_method("gsil", get_estimator("logistic"), beta=0.5)
    run_rounds(
        policy,
        tiny_tokenizer,
        demos(4),
        objective,
        RoundsSettings(
            run_dir=tmp_path,
            rounds=2,
            lora_rank=4,
            optim=optim(epochs=1, grad_accum=1, learning_rate=5e-2),
            generation=GENERATION,
            max_prompt_length=64,
            max_length=96,
        ),
    )
    round0, round1 = final_weights(tmp_path, 0), final_weights(tmp_path, 1)
    assert not any("lora" in key for key in round0)  # saved merged, as a plain model
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(round0[name], initial[name])  # adapters were merged into the base
    assert not torch.equal(round1[name], round0[name])  # round 1 trained fresh adapters on it
