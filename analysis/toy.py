"""The exact testbed: enumerable responses, a tabular autoregressive policy, exact expectations.

Each prompt ``x`` answers with a sequence ``y`` of length ``L`` over a vocabulary of size ``V``;
all ``N = V^L`` sequences are enumerated, so every expectation is an exact finite sum. The
policy is a table of logits, one softmax per ``(prompt, prefix)``:

    log pi(y|x) = sum_t log softmax(table[x, prefix(y_<t)])[y_t]

which normalises exactly as a language model does and can represent any strictly positive
distribution over sequences (chain rule; :func:`table_from_probs`).

Every method is one expectation over (demonstration, generation) pairs with weights
``pair_probs[x, i, j]``: exact = ``pi_data(y_i|x) * pi_ref(y_j|x)`` (a product, so the GSIL part
is ``E_data[l_demo] + E_ref[l_gen]`` and SPIN's pairs are exact too); sampled = the empirical
distribution of drawn pairs. A round starts the policy at ``pi_ref = pi_t`` and minimises the
expected loss over the table (float64, L-BFGS or Adam); the result is ``pi_{t+1}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gsil.estimators import DensityRatioEstimator, get_estimator
from gsil.objectives import sft_loss, spin_loss

DTYPE = torch.float64
DATA_KINDS = ("peaked", "multimodal", "long_tailed")


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: the testbed's tensors are tiny, and on a shared machine the
    intra-op thread pool costs ~50x more than the arithmetic. Restores the setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class ToySpace:
    """All sequences of length ``length`` over ``vocab_size`` tokens, for ``n_prompts`` prompts.

    ``sequences[n, t]`` is token t of sequence n; ``prefix_index[n, t]`` the row of the logits
    table that predicts it (prefixes of length t are numbered after all shorter ones).
    """

    n_prompts: int
    vocab_size: int
    length: int
    sequences: Tensor
    prefix_index: Tensor

    @property
    def n_sequences(self) -> int:
        return self.sequences.shape[0]

    @property
    def n_prefixes(self) -> int:
        return sum(self.vocab_size**t for t in range(self.length))


def make_space(n_prompts: int = 3, vocab_size: int = 3, length: int = 3) -> ToySpace:
    """Enumerate the ``vocab_size ** length`` sequences and their prefix rows."""
    grids = torch.cartesian_prod(*[torch.arange(vocab_size)] * length)
    sequences = grids.reshape(-1, length)
    prefix_index = torch.zeros_like(sequences)
    offset = 0
    for t in range(length):
        code = torch.zeros(sequences.shape[0], dtype=torch.long)
        for k in range(t):
            code = code * vocab_size + sequences[:, k]
        prefix_index[:, t] = offset + code
        offset += vocab_size**t
    return ToySpace(n_prompts, vocab_size, length, sequences, prefix_index)


def sequence_logps(table: Tensor, space: ToySpace) -> Tensor:
    """``log pi(y|x)`` for every prompt and sequence, shape ``[n_prompts, n_sequences]``."""
    token_logps = torch.log_softmax(table, dim=-1)[:, space.prefix_index, space.sequences]
    return token_logps.sum(-1)


def table_from_probs(probs: Tensor, space: ToySpace) -> Tensor:
    """The logits table whose policy is ``probs`` (``[n_prompts, n_sequences]``, positive).

    Row ``prefix`` holds ``log P(prefix + v)``, the marginal mass of each continuation; the
    per-row softmax turns it into ``P(v | prefix)``.
    """
    mass = torch.zeros(space.n_prompts, space.n_prefixes, space.vocab_size, dtype=DTYPE)
    for t in range(space.length):
        flat = space.prefix_index[:, t] * space.vocab_size + space.sequences[:, t]
        mass.view(space.n_prompts, -1).index_add_(1, flat, probs.to(DTYPE))
    return torch.log(mass)


def random_table(space: ToySpace, scale: float = 1.0, seed: int = 0) -> Tensor:
    """A starting policy ``pi_0``: i.i.d. ``N(0, scale^2)`` logits per (prompt, prefix, token)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (space.n_prompts, space.n_prefixes, space.vocab_size)
    return scale * torch.randn(shape, generator=gen, dtype=DTYPE)


