"""GSIL, SPIN, DPO and SFT objectives as pure functions of per-sequence log-probs.

Every function takes summed response log-probabilities (one number per sequence) and returns
per-example losses plus a dict of per-example, detached statistics; the caller averages.
None of them sees a model. Theory page, sections 3 and 4.

Statistics are named as TRL's ``DPOTrainer`` names them where the quantity is the same, with
the demonstration as the *chosen* response and the policy's own sample as the *rejected* one
(as in SPIN): ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``. GSIL's own quantities have names of their own: the classifier logit
``f`` is ``classifier_logits/chosen|rejected`` (TRL's ``logits/*`` are the mean LM-head logits,
another quantity) and the two loss parts are ``loss/chosen|rejected``. The full table of
``metrics.jsonl`` names is in :mod:`gsil.optimization`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from gsil.estimators import DensityRatioEstimator

Stats = dict[str, Tensor]


def gsil_loss(
    policy_demo_logps: Tensor,
    policy_gen_logps: Tensor,
    ref_demo_logps: Tensor,
    ref_gen_logps: Tensor,
    estimator: DensityRatioEstimator,
    beta: float,
    shift: float = 0.0,
) -> tuple[Tensor, Stats]:
    """The GSIL loss: classify demonstrations against own samples with a policy-built logit.

        Delta(x, y) = log pi_theta(y|x) - log pi_ref(y|x)
        f(x, y)     = beta * Delta(x, y) + shift
        loss_i      = demo_loss(f(x_i, y_demo_i)) + gen_loss(f(x_i, y_gen_i))

    With a calibrated estimator the population optimum is
    ``beta * log(pi_theta/pi_ref) + shift = log(pi_data/pi_ref)``. At ``theta = ref``, ``f = shift``.

    Returns per-example losses and stats: ``rewards/chosen`` (demonstrations) and
    ``rewards/rejected`` (own samples), each ``beta * Delta``; ``rewards/margins`` (their
    difference), ``rewards/accuracies`` (1 where the demonstration's reward is higher), the
    classifier logits ``classifier_logits/chosen|rejected`` (``f``) and the two loss parts
    ``loss/chosen``, ``loss/rejected``.
    """
    demo_rewards = beta * (policy_demo_logps - ref_demo_logps)
    gen_rewards = beta * (policy_gen_logps - ref_gen_logps)
    demo_logits = demo_rewards + shift
    gen_logits = gen_rewards + shift
    demo_losses = estimator.demo_loss(demo_logits)
    gen_losses = estimator.gen_loss(gen_logits)
    stats = _reward_stats(demo_rewards, gen_rewards)
    stats.update(
        {
            "classifier_logits/chosen": demo_logits.detach(),
            "classifier_logits/rejected": gen_logits.detach(),
            "loss/chosen": demo_losses.detach(),
            "loss/rejected": gen_losses.detach(),
        }
    )
    return demo_losses + gen_losses, stats


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Stats]:
    """Pairwise logistic loss on the reward margin (Rafailov et al., 2023).

        margin = beta * [(log pi - log pi_ref)(y_w) - (log pi - log pi_ref)(y_l)]
        loss   = (1 - eps) * softplus(-margin) + eps * softplus(margin)

    The per-prompt normaliser cancels in the difference.
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    margins = chosen_rewards - rejected_rewards
    losses = (1 - label_smoothing) * F.softplus(-margins) + label_smoothing * F.softplus(margins)
    return losses, _reward_stats(chosen_rewards, rejected_rewards)


def spin_loss(
    policy_demo_logps: Tensor,
    policy_gen_logps: Tensor,
    ref_demo_logps: Tensor,
    ref_gen_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Stats]:
    """SPIN (Chen et al., 2024): DPO with the demonstration as chosen, own sample as rejected.

        loss = softplus(-beta * [Delta(y_demo) - Delta(y_gen)])

    Only the difference is constrained, so the demonstrations' likelihood may fall.
    """
    return dpo_loss(policy_demo_logps, policy_gen_logps, ref_demo_logps, ref_gen_logps, beta)


def sft_loss(policy_demo_logps: Tensor, demo_token_counts: Tensor) -> tuple[Tensor, Stats]:
    """Supervised fine-tuning: ``-log pi_theta(y_demo|x) / |y_demo|`` (mean over tokens)."""
    token_mean_logps = policy_demo_logps / demo_token_counts.clamp(min=1)
    return -token_mean_logps, {"logps/chosen_per_token": token_mean_logps.detach()}


def _reward_stats(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Stats:
    """TRL's reward statistics (``DPOTrainer``): the chosen side is the demonstration."""
    margins = chosen_rewards - rejected_rewards
    return {
        "rewards/chosen": chosen_rewards.detach(),
        "rewards/rejected": rejected_rewards.detach(),
        "rewards/margins": margins.detach(),
        "rewards/accuracies": (margins > 0).float().detach(),
    }


@dataclass(frozen=True)
class Objective:
    """A loss with the trainer's one calling convention.

    ``fn(policy_demo_logps, policy_gen_logps, ref_demo_logps, ref_gen_logps, demo_token_counts)``
    returns ``(per-example losses, stats)``. The flags tell the trainer what to prepare, so it
    never branches on a loss name.
    """

    name: str
    fn: Callable[..., tuple[Tensor, Stats]]
    needs_generations: bool
    needs_reference: bool

    def __call__(
        self,
        policy_demo_logps: Tensor,
        policy_gen_logps: Tensor | None,
        ref_demo_logps: Tensor | None,
        ref_gen_logps: Tensor | None,
        demo_token_counts: Tensor,
    ) -> tuple[Tensor, Stats]:
        return self.fn(
            policy_demo_logps, policy_gen_logps, ref_demo_logps, ref_gen_logps, demo_token_counts
        )


def make_objective(
    method: str,
    estimator: DensityRatioEstimator | None = None,
    beta: float = 0.1,
    shift: float = 0.0,
) -> Objective:
    """Bind a method (``gsil``, ``spin`` or ``sft``) and its hyper-parameters."""
    if method == "gsil":
        if estimator is None:
            raise ValueError("method 'gsil' needs an estimator (see gsil.estimators)")

        def gsil_fn(pd, pg, rd, rg, _counts):
            return gsil_loss(pd, pg, rd, rg, estimator, beta, shift)

        return Objective(f"gsil-{estimator.name}", gsil_fn, True, True)
    if method == "spin":

        def spin_fn(pd, pg, rd, rg, _counts):
            return spin_loss(pd, pg, rd, rg, beta)

        return Objective("spin", spin_fn, True, True)
    if method == "sft":

        def sft_fn(pd, _pg, _rd, _rg, counts):
            return sft_loss(pd, counts)

        return Objective("sft", sft_fn, False, False)
    raise ValueError(f"unknown method {method!r}; choose one of: gsil, spin, sft")
