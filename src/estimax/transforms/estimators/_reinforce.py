"""The score-function (REINFORCE) estimator, with an optional baseline."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ..._errors import StrategyError
from ...dsl._site import log_density
from ._base import LocalStrategy, SiteContext


@dataclasses.dataclass(frozen=True)
class Reinforce(LocalStrategy):
    r"""Score-function gradient, ``∇_θ E_{p_θ}[f(x)] = E[(f(x) - b) ∇_θ log p_θ(x)]``.

    ``f`` is the rest of the program (its final value), so a site's term uses everything
    downstream of it. The baseline ``b`` must not depend on ``x``: a Python number, or a
    function of the site's distribution (``baseline=lambda d: ...``) evaluated at the current
    parameters. Unbiased for any ``f``, continuous or not; variance grows with ``f``'s range
    and with the number of sites -- pick a baseline close to ``E[f]``.

    Needs no continuation: each site's score is accumulated and multiplied by the program's
    final value, so it also works inside ``lax.scan`` and ``fori_loop`` bodies.

    A *learned* baseline (a control variate ``b_ψ`` computed in the program, e.g. by a small
    network of the data) is ``ex.reinforce(baseline=b, learn="descent")``: the gradient of
    the objective is unchanged, and the parameters ``ψ`` that only ``b`` uses receive the
    gradient of the baseline's own loss ``½ E[(f − b_ψ)²]`` (as Pyro's ``TraceGraph_ELBO`` adds
    it to its surrogate), signed for your optimizer: ``"descent"`` if you minimize the
    objective, ``"ascent"`` if you maximize it -- either way the update moves ``b_ψ``
    towards ``E[f]``. Parameters shared between ``b`` and the rest of the program would get
    both terms: give the baseline its own.
    """

    baseline: Any = None
    learn: str | None = None

    name = "reinforce"
    identity = "∇θ E_p[f(x)] = E_p[(f(x) - b) ∇θ log p(x)]"

    def __call__(self, *, baseline: float | Callable | Any | None = None, learn: str | None = None) -> "Reinforce":
        """``ex.reinforce(baseline=b)``: REINFORCE with a baseline ``b``: a number, a function
        of the site's distribution, or a scalar value computed in the program (traced) -- a
        program argument carrying a moving-average baseline as explicit state (see
        :func:`ema_update`), or a learned control variate with ``learn="descent"`` or
        ``learn="ascent"`` (see the class doc). Inside ``ex.vmap`` a traced baseline may
        differ per lane."""
        if learn not in (None, "descent", "ascent"):
            raise StrategyError(
                f"ex.reinforce(learn=...) expects 'descent' (you minimize the objective) or "
                f"'ascent' (you maximize it); got {learn!r}."
            )
        if isinstance(baseline, jax.core.Tracer):
            if jnp.ndim(baseline) > 1:
                raise StrategyError(
                    "ex.reinforce(baseline=...) expects a scalar, or a vector with one baseline "
                    f"per element of the site's leading batch axis; got shape {jnp.shape(baseline)}."
                )
            return Reinforce(baseline=baseline, learn=learn)
        if learn is not None:
            raise StrategyError(
                "ex.reinforce(learn=...) needs a baseline computed in the program from its own "
                f"parameters (a traced value); got {type(baseline).__name__} {baseline!r}."
            )
        if baseline is not None and not callable(baseline):
            try:
                baseline = float(baseline)
            except (TypeError, ValueError) as e:
                raise StrategyError(
                    f"ex.reinforce(baseline=...) expects a number or a function of the site's "
                    f"distribution; got {type(baseline).__name__}."
                ) from e
        return Reinforce(baseline=baseline)

    def check(self, d, site_name):
        b = self.baseline
        if isinstance(b, jax.core.Tracer) and jnp.ndim(b) == 1:
            batch = tuple(d.batch_shape)
            if not batch or batch[0] != jnp.shape(b)[0]:
                raise StrategyError(
                    f"site {site_name!r}: a vector baseline has one entry per element of the "
                    f"site's leading batch axis; the site's batch shape is {batch}, the baseline's "
                    f"shape {jnp.shape(b)}."
                )

    def split_operands(self):
        if isinstance(self.baseline, jax.core.Tracer):
            return Reinforce(baseline=_TRACED, learn=self.learn), (self.baseline,)
        return self, ()

    def describe(self):
        if self.baseline is None:
            return "reinforce"
        if self.baseline is _TRACED:
            return "reinforce(baseline=<argument>)" if self.learn is None else f"reinforce(baseline=<learned, {self.learn}>)"
        b = getattr(self.baseline, "__name__", None) if callable(self.baseline) else self.baseline
        return f"reinforce(baseline={b})"

    def baseline_value(self, ctx: SiteContext):
        if self.baseline is None:
            return None
        if self.baseline is _TRACED:
            return jax.lax.stop_gradient(ctx.site.extras[0])
        if not callable(self.baseline):
            return self.baseline
        if ctx.site.spec.levels:
            raise StrategyError(
                f"site {ctx.name!r}: a baseline function is not supported on a site mapped by "
                "jax.vmap (its lanes share one program value); use a constant baseline."
            )
        return jax.lax.stop_gradient(jnp.asarray(self.baseline(ctx.site.lane)))

    # -- traced baselines: one per "unit" (the whole site, each ex.vmap lane, or each element)
    def _units(self, ctx: SiteContext, x):
        """``(log_prob_units(leaves), baseline_units(b))``: per-unit log densities and the
        baseline aligned with them, for a traced baseline."""
        site = ctx.site
        b = site.extras[0]
        if site.spec.levels:
            if jnp.ndim(site.lane_map(_identity, x, (b,))) != len(site.spec.levels):  # shape check only
                raise StrategyError(
                    f"site {ctx.name!r}: inside ex.vmap a baseline is a scalar per lane; got a "
                    "vector baseline."
                )
            return (
                lambda leaves: site.lane_map(_lane_log_prob, x, (), leaves),
                lambda v: site.lane_map(_identity, x, (v,)),
            )
        if jnp.ndim(b) == 1:
            return (lambda leaves: site.log_prob_elements(x, leaves), lambda v: v)
        return (lambda leaves: site.log_prob(x, leaves), lambda v: v)

    def _baseline_tangent(self, ctx: SiteContext):
        """The tangent of a learned baseline (its parameters' direction), or ``None``."""
        if self.learn is None or not ctx.mode or not ctx.extra_tangents:
            return None
        return ctx.extra_tangents[0]

    def _traced_terms(self, ctx: SiteContext, x, reduce):
        """Score and offset tangents ``(s, o)`` for a traced baseline, reduced by ``reduce``
        from per-unit values."""
        lp_units, b_units = self._units(ctx, x)
        b = ctx.site.extras[0]
        b_u = jax.lax.stop_gradient(b_units(b))
        if ctx.has_tangent:
            _, score = ctx.jvp(lp_units)
        else:
            score = jnp.zeros(jnp.shape(b_u), jnp.result_type(float))
        offset = b_u * score
        b_dot = self._baseline_tangent(ctx)
        if b_dot is not None:  # the baseline's loss: ∓(f − b)·ḃ per unit
            sign = 1.0 if self.learn == "descent" else -1.0
            _, b_dot_u = jax.jvp(b_units, (b,), (b_dot,))
            score = score - sign * b_dot_u.astype(score.dtype)
            offset = offset - sign * (b_u * b_dot_u).astype(offset.dtype)
        return reduce(score), reduce(offset)

    def forward(self, ctx: SiteContext):
        x = jax.lax.stop_gradient(ctx.site.sample(ctx.key))
        if not ctx.has_tangent and self._baseline_tangent(ctx) is None:
            return x, None, None
        if self.baseline is _TRACED:
            return x, None, self._traced_terms(ctx, x, jnp.sum)
        _, score = ctx.log_prob_jvp(x)
        b = self.baseline_value(ctx)
        return x, None, (score, None if b is None else b * score)

    def takes_elements(self, spec, extras) -> bool:
        """Whether the site's score terms take per-element learning signals: no baseline, or
        one per element (a vector, or a scalar per ``ex.vmap`` lane); ``extras`` are the
        strategy's operands (values or avals)."""
        if self.baseline is None:
            return True
        return self.baseline is _TRACED and (bool(spec.levels) or len(jnp.shape(extras[0])) == 1)

    def forward_elements(self, ctx: SiteContext):
        # Per-element learning signals: only with no baseline, or a baseline per element
        # (per lane inside ex.vmap, or a vector); a baseline for the whole site was chosen
        # for the whole signal.
        if self.baseline is None:
            if not ctx.has_tangent:
                return None
            x = jax.lax.stop_gradient(ctx.site.sample(ctx.key))
            _, scores = ctx.jvp(lambda leaves: ctx.site.log_prob_elements(x, leaves))
            return x, None, (scores, None)
        site = ctx.site
        if not self.takes_elements(site.spec, site.extras):
            return None
        if not ctx.has_tangent and self._baseline_tangent(ctx) is None:
            return None
        x = jax.lax.stop_gradient(site.sample(ctx.key))
        per_element = lambda v: jnp.sum(v.reshape(v.shape[0], -1), axis=1)  # noqa: E731
        return x, None, self._traced_terms(ctx, x, per_element)

    def pathwise(self, ctx: SiteContext):
        # Surrogates with value 0 and derivatives ∇log p and b·∇log p (as in DiCE).
        x = jax.lax.stop_gradient(ctx.site.sample(ctx.key))
        zero = lambda v: v - jax.lax.stop_gradient(v)  # noqa: E731
        if self.baseline is _TRACED:
            lp_units, b_units = self._units(ctx, x)
            lp = lp_units(ctx.site.leaves)
            b_live = b_units(ctx.site.extras[0])
            b_u = jax.lax.stop_gradient(b_live)
            s, o = jnp.sum(zero(lp)), jnp.sum(b_u * zero(lp))
            if self.learn is not None:
                sign = 1.0 if self.learn == "descent" else -1.0
                s = s - sign * jnp.sum(zero(b_live))
                o = o - sign * jnp.sum(b_u * zero(b_live))
            return x, s, o
        s = zero(ctx.site.log_prob(x))
        b = self.baseline_value(ctx)
        return x, s, (None if b is None else b * s)


def _lane_log_prob(d, x):
    return jnp.sum(log_density(d, x))


def _identity(d, x, b):
    del d, x
    return b


class _TracedBaseline:
    def __repr__(self):
        return "<argument>"


_TRACED = _TracedBaseline()


def ema_update(baseline, value, decay: float = 0.9):
    """The exponential-moving-average baseline update ``b ← decay·b + (1 − decay)·value``.

    Carry ``b`` as explicit state next to the parameters and pass it to the program, which
    uses it as ``ex.reinforce(baseline=b)``; after each step update it with the step's
    objective estimate. The baseline of a step never depends on that step's draws, so the
    estimator stays unbiased.
    """
    decay = float(decay)
    if not 0.0 <= decay < 1.0:
        raise StrategyError(f"ema_update: decay must be in [0, 1); got {decay}.")
    return decay * baseline + (1.0 - decay) * jax.lax.stop_gradient(value)


reinforce = Reinforce()
