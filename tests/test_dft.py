"""Discriminative fine-tuning (DFT, DFT2; Guo et al. 2025): the loss against a by-hand
computation, against the authors' formula, against autograd, and its per-prompt state across
steps and a resumed run."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from tiny import Interrupt, interrupting, tiny_demos

from experiments import run
from experiments.config import ConfigError, from_dict, leaves
from experiments.errors import run_command
from gsil.generation import GenerationSettings
from gsil.methods import LogpBatch, build_method, get_method
from gsil.objectives import dft_loss
from gsil.trainer import OptimSettings, RoundsSettings, run_rounds

# 2 prompts x 3 samples; log-probs small enough for plain float math by hand
DEMO = [-4.0, -6.5]
GEN = [[-7.0, -5.0, -9.0], [-3.0, -8.0, -4.5]]
REF_GEN = [[-6.0, -5.5, -8.0], [-3.5, -7.0, -5.0]]
LOG_U_BEFORE = [0.3, -1.2]


def tensors(dtype=torch.float64):
    return (
        torch.tensor(DEMO, dtype=dtype, requires_grad=True),
        torch.tensor(GEN, dtype=dtype, requires_grad=True),
        torch.tensor(REF_GEN, dtype=dtype),
        torch.tensor(LOG_U_BEFORE, dtype=dtype),
    )


def by_hand(scores_demo, scores_gen, log_ratios, log_u_before, tau, gamma):
    """DFT's step for one prompt in plain floats: the normaliser's moving average, the loss
    value and the gradient of the loss with respect to each score."""
    k = len(scores_gen)
    g_hat = sum(math.exp(d) for d in log_ratios) / k  # mean importance-weighted term
    u = (1 - gamma) * math.exp(log_u_before) + gamma * g_hat
    weights = [math.exp(d) / u for d in log_ratios]
    value = -scores_demo + tau * math.log(u)
    return math.log(u), value, -1.0, [w / k for w in weights]


@pytest.mark.parametrize("tau,gamma", [(1.0, 0.85), (0.5, 0.8), (2.0, 1.0)])
def test_dft_matches_a_by_hand_computation_on_2x3(tau, gamma):
    demo, gen, ref_gen, log_u = tensors()
    losses, stats = dft_loss(demo, gen, ref_gen, log_u, tau=tau, gamma=gamma)
    losses.sum().backward()
    for i in range(2):
        ratios = [GEN[i][j] / tau - REF_GEN[i][j] for j in range(3)]
        new_log_u, value, demo_grad, gen_grads = by_hand(
            DEMO[i], GEN[i], ratios, LOG_U_BEFORE[i], tau, gamma
        )
        assert stats["dft/log_normalizer"][i].item() == pytest.approx(new_log_u, rel=1e-12)
        assert losses[i].item() == pytest.approx(value, rel=1e-12)
        assert demo.grad[i].item() == pytest.approx(demo_grad)
        assert gen.grad[i].tolist() == pytest.approx(gen_grads, rel=1e-12)
        # the discriminative logits s / tau: the demonstration outscores all 3 samples of
        # prompt 0 and only sample 1 of prompt 1
        assert stats["rewards/accuracies"][i].item() == pytest.approx([1.0, 1 / 3][i])
        assert stats["rewards/chosen"][i].item() == pytest.approx(DEMO[i] / tau)


def test_dft_gradient_is_the_authors_surrogate_and_the_update_their_log_space_average():
    """The public code's formula, written out independently: its u update through a max and a
    log-sigmoid, and its loss ``-logp_demo + mean_j stopgrad(exp(diff - u)) * logp_j``."""
    tau, gamma = 0.7, 0.9
    demo, gen, ref_gen, log_u = tensors()
    losses, stats = dft_loss(demo, gen, ref_gen, log_u, tau=tau, gamma=gamma)
    ours = torch.autograd.grad(losses.sum(), (demo, gen))

    diff = gen / tau - ref_gen
    top = diff.max(dim=1).values
    w = math.log(gamma) + torch.log(torch.exp(diff - top[:, None]).detach().mean(dim=1)) + top
    u = math.log(1 - gamma) + log_u
    u = torch.maximum(u, w) - torch.nn.functional.logsigmoid(torch.abs(u - w))
    theirs_loss = -demo + (torch.exp(diff - u[:, None]).detach() * gen).mean(dim=1)
    theirs = torch.autograd.grad(theirs_loss.sum(), (demo, gen))

    torch.testing.assert_close(stats["dft/log_normalizer"], u.detach())
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1])
    # the value differs from the surrogate's by a constant: -s(y) + tau * log u
    torch.testing.assert_close(losses.detach(), -demo.detach() + tau * u.detach())


def test_without_memory_the_gradient_is_tau_times_the_discriminative_log_likelihoods():
    """gamma = 1: the step is exactly the gradient of tau * [-s(y)/tau + log ghat], the
    mini-batch estimate of the paper's objective (the normaliser by importance sampling)."""
    tau = 0.4
    demo, gen, ref_gen, log_u = tensors()
    losses, _ = dft_loss(demo, gen, ref_gen, log_u, tau=tau, gamma=1.0)
    ours = torch.autograd.grad(losses.sum(), (demo, gen))
    log_g_hat = torch.logsumexp(gen / tau - ref_gen, dim=1) - math.log(3)
    objective = tau * (-demo / tau + log_g_hat)
    exact = torch.autograd.grad(objective.sum(), (demo, gen))
    torch.testing.assert_close(ours[0], exact[0])
    torch.testing.assert_close(ours[1], exact[1])
    torch.testing.assert_close(losses.detach(), objective.detach())


