"""GSIL, SPIN, DPO, SFT, Dynamic FT and DFT objectives as pure functions of per-sequence
log-probs.

Every function takes summed response log-probabilities (one number per sequence) and returns
per-example losses plus a dict of per-example, detached statistics; the caller averages.
None of them sees a model. Theory page, sections 3 and 4.

Shapes. ``B`` examples (prompts), each with one demonstration and ``k`` generated responses
(``--num-samples``; k = 1 is the paper's setting): demonstration log-probs are ``(B,)``,
generated ones ``(B, k)`` (a ``(B,)`` tensor is read as k = 1). An optional boolean
``gen_mask`` ``(B, k)`` leaves responses out (``--drop-ties`` with k > 1); a mean "over k" is
over the responses left in. Every statistic is ``(B,)``: a quantity of the generated side is
its mean over k, and ``rewards/accuracies`` is the fraction of the example's k pairs that the
demonstration wins. With k = 1 every loss and statistic is exactly the one-sample formula.

Statistics are named as TRL's ``DPOTrainer`` names them where the quantity is the same, with
the demonstration as the *chosen* response and the policy's own sample as the *rejected* one
(as in SPIN): ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``. GSIL's own quantities have names of their own: the classifier logit
``f`` is ``classifier_logits/chosen|rejected`` (TRL's ``logits/*`` are the mean LM-head logits,
another quantity) and the two loss parts are ``loss/chosen|rejected``. The full table of
``metrics.jsonl`` names is in :mod:`gsil.optimization`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from gsil.estimators import DensityRatioEstimator

Stats = dict[str, Tensor]
DFT_VARIANTS = ("dft", "dft2")
# each DFT variant's (tau, gamma) when none is given: the authors' Mistral-7B recipes
DFT_DEFAULTS = {"dft": (1.0, 0.85), "dft2": (0.3, 0.9)}
# SFT's per-token weights: none (plain SFT) or prob (Dynamic Fine-Tuning: sg(p_t))
TOKEN_WEIGHTINGS = ("none", "prob")
# SFT's token mean: each demonstration's (then the examples'), or the optimizer step's
SFT_TOKEN_MEANS = ("sequence", "step")


def per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Generated-side values as ``(*like.shape, k)``: values shaped like the demonstration side
    are one sample per example (k = 1), so the losses stay elementwise over any shape (the toy
    testbed evaluates them on ``[n_prompts, N, N]`` grids); ``(B, k)`` or a flat ``(B * k,)``
    holds k samples per example."""
    if values.shape == like.shape:
        return values.unsqueeze(-1)
    return values.reshape(*like.shape, -1)


def sample_mean(values: Tensor, gen_mask: Tensor | None = None) -> Tensor:
    """Mean over the k samples (last dimension) of ``(B, k)`` values, counting only the
    responses ``gen_mask`` keeps (every one when None). Returns ``(B,)``."""
    if gen_mask is None:
        return values.mean(dim=-1)
    kept = gen_mask.to(torch.bool)
    total = torch.where(kept, values, torch.zeros_like(values)).sum(dim=-1)
    return total / kept.sum(dim=-1).clamp(min=1).to(values.dtype)


