"""Density-ratio estimators: the convex family behind GSIL (theory page, section 2).

Two samples, P (demonstrations, label +1) and Q (self-generated, label -1), and a scalar logit
``f`` that models the log density ratio ``log r = log p/q``. An estimator is a pair of
elementwise losses ``demo_loss(f)`` (applied on P) and ``gen_loss(f)`` (applied on Q); the
population objective ``E_P[demo_loss(f)] + E_Q[gen_loss(f)]`` is minimised pointwise by
``f*(r)``, and a *calibrated* estimator recovers ``log r`` from ``f*`` through its link.

Every calibrated member is a Bregman density-ratio matching loss (Sugiyama, Suzuki & Kanamori
2012): for a strictly convex generator ``h`` and a ratio model ``r = link(f)``,

    demo_loss(f) = -h'(r)                gen_loss(f) = r h'(r) - h(r)

:class:`BregmanEstimator` builds one from ``h`` alone (derivatives by autograd), so a new loss
is a one-line generator. The built-ins below are the same losses in closed, numerically stable
forms (softplus instead of log(sigmoid), linearly extrapolated exponentials), finite with finite
gradients for ``f`` in ``[-1e4, 1e4]`` in float32.

Gradient weights: ``demo_weight(f) = -d demo_loss/df >= 0`` is how hard a demonstration is
pushed up, ``gen_weight(f) = d gen_loss/df >= 0`` how hard an own sample is pushed down.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# exp(x) is computed exactly up to this exponent and continued linearly above it: the loss stays
# convex with a continuous, finite derivative (exp(30) ~ 1e13, far below float32's 3.4e38).
MAX_EXPONENT = 30.0


def safe_exp(x: Tensor, max_exponent: float = MAX_EXPONENT) -> Tensor:
    """``exp(x)`` for ``x <= max_exponent``, its tangent line ``e^c (1 + x - c)`` above.

    Convex, continuously differentiable, and finite for any finite float32 ``x``.
    """
    clipped = x.clamp(max=max_exponent)
    return torch.exp(clipped) * (1.0 + (x - clipped))


def safe_exp_grad(x: Tensor, max_exponent: float = MAX_EXPONENT) -> Tensor:
    """Derivative of :func:`safe_exp`: ``exp(min(x, c))``."""
    return torch.exp(x.clamp(max=max_exponent))


class DensityRatioEstimator:
    """A convex loss pair for classifying demonstrations (P) against own samples (Q).

    Subclasses implement the four elementwise functions. ``ratio_scale`` is the link's slope:
    the estimate of ``log(p/q)`` implied by a logit is ``ratio_scale * f`` (1 for most members,
    2 for the exponential loss whose minimiser is ``(1/2) log r``).
    """

    name: str = "estimator"
    calibrated: bool = True
    ratio_scale: float = 1.0

    def demo_loss(self, logits: Tensor) -> Tensor:
        raise NotImplementedError

    def gen_loss(self, logits: Tensor) -> Tensor:
        raise NotImplementedError

    def demo_weight(self, logits: Tensor) -> Tensor:
        """``-d demo_loss / df``, in closed form."""
        raise NotImplementedError

    def gen_weight(self, logits: Tensor) -> Tensor:
        """``d gen_loss / df``, in closed form."""
        raise NotImplementedError

    def log_ratio(self, logits: Tensor) -> Tensor:
        """The estimate of ``log(p/q)`` implied by the logit (the inverse link)."""
        if not self.calibrated:
            raise ValueError(
                f"the {self.name!r} estimator is not calibrated: its minimiser is "
                "sign(log r), which carries no density ratio; use a calibrated estimator "
                f"({', '.join(n for n in ESTIMATORS if ESTIMATORS[n]().calibrated)})"
            )
        return self.ratio_scale * logits

    def minimiser(self, log_ratio: Tensor) -> Tensor:
        """Population minimiser ``f*`` of ``p l_demo(f) + q l_gen(f)`` given ``log(p/q)``."""
        return log_ratio / self.ratio_scale

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Logistic(DensityRatioEstimator):
    """Bernoulli log-loss: ``softplus(-f)`` on demos, ``softplus(f)`` on own samples.

    Weights ``sigmoid(-f)`` and ``sigmoid(f)``, bounded in [0, 1]; ``f* = log r``.
    """

    name = "logistic"

    def demo_loss(self, logits: Tensor) -> Tensor:
        return F.softplus(-logits)

    def gen_loss(self, logits: Tensor) -> Tensor:
        return F.softplus(logits)

    def demo_weight(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(-logits)

    def gen_weight(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)


class Brier(DensityRatioEstimator):
    """Squared (Brier) loss on ``sigmoid(f)``: ``(1-sigmoid(f))^2`` and ``sigmoid(f)^2``.

    Weights ``2 s (1-s)^2`` and ``2 s^2 (1-s)`` with ``s = sigmoid(f)``: bounded, and vanishing
    when the classifier is confidently wrong. ``f* = log r``.
    """

    name = "brier"

    def demo_loss(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(-logits) ** 2

    def gen_loss(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits) ** 2

    def demo_weight(self, logits: Tensor) -> Tensor:
        return 2 * torch.sigmoid(logits) * torch.sigmoid(-logits) ** 2

    def gen_weight(self, logits: Tensor) -> Tensor:
        return 2 * torch.sigmoid(logits) ** 2 * torch.sigmoid(-logits)


class Exponential(DensityRatioEstimator):
    """Boosting loss ``exp(-f)`` and ``exp(f)``; ``f* = (1/2) log r``, so ``r = exp(2f)``.

    Unbounded weights ``exp(-f)`` and ``exp(f)`` (linearly extrapolated past ``|f| = 30``).
    """

    name = "exponential"
    ratio_scale = 2.0

    def demo_loss(self, logits: Tensor) -> Tensor:
        return safe_exp(-logits)

    def gen_loss(self, logits: Tensor) -> Tensor:
        return safe_exp(logits)

    def demo_weight(self, logits: Tensor) -> Tensor:
        return safe_exp_grad(-logits)

    def gen_weight(self, logits: Tensor) -> Tensor:
        return safe_exp_grad(logits)


class KLIEP(DensityRatioEstimator):
    """Unnormalised KL: ``-f`` on demos (an SFT-like term, weight 1), ``exp(f)`` on own samples."""

    name = "kliep"

    def demo_loss(self, logits: Tensor) -> Tensor:
        return -logits

    def gen_loss(self, logits: Tensor) -> Tensor:
        return safe_exp(logits)

    def demo_weight(self, logits: Tensor) -> Tensor:
        return torch.ones_like(logits)

    def gen_weight(self, logits: Tensor) -> Tensor:
        return safe_exp_grad(logits)


class Power(DensityRatioEstimator):
    """Basu power divergence, ``gamma > 0``:

        demo_loss = -(1 + 1/gamma) exp(gamma f)      gen_loss = exp((1 + gamma) f)

    Weights ``(1+gamma) exp(gamma f)`` and ``(1+gamma) exp((1+gamma) f)``; ``f* = log r``.
    ``gamma = 1`` is twice LSIF; ``gamma -> 0`` tends to KLIEP up to constants.
    """

    name = "power"

    def __init__(self, gamma: float = 1.0):
        if not (isinstance(gamma, int | float) and math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"power estimator needs gamma > 0 (a finite number), got {gamma!r}")
        self.gamma = float(gamma)

    def demo_loss(self, logits: Tensor) -> Tensor:
        return -(1 + 1 / self.gamma) * safe_exp(self.gamma * logits)

    def gen_loss(self, logits: Tensor) -> Tensor:
        return safe_exp((1 + self.gamma) * logits)

    def demo_weight(self, logits: Tensor) -> Tensor:
        return (1 + self.gamma) * safe_exp_grad(self.gamma * logits)

    def gen_weight(self, logits: Tensor) -> Tensor:
        return (1 + self.gamma) * safe_exp_grad((1 + self.gamma) * logits)

    def __repr__(self) -> str:
        return f"Power(gamma={self.gamma})"


class LSIF(Power):
    """Least-squares importance fitting: ``-exp(f)`` on demos, ``exp(2f)/2`` on own samples.

    Weights ``exp(f)`` and ``exp(2f)``; equal to ``power(1) / 2``.
    """

    name = "lsif"

    def __init__(self):
        super().__init__(gamma=1.0)

    def demo_loss(self, logits: Tensor) -> Tensor:
        return super().demo_loss(logits) / 2

    def gen_loss(self, logits: Tensor) -> Tensor:
        return super().gen_loss(logits) / 2

    def demo_weight(self, logits: Tensor) -> Tensor:
        return super().demo_weight(logits) / 2

    def gen_weight(self, logits: Tensor) -> Tensor:
        return super().gen_weight(logits) / 2

    def __repr__(self) -> str:
        return "LSIF()"


class Hinge(DensityRatioEstimator):
    """Margin loss ``relu(1 - f)`` and ``relu(1 + f)``; minimiser ``sign(log r)``: not calibrated.

    Weights ``1[f < 1]`` and ``1[f > -1]``: flat, then zero.
    """

    name = "hinge"
    calibrated = False

    def demo_loss(self, logits: Tensor) -> Tensor:
        return F.relu(1 - logits)

    def gen_loss(self, logits: Tensor) -> Tensor:
        return F.relu(1 + logits)

    def demo_weight(self, logits: Tensor) -> Tensor:
        return (logits < 1).to(logits.dtype)

    def gen_weight(self, logits: Tensor) -> Tensor:
        return (logits > -1).to(logits.dtype)

    def minimiser(self, log_ratio: Tensor) -> Tensor:
        return torch.sign(log_ratio)


class BregmanEstimator(DensityRatioEstimator):
    """A calibrated estimator from any strictly convex generator ``h`` on ``r > 0``.

    With ``r = exp(ratio_scale * f)``:

        demo_loss(f) = -h'(r)          gen_loss(f) = r h'(r) - h(r)

    Pointwise, ``d/dr [p (-h'(r)) + q (r h'(r) - h(r))] = h''(r) (q r - p)``, zero at ``r = p/q``,
    and ``h'' > 0`` makes it the minimum. ``h'`` and the weights come from autograd, so ``h`` must
    be written with torch operations. Example, the logistic loss::

        BregmanEstimator(lambda r: r * torch.log(r) - (1 + r) * torch.log1p(r), name="bkl")

    Not numerically hardened: prefer the built-ins' closed forms for training at large ``|f|``.
    """

    def __init__(
        self,
        generator: Callable[[Tensor], Tensor],
        name: str = "bregman",
        ratio_scale: float = 1.0,
    ):
        self.generator = generator
        self.name = name
        self.ratio_scale = float(ratio_scale)

    def _parts(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(-h'(r), r h'(r) - h(r)), differentiable in the logits when they require grad."""
        with torch.enable_grad():
            if not logits.requires_grad:
                logits = logits.detach().requires_grad_(True)
            ratio = torch.exp(self.ratio_scale * logits)
            h = self.generator(ratio)
            # h is elementwise, so the gradient of its sum is h'(r) at each point; create_graph
            # keeps h' a function of r (and so of the logits) for the weights and for training.
            (h_prime,) = torch.autograd.grad(h.sum(), ratio, create_graph=True)
            return -h_prime, ratio * h_prime - h

    def demo_loss(self, logits: Tensor) -> Tensor:
        return self._parts(logits)[0]

    def gen_loss(self, logits: Tensor) -> Tensor:
        return self._parts(logits)[1]

    def _weight(self, logits: Tensor, part: int, sign: float) -> Tensor:
        with torch.enable_grad():
            leaf = logits.detach().requires_grad_(True)
            loss = self._parts(leaf)[part]
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
        return sign * grad

    def demo_weight(self, logits: Tensor) -> Tensor:
        return self._weight(logits, 0, -1.0)

    def gen_weight(self, logits: Tensor) -> Tensor:
        return self._weight(logits, 1, 1.0)

    def __repr__(self) -> str:
        return f"BregmanEstimator(name={self.name!r}, ratio_scale={self.ratio_scale})"