def data_distribution(
    space: ToySpace, kind: str = "multimodal", seed: int = 0, floor: float = 0.1
) -> Tensor:
    """A known ``pi_data(y|x)``, ``[n_prompts, n_sequences]``, mixed with ``floor`` of uniform.

    ``peaked``: one sequence holds the rest of the mass; ``multimodal``: three sequences hold
    0.40 / 0.35 / 0.25 of it; ``long_tailed``: Zipf weights ``rank^-1.1`` over all sequences.
    Positions are a seeded random permutation per prompt.
    """
    if kind not in DATA_KINDS:
        raise ValueError(f"unknown data kind {kind!r}; choose one of {DATA_KINDS}")
    gen = torch.Generator().manual_seed(seed)
    n = space.n_sequences
    rows = []
    for _ in range(space.n_prompts):
        order = torch.randperm(n, generator=gen)
        weights = torch.zeros(n, dtype=DTYPE)
        if kind == "peaked":
            weights[order[0]] = 1.0
        elif kind == "multimodal":
            weights[order[:3]] = torch.tensor([0.40, 0.35, 0.25], dtype=DTYPE)
        else:
            weights[order] = torch.arange(1, n + 1, dtype=DTYPE) ** -1.1
        rows.append((1 - floor) * weights / weights.sum() + floor / n)
    return torch.stack(rows)


def mode_mask(data_probs: Tensor) -> Tensor:
    """The data's modes: sequences with at least half the largest ``pi_data`` of their prompt."""
    return data_probs >= 0.5 * data_probs.max(dim=-1, keepdim=True).values


def gsil_target(ref_probs: Tensor, data_probs: Tensor, beta: float) -> Tensor:
    """The predicted GSIL fixed point ``pi_ref^(1-1/beta) pi_data^(1/beta)``, normalised."""
    log_target = (1 - 1 / beta) * torch.log(ref_probs) + torch.log(data_probs) / beta
    return torch.softmax(log_target, dim=-1)


def log_normaliser(ref_probs: Tensor, data_probs: Tensor, beta: float, shift: float) -> Tensor:
    """``log Z_x`` of the pointwise optimum ``pi_ref (pi_data/pi_ref)^(1/beta) exp(-shift/beta)``.

    The unpaired loss is minimised pointwise by this unnormalised "policy"; ``log Z_x = 0`` for
    every prompt is the condition for no normaliser bias. With beta = 1 it is ``-shift`` for all
    prompts; otherwise ``(1/beta - 1) D_{1/beta}(pi_data || pi_ref) - shift/beta`` (Renyi),
    which varies per prompt, so no single shift can absorb it.
    """
    log_terms = (1 - 1 / beta) * torch.log(ref_probs) + torch.log(data_probs) / beta
    return torch.logsumexp(log_terms, dim=-1) - shift / beta


def kl(p: Tensor, q: Tensor) -> Tensor:
    """``KL(p || q)`` per prompt (last axis is the sequence axis)."""
    return (p * (torch.log(p) - torch.log(q))).sum(-1)


def policy_metrics(policy_probs: Tensor, data_probs: Tensor) -> dict[str, float]:
    """Per-prompt means of the distances from the policy to ``pi_data``.

    forward_kl = KL(pi_data || pi) (nats), reverse_kl = KL(pi || pi_data) (nats),
    tv = (1/2) sum |pi_data - pi|, demo_loglik = E_data[log pi(y|x)] (nats per sequence),
    mode_mass = pi(data's modes) and data_mode_mass = pi_data(data's modes).
    """
    modes = mode_mask(data_probs)
    return {
        "forward_kl": kl(data_probs, policy_probs).mean().item(),
        "reverse_kl": kl(policy_probs, data_probs).mean().item(),
        "tv": (0.5 * (data_probs - policy_probs).abs().sum(-1)).mean().item(),
        "demo_loglik": (data_probs * torch.log(policy_probs)).sum(-1).mean().item(),
        "mode_mass": (policy_probs * modes).sum(-1).mean().item(),
        "data_mode_mass": (data_probs * modes).sum(-1).mean().item(),
    }


@dataclass(frozen=True)
class Method:
    """A training objective: ``kind`` in {sft, spin, gsil}; GSIL takes an estimator."""

    kind: str
    estimator: str = "logistic"
    estimator_params: dict = field(default_factory=dict)
    beta: float = 1.0
    shift: float = 0.0

    @property
    def name(self) -> str:
        if self.kind != "gsil":
            return self.kind
        params = ",".join(f"{v:g}" for v in self.estimator_params.values())
        return f"gsil-{self.estimator}" + (f"({params})" if params else "")

    def make_estimator(self) -> DensityRatioEstimator:
        return get_estimator(self.estimator, **self.estimator_params)