def test_dft2_length_normalises_and_needs_no_reference():
    tau, gamma = 0.3, 0.9
    demo, gen, _, log_u = tensors()
    demo_counts = torch.tensor([4.0, 5.0], dtype=torch.float64)
    gen_counts = torch.tensor([[7.0, 2.0, 3.0], [6.0, 4.0, 9.0]], dtype=torch.float64)
    losses, stats = dft_loss(
        demo,
        gen,
        None,
        log_u,
        tau=tau,
        gamma=gamma,
        variant="dft2",
        demo_token_counts=demo_counts,
        gen_token_counts=gen_counts,
    )
    losses.sum().backward()
    for i in range(2):
        scores = [GEN[i][j] / gen_counts[i, j].item() for j in range(3)]
        new_log_u, value, _, grads_per_score = by_hand(
            DEMO[i] / demo_counts[i].item(),
            scores,
            [s / tau for s in scores],
            LOG_U_BEFORE[i],
            tau,
            gamma,
        )
        assert stats["dft/log_normalizer"][i].item() == pytest.approx(new_log_u, rel=1e-12)
        assert losses[i].item() == pytest.approx(value, rel=1e-12)
        assert demo.grad[i].item() == pytest.approx(-1 / demo_counts[i].item())
        # d score / d log-prob = 1 / length
        expected = [g / gen_counts[i, j].item() for j, g in enumerate(grads_per_score)]
        assert gen.grad[i].tolist() == pytest.approx(expected, rel=1e-12)


def test_a_left_out_sample_counts_for_nothing():
    demo, gen, ref_gen, log_u = tensors()
    mask = torch.tensor([[True, False, True], [True, True, True]])
    wild = gen.detach().clone()
    wild[0, 1] = 1e4  # would dominate every weight if it counted
    losses, stats = dft_loss(
        demo, wild.requires_grad_(True), ref_gen, log_u, tau=1.0, gamma=0.8, gen_mask=mask
    )
    keep = [0, 2]
    alone, alone_stats = dft_loss(
        demo[:1], gen[:1, keep], ref_gen[:1, keep], log_u[:1], tau=1.0, gamma=0.8
    )
    torch.testing.assert_close(losses[:1], alone)
    torch.testing.assert_close(stats["dft/log_normalizer"][:1], alone_stats["dft/log_normalizer"])
    torch.testing.assert_close(stats["rewards/accuracies"][:1], alone_stats["rewards/accuracies"])


