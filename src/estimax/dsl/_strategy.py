"""The interface of a per-site gradient strategy, as the language sees it.

``ex.sample(d, estimator=s)`` takes any :class:`Strategy`; the language checks it against the
site's distribution (``check``) and carries its static part in the site's parameters
(``split_operands``). The estimating half, ``estimate(ctx, cont)``, is called by the estimator
pass (``transforms/_adev.py``) with a ``SiteContext`` and a continuation defined there
(``transforms/estimators/_base.py``: ``LocalStrategy`` and ``ContinuationStrategy`` are the two
kinds a new strategy subclasses).
"""

from __future__ import annotations

import abc
from typing import ClassVar


class Strategy(abc.ABC):
    """A per-site gradient strategy. Final subclasses are frozen dataclasses (hashable)."""

    #: short name shown by ``explain``
    name: ClassVar[str]
    #: ``unbiased``, ``consistent`` or ``biased``
    certificate: ClassVar[str] = "unbiased"
    #: whether the strategy calls its continuation more than once or with other values;
    #: such strategies cannot be used inside ``lax.scan``/``while_loop`` bodies.
    needs_continuation: ClassVar[bool]
    #: the identity the strategy implements
    identity: ClassVar[str]
    #: whether the site's value carries the parameters' derivative (reparam, relaxations):
    #: then the rest of the program must be differentiable in it (``transforms/_smoothness``)
    pathwise_value: ClassVar[bool] = False

    @abc.abstractmethod
    def check(self, d, site_name: str) -> None:
        """Raise :class:`~estimax.StrategyError` naming the site if ``d`` is unsupported."""

    @abc.abstractmethod
    def estimate(self, ctx: SiteContext, cont: Continuation) -> tuple[list, list | None]:
        """The program's outputs and their tangents, estimated through this site."""

    def describe(self) -> str:
        return self.name

    def split_operands(self) -> tuple["Strategy", tuple]:
        """``(static strategy, traced values)``: traced settings (e.g. a baseline passed as a
        program argument) travel as operands of the site, never inside its static data."""
        return self, ()

    def value_struct(self, d):
        """The ``jax.ShapeDtypeStruct`` of the site's value, or ``None`` for ``d``'s sample.

        Strategies that relax a discrete site (its value becomes float, or one-hot) say so
        here; the program is then traced with that value type.
        """
        del d
        return None

    def __repr__(self) -> str:
        return f"ex.{self.describe()}"


__all__ = ["Strategy"]
