"""Reparameterization (pathwise) gradients."""

from __future__ import annotations

import dataclasses

from ..._errors import StrategyError
from ...dsl._site import family_name, unwrap
from ._base import LocalStrategy, SiteContext

import numpyro.distributions as dist

#: Families whose NumPyro sampler is differentiated implicitly (through the gamma sampler's
#: derivative, Figurnov et al. 2018) rather than through an explicit transform of noise.
IMPLICIT_FAMILIES = (dist.Gamma, dist.Beta, dist.Dirichlet, dist.Chi2, dist.StudentT, dist.InverseGamma)


@dataclasses.dataclass(frozen=True)
class Reparam(LocalStrategy):
    r"""Pathwise gradient through a reparameterized sampler.

    Identity: with ``x = g(θ, ε)``, ``ε ~ q`` independent of ``θ``,
    ``∇_θ E_{p_θ}[f(x)] = E_q[∇_θ f(g(θ, ε))]``. For Gamma, Beta and Dirichlet (and families
    built on them) NumPyro's sampler is differentiated implicitly,
    ``∇_θ x = -∇_θ F(x; θ) / p_θ(x)`` with ``F`` the CDF. Unbiased; usually the lowest
    variance choice when ``f`` is smooth. Needs ``f`` differentiable in ``x``.
    """

    name = "reparam"
    pathwise_value = True
    identity = "∇θ E_p[f(x)] = E_ε[∇θ f(g(θ, ε))]"

    def check(self, d, site_name):
        if not d.has_rsample:
            raise StrategyError(
                f"site {site_name!r}: ex.reparam needs a reparameterized sampler, and "
                f"{family_name(d)} has none (has_rsample=False). Use estimator=ex.reinforce, "
                "ex.mvd, or (for a small finite support) ex.enum."
            )

    def forward(self, ctx: SiteContext):
        if not ctx.has_tangent:
            return ctx.site.sample(ctx.key), None, None
        x, x_dot = ctx.jvp(lambda leaves: ctx.site.sample(ctx.key, leaves))
        return x, x_dot, None

    def pathwise(self, ctx: SiteContext):
        return ctx.site.sample(ctx.key), None, None

    @staticmethod
    def is_implicit(d) -> bool:
        return isinstance(unwrap(d), IMPLICIT_FAMILIES)


reparam = Reparam()
