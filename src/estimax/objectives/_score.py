"""Score matching as programs: denoising (DSM) with derived weightings, and sliced (SSM).

A noising schedule ``x_t = α(t) x₀ + σ(t) ε`` (``ε ~ N(0, I)``) is a pair of functions of
``t``: :func:`vp`, :func:`ve`, or any :class:`Schedule`. The DSM objective is stated once,
in score space,

    L(θ) = E_{t, x₀, ε}[ λ(t) ‖ŝ_θ(x_t, t) - ∇log p(x_t | x₀)‖² ],   ∇log p(x_t | x₀) = -ε/σ(t),

and a network that predicts ``ε``, ``x₀`` or ``v = αε - σx₀`` instead of the score is trained
on the *same* objective: its output is converted to a score estimate ``ŝ``, so that

    λ(t) ‖ŝ - s‖² = λ(t) c(t) ‖output - target‖²,
    c = 1 (score), 1/σ² (ε), α²/σ⁴ (x₀), α²/(σ²(α²+σ²)²) (v),

and the loss is computed in the network's own parameterization with the weight ``λ·c``
(:func:`loss_weight`). ``λ`` is ``σ²`` (``"sigma2"``: for ``ε``-prediction the plain MSE of
DDPM), the likelihood weighting ``g(t)² = dσ²/dt - 2 (d log α/dt) σ²`` (``"likelihood"``,
derived from the schedule by automatic differentiation), or any function of ``t``.

Both objectives are ``@ex.expectation`` programs of ``(params, x)`` (``x`` a batch, the loss
its mean); their estimators are unbiased for the stated loss (``t``, ``ε`` and the slicing
directions are reparameterized draws whose distributions do not depend on ``θ``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from .._errors import ArgumentError, ProgramError
from ..dsl._primitives import sample
from ..transforms._estimate import Expectation

PREDICTIONS = ("score", "eps", "x0", "v")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """``x_t = alpha(t) x₀ + sigma(t) ε`` for ``t`` in ``[t_min, t_max]``.

    ``alpha`` and ``sigma`` are JAX-traceable functions of a scalar ``t`` (``sigma > 0`` on
    the interval). ``name`` is for messages.
    """

    alpha: Callable
    sigma: Callable
    t_min: float = 1e-3
    t_max: float = 1.0
    name: str = "custom"

    def __post_init__(self):
        if not (callable(self.alpha) and callable(self.sigma)):
            raise ArgumentError("Schedule(alpha, sigma): both must be functions of t (e.g. lambda t: jnp.cos(t)).")
        if not 0.0 <= self.t_min < self.t_max:
            raise ArgumentError(f"Schedule: need 0 <= t_min < t_max; got t_min={self.t_min}, t_max={self.t_max}.")

    def snr(self, t):
        """The signal-to-noise ratio ``α²/σ²``."""
        return self.alpha(t) ** 2 / self.sigma(t) ** 2

    def g2(self, t):
        """The squared diffusion coefficient of the schedule's SDE,
        ``dσ²/dt - 2 (d log α/dt) σ²`` (the likelihood weighting), by autodiff."""
        t = jnp.asarray(t)

        def one(s):
            dvar = jax.grad(lambda u: self.sigma(u) ** 2)(s)
            dlog_alpha = jax.grad(lambda u: jnp.log(self.alpha(u)))(s)
            return dvar - 2.0 * dlog_alpha * self.sigma(s) ** 2

        return jnp.vectorize(one)(t)


def vp(beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3) -> Schedule:
    """The variance-preserving schedule: ``log α = -(β_min t + (β_max - β_min) t²/2)/2``,
    ``σ = sqrt(1 - α²)`` (DDPM in continuous time)."""

    def alpha(t):
        return jnp.exp(-0.5 * (beta_min * t + 0.5 * (beta_max - beta_min) * t**2))

    return Schedule(alpha, lambda t: jnp.sqrt(-jnp.expm1(-(beta_min * t + 0.5 * (beta_max - beta_min) * t**2))),
                    t_min, 1.0, "VP")


def ve(sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 0.0) -> Schedule:
    """The variance-exploding schedule: ``α = 1``, ``σ = σ_min (σ_max/σ_min)^t``."""
    ratio = sigma_max / sigma_min
    return Schedule(lambda t: jnp.ones_like(jnp.asarray(t, float)), lambda t: sigma_min * ratio**t, t_min, 1.0, "VE")


def _check_prediction(prediction):
    if prediction not in PREDICTIONS:
        raise ArgumentError(f"prediction={prediction!r}; expected one of {PREDICTIONS}.")


def to_score(prediction: str, output, x_t, alpha, sigma):
    """The score estimate ``ŝ`` that a network's ``output`` stands for."""
    _check_prediction(prediction)
    if prediction == "score":
        return output
    if prediction == "eps":
        return -output / sigma
    if prediction == "x0":
        return -(x_t - alpha * output) / sigma**2
    eps = (sigma * x_t + alpha * output) / (alpha**2 + sigma**2)  # v
    return -eps / sigma


