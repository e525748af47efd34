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
            if jnp.shape(baseline) != ():
                raise StrategyError(
                    f"ex.reinforce(baseline=...) expects a scalar; got shape {jnp.shape(baseline)}."
                )
            return Reinforce(baseline=baseline, learn=learn)
        if learn is not None:
            raise StrategyError(
                "ex.reinforce(learn=...) needs a baseline computed in the program from its "
                f"parameters (a traced scalar); got {type(baseline).__name__} {baseline!r}."
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
        del d, site_name  # any distribution with a log density

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

    def forward(self, ctx: SiteContext):
        x = jax.lax.stop_gradient(ctx.site.sample(ctx.key))
        b_dot = ctx.extra_tangents[0] if self.learn is not None and ctx.mode and ctx.extra_tangents else None
        if not ctx.has_tangent and b_dot is None:
            return x, None, None
        score = offset = None
        if ctx.has_tangent:
            _, score = ctx.log_prob_jvp(x)
            if self.baseline is _TRACED:  # per lane: Σ_l b_l ∇log p(x_l)
                b = jax.lax.stop_gradient(ctx.site.extras[0])
                _, offset = ctx.jvp(lambda leaves: ctx.site.lane_sum(_weighted_log_prob, x, (b,), leaves))
            else:
                b = self.baseline_value(ctx)
                offset = None if b is None else b * score
        if b_dot is not None:  # the baseline's loss: ∓(f − b)·ḃ, summed over lanes
            b = ctx.site.extras[0]
            sign = 1.0 if self.learn == "descent" else -1.0
            _, sum_b_dot = jax.jvp(lambda v: ctx.site.lane_sum(_identity, x, (v,)), (b,), (b_dot,))
            _, sum_bb_dot = jax.jvp(lambda v: ctx.site.lane_sum(_stopped_times, x, (v,)), (b,), (b_dot,))
            score = -sign * sum_b_dot if score is None else score - sign * sum_b_dot.astype(score.dtype)
            offset = -sign * sum_bb_dot if offset is None else offset - sign * sum_bb_dot.astype(offset.dtype)
        return x, None, (score, offset)

    def pathwise(self, ctx: SiteContext):
        # Surrogates with value 0 and derivatives ∇log p and b·∇log p (as in DiCE).
        x = jax.lax.stop_gradient(ctx.site.sample(ctx.key))
        zero = lambda v: v - jax.lax.stop_gradient(v)  # noqa: E731
        s = zero(ctx.site.log_prob(x))
        if self.baseline is _TRACED:
            b = ctx.site.extras[0]
            o = zero(ctx.site.lane_sum(_weighted_log_prob, x, (jax.lax.stop_gradient(b),)))
            if self.learn is not None:
                sign = 1.0 if self.learn == "descent" else -1.0
                s = s - sign * zero(ctx.site.lane_sum(_identity, x, (b,)))
                o = o - sign * zero(ctx.site.lane_sum(_stopped_times, x, (b,)))
            return x, s, o
        b = self.baseline_value(ctx)
        return x, s, (None if b is None else b * s)


def _weighted_log_prob(d, x, b):
    return b * jnp.sum(log_density(d, x))


def _identity(d, x, b):
    del d, x
    return b


def _stopped_times(d, x, b):
    del d, x
    return jax.lax.stop_gradient(b) * b


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
