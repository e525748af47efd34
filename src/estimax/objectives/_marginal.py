"""Approximate marginalization and normalization: distributions whose density is estimated.

``ex.marginal`` and ``ex.normalize`` build *distribution-like* objects out of programs. Their
densities are intractable; instead each offers two unbiased estimates, themselves programs
(their random choices are ordinary sites, each with its own gradient strategy):

- ``q.draw(params, *data) -> (value, log_q)``: a draw ``value ~ q`` together with a log
  density estimate whose *reciprocal* is unbiased: ``E[exp(-log_q) | value] = 1/q(value)``.
  This is what a variational objective needs for its ``- log q(z)`` term: by Jensen's
  inequality ``E[log p(x, z) - log_q] <= ELBO(q)``, so every lower bound stays a lower bound.
- ``q.log_density(value, params, *data) -> log_q``: at a *given* value, an estimate whose
  exponential is unbiased: ``E[exp(log_q)] = q(value)`` -- what a term ``+ log q`` needs.

The two constructions (Lew, Becker et al., "Probabilistic programming with programmable
variational inference", following Ranganath et al. 2016 and Sobolev & Vetrov 2019):

- ``marginal(joint, keep=..., proposal=r, particles=m)``: ``q(z) = ∫ q(z, u) du`` for a
  program ``joint`` drawing ``z`` (the kept sites) and auxiliary sites ``u``, with a reverse
  model ``r(u | z)``. ``draw`` samples ``(z, u_0)`` from the joint -- so ``u_0`` is an exact
  draw of ``q(u | z)`` -- and ``m`` fresh ``u_k ~ r(u | z)``, and returns
  ``log_q = log (1/(m+1)) Σ_k q(z, u_k)/r(u_k | z)``: ``m = 0`` gives hierarchical VI (HVI),
  ``m > 0`` importance-weighted HVI (IWHVI). ``log_density`` uses ``max(m, 1)`` fresh draws.
- ``normalize(target, proposal, particles=K)``: sampling-importance-resampling from an
  unnormalized target ``p̃`` (a model as the objectives take it: its log joint is ``log p̃``)
  with ``K`` proposal draws ``z_k``; ``draw`` returns ``z_j`` with ``j ~ Categorical(w)`` and
  ``log_q = log p̃(z_j) - log Ẑ``, ``Ẑ = (1/K) Σ_k p̃(z_k)/r(z_k)``. An ELBO whose guide is
  ``normalize(model, guide, K)`` is the IWELBO_K of ``guide``.

Both are written with ``ex.trace``, ``ex.vmap`` and ``ex.sample``: no pass knows about them,
so the estimator pass, ``explain`` and the certificate treat their random choices like any
other. Fresh auxiliary draws are named ``"<name>/<site>"`` in the enclosing program (those of
``log_density`` ``"<name>/density/<site>"``, or as its ``name=`` says: each call of it in one
program needs its own name).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jax.scipy.special import logsumexp

from .._errors import ArgumentError, ProgramError
from ..dsl._model import model_log_density
from ..dsl._primitives import sample, sample_p, stage, vmap
from ..transforms._trace import trace


class Approximate:
    """A distribution given by a sampler with density estimates (see the module doc)."""

    name: str

    def draw(self, params, *data) -> tuple[dict, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def log_density(self, values: dict, params, *data, name: str | None = None):  # pragma: no cover - abstract
        raise NotImplementedError


def _label(fn) -> str:
    return getattr(getattr(fn, "fn", fn), "__name__", "program")


def _check_particles(n, what, minimum):
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        raise ArgumentError(f"{what}: particles must be an integer >= {minimum}; got {n!r}.")


def _check_name(name, what):
    if not isinstance(name, str) or not name:
        raise ArgumentError(f"{what}: name must be a non-empty string; got {name!r}.")


class Marginal(Approximate):
    """``ex.marginal(...)``: see :func:`marginal`."""

    def __init__(self, joint: Callable, keep: Sequence[str], proposal: Callable, particles: int, name: str):
        self.joint, self.keep, self.proposal, self.particles, self.name = joint, tuple(keep), proposal, particles, name

    def __repr__(self):
        return f"ex.marginal({_label(self.joint)}, keep={list(self.keep)}, proposal={_label(self.proposal)}, particles={self.particles})"

    def _split(self, sites: dict) -> tuple[dict, dict]:
        missing = [k for k in self.keep if k not in sites]
        if missing:
            raise ProgramError(
                f"{self!r}: the joint program has no top-level sites named {missing}; its sites "
                f"are {sorted(sites)}."
            )
        kept = {k: sites[k] for k in self.keep}
        aux = {k: v for k, v in sites.items() if k not in self.keep}
        if not aux:
            raise ProgramError(
                f"{self!r}: every site of the joint program is kept, so there is nothing to "
                "marginalize; use the program itself as the guide."
            )
        return kept, aux

    def _reverse(self, kept, aux, params, data, **kw):
        """``log r(aux | kept)`` at the joint draw's auxiliary values (no new sites)."""
        try:
            tr = trace(self.proposal, **kw)(kept, params, *data)
        except KeyError:  # a value for a site the proposal does not draw
            tr = None
        if tr is None or set(tr.sites) != set(aux):
            drawn = _proposal_sites(self.proposal, kept, params, data) if tr is None else tr.sites
            raise self._wrong_proposal(aux, drawn)
        return tr

    def _wrong_proposal(self, expected, drawn) -> ProgramError:
        return ProgramError(
            f"{self!r}: the proposal must draw exactly the joint program's auxiliary sites "
            f"{sorted(expected)}; it draws {sorted(drawn)}."
        )

    def _fresh_log_weights(self, kept, aux_names, params, data, m, prefix):
        def one():
            tr = trace(self.proposal, prefix=f"{prefix}/")(kept, params, *data)
            if set(tr.sites) != set(aux_names):
                raise self._wrong_proposal(aux_names, tr.sites)
            log_joint = trace(self.joint, values={**kept, **tr.sites})(params, *data).log_prob
            return log_joint - tr.log_prob

        return one()[None] if m == 1 else vmap(one, axis_size=m)()

    def draw(self, params, *data):
        tr = trace(self.joint)(params, *data)
        kept, aux = self._split(tr.sites)
        log_w0 = tr.log_prob - self._reverse(kept, aux, params, data, values=aux).log_prob
        if self.particles == 0:
            return kept, log_w0
        fresh = self._fresh_log_weights(kept, tuple(aux), params, data, self.particles, self.name)
        log_w = jnp.concatenate([log_w0[None], fresh.astype(log_w0.dtype)])
        return kept, logsumexp(log_w) - math.log(self.particles + 1)

    def log_density(self, values: dict, params, *data, name: str | None = None):
        values = dict(values)
        unknown = sorted(set(values) - set(self.keep))
        if unknown or len(values) != len(self.keep):
            raise ProgramError(
                f"{self!r}.log_density: expected values for exactly the kept sites "
                f"{list(self.keep)}; got {sorted(values)}."
            )
        m = max(self.particles, 1)
        aux_names = _proposal_sites(self.proposal, values, params, data)
        log_w = self._fresh_log_weights(values, aux_names, params, data, m, _density_prefix(self, name))
        return logsumexp(log_w) - math.log(m)