def target(prediction: str, x0, eps, alpha, sigma):
    """What the network regresses onto, in its own parameterization."""
    _check_prediction(prediction)
    return {"score": -eps / sigma, "eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[prediction]


def conversion(prediction: str, alpha, sigma):
    """``c(t)`` with ``‖ŝ - s‖² = c ‖output - target‖²``."""
    _check_prediction(prediction)
    if prediction == "score":
        return jnp.ones_like(sigma)
    if prediction == "eps":
        return 1.0 / sigma**2
    if prediction == "x0":
        return alpha**2 / sigma**4
    return alpha**2 / (sigma**2 * (alpha**2 + sigma**2) ** 2)


def weighting_fn(weighting, schedule: Schedule) -> Callable:
    """``λ(t)`` for ``weighting`` = ``"sigma2"``, ``"likelihood"`` or a function of ``t``."""
    if callable(weighting):
        return weighting
    if weighting == "sigma2":
        return lambda t: schedule.sigma(t) ** 2
    if weighting == "likelihood":
        return schedule.g2
    raise ArgumentError(f'weighting={weighting!r}; expected "sigma2", "likelihood" or a function of t.')


def loss_weight(schedule: Schedule, prediction: str, weighting="sigma2") -> Callable:
    """``t -> λ(t) c(t)``: the weight of ``‖output - target‖²`` in the network's own
    parameterization that makes its loss the score-space DSM loss with weighting ``λ``.

    For example ``ε``-prediction with ``λ = σ²`` has weight 1 (DDPM's plain MSE), and
    ``x₀``-prediction with the same ``λ`` has weight ``α²/σ² = SNR(t)``.
    """
    lam = weighting_fn(weighting, schedule)
    return lambda t: lam(t) * conversion(prediction, schedule.alpha(t), schedule.sigma(t))


def _expand(v, x):
    return jnp.reshape(v, jnp.shape(v) + (1,) * (jnp.ndim(x) - jnp.ndim(v)))


def dsm(net: Callable, schedule: Schedule | None = None, prediction: str = "eps", weighting="sigma2",
        time: dist.Distribution | None = None, name: str = "dsm") -> Expectation:
    """Denoising score matching of ``net(params, x_t, t)``, a program of ``(params, x)``.

    ``x`` is a batch (leading axis); the value is the batch mean of
    ``λ(t) c(t) ‖net(params, x_t, t) - target‖²`` (see the module docs), an unbiased
    estimate of the score-space loss ``E[λ(t) ‖ŝ - ∇log p(x_t | x₀)‖²]``.

    - ``schedule``: :func:`vp` (default), :func:`ve` or a :class:`Schedule`;
    - ``prediction``: what ``net`` outputs: ``"eps"`` (default), ``"score"``, ``"x0"``, ``"v"``;
    - ``weighting``: ``λ``: ``"sigma2"`` (default), ``"likelihood"`` or a function of ``t``;
    - ``time``: the distribution of ``t`` (default uniform on the schedule's interval); the
      loss is then the ``time``-weighted average over ``t``.
    """
    schedule = vp() if schedule is None else schedule
    if not isinstance(schedule, Schedule):
        raise ArgumentError(f"dsm: schedule must be ex.objectives.vp(), ve() or a Schedule; got {type(schedule).__name__}.")
    _check_prediction(prediction)
    weight = loss_weight(schedule, prediction, weighting)
    time = dist.Uniform(schedule.t_min, schedule.t_max) if time is None else time

    def program(params, x):
        x = jnp.asarray(x)
        if x.ndim < 2:
            raise ProgramError(f"{name}: x must be a batch of shape (n, ...); got shape {x.shape}.")
        n = x.shape[0]
        t = sample(time.expand([n]), name="t")
        eps = sample(dist.Normal(jnp.zeros(x.shape, x.dtype), 1.0).to_event(x.ndim), name="eps")
        a, s = _expand(schedule.alpha(t), x), _expand(schedule.sigma(t), x)
        x_t = a * x + s * eps
        out = net(params, x_t, t)
        if jnp.shape(out) != x.shape:
            raise ProgramError(f"{name}: net(params, x_t, t) returned shape {jnp.shape(out)}; expected {x.shape}, the shape of x.")
        err = jnp.sum(((out - target(prediction, x, eps, a, s)) ** 2).reshape(n, -1), axis=1)
        return jnp.mean(weight(t) * err)

    program.__name__ = name
    return Expectation(program, name=name)


def ssm(score: Callable, projections: int = 1, variance_reduction: bool = True, name: str = "ssm") -> Expectation:
    """Sliced score matching of a model score ``score(params, x)``, a program of ``(params, x)``.

    With directions ``v ~ N(0, I)``: ``E[vᵀ∇ₓ(vᵀs) + ½(vᵀs)²]``, or with
    ``variance_reduction`` (for a model given by its score, SSM-VR) the second term in closed
    form, ``½‖s‖²``. Both are unbiased for Hyvärinen's ``E[tr ∇ₓs + ½‖s‖²]``; ``vᵀ∇ₓ(vᵀs)`` is
    one Jacobian-vector product per direction. ``x`` is a batch; the value is its mean.
    """
    if isinstance(projections, bool) or not isinstance(projections, int) or projections < 1:
        raise ArgumentError(f"ssm: projections must be a positive integer; got {projections!r}.")

    def program(params, x):
        x = jnp.asarray(x)
        n = x.shape[0]
        v = sample(dist.Normal(jnp.zeros((projections, *x.shape), x.dtype), 1.0).to_event(x.ndim + 1), name="v")
        f = lambda z: score(params, z)
        s, jv = jax.vmap(lambda u: jax.jvp(f, (x,), (u,)))(v)  # (p, n, ...) each
        quad = jnp.sum((v * jv).reshape(projections, n, -1), axis=2)
        if variance_reduction:
            second = 0.5 * jnp.sum((s[0] ** 2).reshape(n, -1), axis=1)[None]
        else:
            second = 0.5 * jnp.sum((v * s).reshape(projections, n, -1), axis=2) ** 2
        return jnp.mean(quad + second)

    program.__name__ = name
    return Expectation(program, name=name)


__all__ = ["Schedule", "vp", "ve", "dsm", "ssm", "loss_weight", "to_score", "target", "conversion", "PREDICTIONS"]
