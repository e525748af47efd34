"""The interface every per-site gradient strategy implements.

A strategy is a value (``ex.reparam``, ``ex.reinforce(baseline=...)``, ...). The estimator
pass hands it the site (its distribution at the current parameters, the parameters'
tangents, a key) and the site's *continuation* -- the rest of the program as a function of
the site's value -- and the strategy returns the program's output and the output's tangent.
Adding an estimator is adding one subclass and its unbiasedness test.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Protocol

import jax
import jax.numpy as jnp

from ...dsl._site import SiteDist
from ...dsl._strategy import Strategy
from ...runtime import _jax_compat as compat


@dataclasses.dataclass(frozen=True)
class SiteContext:
    """What a strategy sees of a site."""

    name: str
    site: SiteDist
    tangents: tuple  # per leaf: an array, or None where the leaf is not being differentiated
    key: Any
    mode: bool  # True when tangents are propagated
    #: tangents of the strategy's own operands (e.g. a traced baseline), or None each
    extra_tangents: tuple = ()

    @property
    def has_tangent(self) -> bool:
        return self.mode and any(t is not None for t in self.tangents)

    def instantiated_tangents(self):
        return tuple(
            compat.zero_tangent(compat.aval_of(x)) if t is None else t
            for x, t in zip(self.site.leaves, self.tangents, strict=True)
        )

    def jvp(self, fn):
        """``fn(leaves) -> pytree``, with its tangent along the parameters' tangents."""
        return jax.jvp(lambda *leaves: fn(leaves), self.site.leaves, self.instantiated_tangents())

    def log_prob_jvp(self, x):
        """``(log p(x), d/dε log p(x))`` with ``x`` held fixed."""
        x = jax.lax.stop_gradient(x)
        return self.jvp(lambda leaves: self.site.log_prob(x, leaves))


class Continuation(Protocol):
    """The rest of the program, from a site's value to the program's outputs."""

    def __call__(self, value, tangent=None, *, mode: bool | None = None) -> tuple[list, list | None]: ...

    def with_score(self, score_tangent, offset_tangent) -> "Continuation": ...


class LocalStrategy(Strategy):
    """A strategy that needs no continuation: its term depends on the rest of the program
    only through the program's final value (reparam: not at all; REINFORCE: as a factor).

    The pass evaluates such sites in a loop (no recursion), and inside ``lax`` loop bodies.
    """

    needs_continuation = False

    @abc.abstractmethod
    def forward(self, ctx: SiteContext):
        """``(x, x_tangent, score)``: the value, its tangent (or None), and a score term
        ``(s, o)`` whose contribution to the final tangent is ``value·s − o`` (or None)."""

    @abc.abstractmethod
    def pathwise(self, ctx: SiteContext):
        """``(x, s, o)`` for use where JAX differentiates: ``x`` differentiable (or not),
        ``s`` and ``o`` scalar surrogates with value 0 whose derivatives are the score terms."""

    def forward_elements(self, ctx: SiteContext):
        """Like :meth:`forward`, with a score term per element of the site's leading batch
        axis: ``(x, x_tangent, (s, o))`` with ``s``, ``o`` of shape ``(n,)`` (element ``b``
        contributes ``value_b·s_b − o_b``, ``value_b`` its own learning signal), or ``None``
        where the strategy has no per-element form (then :meth:`forward` is used)."""
        del ctx
        return None

    def estimate(self, ctx, cont):
        x, x_dot, score = self.forward(ctx)
        if score is not None:
            cont = cont.with_score(*score)
        return cont(x, x_dot)


class ContinuationStrategy(Strategy):
    """A strategy that evaluates the rest of the program at other values of the site
    (enumeration, measure-valued derivatives). Not allowed inside ``lax`` loop bodies."""

    needs_continuation = True


def weighted_sum(weights, values):
    """``Σ_m weights[m] * values[m]`` over the leading axis, for each output."""
    return [jnp.tensordot(weights.astype(v.dtype), v, axes=1) if compat.is_float_dtype(v.dtype) else None for v in values]
