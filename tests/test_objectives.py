"""GSIL/SPIN/DPO/SFT objectives as pure functions of log-probs."""

import pytest
import torch
import torch.nn.functional as F

from gsil.estimators import get_estimator
from gsil.objectives import dpo_loss, gsil_loss, make_objective, sft_loss, spin_loss


def random_logps(n=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [-50 * torch.rand(n, generator=generator, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("name", ["logistic", "brier", "exponential", "kliep", "lsif", "hinge"])
@pytest.mark.parametrize("shift", [0.0, 2.0, -0.5])
def test_gsil_at_reference_gives_logit_equal_to_shift(name, shift):
    policy_demo, policy_gen, _, _ = random_logps()
    estimator = get_estimator(name)
    losses, stats = gsil_loss(
        policy_demo, policy_gen, policy_demo, policy_gen, estimator, 0.1, shift
    )
    torch.testing.assert_close(
        stats["classifier_logits/chosen"], torch.full_like(policy_demo, shift)
    )
    torch.testing.assert_close(
        stats["classifier_logits/rejected"], torch.full_like(policy_gen, shift)
    )
    expected = estimator.demo_loss(torch.tensor(shift)) + estimator.gen_loss(torch.tensor(shift))
    torch.testing.assert_close(losses, expected.to(losses.dtype).expand_as(losses))
    assert (stats["rewards/chosen"] == 0).all() and (stats["rewards/margins"] == 0).all()


def test_gsil_matches_formula_and_stats():
    policy_demo, policy_gen, ref_demo, ref_gen = random_logps(seed=1)
    beta, shift = 0.3, 0.7
    losses, stats = gsil_loss(
        policy_demo, policy_gen, ref_demo, ref_gen, get_estimator("logistic"), beta, shift
    )
    demo_reward = beta * (policy_demo - ref_demo)
    gen_reward = beta * (policy_gen - ref_gen)
    expected = F.softplus(-(demo_reward + shift)) + F.softplus(gen_reward + shift)
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(stats["rewards/margins"], demo_reward - gen_reward)
    torch.testing.assert_close(stats["rewards/accuracies"], (demo_reward > gen_reward).float())
    torch.testing.assert_close(stats["loss/chosen"] + stats["loss/rejected"], losses)


def test_gsil_gradient_pushes_demo_up_and_gen_down():
    policy_demo, policy_gen, ref_demo, ref_gen = random_logps(seed=2)
    policy_demo.requires_grad_(True)
    policy_gen.requires_grad_(True)
    beta, shift = 0.5, 0.0
    estimator = get_estimator("brier")
    losses, stats = gsil_loss(policy_demo, policy_gen, ref_demo, ref_gen, estimator, beta, shift)
    losses.sum().backward()
    torch.testing.assert_close(
        -policy_demo.grad, beta * estimator.demo_weight(stats["classifier_logits/chosen"])
    )
    torch.testing.assert_close(
        policy_gen.grad, beta * estimator.gen_weight(stats["classifier_logits/rejected"])
    )


def test_spin_matches_its_formula():
    policy_demo, policy_gen, ref_demo, ref_gen = random_logps(seed=3)
    beta = 0.2
    losses, stats = spin_loss(policy_demo, policy_gen, ref_demo, ref_gen, beta)
    margin = beta * ((policy_demo - ref_demo) - (policy_gen - ref_gen))
    torch.testing.assert_close(losses, torch.log1p(torch.exp(-margin)))
    torch.testing.assert_close(stats["rewards/margins"], margin)


def test_spin_is_invariant_to_a_per_prompt_constant_but_gsil_is_not():
    policy_demo, policy_gen, ref_demo, ref_gen = random_logps(seed=4)
    per_prompt = torch.linspace(-3, 3, policy_demo.numel(), dtype=torch.float64)
    spin_a, _ = spin_loss(policy_demo, policy_gen, ref_demo, ref_gen, 1.0)
    spin_b, _ = spin_loss(policy_demo + per_prompt, policy_gen + per_prompt, ref_demo, ref_gen, 1.0)
    torch.testing.assert_close(spin_a, spin_b)
    estimator = get_estimator("logistic")
    gsil_a, _ = gsil_loss(policy_demo, policy_gen, ref_demo, ref_gen, estimator, 1.0)
    gsil_b, _ = gsil_loss(
        policy_demo + per_prompt, policy_gen + per_prompt, ref_demo, ref_gen, estimator, 1.0
    )
    assert not torch.allclose(gsil_a, gsil_b)


def test_dpo_label_smoothing():
    policy_demo, policy_gen, ref_demo, ref_gen = random_logps(seed=5)
    losses, stats = dpo_loss(policy_demo, policy_gen, ref_demo, ref_gen, 0.1, label_smoothing=0.2)
    margin = stats["rewards/margins"]
    torch.testing.assert_close(losses, 0.8 * F.softplus(-margin) + 0.2 * F.softplus(margin))


def test_sft_is_mean_token_negative_log_likelihood():
    logps = torch.tensor([-10.0, -3.0])
    counts = torch.tensor([5, 3])
    losses, _ = sft_loss(logps, counts)
    torch.testing.assert_close(losses, torch.tensor([2.0, 1.0]))


def test_make_objective_binds_methods_with_one_signature():
    policy_demo, policy_gen, ref_demo, ref_gen = random_logps(seed=6)
    counts = torch.full_like(policy_demo, 4)
    gsil = make_objective("gsil", get_estimator("logistic"), beta=0.1, shift=1.0)
    spin = make_objective("spin", beta=0.1)
    sft = make_objective("sft")
    assert gsil.needs_generations and gsil.needs_reference
    assert not sft.needs_generations and not sft.needs_reference
    gsil_losses, _ = gsil(policy_demo, policy_gen, ref_demo, ref_gen, counts)
    expected, _ = gsil_loss(
        policy_demo, policy_gen, ref_demo, ref_gen, get_estimator("logistic"), 0.1, 1.0
    )
    torch.testing.assert_close(gsil_losses, expected)
    torch.testing.assert_close(
        spin(policy_demo, policy_gen, ref_demo, ref_gen, counts)[0],
        spin_loss(policy_demo, policy_gen, ref_demo, ref_gen, 0.1)[0],
    )
    torch.testing.assert_close(sft(policy_demo, None, None, None, counts)[0], -policy_demo / 4)
    with pytest.raises(ValueError, match="gsil, spin, sft"):
        make_objective("ppo")
    with pytest.raises(ValueError, match="estimator"):
        make_objective("gsil")
