"""What every loop returns: one results enum with its messages, the constrained solvers'
:class:`Solution` and :class:`SolverError` (``ex.fit`` returns a ``FitResult`` that carries
the same :class:`RESULTS`)."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from .._errors import EstimaxError


class RESULTS(enum.IntEnum):
    """Why a loop stopped: ``ex.solve``, ``ex.solve_bilevel``, ``ex.solve_multiblock``, the
    inner solve of ``ex.argmin`` and ``ex.fit``. Each has a ``.message``."""

    successful = 0
    max_steps_reached = 1
    nonfinite = 2
    infeasible = 3
    line_search_failed = 4
    stagnated = 5
    stopped_by_callback = 6
    plateau = 7

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    RESULTS.successful: "converged: the KKT residual is below the tolerance",
    RESULTS.max_steps_reached: "stopped after max_steps without reaching the tolerance; raise max_steps, or "
    "resume from the returned state",
    RESULTS.nonfinite: "a step produced non-finite values (NaN or Inf); the last finite iterate is returned",
    RESULTS.infeasible: "the constraints appear (locally) infeasible: the iterate is a stationary point of "
    "the constraint violation (no nearby point reduces it) where the violation is above the tolerance; the "
    "returned point is where it is least nearby. Check the constraints for a contradiction, or start elsewhere",
    RESULTS.line_search_failed: "the line search could not decrease the merit function; the iterate is "
    "returned as it is (often a sign of inconsistent derivatives or a badly scaled problem)",
    RESULTS.stagnated: "the iterates stopped changing before the KKT residual reached the tolerance",
    RESULTS.stopped_by_callback: "the callback asked the run to stop",
    RESULTS.plateau: "the running objective stopped improving (early_stop)",
}


class SolverError(EstimaxError, RuntimeError):
    """A solver run that did not succeed, with ``throw=True``; ``.solution`` holds the result."""

    def __init__(self, message: str, solution: "Solution"):
        super().__init__(message)
        self.solution = solution


@dataclasses.dataclass(frozen=True)
class Solution:
    """The result of :func:`estimax.solve`.

    - ``params``: the solution, shaped like the initial parameters;
    - ``value``: the objective there (in the program's own sign);
    - ``multipliers``: each constraint's multiplier by name (``λ`` for equalities, ``μ >= 0``
      for inequalities and bounds ``"bounds/lower"``, ``"bounds/upper"``);
    - ``kkt``: the KKT residual (max of stationarity, feasibility and complementarity);
      ``infeasibility``: the largest constraint violation;
    - ``steps``, ``result`` (a :class:`RESULTS`), ``success``, ``message``;
    - ``history``: ``{"value", "kkt", "infeasibility"}`` per iterate (index 0 the start);
    - ``stats``: ``compile_s`` and ``solve_s`` (seconds; ``solve_s`` excludes compilation),
      and solver-specific counts;
    - ``state``: the solver's final state (for a warm restart).
    """

    params: Any
    value: float
    multipliers: dict
    kkt: float
    infeasibility: float
    steps: int
    result: RESULTS
    message: str
    history: dict
    stats: dict
    state: Any

    @property
    def success(self) -> bool:
        return self.result == RESULTS.successful

    def __repr__(self) -> str:
        return (f"Solution({self.result.name}: value={self.value + 0.0:.10g}, kkt={self.kkt:.3g}, "
                f"infeasibility={self.infeasibility:.3g}, steps={self.steps})")


__all__ = ["RESULTS", "Solution", "SolverError"]
