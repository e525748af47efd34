"""The score-function (REINFORCE) estimator, with an optional baseline."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ..._errors import StrategyError
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
    """

    baseline: Any = None

    name = "reinforce"
    identity = "∇θ E_p[f(x)] = E_p[(f(x) - b) ∇θ log p(x)]"

    def __call__(self, *, baseline: float | Callable | Any | None = None) -> "Reinforce":
        """``ex.reinforce(baseline=b)``: REINFORCE with a baseline ``b``: a number, a function
        of the site's distribution, or a scalar *program argument* (traced) -- the way to
        carry a moving-average baseline as explicit state (see :func:`ema_update`)."""
        if isinstance(baseline, jax.core.Tracer):
            if jnp.shape(baseline) != ():
                raise StrategyError(
                    f"ex.reinforce(baseline=...) expects a scalar; got shape {jnp.shape(baseline)}."
                )
            return Reinforce(baseline=baseline)
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
            return Reinforce(baseline=_TRACED), (self.baseline,)
        return self, ()

    def describe(self):
        if self.baseline is None:
            return "reinforce"
        if self.baseline is _TRACED:
            return "reinforce(baseline=<argument>)"
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
        if not ctx.has_tangent:
            return x, None, None
        _, score = ctx.log_prob_jvp(x)
        b = self.baseline_value(ctx)
        return x, None, (score, None if b is None else b * score)

    def pathwise(self, ctx: SiteContext):
        # Surrogates with value 0 and derivatives ∇log p and b·∇log p (as in DiCE).
        x = jax.lax.stop_gradient(ctx.site.sample(ctx.key))
        lp = ctx.site.log_prob(x)
        s = lp - jax.lax.stop_gradient(lp)
        b = self.baseline_value(ctx)
        return x, s, (None if b is None else b * s)


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
