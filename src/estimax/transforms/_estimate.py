"""``Expectation``: a program that can be estimated, and ``@ex.expectation``."""

from __future__ import annotations

from typing import Callable

import jax

from .._errors import ProgramError
from ..dsl._constraints import refuse_constraints
from ..dsl._program import Program, check_key
from ._adev import build_estimator
from ._certify import collect_sites


class Expectation(Program):
    """A program whose value is a random variable; built by :func:`expectation`.

    Calling it inside another program inlines it (its sites become that program's sites).
    ``.estimate(key, *args)`` is an unbiased estimate of its expected value; ``jax.grad`` of
    ``.estimate`` (or :func:`estimax.grad`) is an estimate of the expectation's gradient.
    """

    def __init__(self, fn: Callable, name: str | None = None, certificate: tuple[str, str] | None = None):
        super().__init__(fn, name, certificate)
        self.estimate = jax.jit(self._estimate)

    def _estimator(self, args):
        closed, in_tree, out_tree = self.stage(args)
        refuse_constraints(closed.jaxpr)  # solved by ex.solve, never estimated as if unconstrained
        collect_sites(closed.jaxpr)  # validates names
        est = build_estimator(closed.jaxpr, len(closed.consts))
        consts = list(closed.consts)

        def flat_est(key, *flat_args):
            return jax.tree_util.tree_unflatten(out_tree, est(key, *consts, *flat_args))

        return flat_est, in_tree, out_tree

    def _estimate(self, key, *args):
        """An unbiased estimate of ``E[program(*args)]`` (same pytree as the program's value).

        Differentiable: ``jax.grad(objective.estimate, argnums=1)(key, theta)`` is the
        estimator pass's gradient estimate.
        """
        check_key(key, f"{self.name}.estimate")
        flat_est, in_tree, _ = self._estimator(args)
        return flat_est(key, *jax.tree_util.tree_leaves(args))


def expectation(fn: Callable | None = None, *, name: str | None = None):
    """Declare a program whose value is a random variable.

    **Example:**

        >>> import jax, numpyro.distributions as dist, estimax as ex
        >>> @ex.expectation
        ... def objective(mu):
        ...     z = ex.sample(dist.Normal(mu, 1.0), name="z")
        ...     return (z - 1.0) ** 2
        >>> g = ex.grad(objective)(jax.random.PRNGKey(0), 0.0)   # estimates d/dmu E[(z-1)^2] = -2
    """
    if fn is None:
        return lambda f: Expectation(f, name=name)
    if isinstance(fn, Expectation):
        return fn
    return Expectation(fn, name=name)


def as_program(objective, where: str) -> Expectation:
    """``objective`` as an :class:`Expectation` (a plain function is wrapped); ``where`` names the caller."""
    if isinstance(objective, Expectation):
        return objective
    if callable(objective):
        return Expectation(objective)
    raise ProgramError(f"{where} expects a program (an @ex.expectation function); got {type(objective).__name__}.")


__all__ = ["Expectation", "as_program", "expectation"]