def _density_prefix(q: Approximate, name: str | None) -> str:
    """Where ``log_density``'s fresh draws are named: ``"<q's name>/density/<site>"`` unless
    ``name`` is given (each call in one program needs its own)."""
    if name is None:
        return f"{q.name}/density"
    _check_name(name, f"{q!r}.log_density")
    return name


def _proposal_sites(proposal, kept, params, data) -> tuple[str, ...]:
    """The top-level site names of ``proposal(kept, params, *data)`` (staged, not run)."""
    closed, _, _ = stage(
        getattr(proposal, "fn", proposal), (kept, params, *data), f"the proposal {_label(proposal)!r}",
        fresh_names=True, float_outputs=False,
    )
    return tuple(e.params["spec"].name for e in closed.jaxpr.eqns if e.primitive is sample_p)


class Normalized(Approximate):
    """``ex.normalize(...)``: see :func:`normalize`."""

    def __init__(self, target, proposal: Callable, particles: int, name: str, index_estimator):
        self.target, self.proposal, self.particles, self.name = target, proposal, particles, name
        self.index_estimator = index_estimator

    def __repr__(self):
        return f"ex.normalize({_label(self.target)}, proposal={_label(self.proposal)}, particles={self.particles})"

    def _log_target(self, values, params, data):
        return model_log_density(self.target, values, params, data)

    def _particles(self, params, data, k, prefix):
        def one():
            tr = trace(self.proposal, prefix=f"{prefix}/")(params, *data)
            log_p = self._log_target(tr.sites, params, data)
            return tr.sites, log_p, log_p - tr.log_prob

        if k == 1:
            sites, log_p, log_w = one()
            return jax.tree.map(lambda a: a[None], sites), log_p[None], log_w[None]
        return vmap(one, axis_size=k)()

    def draw(self, params, *data):
        sites, log_p, log_w = self._particles(params, data, self.particles, self.name)
        j = sample(dist.Categorical(logits=log_w), estimator=self.index_estimator, name=f"{self.name}/index")
        chosen = jax.tree.map(lambda a: a[j], sites)
        log_z = logsumexp(log_w) - math.log(self.particles)
        return chosen, log_p[j] - log_z

    def log_density(self, values: dict, params, *data, name: str | None = None):
        values = dict(values)
        log_r = trace(self.proposal, values=values)(params, *data).log_prob
        log_p = self._log_target(values, params, data)
        log_w = (log_p - log_r)[None]
        if self.particles > 1:
            _, _, others = self._particles(params, data, self.particles - 1, _density_prefix(self, name))
            log_w = jnp.concatenate([log_w, others.astype(log_w.dtype)])
        return log_p - (logsumexp(log_w) - math.log(self.particles))


