"""The exact testbed: enumeration, normalisation, and what each method converges to."""

import pytest
import torch

from analysis.toy import (
    Method,
    data_distribution,
    exact_pairs,
    gsil_target,
    kl,
    log_normaliser,
    make_space,
    method_loss,
    random_table,
    run_rounds,
    sampled_pairs,
    sequence_logps,
    table_from_probs,
)
from analysis.toy_sweeps import setup
from gsil.estimators import get_estimator
from gsil.objectives import gsil_loss


@pytest.fixture(scope="module")
def testbed():
    return setup()


def test_policy_is_normalised_and_tables_round_trip():
    space = make_space(n_prompts=2, vocab_size=4, length=3)
    assert space.n_sequences == 64 and space.n_prefixes == 1 + 4 + 16
    probs = sequence_logps(random_table(space, scale=2.0, seed=3), space).exp()
    assert torch.allclose(probs.sum(-1), torch.ones(2, dtype=probs.dtype), atol=1e-12)
    data = data_distribution(space, "long_tailed")
    assert torch.allclose(sequence_logps(table_from_probs(data, space), space).exp(), data)


def test_gsil_expectation_matches_library_loss_on_pairs(testbed):
    space, data, init = testbed
    ref_logps = sequence_logps(init, space)
    policy_logps = sequence_logps(random_table(space, seed=7), space)
    pairs = exact_pairs(data, ref_logps.exp())
    method = Method("gsil", "exponential", beta=0.7, shift=0.3)
    fast = method_loss(method, policy_logps, ref_logps, pairs, space.length)
    pd, pg = policy_logps[:, :, None], policy_logps[:, None, :]
    rd, rg = ref_logps[:, :, None], ref_logps[:, None, :]
    losses, _ = gsil_loss(
        *torch.broadcast_tensors(pd, pg, rd, rg), get_estimator("exponential"), 0.7, 0.3
    )
    assert torch.allclose(fast, (pairs * losses).sum((-1, -2)).mean(), rtol=1e-12)


@pytest.mark.parametrize(
    "method",
    [Method("sft"), Method("gsil", "logistic"), Method("spin"), Method("gsil", "kliep", shift=1.0)],
    ids=lambda m: f"{m.name}-shift{m.shift:g}",
)
def test_exact_one_round_reaches_pi_data(testbed, method):
    """beta = 1, shift = 0 (KLIEP: any shift): the per-prompt normaliser is exactly 1, so
    one exactly optimised round lands on pi_data."""
    space, data, init = testbed
    result = run_rounds(space, data, init, method, n_rounds=1)
    assert result["metrics"]["forward_kl"][0] > 1.0
    assert result["metrics"]["forward_kl"][-1] < 1e-3


def test_exponential_link_halves_beta_and_converges_over_rounds(testbed):
    """Exponential at beta = 1 behaves as beta_eff = 2: each round halves log(pi_t / pi_data)."""
    space, data, init = testbed
    kls = run_rounds(space, data, init, Method("gsil", "exponential"), n_rounds=4)["metrics"]
    kls = kls["forward_kl"]
    assert kls[1] > 0.1 and kls[4] < 0.01
    ratios = [kls[t + 1] / kls[t] for t in range(1, 4)]
    assert all(0.15 < r < 0.35 for r in ratios)  # KL ~ (1/2)^2 per round


def test_shift_biases_one_round_and_normaliser_predicts_it(testbed):
    space, data, init = testbed
    ref = sequence_logps(init, space).exp()
    assert torch.allclose(
        log_normaliser(ref, data, 1.0, 0.7), torch.full((3,), -0.7, dtype=ref.dtype)
    )
    spread = log_normaliser(ref, data, 0.5, 0.0)
    assert spread.max() - spread.min() > 0.1  # beta != 1: no single shift absorbs it
    biased = run_rounds(space, data, init, Method("gsil", "logistic", shift=-1.0), n_rounds=5)
    kls = biased["metrics"]["forward_kl"]
    assert kls[1] > 1e-2  # one round is biased by the normaliser ...
    assert kls[5] < 1e-4  # ... but pi_data is the rounds' fixed point, reached geometrically


def test_spin_matches_target_but_gsil_does_not_for_beta_half(testbed):
    space, data, init = testbed
    target = gsil_target(sequence_logps(init, space).exp(), data, 0.5)
    pi_spin = sequence_logps(
        run_rounds(space, data, init, Method("spin", beta=0.5), 1)["tables"][1], space
    ).exp()
    pi_gsil = sequence_logps(
        run_rounds(space, data, init, Method("gsil", beta=0.5), 1)["tables"][1], space
    ).exp()
    assert kl(target, pi_spin).mean() < 1e-4
    assert kl(target, pi_gsil).mean() > 1e-2


def test_sampled_pairs_are_an_empirical_distribution():
    idx = torch.tensor([[0, 0, 2], [1, 1, 1]])
    weights = sampled_pairs(idx, torch.tensor([[1, 1, 0], [1, 1, 1]]), 3)
    assert torch.allclose(weights.sum((-1, -2)), torch.ones(2, dtype=weights.dtype))
    assert weights[0, 0, 1] == pytest.approx(2 / 3) and weights[1, 1, 1] == pytest.approx(1.0)