def method_loss(
    method: Method, policy_logps: Tensor, ref_logps: Tensor, pair_probs: Tensor, length: int
) -> Tensor:
    """``E_{(y_d, y_g) ~ pair_probs}[loss(y_d, y_g)]``, averaged over prompts.

    SPIN is evaluated with :func:`gsil.objectives.spin_loss` on the ``[n_prompts, N, N]`` grid
    of (demonstration i, generation j) pairs. GSIL and SFT are additive over the pair, so their
    expectation only needs the marginals ``pair_probs.sum(-1)`` (demonstrations) and
    ``pair_probs.sum(-2)`` (generations):

        E[l_demo(f(y_d)) + l_gen(f(y_g))] = sum_y P_demo(y) l_demo(f(y)) + P_gen(y) l_gen(f(y))

    with ``f = beta * (log pi - log pi_ref) + shift`` exactly as :func:`gsil.objectives.gsil_loss`
    builds it (a test holds the two forms equal).
    """
    if method.kind == "spin":
        pd, pg = policy_logps[:, :, None], policy_logps[:, None, :]
        rd, rg = ref_logps[:, :, None], ref_logps[:, None, :]
        losses, _ = spin_loss(*torch.broadcast_tensors(pd, pg, rd, rg), method.beta)
        return (pair_probs * losses).sum((-1, -2)).mean()
    demo_marginal = pair_probs.sum(-1)
    if method.kind == "sft":
        losses, _ = sft_loss(policy_logps, torch.full_like(policy_logps, float(length)))
        return (demo_marginal * losses).sum(-1).mean()
    if method.kind == "gsil":
        est = method.make_estimator()
        logits = method.beta * (policy_logps - ref_logps) + method.shift
        demo_part = (demo_marginal * est.demo_loss(logits)).sum(-1)
        gen_part = (pair_probs.sum(-2) * est.gen_loss(logits)).sum(-1)
        return (demo_part + gen_part).mean()
    raise ValueError(f"unknown method kind {method.kind!r}; choose sft, spin or gsil")


def exact_pairs(data_probs: Tensor, ref_probs: Tensor) -> Tensor:
    """Exact pair weights ``pi_data(y_i|x) pi_ref(y_j|x)``, shape ``[n_prompts, N, N]``."""
    return data_probs[:, :, None] * ref_probs[:, None, :]


def sample_indices(probs: Tensor, n_samples: int, generator: torch.Generator) -> Tensor:
    """``n_samples`` sequence indices per prompt drawn from ``probs``, ``[n_prompts, n]``."""
    return torch.multinomial(probs.float(), n_samples, replacement=True, generator=generator)


def sampled_pairs(demo_idx: Tensor, gen_idx: Tensor, n_sequences: int) -> Tensor:
    """Empirical pair weights of ``(demo_idx[:, k], gen_idx[:, k])``, ``[n_prompts, N, N]``."""
    n_prompts, n = demo_idx.shape
    weights = torch.zeros(n_prompts, n_sequences * n_sequences, dtype=DTYPE)
    flat = demo_idx * n_sequences + gen_idx
    weights.scatter_add_(1, flat, torch.full(flat.shape, 1.0 / n, dtype=DTYPE))
    return weights.view(n_prompts, n_sequences, n_sequences)


@dataclass
class RoundResult:
    """One round: the trained table, per-step ``loss`` / ``demo_loglik``, and convergence."""

    table: Tensor
    losses: list[float]
    demo_logliks: list[float]
    converged: bool


