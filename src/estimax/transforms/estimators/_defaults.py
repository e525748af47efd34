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
    if spec.reason is not None:  # a default the differentiability analysis replaced
        return spec.strategy, spec.reason
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


def fallback(spec: SiteSpec, avals, in_loop: bool) -> Strategy:
    """The default that replaces a reparameterized sampler whose pathwise derivative would be
    biased (see ``transforms/_smoothness``): ``ex.mvd`` where the family has a measure-valued
    derivative, ``ex.reinforce`` otherwise -- and inside a loop body, where no continuation
    can cross the loop boundary, always ``ex.reinforce``."""
    if not in_loop:
        try:
            mvd.check(SiteDist(spec, avals).lane, spec.name)
            return mvd
        except Exception:  # StrategyError: no rule for the family (or its event shape)
            pass
    return reinforce