# Generators of the calibrated built-ins, as functions of r = p/q (Menon & Ong 2016:
# h(r) = -(1 + r) * BayesRisk(r / (1 + r)) for a proper loss). Their Bregman forms equal the
# closed forms above up to additive constants; tests hold them to it.
GENERATORS: dict[str, tuple[Callable[[Tensor], Tensor], float]] = {
    "logistic": (lambda r: r * torch.log(r) - (1 + r) * torch.log1p(r), 1.0),
    "brier": (lambda r: -r / (1 + r), 1.0),
    "exponential": (lambda r: -2 * torch.sqrt(r), 2.0),
    "kliep": (lambda r: r * torch.log(r) - r, 1.0),
    "lsif": (lambda r: (r - 1) ** 2 / 2, 1.0),
}


def power_generator(gamma: float) -> Callable[[Tensor], Tensor]:
    """Basu's power generator ``h(r) = (r^(1+gamma) - r) / gamma``."""
    return lambda r: (r ** (1 + gamma) - r) / gamma


ESTIMATORS: dict[str, type[DensityRatioEstimator]] = {
    "logistic": Logistic,
    "brier": Brier,
    "exponential": Exponential,
    "kliep": KLIEP,
    "lsif": LSIF,
    "power": Power,
    "hinge": Hinge,
}


def get_estimator(name: str, **params: float) -> DensityRatioEstimator:
    """Look up a built-in estimator by name, e.g. ``get_estimator("power", gamma=0.5)``.

    Raises ``ValueError`` naming the valid choices for an unknown name or a bad parameter.
    """
    key = name.strip().lower()
    if key not in ESTIMATORS:
        raise ValueError(
            f"unknown estimator {name!r}; choose one of: {', '.join(ESTIMATORS)} "
            "(power takes gamma > 0, e.g. power with gamma=0.5)"
        )
    cls = ESTIMATORS[key]
    try:
        return cls(**params)
    except TypeError as err:
        accepted = "gamma" if cls is Power else "no parameters"
        raise ValueError(
            f"estimator {key!r} takes {accepted}; got {sorted(params)} ({err})"
        ) from None