@single_thread()
def train_round(
    space: ToySpace,
    ref_table: Tensor,
    pair_probs: Tensor,
    method: Method,
    data_probs: Tensor,
    optimizer: str = "lbfgs",
    max_steps: int = 500,
    lr: float = 0.05,
    grad_tol: float = 1e-8,
) -> RoundResult:
    """Minimise the expected loss over the table, starting at ``pi_ref``.

    ``optimizer`` is ``lbfgs`` (strong-Wolfe line search, at most ``max_steps`` iterations,
    stops when the largest gradient entry is below ``grad_tol``; ``losses`` has one entry per
    function evaluation, ``demo_logliks`` the start and the end) or ``adam`` (``max_steps``
    steps at ``lr``: a training run's trajectory, with ``demo_logliks[k]`` the exact
    ``E_data[log pi(y|x)]`` (nats) after k steps).
    ``converged`` means the final largest gradient entry is below 1e-6.
    """
    ref_logps = sequence_logps(ref_table, space).detach()
    table = ref_table.detach().clone().requires_grad_(True)

    def demo_loglik() -> float:
        with torch.no_grad():
            return (data_probs * sequence_logps(table, space)).sum(-1).mean().item()

    losses: list[float] = []
    logliks = [demo_loglik()]

    def closure() -> Tensor:
        opt.zero_grad()
        loss = method_loss(
            method, sequence_logps(table, space), ref_logps, pair_probs, space.length
        )
        loss.backward()
        return loss

    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(
            [table],
            lr=1.0,
            max_iter=max_steps,
            max_eval=2 * max_steps,
            history_size=50,
            tolerance_grad=grad_tol,
            tolerance_change=1e-16,
            line_search_fn="strong_wolfe",
        )

        def recording_closure() -> Tensor:
            loss = closure()
            losses.append(loss.item())
            return loss

        opt.step(recording_closure)
        logliks.append(demo_loglik())
    elif optimizer == "adam":
        opt = torch.optim.Adam([table], lr=lr)
        for _ in range(max_steps):
            losses.append(opt.step(closure).item())
            logliks.append(demo_loglik())
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose lbfgs or adam")
    closure()
    converged = table.grad.abs().max().item() < 1e-6
    return RoundResult(table.detach(), losses, logliks, converged)


def run_rounds(
    space: ToySpace,
    data_probs: Tensor,
    init_table: Tensor,
    method: Method,
    n_rounds: int = 5,
    n_samples: int | None = None,
    seed: int = 0,
    **round_kwargs,
) -> dict:
    """Self-imitation rounds: ``pi_ref = pi_t``, train, ``pi_{t+1} = result``.

    ``n_samples=None`` uses exact expectations; an integer draws that many demonstrations per
    prompt once (a fixed data set) and fresh generations from ``pi_t`` every round. Returns
    ``{"metrics": {name: [value at round 0..T]}, "tables": [...], "rounds": [RoundResult]}``.
    """
    gen = torch.Generator().manual_seed(seed)
    demo_idx = None if n_samples is None else sample_indices(data_probs, n_samples, gen)
    table = init_table.to(DTYPE)
    tables, rounds = [table], []
    metrics: dict[str, list[float]] = {}

    def record(tab: Tensor) -> None:
        for key, value in policy_metrics(sequence_logps(tab, space).exp(), data_probs).items():
            metrics.setdefault(key, []).append(value)

    record(table)
    for _ in range(n_rounds):
        ref_probs = sequence_logps(table, space).exp()
        if demo_idx is None:
            pairs = exact_pairs(data_probs, ref_probs)
        else:
            gen_idx = sample_indices(ref_probs, n_samples, gen)
            pairs = sampled_pairs(demo_idx, gen_idx, space.n_sequences)
        result = train_round(space, table, pairs, method, data_probs, **round_kwargs)
        table = result.table
        tables.append(table)
        rounds.append(result)
        record(table)
    metrics["converged"] = [float(r.converged) for r in rounds]
    return {"metrics": metrics, "tables": tables, "rounds": rounds}


def one_round_bias(
    space: ToySpace, data_probs: Tensor, ref_table: Tensor, method: Method, **round_kwargs
) -> dict[str, float]:
    """The fixed-point bias of one exactly optimised round from ``pi_ref``.

    Returns ``kl_to_target`` = KL(target || pi_1) with target the normalised
    ``pi_ref^(1-1/beta) pi_data^(1/beta)``, ``kl_to_data`` = KL(pi_data || pi_1), and
    ``abs_log_normaliser`` = mean over prompts of ``|log Z_x|`` (:func:`log_normaliser`).
    """
    ref_probs = sequence_logps(ref_table, space).exp()
    result = train_round(
        space, ref_table, exact_pairs(data_probs, ref_probs), method, data_probs, **round_kwargs
    )
    policy_probs = sequence_logps(result.table, space).exp()
    target = gsil_target(ref_probs, data_probs, method.beta)
    log_z = log_normaliser(ref_probs, data_probs, method.beta, method.shift)
    return {
        "kl_to_target": kl(target, policy_probs).mean().item(),
        "kl_to_data": kl(data_probs, policy_probs).mean().item(),
        "kl_ref_to_data": kl(data_probs, ref_probs).mean().item(),
        "abs_log_normaliser": log_z.abs().mean().item(),
        "converged": float(result.converged),
    }
