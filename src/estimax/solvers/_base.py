"""The solver interface: every solver in estimax subclasses :class:`Solver`.

A solver is three pure functions over a state pytree (a ``NamedTuple``), as in optax and
optimistix:

- ``init(problem, *start, key) -> state``;
- ``step(problem, state, key) -> state``: one iteration;
- ``terminate(problem, state, tol) -> (done, result)``: whether to stop, and why (a
  :class:`~estimax.solvers.RESULTS` code, int32).

The rest has defaults that a solver overrides where it differs: what the driver checks for
finiteness (:meth:`Solver.checked`), records per step (:meth:`Solver.record`) and reports
from inside the loop (:meth:`Solver.report`); how the first state is made from the run's key
(:meth:`Solver.start`); the problem check and the statistics of a final state.
"""

from __future__ import annotations

import abc
from typing import Any

import jax


class Solver(abc.ABC):
    """The abstract solver. The constrained solvers' states expose ``x``, ``lam`` (equality
    multipliers), ``mu`` (inequality multipliers), ``value``, ``kkt`` (the KKT residual) and
    ``infeasibility`` at their iterate, and keep every floating-point leaf finite (a "not yet
    set" value is the dtype's largest float, not ``inf``), but for a field named ``extra``: a
    solver's own bookkeeping (an optax state), not checked."""

    #: the solver's iteration budget when the caller gives none (``None``: the caller's default)
    max_steps: int | None = None
    #: whether its step has no loop inside, so that it can be differentiated (``ex.argmin``'s
    #: ``method="unrolled"``)
    unrollable: bool = False

    @property
    def name(self) -> str:
        return type(self).__name__

    @abc.abstractmethod
    def init(self, problem, *start) -> Any:
        """The first state, from the starting point(s) and a key (the last argument)."""

    @abc.abstractmethod
    def step(self, problem, state, key) -> Any:
        """One iteration."""

    @abc.abstractmethod
    def terminate(self, problem, state, tol) -> tuple[jax.Array, jax.Array]:
        """``(done, result)``: whether to stop, and a ``RESULTS`` code (int32)."""

    def check(self, problem) -> None:
        """Refuse a problem the solver cannot solve (an ``estimax.ProgramError`` naming why)."""
        del problem

    def stats(self, state) -> dict:
        """Solver-specific numbers about a final state, for ``Solution.stats``."""
        del state
        return {}

    def start(self, problem, start: tuple, key) -> tuple[Any, jax.Array]:
        """The first state and the key the loop goes on with: by default the run's key is
        split, the second half drawn by ``init``."""
        key, sub = jax.random.split(key)
        return self.init(problem, *start, sub), key

    def checked(self, state) -> dict:
        """The parts of the state that must stay finite, by name, in the order in which a
        failure is blamed: every field but ``extra``."""
        return {f: getattr(state, f) for f in state._fields if f != "extra"}

    def record(self, state) -> dict:
        """The scalars recorded for each iterate (``Solution.history``)."""
        return {"value": state.value, "kkt": state.kkt, "infeasibility": state.infeasibility}

    def report(self, state) -> tuple:
        """The values reported with the step from inside the loop (``progress=``)."""
        return state.kkt, state.value


__all__ = ["Solver"]