def test_dft_stays_finite_at_extreme_log_probs_in_float32():
    demo = torch.tensor([-1e4, -1.0], requires_grad=True)
    gen = torch.tensor([[-1e4, -1.0, -5e3], [-1e4, -1e4, -2.0]], requires_grad=True)
    ref_gen = torch.tensor([[-1.0, -1e4, -1.0], [-1.0, -1e4, -1e4]])
    for log_u in (torch.tensor([1e4, -1e4]), torch.zeros(2)):
        losses, stats = dft_loss(demo, gen, ref_gen, log_u, tau=0.3, gamma=0.9)
        grads = torch.autograd.grad(losses.sum(), (demo, gen))
        assert torch.isfinite(losses).all() and all(torch.isfinite(g).all() for g in grads)
        # w_ij = exp(d_ij - log u_i) <= k / gamma: no weight explodes (float32 at |d| ~ 1e4
        # rounds d - log u to ~1e-3)
        assert (grads[1].abs() <= (1 / 0.9) * (1 + 1e-3)).all()
        assert torch.isfinite(stats["dft/log_normalizer"]).all()


def test_get_method_binds_dft_with_its_state():
    dft = get_method("dft", dft_tau=0.5, dft_gamma=0.9, dft_u_init=0.25)
    dft2 = get_method("dft", dft_variant="dft2")
    assert dft.needs_generations and dft.needs_reference and dft.name == "dft"
    assert dft2.needs_generations and not dft2.needs_reference and dft2.name == "dft2"
    assert dft.state_key == "dft/log_normalizer"
    torch.testing.assert_close(dft.initial_state(3), torch.full((3,), 0.25))
    assert get_method("spin").initial_state(3) is None
    demo, gen, ref_gen, log_u = tensors()
    counts = torch.ones(2, dtype=torch.float64)
    losses, stats = dft.loss(
        LogpBatch(
            demo,
            counts,
            policy_gen_logps=gen,
            ref_gen_logps=ref_gen,
            gen_token_counts=torch.ones_like(gen),
            state=log_u,
        )
    )
    expected, _ = dft_loss(demo, gen, ref_gen, log_u, tau=0.5, gamma=0.9)
    torch.testing.assert_close(losses, expected)
    for bad in ({"dft_tau": 0.0}, {"dft_gamma": 0.0}, {"dft_gamma": 1.5}, {"dft_variant": "x"}):
        with pytest.raises(ValueError, match="dft"):
            get_method("dft", **bad)


# --------------------------------------------------------------------------- in the round loop

SAMPLED = GenerationSettings(max_new_tokens=6, do_sample=True, batch_size=4, num_samples=2)


def dft_run(model, tokenizer, run_dir, objective, resume=False):
    return run_rounds(
        model,
        tokenizer,
        tiny_demos(6),
        objective,
        RoundsSettings(
            run_dir=run_dir,
            rounds=1,
            optim=OptimSettings(learning_rate=1e-2, epochs=2, batch_size=2, checkpoint_every=1),
            generation=SAMPLED,
            max_prompt_length=64,
            max_length=96,
            seed=0,
            resume=resume,
        ),
    )


