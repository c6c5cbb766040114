"""The exact measures of one trained model of the testbed grid (one round of one chain).

:func:`measure_model` scores a policy against p_data with :mod:`analysis.testbed.measures`:
forward KL on the held-out test demonstrations, reverse KL / entropy / answer accuracy on its
own samples (temperature 1), the training demonstrations' log-likelihood, and optionally the
(forward KL, reverse KL) frontier over sampling temperatures. :func:`implicit_classifier`
compares a GSIL round's implicit classifier ``f = beta (log pi - log pi_ref) + shift`` on the
training demonstrations with its exact targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from analysis.testbed.distribution import TARGET, TaskDistribution
from analysis.testbed.grid import classifier_target, empirical_log_probs
from analysis.testbed.measures import classifier_fit, entropy, forward_kl, proportion, reverse_kl
from analysis.testbed.model import sample, sequence_logps
from gsil.demonstrations import Demonstration

TEST_SEED = 0  # one held-out test set and one validation set for every seed and method


@dataclass(frozen=True)
class HeldOut:
    """Demonstrations that no run trains on, with their exact ``log p_data``."""

    prompts: tuple[str, ...]
    responses: tuple[str, ...]
    data_logps: tuple[float, ...]


@lru_cache(maxsize=8)
def held_out(split: str, size: int) -> HeldOut:
    """The first ``size`` demonstrations of ``split`` (``test`` or ``validation``)."""
    demos = TaskDistribution(TARGET).demonstrations(size, TEST_SEED, split=split)
    return HeldOut(
        tuple(d.prompt for d in demos),
        tuple(d.response for d in demos),
        tuple(d.meta["data_logp"] for d in demos),
    )


@lru_cache(maxsize=32)
def train_pool(seed: int, pool: int) -> tuple[Demonstration, ...]:
    """A seed's pool of training demonstrations; the first N are the grid's N (nested).

    The stream's empty responses (the noise part's length 0, probability
    ``lambda (1 - q)``) are left out: a training record needs a response
    (``gsil.data.load_demonstrations``). Held-out sets keep them.
    """
    dist, draw = TaskDistribution(TARGET), pool
    while True:
        kept = [d for d in dist.demonstrations(draw, seed, split="train") if d.response]
        if len(kept) >= pool:
            return tuple(kept[:pool])
        draw += pool // 8 + 8


def forward_kl_on(model: Any, tokenizer: Any, data: HeldOut, temperature: float = 1.0) -> dict:
    """``KL(p_data || pi_T)`` on ``data`` (mean, 95% interval)."""
    policy = sequence_logps(model, tokenizer, data.prompts, data.responses, temperature)
    return forward_kl(data.data_logps, policy.tolist()).to_dict()


def own_samples(
    model: Any, tokenizer: Any, prompts: Sequence[str], temperature: float, seed: int, max_new: int
) -> dict:
    """Reverse KL (outside-support mass apart), entropy and answer accuracy of the policy's
    samples at ``temperature``; incomplete samples count as outside and as wrong."""
    dist = TaskDistribution(TARGET)
    drawn = sample(model, tokenizer, prompts, temperature, seed, max_new_tokens=max_new)
    policy = sequence_logps(model, tokenizer, prompts, drawn.texts, temperature).tolist()
    data = [
        dist.log_prob(p, t) if ok else float("-inf")
        for p, t, ok in zip(prompts, drawn.texts, drawn.complete, strict=True)
    ]
    reverse = reverse_kl(policy, data, drawn.complete)
    correct = [
        ok and dist.is_correct(p, t)
        for p, t, ok in zip(prompts, drawn.texts, drawn.complete, strict=True)
    ]
    return {
        "reverse_kl": None if reverse.kl is None else reverse.kl.to_dict(),
        "outside_mass": reverse.outside_mass,
        "entropy": entropy(policy, drawn.complete).to_dict() if any(drawn.complete) else None,
        "accuracy": proportion(correct).to_dict(),
    }


@dataclass(frozen=True)
class MeasurePlan:
    """What to measure of one model: the sizes and the frontier's temperatures (empty: none)."""

    test_size: int
    policy_samples: int
    max_new_tokens: int
    sample_seed: int
    temperatures: tuple[float, ...] = ()
    samples: bool = True  # False: no policy samples (no reverse KL, entropy, accuracy)
    demonstrations: bool = True  # False: the training demonstrations are not scored


def measure_model(
    model: Any, tokenizer: Any, train: Sequence[Demonstration], plan: MeasurePlan
) -> dict:
    """Every measure of one model (see the module docstring); ``demo_logps`` holds the
    training demonstrations' log-probabilities, one per demonstration of ``train``."""
    test = held_out("test", plan.test_size)
    prompts = list(test.prompts[: plan.policy_samples])
    out: dict[str, Any] = {"forward_kl": forward_kl_on(model, tokenizer, test)}
    if plan.demonstrations:
        demo_logps = sequence_logps(
            model, tokenizer, [d.prompt for d in train], [d.response for d in train]
        ).tolist()
        out.update(demo_logp=sum(demo_logps) / len(demo_logps), demo_logps=demo_logps)
    if plan.samples:
        out.update(
            own_samples(model, tokenizer, prompts, 1.0, plan.sample_seed, plan.max_new_tokens)
        )
    frontier = []
    for temperature in plan.temperatures:
        point = own_samples(
            model, tokenizer, prompts, temperature, plan.sample_seed, plan.max_new_tokens
        )
        frontier.append(
            {
                "temperature": temperature,
                "forward_kl": forward_kl_on(model, tokenizer, test, temperature)["mean"],
                "reverse_kl": (point["reverse_kl"] or {}).get("mean"),
                "outside_mass": point["outside_mass"],
            }
        )
    out["frontier"] = frontier or None
    return out


def implicit_classifier(
    train: Sequence[Demonstration],
    policy_logps: Sequence[float],
    ref_logps: Sequence[float],
    objective: dict,
) -> dict:
    """A GSIL round's ``f = beta (log pi - log pi_ref) + shift`` on the training demonstrations
    against its loss's target (:func:`~analysis.testbed.grid.classifier_target`) at the exact
    ``log p_data/pi_ref`` (``data``) and at the empirical ``log p_N/pi_ref`` (``empirical``)."""
    beta, shift, loss = objective["beta"], objective.get("shift", 0.0), objective["loss"]
    f = [beta * (p - r) + shift for p, r in zip(policy_logps, ref_logps, strict=True)]
    data = [d.meta["data_logp"] - r for d, r in zip(train, ref_logps, strict=True)]
    empirical = [e - r for e, r in zip(empirical_log_probs(train), ref_logps, strict=True)]
    return {
        "data": classifier_fit(f, classifier_target(loss, data)),
        "empirical": classifier_fit(f, classifier_target(loss, empirical)),
    }