def gsil_loss(
    policy_demo_logps: Tensor,
    policy_gen_logps: Tensor,
    ref_demo_logps: Tensor,
    ref_gen_logps: Tensor,
    estimator: DensityRatioEstimator,
    beta: float,
    shift: float = 0.0,
    gen_mask: Tensor | None = None,
) -> tuple[Tensor, Stats]:
    """The GSIL loss: classify demonstrations against own samples with a policy-built logit.

        Delta(x, y) = log pi_theta(y|x) - log pi_ref(y|x)
        f(x, y)     = beta * Delta(x, y) + shift
        loss_i      = demo_loss(f(x_i, y_demo_i)) + (1/k) sum_j gen_loss(f(x_i, y_gen_ij))

    The generated side of ``E_P[l_demo] + E_Q[l_gen]`` is estimated from the prompt's k own
    samples (k = 1: the paper's one-sample loss). With a calibrated estimator the population
    optimum is ``beta * log(pi_theta/pi_ref) + shift = log(pi_data/pi_ref)``. At
    ``theta = ref``, ``f = shift``.

    Args:
        policy_demo_logps, ref_demo_logps: ``(B,)`` summed log-probs of the demonstrations.
        policy_gen_logps, ref_gen_logps: ``(B, k)`` (or ``(B,)`` for k = 1), own samples.
        gen_mask: optional ``(B, k)`` bool, the samples that count (default: all).

    Returns per-example losses ``(B,)`` and stats: ``rewards/chosen`` (demonstrations) and
    ``rewards/rejected`` (own samples, mean over k), each ``beta * Delta``; ``rewards/margins``
    (their difference), ``rewards/accuracies`` (the fraction of the k pairs whose
    demonstration reward is higher), the classifier logits ``classifier_logits/chosen|rejected``
    (``f``, the rejected one a mean over k) and the two loss parts ``loss/chosen``,
    ``loss/rejected`` (they sum to the loss).
    """
    policy_gen_logps = per_sample(policy_gen_logps, policy_demo_logps)
    ref_gen_logps = per_sample(ref_gen_logps, policy_demo_logps)
    demo_rewards = beta * (policy_demo_logps - ref_demo_logps)
    gen_rewards = beta * (policy_gen_logps - ref_gen_logps)  # (B, k)
    demo_logits = demo_rewards + shift
    gen_logits = gen_rewards + shift
    demo_losses = estimator.demo_loss(demo_logits)
    gen_losses = sample_mean(estimator.gen_loss(gen_logits), gen_mask)
    stats = _reward_stats(demo_rewards, gen_rewards, gen_mask)
    stats.update(
        {
            "classifier_logits/chosen": demo_logits.detach(),
            "classifier_logits/rejected": sample_mean(gen_logits.detach(), gen_mask),
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
    gen_mask: Tensor | None = None,
) -> tuple[Tensor, Stats]:
    """SPIN (Chen et al., 2024): DPO with the demonstration as chosen, own samples as rejected.

        loss_i = (1/k) sum_j softplus(-beta * [Delta(y_demo_i) - Delta(y_gen_ij)])

    The demonstration is paired with each of its k own samples (k = 1: SPIN's one pair).
    Shapes as :func:`gsil_loss`. Only the difference is constrained, so the demonstrations'
    likelihood may fall.
    """
    policy_gen_logps = per_sample(policy_gen_logps, policy_demo_logps)
    ref_gen_logps = per_sample(ref_gen_logps, policy_demo_logps)
    pair_losses, _ = dpo_loss(
        policy_demo_logps[..., None].expand_as(policy_gen_logps),
        policy_gen_logps,
        ref_demo_logps[..., None].expand_as(ref_gen_logps),
        ref_gen_logps,
        beta,
    )
    stats = _reward_stats(
        beta * (policy_demo_logps - ref_demo_logps),
        beta * (policy_gen_logps - ref_gen_logps),
        gen_mask,
    )
    return sample_mean(pair_losses, gen_mask), stats


def dft_loss(
    policy_demo_logps: Tensor,
    policy_gen_logps: Tensor,
    ref_gen_logps: Tensor | None,
    log_normalizer: Tensor,
    *,
    tau: float,
    gamma: float,
    variant: str = "dft",
    demo_token_counts: Tensor | None = None,
    gen_token_counts: Tensor | None = None,
    gen_mask: Tensor | None = None,
) -> tuple[Tensor, Stats]:
    """Discriminative fine-tuning (Guo et al., ICML 2025, arXiv 2502.18679): DFT (the paper's
    section 4) and DFT2 (section 5), as the authors' code (PenGuln/DFT, ``DFTTrainer.dft_loss``
    and ``dft_loss_ref_free``) computes them.

    The model scores an answer with ``s_theta(y, x)`` and discriminates it among ALL outputs
    ``Y`` with temperature ``tau``; DFT maximises this discriminative likelihood of the
    demonstrations (``tau`` times its negative log is minimised)::

        P_d(y|x)  = exp(s_theta(y,x)/tau) / sum_{y' in Y} exp(s_theta(y',x)/tau)
        F(theta)  = (1/n) sum_i [ -s_theta(y_i,x_i) + tau * log g_i(theta) ]
        g_i       = sum_{y'} exp(s_theta(y',x_i)/tau)
                  = E_{y' ~ pi_ref(.|x_i)}[ exp(s_theta(y',x_i)/tau) / pi_ref(y'|x_i) ]

    The sum over outputs is estimated from the prompt's k samples ``y'_ij ~ pi_ref`` (here the
    round's policy, which is also the reference). ``log`` of a mini-batch estimate is biased,
    so the paper's optimiser (finite-sum coupled compositional optimisation) keeps one moving
    average ``u_i`` of ``g_i`` per prompt, updated whenever the prompt is in a batch, and steps
    along a gradient in which ``u_i`` replaces ``g_i``::

        d_ij      = s_ij / tau - log pi_ref(y'_ij|x_i)      (DFT)
        log u_i  <- logaddexp(log(1 - gamma) + log u_i,  log gamma + logmeanexp_j d_ij)
        w_ij      = exp(d_ij - log u_i)                     (detached; w_ij <= k / gamma)
        grad_i    = -grad s_theta(y_i,x_i) + (1/k) sum_j w_ij grad s_theta(y'_ij,x_i)

    ``gamma = 1`` keeps no memory (``log u_i = logmeanexp_j d_ij``), and then ``grad_i`` is
    exactly ``tau * grad[-s(y_i)/tau + log ghat_i]`` for the mini-batch estimate ghat_i. The
    code's ``tau = 1, gamma = 0.85`` (DFT) and ``tau = 0.3, gamma = 0.9`` (DFT2) are its
    Mistral-7B recipes (each variant's default, :data:`DFT_DEFAULTS`); its ``u_init`` (the
    initial ``log u_i``) is 0. The authors draw their negatives once, offline, from the base
    model with the system message "You are an unhelpful assistant." (temperature 0.7, top-k
    50, 320 new tokens; their ``generator/gen.py``); gsil samples them from each round's
    policy on the training prompt as it is, the self-play setting SPIN and GSIL use, so the
    three see the same prompts.
    (Equation numbers are not cited: the paper's text beyond its abstract was not available
    offline when this was written; the formulas follow the authors' code, named above.)

    * DFT: ``s = log pi_theta(y|x)`` (summed log-probs, as given).
    * DFT2: ``s = log pi_theta(y|x) / |y|`` (length-normalised with the token counts) and the
      importance weight drops ``pi_ref``: ``d_ij = s_ij / tau``; no reference is needed.

    The loss VALUE is ``-s(y_i) + tau * log u_i``, tau times the estimated negative log
    discriminative likelihood; its GRADIENT is the code's surrogate
    ``-s(y_i) + (1/k) sum_j w_ij s_ij`` (w detached), i.e. ``grad_i`` above. Every step in log
    space (logsumexp, logaddexp), so no exponential overflows.

    Args:
        policy_demo_logps: ``(B,)`` log pi_theta of the demonstrations (summed, or averaged).
        policy_gen_logps: ``(B, k)`` log pi_theta of the k samples.
        ref_gen_logps: ``(B, k)`` log pi_ref of the samples (DFT); None for DFT2.
        log_normalizer: ``(B,)`` each prompt's ``log u_i`` before this step (the state).
        tau: temperature > 0. gamma: moving-average weight of the new estimate, in (0, 1].
        variant: ``"dft"`` or ``"dft2"``.
        demo_token_counts, gen_token_counts: ``(B,)``, ``(B, k)`` response lengths (DFT2).
        gen_mask: optional ``(B, k)`` bool, the samples that count (default: all).

    Returns:
        Per-example losses ``(B,)`` and stats: ``dft/log_normalizer`` (the updated ``log u_i``,
        the caller's new state), ``dft/weights`` (mean ``w_ij`` over k), the loss parts
        ``loss/chosen`` (``-s(y_i)``) and ``loss/rejected`` (``tau log u_i``), and TRL's
        ``rewards/*`` with the discriminative logit ``s / tau`` as the reward: a margin
        ``> 0`` means the demonstration outscores the sample (``rewards/accuracies``: the
        fraction of the k samples it outscores).
    """
    if variant not in DFT_VARIANTS:
        raise ValueError(f"unknown DFT variant {variant!r}; choose one of {DFT_VARIANTS}")
    if tau <= 0 or not 0 < gamma <= 1:
        raise ValueError(f"DFT needs tau > 0 and 0 < gamma <= 1, got tau={tau}, gamma={gamma}")
    gen_logps = per_sample(policy_gen_logps, policy_demo_logps)
    kept = torch.ones_like(gen_logps, dtype=torch.bool) if gen_mask is None else gen_mask.bool()
    if variant == "dft":
        if ref_gen_logps is None:
            raise ValueError("DFT's importance weights need the samples' reference log-probs")
        demo_scores, gen_scores = policy_demo_logps, gen_logps
        log_ratios = gen_scores / tau - per_sample(ref_gen_logps, policy_demo_logps)
    else:
        if demo_token_counts is None or gen_token_counts is None:
            raise ValueError("DFT2 length-normalises: it needs the demo and sample token counts")
        demo_scores = policy_demo_logps / demo_token_counts.clamp(min=1)
        gen_scores = gen_logps / per_sample(gen_token_counts, policy_demo_logps).clamp(min=1)
        log_ratios = gen_scores / tau
    with torch.no_grad():
        ratios = log_ratios.detach().masked_fill(~kept, float("-inf"))
        counts = kept.sum(dim=-1).clamp(min=1).to(ratios.dtype)
        log_mean = torch.logsumexp(ratios, dim=-1) - torch.log(counts)  # log ghat_i
        if gamma < 1:
            previous = log_normalizer.to(ratios.dtype)
            log_u = torch.logaddexp(math.log1p(-gamma) + previous, math.log(gamma) + log_mean)
        else:
            log_u = log_mean
        weights = torch.exp(ratios - log_u[:, None])  # 0 where left out
    weighted = sample_mean(weights * gen_scores, kept)
    surrogate = -demo_scores + weighted  # the gradient of the code's loss
    losses = surrogate - weighted.detach() + tau * log_u  # its value: -s(y_i) + tau log u_i
    stats = _reward_stats(demo_scores / tau, gen_scores / tau, kept)
    stats.update(
        {
            "dft/log_normalizer": log_u.detach(),
            "dft/weights": sample_mean(weights, kept),
            "loss/chosen": -demo_scores.detach(),
            "loss/rejected": tau * log_u.detach(),
        }
    )
    return losses, stats


def sft_loss(policy_demo_logps: Tensor, demo_token_counts: Tensor) -> tuple[Tensor, Stats]:
    """Supervised fine-tuning: ``-log pi_theta(y_demo|x) / |y_demo|`` (mean over tokens)."""
    token_mean_logps = policy_demo_logps / demo_token_counts.clamp(min=1)
    return -token_mean_logps, {"logps/chosen_per_token": token_mean_logps.detach()}


def dynamic_ft_loss(
    policy_demo_prob_weighted_logps: Tensor,
    policy_demo_logps: Tensor,
    demo_token_counts: Tensor,
) -> tuple[Tensor, Stats]:
    """Dynamic Fine-Tuning (Wu et al. 2025, arXiv 2508.05629): SFT with each token's loss
    weighted by its own detached probability ``p_t = pi_theta(y_t | x, y_<t)``::

        loss_i = -(1/|y_i|) sum_t sg(p_t) log p_t        (mean over the demonstration's tokens)

    so the gradient ``-(1/|y_i|) sum_t p_t grad log p_t`` down-weights the tokens the model
    finds unlikely. The value is not a likelihood: a token's ``-p log p`` rises with ``p`` up to
    ``p = 1/e``, so on unlikely demonstrations the loss grows as training raises their
    log-probs (``logps/chosen``). Per token this is TRL's ``SFTConfig(loss_type="dft")``
    (``-exp(log p).detach() * log p``). TRL divides the step's sum by the step's token count;
    with ``demo_token_counts`` the lengths, each demonstration's sum is divided by its own
    length (as :func:`sft_loss`), which agrees on equal lengths; with every count the step's
    mean length (``--sft-token-mean step``, :class:`gsil.methods.SFT`) the mean over the
    step's examples is TRL's loss.

    Args:
        policy_demo_prob_weighted_logps: ``(B,)`` ``sum_t sg(p_t) log p_t`` of each
            demonstration (:class:`gsil.logprobs.SequenceLogps`; its mean with
            ``demo_token_counts`` of ones when already length-averaged).
        policy_demo_logps: ``(B,)`` ``log pi_theta(y_demo|x)``, for the statistic only.
        demo_token_counts: ``(B,)`` response lengths.

    Returns per-example losses ``(B,)`` and the statistic ``logps/chosen_per_token`` (the plain
    token-mean log-prob, as :func:`sft_loss`'s).
    """
    counts = demo_token_counts.clamp(min=1)
    stats = {"logps/chosen_per_token": (policy_demo_logps / counts).detach()}
    return -policy_demo_prob_weighted_logps / counts, stats


def _reward_stats(
    chosen_rewards: Tensor, rejected_rewards: Tensor, gen_mask: Tensor | None = None
) -> Stats:
    """TRL's reward statistics (``DPOTrainer``): the chosen side is the demonstration.

    ``chosen_rewards`` is ``(B,)``, ``rejected_rewards`` ``(B, k)`` or ``(B,)``; the pairs are
    (demonstration, sample j) and every statistic is its mean over the k pairs.
    """
    rejected = per_sample(rejected_rewards, chosen_rewards)
    margins = chosen_rewards[..., None] - rejected
    return {
        "rewards/chosen": chosen_rewards.detach(),
        "rewards/rejected": sample_mean(rejected.detach(), gen_mask),
        "rewards/margins": sample_mean(margins.detach(), gen_mask),
        "rewards/accuracies": sample_mean((margins > 0).float().detach(), gen_mask),
    }
