"""GSIL/SPIN/DPO/SFT objectives as pure functions of log-probs."""

import pytest
import torch
import torch.nn.functional as F

from gsil.estimators import get_estimator
from gsil.methods import LogpBatch, get_method
from gsil.objectives import dpo_loss, gsil_loss, sft_loss, spin_loss


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


def test_get_method_binds_methods_with_one_signature():
    policy_demo, policy_gen, ref_demo, ref_gen = random_logps(seed=6)
    counts = torch.full_like(policy_demo, 4)
    gsil = get_method("gsil", get_estimator("logistic"), beta=0.1, shift=1.0)
    spin = get_method("spin", beta=0.1)
    sft = get_method("sft")
    assert gsil.needs_generations and gsil.needs_reference
    assert not sft.needs_generations and not sft.needs_reference
    batch = LogpBatch(policy_demo, counts, policy_gen, ref_demo, ref_gen)
    gsil_losses, _ = gsil.loss(batch)
    expected, _ = gsil_loss(
        policy_demo, policy_gen, ref_demo, ref_gen, get_estimator("logistic"), 0.1, 1.0
    )
    torch.testing.assert_close(gsil_losses, expected)
    torch.testing.assert_close(
        spin.loss(batch)[0],
        spin_loss(policy_demo, policy_gen, ref_demo, ref_gen, 0.1)[0],
    )
    torch.testing.assert_close(sft.loss(LogpBatch(policy_demo, counts))[0], -policy_demo / 4)
    with pytest.raises(ValueError, match="gsil, spin, sft"):
        get_method("ppo")
    with pytest.raises(ValueError, match="takes no estimator"):
        get_method("spin", get_estimator("logistic"))
    assert get_method("gsil", loss="brier").name == "gsil-brier"


# --------------------------------------------------------------------------- k samples per prompt


def k_sample_logps(n=4, k=3, seed=7):
    generator = torch.Generator().manual_seed(seed)
    demo = [-50 * torch.rand(n, generator=generator, dtype=torch.float64) for _ in range(2)]
    gen = [-50 * torch.rand(n, k, generator=generator, dtype=torch.float64) for _ in range(2)]
    return demo[0], gen[0], demo[1], gen[1]


def test_one_sample_path_is_exactly_the_one_sample_formula():
    """k = 1, given as (B,) or (B, 1): bit for bit the formulas without samples."""
    policy_demo, policy_gen, ref_demo, ref_gen = random_logps(seed=8)
    beta, shift = 0.3, 0.7
    estimator = get_estimator("brier")
    f_demo = beta * (policy_demo - ref_demo) + shift
    f_gen = beta * (policy_gen - ref_gen) + shift
    gsil_expected = estimator.demo_loss(f_demo) + estimator.gen_loss(f_gen)
    # the one-pair code: margin of the two rewards, label smoothing 0 (dpo_loss)
    margin = beta * (policy_demo - ref_demo) - beta * (policy_gen - ref_gen)
    spin_expected = (1 - 0.0) * F.softplus(-margin) + 0.0 * F.softplus(margin)
    for gen, ref in ((policy_gen, ref_gen), (policy_gen[:, None], ref_gen[:, None])):
        losses, stats = gsil_loss(policy_demo, gen, ref_demo, ref, estimator, beta, shift)
        assert torch.equal(losses, gsil_expected)
        assert torch.equal(stats["classifier_logits/rejected"], f_gen)
        assert torch.equal(stats["rewards/accuracies"], (margin > 0).float())
        losses, stats = spin_loss(policy_demo, gen, ref_demo, ref, beta)
        assert torch.equal(losses, spin_expected)
        assert torch.equal(stats["rewards/rejected"], beta * (policy_gen - ref_gen))


@pytest.mark.parametrize("masked", [False, True])
def test_gsil_and_spin_average_over_k_samples_like_a_loop(masked):
    policy_demo, policy_gen, ref_demo, ref_gen = k_sample_logps()
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
    gen_mask = mask if masked else None
    beta, shift = 0.2, 0.5
    estimator = get_estimator("logistic")
    gsil, gsil_stats = gsil_loss(
        policy_demo, policy_gen, ref_demo, ref_gen, estimator, beta, shift, gen_mask
    )
    spin, spin_stats = spin_loss(policy_demo, policy_gen, ref_demo, ref_gen, beta, gen_mask)
    for i in range(4):
        samples = [j for j in range(3) if not masked or mask[i, j]]
        demo_part = None
        gen_parts, pairs, wins, rejected = [], [], [], []
        for j in samples:  # one sample at a time, through the one-sample functions
            one = slice(i, i + 1)
            loss, stats = gsil_loss(
                policy_demo[one],
                policy_gen[one, j],
                ref_demo[one],
                ref_gen[one, j],
                estimator,
                beta,
                shift,
            )
            demo_part = stats["loss/chosen"]
            gen_parts.append(stats["loss/rejected"])
            pair, pair_stats = spin_loss(
                policy_demo[one], policy_gen[one, j], ref_demo[one], ref_gen[one, j], beta
            )
            pairs.append(pair)
            wins.append(pair_stats["rewards/accuracies"])
            rejected.append(pair_stats["rewards/rejected"])
        mean = lambda parts: torch.stack(parts).mean()  # noqa: E731
        torch.testing.assert_close(gsil[i], (demo_part + mean(gen_parts))[0])
        torch.testing.assert_close(gsil_stats["loss/rejected"][i], mean(gen_parts))
        torch.testing.assert_close(spin[i], mean(pairs))
        torch.testing.assert_close(spin_stats["rewards/accuracies"][i], mean(wins))
        torch.testing.assert_close(gsil_stats["rewards/accuracies"][i], mean(wins))
        torch.testing.assert_close(spin_stats["rewards/rejected"][i], mean(rejected))


def test_gsil_gradient_over_k_samples_is_the_mean_of_the_sample_weights():
    policy_demo, policy_gen, ref_demo, ref_gen = k_sample_logps(seed=9)
    policy_gen.requires_grad_(True)
    beta, estimator = 0.5, get_estimator("exponential")
    losses, _ = gsil_loss(policy_demo, policy_gen, ref_demo, ref_gen, estimator, beta)
    losses.sum().backward()
    logits = beta * (policy_gen - ref_gen)
    torch.testing.assert_close(policy_gen.grad, beta * estimator.gen_weight(logits.detach()) / 3)


def test_a_method_sees_a_mask_only_when_it_leaves_something_out():
    policy_demo, policy_gen, ref_demo, ref_gen = k_sample_logps()
    counts = torch.ones(4)
    full = torch.ones(4, 3, dtype=torch.bool)
    partial = full.clone()
    partial[0, 0] = False
    assert LogpBatch(policy_demo, counts, policy_gen, gen_mask=full).kept_mask() is None
    assert LogpBatch(policy_demo, counts, policy_gen).kept_mask() is None
    assert LogpBatch(policy_demo, counts, policy_gen, gen_mask=partial).kept_mask() is partial
    gsil = get_method("gsil", beta=0.5)
    masked, _ = gsil.loss(
        LogpBatch(policy_demo, counts, policy_gen, ref_demo, ref_gen, gen_mask=partial)
    )
    expected, _ = gsil_loss(
        policy_demo, policy_gen, ref_demo, ref_gen, get_estimator("logistic"), 0.5, gen_mask=partial
    )
    torch.testing.assert_close(masked, expected)