def test_dft_state_is_kept_across_epochs_and_resumed_exactly(
    tiny_model_readonly, tiny_tokenizer, tmp_path
):
    """6 prompts, batch 2, 2 epochs: 6 steps. The run stops inside the second epoch, whose
    steps read the moving average the first wrote; resumed, it must end where the
    uninterrupted run ends (the state is saved with each checkpoint and loaded back)."""
    import copy

    objective = get_method("dft", dft_tau=1.0, dft_gamma=0.5)
    whole = tmp_path / "whole"
    dft_run(copy.deepcopy(tiny_model_readonly), tiny_tokenizer, whole, objective)
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    # first step: the policy is the reference, so u = 0 and the loss is -log pi(demo)
    assert rows[0]["loss"] == pytest.approx(-rows[0]["logps/chosen"], rel=1e-5)
    assert rows[0]["dft/log_normalizer"] == pytest.approx(0.0, abs=1e-5)
    assert rows[-1]["logps/chosen"] > rows[0]["logps/chosen"]

    broken = tmp_path / "broken"
    with pytest.raises(Interrupt):
        dft_run(
            copy.deepcopy(tiny_model_readonly),
            tiny_tokenizer,
            broken,
            interrupting(objective, after_calls=4),
        )
    saved = torch.load(broken / "checkpoint" / "objective_state.pt")
    assert saved.shape == (6,) and (saved != 0).any()  # the moving averages of 4 steps
    dft_run(copy.deepcopy(tiny_model_readonly), tiny_tokenizer, broken, objective, resume=True)
    resumed_rows = [
        json.loads(line) for line in (broken / "metrics.jsonl").read_text().splitlines()
    ]
    for key in ("loss", "dft/log_normalizer", "logps/chosen"):
        assert [r[key] for r in resumed_rows] == pytest.approx([r[key] for r in rows], rel=1e-5)
    expected = load_file(str(whole / "round_0" / "model" / "model.safetensors"))
    got = load_file(str(broken / "round_0" / "model" / "model.safetensors"))
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor)


# --------------------------------------------------------------------------- settings


def test_each_variant_defaults_to_its_authors_tau_and_gamma():
    """The authors' Mistral-7B recipes: DFT tau 1.0, gamma 0.85; DFT2 tau 0.3, gamma 0.9. A
    value given explicitly wins, the other keeps the variant's default."""
    dft = get_method("dft")
    dft2 = build_method(
        from_dict({"method": "dft", "dft_variant": "dft2", "do_sample": True}).objective
    )
    assert (dft.tau, dft.gamma) == (1.0, 0.85)
    assert (dft2.tau, dft2.gamma) == (0.3, 0.9)
    mixed = get_method("dft", dft_variant="dft2", dft_tau=1.0)
    assert (mixed.tau, mixed.gamma) == (1.0, 0.9)
    demo, gen, _, log_u = tensors()
    counts = torch.tensor([3.0, 5.0], dtype=torch.float64)
    gen_counts = torch.tensor([[2.0, 4.0, 6.0], [1.0, 3.0, 5.0]], dtype=torch.float64)
    batch = LogpBatch(demo, counts, policy_gen_logps=gen, gen_token_counts=gen_counts, state=log_u)
    losses, _ = dft2.loss(batch)
    expected, _ = dft_loss(
        demo,
        gen,
        None,
        log_u,
        tau=0.3,
        gamma=0.9,
        variant="dft2",
        demo_token_counts=counts,
        gen_token_counts=gen_counts,
    )
    torch.testing.assert_close(losses, expected, rtol=0, atol=0)
    help_texts = {leaf.flag: leaf.help for leaf in leaves()}
    assert "dft 1.0, dft2 0.3" in help_texts["dft_tau"]
    assert "dft 0.85, dft2 0.9" in help_texts["dft_gamma"]


def test_dft_with_one_greedy_sample_is_refused(capsys):
    """Greedy decoding gives each prompt one deterministic negative: DFT's normaliser then
    has nothing to average; the error names the fields and the fix, exit status 2."""
    with pytest.raises(ConfigError, match=r"generation.do_sample=false.*--do-sample"):
        from_dict({"method": "dft"})
    with pytest.raises(ConfigError, match="generation.num_samples=1"):
        from_dict({"method": "dft", "dft_variant": "dft2", "do_sample": False})
    assert run_command(run.main, ["--method", "dft", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "objective.method=dft" in err and "--do-sample" in err
    assert "Traceback" not in err
    for sampled in ({"num_samples": 1}, {"num_samples": 4, "temperature": 0.7, "top_k": 50}):
        from_dict({"method": "dft", "do_sample": True, **sampled})
    from_dict({"method": "gsil"})  # greedy stays the default of the other methods
