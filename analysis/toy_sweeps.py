"""Sweeps over the exact testbed (:mod:`analysis.toy`): plain dicts of lists, ready to plot.

Defaults keep a full sweep well under a minute on two CPU cores: ``V = 3``, ``L = 3``,
3 prompts (27 sequences each, 117 table entries).
"""

from __future__ import annotations

import torch
from torch import Tensor

from analysis.toy import (
    Method,
    ToySpace,
    data_distribution,
    exact_pairs,
    gsil_target,
    kl,
    log_normaliser,
    make_space,
    random_table,
    run_rounds,
    sample_indices,
    sampled_pairs,
    sequence_logps,
    train_round,
)

CALIBRATED_LOSSES = ("logistic", "brier", "exponential", "kliep", "lsif")
ALL_LOSSES = CALIBRATED_LOSSES + ("hinge",)


def setup(
    data_kind: str = "multimodal", seed: int = 0, init_scale: float = 1.0
) -> tuple[ToySpace, Tensor, Tensor]:
    """The default testbed: ``(space, pi_data probs, pi_0 table)``."""
    space = make_space()
    return (
        space,
        data_distribution(space, data_kind, seed=seed),
        random_table(space, init_scale, seed),
    )


def default_methods(beta: float = 1.0, shift: float = 0.0) -> list[Method]:
    """SFT, SPIN and GSIL with every built-in estimator (power with gamma = 0.5)."""
    methods = [Method("sft"), Method("spin", beta=beta)]
    methods += [Method("gsil", name, beta=beta, shift=shift) for name in ALL_LOSSES]
    methods.append(Method("gsil", "power", {"gamma": 0.5}, beta=beta, shift=shift))
    return methods