def marginal(joint: Callable, *, keep: str | Sequence[str], proposal: Callable, particles: int = 0, name: str = "marginal") -> Marginal:
    """The marginal ``q(z) = ∫ q(z, u) du`` of a program over some of its sites.

    **Arguments:**

    - ``joint``: an estimax program ``joint(params, *data)`` drawing the kept sites and
      the auxiliary ones (all of its other top-level sites).
    - ``keep``: the name, or names, of the sites the marginal is over.
    - ``proposal``: an estimax program ``proposal(kept, params, *data)`` (``kept`` a dict
      of the kept sites' values) drawing every auxiliary site under its joint name: the
      reverse model ``r(u | z)`` of hierarchical VI.
    - ``particles``: ``m``, the number of fresh proposal draws (``0``: HVI's bound).
    - ``name``: the prefix of the fresh draws' site names.

    Use it as the guide of any objective in ``ex.objectives`` (``elbo`` gives HVI/IWHVI,
    ``iwelbo`` DIWHVI), or call ``draw``/``log_density`` inside your own program.
    """
    _check_name(name, "ex.marginal")
    _check_particles(particles, "ex.marginal", 0)
    keep = (keep,) if isinstance(keep, str) else tuple(keep)
    if not keep or not all(isinstance(k, str) for k in keep):
        raise ArgumentError(f"ex.marginal: keep must be a site name or a sequence of names; got {keep!r}.")
    for what, fn in (("joint", joint), ("proposal", proposal)):
        if not callable(fn):
            raise ArgumentError(f"ex.marginal: {what} must be a program (a function); got {type(fn).__name__}.")
    return Marginal(joint, keep, proposal, particles, name)


def normalize(target, proposal: Callable, *, particles: int, name: str = "normalize", index_estimator=None) -> Normalized:
    """Sampling-importance-resampling from an unnormalized ``target`` with ``particles`` draws.

    **Arguments:**

    - ``target``: a model as ``ex.objectives`` takes it (a NumPyro model or an
      :class:`~estimax.objectives.LogJoint`); its log joint at the data is ``log p̃``.
    - ``proposal``: an estimax program ``proposal(params, *data)`` whose sites are named
      like the target's latents.
    - ``particles``: ``K >= 1`` (``K = 1`` is the proposal itself).
    - ``index_estimator``: the strategy of the resampling index site ``"<name>/index"``
      (default: the site default, enumeration of the ``K`` indices).
    """
    _check_name(name, "ex.normalize")
    _check_particles(particles, "ex.normalize", 1)
    if not callable(proposal):
        raise ArgumentError(f"ex.normalize: proposal must be a program (a function); got {type(proposal).__name__}.")
    return Normalized(target, proposal, particles, name, index_estimator)
