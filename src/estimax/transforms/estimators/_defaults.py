"""The default strategy of a site, and why it was chosen."""

from __future__ import annotations

from ...dsl._site import SiteDist, SiteSpec, support_size_or_none
from ._base import Strategy
from ._enum import DEFAULT_MAX_AUTO, enum
from ._mvd import mvd
from ._reinforce import reinforce
from ._reparam import Reparam, reparam


def resolve(spec: SiteSpec, operands) -> tuple[Strategy, str]:
    """``(strategy, reason)`` for a site; ``operands`` may be arrays, tracers or avals."""
    site = SiteDist(spec, operands)
    d, n = site.lane, site.num_coordinates
    if spec.strategy is not None:
        reason = "chosen in the program"
        if isinstance(spec.strategy, Reparam) and Reparam.is_implicit(d):
            reason += " (implicit reparameterization through the sampler's derivative)"
        return spec.strategy, reason
    if d.has_rsample:
        if Reparam.is_implicit(d):
            return reparam, "default: implicit reparameterized sampler (gamma-based)"
        return reparam, "default: reparameterized sampler"
    k = support_size_or_none(d)
    if k is not None:
        size = k**n
        if size <= DEFAULT_MAX_AUTO:
            return enum, f"default: finite support of {size} joint value{'s' if size != 1 else ''}"
        return reinforce, (
            f"default: no reparameterized sampler; joint support of {k}^{n} values is too "
            f"large to enumerate (> {DEFAULT_MAX_AUTO})" + _mvd_hint(d)
        )
    return reinforce, "default: no reparameterized sampler and no finite support" + _mvd_hint(d)


def _mvd_hint(d) -> str:
    try:
        mvd.check(d, "")
    except Exception:
        return ""
    return "; ex.mvd applies and usually has far lower variance"