def convergence_sweep(
    methods: list[Method] | None = None,
    n_rounds: int = 6,
    data_kinds: tuple[str, ...] = ("multimodal",),
    n_samples: int | None = None,
) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{data_kind: {method name: metrics per round}}`` (see :func:`analysis.toy.run_rounds`)."""
    methods = default_methods() if methods is None else methods
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for kind in data_kinds:
        space, data_probs, init = setup(kind)
        out[kind] = {
            m.name: run_rounds(space, data_probs, init, m, n_rounds, n_samples)["metrics"]
            for m in methods
        }
    return out


def beta_sweep(
    betas: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0),
    losses: tuple[str, ...] = ("logistic", "exponential"),
    n_rounds: int = 5,
) -> dict[str, dict[float, dict[str, list[float]]]]:
    """``{method name: {beta: metrics per round}}`` for SPIN and GSIL with ``losses``, shift 0.

    The exact per-round optimum of a calibrated loss (and of SPIN) is, up to the normaliser,
    ``pi_{t+1} = pi_t^(1-1/b) pi_data^(1/b)`` with ``b = beta / ratio_scale``: in log space
    the distance to ``pi_data`` is multiplied by ``1 - 1/b`` per round, so rounds converge for
    ``b > 1/2`` and oscillate with growing amplitude for ``b < 1/2``.
    """
    space, data_probs, init = setup()
    out: dict[str, dict[float, dict[str, list[float]]]] = {}
    for beta in betas:
        methods = [Method("spin", beta=beta)]
        methods += [Method("gsil", name, beta=beta) for name in losses]
        for m in methods:
            result = run_rounds(space, data_probs, init, m, n_rounds, max_steps=200)
            out.setdefault(m.name, {})[beta] = result["metrics"]
    return out


def normaliser_bias_grid(
    losses: tuple[str, ...] = ALL_LOSSES,
    betas: tuple[float, ...] = (0.5, 1.0, 2.0),
    shifts: tuple[float, ...] = (-1.0, 0.0, 1.0),
    n_rounds: int = 3,
) -> dict:
    """The fixed-point bias of the unpaired loss, per loss, beta and shift (exact, from ``pi_0``).

    Arrays ``[n_losses, n_betas, n_shifts]``: ``kl_to_target`` = KL(target || pi_1) after one
    exactly optimised round, with target = normalised ``pi_0^(1-1/beta) pi_data^(1/beta)``
    (what the round would reach if the normaliser cancelled, as it does for SPIN);
    ``kl_to_data`` = KL(pi_data || pi_1); ``final_kl_to_data`` = KL(pi_data || pi_T) after
    ``n_rounds``; ``abs_log_normaliser`` = mean_x |log Z_x| at round 1. Also
    ``spin_kl_to_target`` ``[n_betas]``, the paired baseline.
    """
    space, data_probs, init = setup()
    ref_probs = sequence_logps(init, space).exp()
    shape = (len(losses), len(betas), len(shifts))
    grids = {k: torch.zeros(shape, dtype=torch.float64) for k in ("kl_to_target", "kl_to_data")}
    grids["final_kl_to_data"] = torch.zeros(shape, dtype=torch.float64)
    grids["abs_log_normaliser"] = torch.zeros(shape, dtype=torch.float64)
    for i, loss in enumerate(losses):
        for j, beta in enumerate(betas):
            target = gsil_target(ref_probs, data_probs, beta)
            for k, shift in enumerate(shifts):
                m = Method("gsil", loss, beta=beta, shift=shift)
                result = run_rounds(space, data_probs, init, m, n_rounds, max_steps=200)
                pi_1 = sequence_logps(result["tables"][1], space).exp()
                grids["kl_to_target"][i, j, k] = kl(target, pi_1).mean()
                grids["kl_to_data"][i, j, k] = kl(data_probs, pi_1).mean()
                grids["final_kl_to_data"][i, j, k] = result["metrics"]["forward_kl"][-1]
                log_z = log_normaliser(ref_probs, data_probs, beta, shift)
                grids["abs_log_normaliser"][i, j, k] = log_z.abs().mean()
    spin = []
    for beta in betas:
        result = run_rounds(space, data_probs, init, Method("spin", beta=beta), 1, max_steps=200)
        pi_1 = sequence_logps(result["tables"][1], space).exp()
        spin.append(kl(gsil_target(ref_probs, data_probs, beta), pi_1).mean().item())
    out = {k: v.numpy() for k, v in grids.items()}
    out.update(losses=list(losses), betas=list(betas), shifts=list(shifts), spin_kl_to_target=spin)
    return out


def demo_loglik_trajectories(
    methods: list[Method] | None = None,
    n_samples: tuple[int | None, ...] = (None, 4),
    steps: int = 400,
    lr: float = 0.05,
    seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """``E_data[log pi]`` (nats) after every Adam step of round 1, per data regime and method.

    Keys of the outer dict: ``"exact"`` or ``"n=<samples per prompt>"``. Sampled regimes draw
    demonstrations from ``pi_data`` and generations from ``pi_0`` once (seeded) and pair them.
    """
    methods = methods or [
        Method("spin", beta=0.5),
        Method("gsil", "logistic", beta=0.5),
        Method("gsil", "kliep", beta=0.5),
        Method("sft"),
    ]
    space, data_probs, init = setup()
    ref_probs = sequence_logps(init, space).exp()
    out: dict[str, dict[str, list[float]]] = {}
    for n in n_samples:
        if n is None:
            key, pairs = "exact", exact_pairs(data_probs, ref_probs)
        else:
            gen = torch.Generator().manual_seed(seed)
            demo_idx = sample_indices(data_probs, n, gen)
            gen_idx = sample_indices(ref_probs, n, gen)
            key, pairs = f"n={n}", sampled_pairs(demo_idx, gen_idx, space.n_sequences)
        out[key] = {
            m.name: train_round(
                space, init, pairs, m, data_probs, optimizer="adam", max_steps=steps, lr=lr
            ).demo_logliks
            for m in methods
        }
    return out
