"""Exact enumeration of a finite support."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..._errors import StrategyError
from ...dsl._site import _support_size, family_name, support_size_or_none
from ...runtime import _jax_compat as compat
from ._base import ContinuationStrategy, SiteContext, weighted_sum

#: default: enumerate automatically when the joint support has at most this many values
DEFAULT_MAX_AUTO = 64


@dataclasses.dataclass(frozen=True)
class Enum(ContinuationStrategy):
    r"""Exact sum over the site's (joint) finite support.

    Identity: ``E_{p_θ}[f(x)] = Σ_k p_θ(k) f(k)`` and
    ``∇_θ E = Σ_k (∇_θ p_θ(k) f(k) + p_θ(k) ∇_θ f(k))``. Zero variance from this site; the
    continuation runs once per support value (vectorized with ``vmap``), so the cost grows
    with the joint support size ``K**n`` for ``n`` independent coordinates.
    """

    max_size: int = 4096

    name = "enum"
    identity = "E_p[f(x)] = Σ_k p(k) f(k)"

    def __call__(self, *, max_size: int = 4096) -> "Enum":
        """``ex.enum(max_size=N)``: allow joint supports of up to ``N`` values."""
        return Enum(max_size=int(max_size))

    def check(self, d, site_name):
        k = support_size_or_none(d)
        if k is None:
            raise StrategyError(
                f"site {site_name!r}: ex.enum needs a finite support, and {family_name(d)} "
                f"has {'a continuous' if not d.is_discrete else 'an infinite'} support. Use "
                "estimator=ex.reparam (if it has a reparameterized sampler), ex.mvd or ex.reinforce."
            )

    def check_size(self, name: str, site) -> None:
        """Raise if the joint support of ``site`` (a :class:`SiteDist`) is over the limit."""
        size = site.joint_support_size()
        if size > self.max_size:
            k, n = _support_size(site.lane), site.num_coordinates
            shown = f"{size}" if size < 10**7 else f"{k}^{n}"
            raise StrategyError(
                f"site {name!r}: ex.enum would enumerate {shown} joint values "
                f"({n} coordinates of {k} values each); the limit is {self.max_size}. "
                "Enumeration is joint over a vector site, so it suits a few discrete "
                "choices, not one per data point: use ex.mvd (per-coordinate, low variance) "
                "or ex.reinforce, or raise the limit with ex.enum(max_size=...)."
            )

    def estimate(self, ctx: SiteContext, cont):
        self.check_size(ctx.name, ctx.site)
        values = ctx.site.joint_support()
        logp_fn = lambda leaves: jax.vmap(lambda v: ctx.site.log_prob(v, leaves))(values)
        if ctx.has_tangent:
            logp, logp_dot = ctx.jvp(logp_fn)
        else:
            logp, logp_dot = logp_fn(ctx.site.leaves), None
        p = jnp.exp(logp)
        outs, touts = _map_continuation(cont, values)
        value = weighted_sum(p, outs)
        if touts is None:
            return value, None
        tangent = weighted_sum(p, touts)
        if logp_dot is not None:
            tangent = [t + s for t, s in zip(tangent, weighted_sum(p * logp_dot, outs), strict=True)]
        return value, tangent


#: supports up to this size are unrolled at trace time rather than looped over
UNROLL_MAX = 8


def _map_continuation(cont, values):
    """``cont`` at every support value, stacked along a new leading axis.

    Not ``vmap``: under vmap a conditional in the continuation becomes a select whose
    untaken operands JAX wraps in ``stop_gradient``, which cannot be transposed once they
    carry tangents (reverse mode would fail). Small supports are unrolled; larger ones use
    ``lax.map``, whose body closes over tangents -- JAX versions whose scan transpose cannot
    handle linear closed-over values (``compat.scan_transposes_linear_consts``) unroll.
    """
    if values.shape[0] <= UNROLL_MAX or not compat.scan_transposes_linear_consts():
        results = [cont(values[i], None) for i in range(values.shape[0])]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *results)
    return jax.lax.map(lambda v: cont(v, None), values)


enum = Enum()
