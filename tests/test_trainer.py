"""The round loop end to end on a tiny random model (seconds)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import Interrupt, interrupting, tiny_demos

from gsil.estimators import get_estimator
from gsil.generation import GenerationSettings
from gsil.objectives import make_objective
from gsil.trainer import OptimSettings, run_rounds

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
    objective = make_objective("gsil", get_estimator("logistic"), beta=0.5, shift=0.0)
    summary = run_rounds(
        tiny_model, tiny_tokenizer, demos(), objective, tmp_path, rounds=2, optim=optim(),
        generation=GENERATION, max_prompt_length=64, max_length=96, seed=0,
    )  # fmt: skip
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    metrics = read_metrics(tmp_path)
    # 8 examples / batch 2 = 4 micro-batches = 2 steps per epoch, 2 epochs, 2 rounds
    assert [m["step"] for m in metrics] == list(range(1, 9))
    for key in ["loss", "loss/chosen", "loss/rejected", "rewards/chosen", "rewards/rejected",
                "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
                "classifier_logits/chosen", "classifier_logits/rejected", "grad_norm",
                "learning_rate", "epoch"]:  # fmt: skip
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


@pytest.mark.parametrize("method", ["spin", "sft"])
def test_spin_and_sft_runs(method, tiny_model, tiny_tokenizer, tmp_path):
    objective = make_objective(method, beta=0.5)
    run_rounds(
        tiny_model, tiny_tokenizer, demos(), objective, tmp_path, rounds=1, optim=optim(),
        generation=GENERATION, max_prompt_length=64, max_length=96,
    )  # fmt: skip
    metrics = read_metrics(tmp_path)
    assert len(metrics) == 4
    assert (tmp_path / "round_0" / "generated.jsonl").exists() == (method == "spin")
    assert metrics[-1]["logps/chosen"] > metrics[0]["logps/chosen"] or method == "spin"
    if method == "sft":
        assert metrics[-1]["loss"] < metrics[0]["loss"]
    else:
        assert metrics[-1]["rewards/margins"] > metrics[0]["rewards/margins"]


@pytest.mark.parametrize("interrupt_after_calls", [3, 10])  # round 0 mid-epoch; round 1
def test_resume_after_interruption_gives_identical_weights(
    tiny_model_readonly, tiny_tokenizer, tmp_path, interrupt_after_calls
):
    import copy

    objective = make_objective("gsil", get_estimator("brier"), beta=0.5, shift=0.5)
    kwargs = dict(rounds=2, optim=optim(optimizer="rmsprop", warmup_steps=1),
                  generation=GENERATION, max_prompt_length=64, max_length=96, seed=3)  # fmt: skip
    straight = tmp_path / "straight"
    run_rounds(copy.deepcopy(tiny_model_readonly), tiny_tokenizer, demos(), objective, straight,
               **kwargs)  # fmt: skip
    resumed = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        run_rounds(copy.deepcopy(tiny_model_readonly), tiny_tokenizer, demos(),
                   interrupting(objective, interrupt_after_calls), resumed, **kwargs)  # fmt: skip
    assert (resumed / "checkpoint" / "trainer_state.json").exists()
    run_rounds(copy.deepcopy(tiny_model_readonly), tiny_tokenizer, demos(), objective, resumed,
               resume=True, **kwargs)  # fmt: skip
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

    objective = make_objective("gsil", get_estimator("logistic"), beta=1.0)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    run_rounds(
        tiny_model, tiny_tokenizer, demos(4), objective, tmp_path, rounds=1,
        optim=optim(epochs=1, grad_accum=1), generation=GENERATION, max_prompt_length=64,
        max_length=96, accelerator=accelerator,
    )  # fmt: skip
    first = read_metrics(tmp_path)[0]
    # the reference pass ran under the same autocast as the policy's first forward
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6


def test_lora_rounds_merge_adapters_into_the_next_reference(tiny_model, tiny_tokenizer, tmp_path):
    from gsil.models import apply_lora

    initial = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    policy = apply_lora(tiny_model, rank=4)
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    objective = make_objective("gsil", get_estimator("logistic"), beta=0.5)
    run_rounds(
        policy, tiny_tokenizer, demos(4), objective, tmp_path, rounds=2, lora_rank=4,
        optim=optim(epochs=1, grad_accum=1, learning_rate=5e-2), generation=GENERATION,
        max_prompt_length=64, max_length=96,
    )  # fmt: skip
    round0, round1 = final_weights(tmp_path, 0), final_weights(tmp_path, 1)
    assert not any("lora" in key for key in round0)  # saved merged, as a plain model
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(round0[name], initial[name])  # adapters were merged into the base
    assert not torch.equal(round1[name], round0[name])  # round 1 trained fresh adapters on it
