"""Variational objectives as programs.

A *model* is a NumPyro model function ``model(params, *data)`` (latent sites sampled with
``numpyro.sample``, observed ones with ``obs=``), or a :class:`LogJoint` wrapping a plain
``log_joint(latents, params, *data)``. A *guide* is an estimax program
``guide(params, *data)`` whose ``ex.sample`` sites are named like the model's latents, each
with its own gradient strategy. Every objective below is an ``@ex.expectation`` program of
``(params, *data)``, written with ``ex.trace`` and ``ex.vmap`` exactly as a user would write
their own -- see :func:`log_weight`.

All are lower bounds on ``log p(x)`` to *maximize*, except :func:`cubo` (an upper bound).
Their estimators are unbiased for the objective as stated (an IWELBO is ``E[log mean w]``),
which ``ex.explain`` certifies per site.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from .._errors import ProgramError
from ..dsl._primitives import vmap
from ..dsl._program import Expectation
from ..dsl._trace import trace


@dataclasses.dataclass(frozen=True)
class LogJoint:
    """A model given by its log joint density: ``fn(latents: dict, params, *data) -> scalar``."""

    fn: Callable

    def __call__(self, latents, params, *data):
        return self.fn(latents, params, *data)


def model_log_density(model, latents: dict, params, data) -> Any:
    """``log p(data, latents)`` of a NumPyro model or a :class:`LogJoint`."""
    if isinstance(model, LogJoint):
        return model(latents, params, *data)
    from numpyro import handlers

    conditioned = handlers.substitute(model, data=latents)
    model_trace = handlers.trace(handlers.seed(conditioned, rng_seed=0)).get_trace(params, *data)
    total = jnp.zeros((), jnp.result_type(float))
    for name, site in model_trace.items():
        if site["type"] != "sample":
            continue
        if not site["is_observed"] and name not in latents:
            raise ProgramError(
                f"the model's latent site {name!r} has no value in the guide's trace (guide sites: "
                f"{sorted(latents)}). Sample it in the guide with ex.sample(..., name={name!r})."
            )
        lp = site["fn"].log_prob(site["value"])
        scale = site.get("scale")
        total = total + jnp.sum(lp if scale is None else scale * lp).astype(total.dtype)
    return total


def log_weight(model, guide, params, *data):
    """``log p(x, z) − log q(z)`` at one draw ``z ~ q``: the building block of every objective."""
    tr = trace(guide)(params, *data)
    return model_log_density(model, tr.sites, params, data) - tr.log_prob


def _particles(model, guide, k: int, params, data):
    if k == 1:
        return log_weight(model, guide, params, *data)[None]
    return vmap(lambda: log_weight(model, guide, params, *data), axis_size=k)()


def _check_k(k, what):
    if not isinstance(k, int) or k < 1:
        raise ProgramError(f"{what}: the number of particles must be a positive integer; got {k!r}.")


def elbo(model, guide, *, particles: int = 1) -> Expectation:
    """``ELBO = E_q[log p(x, z) − log q(z)]`` (mean over ``particles`` independent draws)."""
    _check_k(particles, "ex.objectives.elbo")

    def elbo_objective(params, *data):
        return jnp.mean(_particles(model, guide, particles, params, data))

    return Expectation(elbo_objective, name="elbo")


def iwelbo(model, guide, k: int) -> Expectation:
    """``IWELBO_K = E[log (1/K) Σ_k w_k]``, ``w_k = p(x, z_k)/q(z_k)``, ``z_k ~ q`` i.i.d.

    Increases with ``K`` towards ``log p(x)`` (Burda et al. 2016).
    """
    _check_k(k, "ex.objectives.iwelbo")

    def iwelbo_objective(params, *data):
        return logsumexp(_particles(model, guide, k, params, data)) - math.log(k)

    return Expectation(iwelbo_objective, name=f"iwelbo{k}")


def renyi(model, guide, alpha: float, k: int = 1) -> Expectation:
    """The variational Rényi bound ``VR_α = E[1/(1−α) log (1/K) Σ_k w_k^{1−α}]`` (Li & Turner 2016).

    ``α = 0`` is the IWELBO, ``α → 1`` the ELBO (``alpha=1`` gives :func:`elbo`).
    """
    _check_k(k, "ex.objectives.renyi")
    alpha = float(alpha)
    if alpha == 1.0:
        return elbo(model, guide, particles=k)

    def renyi_objective(params, *data):
        lw = _particles(model, guide, k, params, data)
        return (logsumexp((1.0 - alpha) * lw) - math.log(k)) / (1.0 - alpha)

    return Expectation(renyi_objective, name=f"renyi(alpha={alpha:g}, k={k})")


def cubo(model, guide, n: float = 2.0, k: int = 1) -> Expectation:
    """The χ upper bound ``CUBO_n = (1/n) log E_q[w^n]`` estimated as ``(1/n) log (1/K) Σ w_k^n``
    (Dieng et al. 2017). An *upper* bound on ``log p(x)``: minimize it. The plug-in ``log`` of
    a mean makes the estimate biased for CUBO itself (consistent as ``K`` grows); minimizing
    the unbiased ``E[w^n]`` instead is the usual remedy, available as
    ``ex.expectation(lambda p, *x: jnp.exp(n * log_weight(...)))``.
    """
    _check_k(k, "ex.objectives.cubo")
    n = float(n)

    def cubo_objective(params, *data):
        lw = _particles(model, guide, k, params, data)
        return (logsumexp(n * lw) - math.log(k)) / n

    return Expectation(cubo_objective, name=f"cubo(n={n:g}, k={k})")
