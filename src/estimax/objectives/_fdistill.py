"""f-divergence distribution matching (f-distill) of a one-step generator, as a program.

For a student ``q_θ``, the law of ``x = G_θ(z)``, a teacher ``p`` and a convex ``f`` with
``f(1) = 0``, ``D_f(p ‖ q_θ) = E_q[f(p/q)]`` has the gradient (differentiate ``q`` inside the
integral, then reparameterize with the integrand held fixed)

    ∇_θ D_f = E_z[ h(r(x)) (∇ₓlog q_θ(x) - ∇ₓlog p(x)) · ∂G_θ(z)/∂θ ],   h(r) = r² f''(r),

with ``r = p/q``. ``h`` is derived from ``f`` by automatic differentiation
(:func:`weight`), so any convex ``f`` a user writes works; the built-ins are in
:data:`DIVERGENCES` (reverse KL has ``h ≡ 1``: variational score distillation). In practice
``∇log p`` is a teacher score network, ``∇log q`` a "fake" score network trained on the
student's samples, and ``r`` comes from a discriminator head (``log r``).

The program's *value* is the surrogate ``E_z[stop_gradient(h (s_q - s_p)) · G_θ(z)]``, whose
gradient is the estimator above; the value itself is not the divergence.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from .._errors import ArgumentError
from ..dsl._primitives import sample, vmap
from ..transforms._estimate import Expectation
from ._score import Schedule


def reverse_kl(r):
    return -jnp.log(r)


def forward_kl(r):
    return r * jnp.log(r)


def jeffreys(r):
    return (r - 1.0) * jnp.log(r)


def jensen_shannon(r):
    return r * jnp.log(r) - (r + 1.0) * jnp.log((r + 1.0) / 2.0)


def softened_reverse_kl(r):
    return (r + 1.0) * jnp.log(r + 1.0) - r * jnp.log(r) - jnp.log(r) - 2.0 * jnp.log(2.0)


def squared_hellinger(r):
    return (jnp.sqrt(r) - 1.0) ** 2


def alpha_divergence(alpha: float) -> Callable:
    """``f(r) = (r^α - α r - (1 - α)) / (α(α - 1))`` (``α ∉ {0, 1}``): ``h(r) = r^α``."""
    if alpha in (0, 1):
        raise ArgumentError("alpha_divergence: alpha = 0 and 1 are the KL limits; use reverse_kl or forward_kl.")

    def f(r):
        return (r**alpha - alpha * r - (1.0 - alpha)) / (alpha * (alpha - 1.0))

    f.__name__ = f"alpha_divergence({alpha:g})"
    return f


#: the built-in divergences by name: ``f`` with ``f(1) = 0``, convex on ``r > 0``
DIVERGENCES = {
    "reverse_kl": reverse_kl,
    "softened_reverse_kl": softened_reverse_kl,
    "jensen_shannon": jensen_shannon,
    "squared_hellinger": squared_hellinger,
    "forward_kl": forward_kl,
    "jeffreys": jeffreys,
}


def weight(f: Callable | str) -> Callable:
    """``h(r) = r² f''(r)``, by automatic differentiation of ``f`` (elementwise on arrays)."""
    fn = _as_f(f)
    second = jax.grad(jax.grad(lambda r: fn(r)))

    def h(r):
        r = jnp.asarray(r)
        return jnp.vectorize(lambda s: s**2 * second(s))(r)

    return h


def _as_f(f):
    if isinstance(f, str):
        if f.startswith("alpha_divergence"):
            raise ArgumentError('write alpha divergences as ex.objectives.alpha_divergence(0.5), not a string.')
        if f not in DIVERGENCES:
            raise ArgumentError(f"unknown divergence {f!r}; built-ins: {sorted(DIVERGENCES)}, or pass a function f(r).")
        return DIVERGENCES[f]
    if not callable(f):
        raise ArgumentError(f"f must be a function of the ratio r or a built-in name; got {type(f).__name__}.")
    return f


def fdistill(generator: Callable, teacher_score: Callable, fake_score: Callable, log_ratio: Callable,
             f: Callable | str = "reverse_kl", latent: dist.Distribution | None = None, batch: int = 64,
             schedule: Schedule | None = None, clamp: tuple[float, float] | None = None,
             normalize: bool = False, exact: bool = False, name: str = "fdistill") -> Expectation:
    """The f-distill generator objective, a program of ``(params, *data)``.

    - ``generator(params, z)``: a batch of samples from a batch of latents;
    - ``teacher_score(x, t, *data)``, ``fake_score(x, t, *data)``: ``∇ₓlog p`` and
      ``∇ₓlog q`` (at noise level ``t`` with a ``schedule``; ``t`` is 0 without one);
    - ``log_ratio(x, t, *data)``: ``log(p/q)`` per sample (a discriminator's logit);
    - ``f``: a built-in name, ``alpha_divergence(a)``, or any convex ``f(r)``;
    - ``latent``: the distribution of one latent (default ``N(0, 1)``), drawn ``batch`` times;
    - ``schedule``: match the noised distributions, ``x_t = α x + σ ε`` at ``t`` drawn
      uniformly (the scores and ratio are then those of ``p_t`` and ``q_t``);
    - ``clamp=(lo, hi)``: clamp ``r`` (the reference implementation's guard against a
      discriminator's extreme ratios; biased);
    - ``normalize``: divide ``h`` by its batch mean (a self-normalized weight: consistent);
    - ``exact``: the scores and the ratio are the exact ones (analytic teacher and student,
      tests): then the estimator is certified unbiased; otherwise ``consistent``, as the
      fake score and the discriminator converge.

    Other arguments of the program (``*data``) are passed to the three functions: give the
    teacher's, the fake score's and the discriminator's parameters there, so that updating
    them between steps recompiles nothing.
    """
    h = weight(f)
    fname = f if isinstance(f, str) else getattr(f, "__name__", "f")
    latent = dist.Normal(0.0, 1.0) if latent is None else latent
    if clamp is not None and not (len(clamp) == 2 and 0 < clamp[0] < clamp[1]):
        raise ArgumentError(f"{name}: clamp must be (lo, hi) with 0 < lo < hi; got {clamp!r}.")
    kind, reasons = "unbiased", []
    if not exact:
        kind = "consistent"
        reasons.append("the fake score and the ratio are estimates: consistent as they converge")
    if normalize:
        kind = "consistent" if kind == "unbiased" else kind
        reasons.append("h is divided by its batch mean (self-normalized: consistent)")
    if clamp is not None:
        kind = "biased"
        reasons.append(f"the ratio is clamped to {tuple(clamp)} (biased)")
    certificate = None if kind == "unbiased" else (kind, f"{name}: " + "; ".join(reasons))
    sg = jax.lax.stop_gradient

    def program(params, *data):
        z = vmap(lambda: sample(latent, name="z"), axis_size=batch)()  # independent per lane
        x = generator(params, z)
        t = jnp.zeros((x.shape[0],), x.dtype)
        if schedule is not None:
            t = sample(dist.Uniform(schedule.t_min, schedule.t_max).expand([x.shape[0]]), name="t")
            eps = sample(dist.Normal(jnp.zeros(x.shape, x.dtype), 1.0).to_event(x.ndim), name="eps")
            shape = (-1,) + (1,) * (x.ndim - 1)
            x = jnp.reshape(schedule.alpha(t), shape) * x + jnp.reshape(schedule.sigma(t), shape) * eps
        xs = sg(x)
        r = jnp.exp(log_ratio(xs, t, *data))
        if clamp is not None:
            r = jnp.clip(r, clamp[0], clamp[1])
        w = h(r)
        if normalize:
            w = w / jnp.mean(w)
        direction = sg(jnp.reshape(w, (-1,) + (1,) * (x.ndim - 1)) * (fake_score(xs, t, *data) - teacher_score(xs, t, *data)))
        return jnp.sum(direction * x) / x.shape[0]

    program.__name__ = name
    return Expectation(program, name=f"{name}[{fname}]", certificate=certificate)


__all__ = [
    "DIVERGENCES", "weight", "fdistill", "alpha_divergence", "reverse_kl", "forward_kl", "jeffreys",
    "jensen_shannon", "softened_reverse_kl", "squared_hellinger",
]
