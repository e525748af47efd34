"""The solver driver: one loop for every solver in estimax.

A solver is three pure functions over a state pytree (as in optax and optimistix):

- ``init(problem, x0, lam0, mu0, key) -> state``;
- ``step(problem, state, key) -> state``: one iteration;
- ``terminate(problem, state, tol) -> (done, result)``: whether to stop, and why
  (a :class:`RESULTS` code).

and the state exposes ``x``, ``lam`` (equality multipliers), ``mu`` (inequality
multipliers), ``value``, ``kkt`` (the KKT residual) and ``infeasibility`` at its iterate.
Every floating-point leaf of the state must stay finite (the driver stops on NaN or Inf):
a "not yet set" value is the dtype's largest float, not ``inf``. The exception is a field
named ``extra``: a solver's own bookkeeping (an optax state), not checked.

The driver owns everything else: the bounded loop (one ``lax.while_loop``, compiled once;
or, when progress is shown or a checkpoint is written, the same loop run in chunks between
which the host reports and saves), the step budget, non-finite detection (a step that makes
the state non-finite is not taken; the run stops and says which field went bad at which
step), the history of value / KKT residual / infeasibility, and the result with a readable
message. ``throw=True`` turns an unsuccessful result into a :class:`SolverError`.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import EstimaxError
from ..runtime import _progress
from ..runtime._fit import _all_finite as all_finite


class RESULTS(enum.IntEnum):
    """Why a solver stopped."""

    successful = 0
    max_steps_reached = 1
    nonfinite = 2
    infeasible = 3
    line_search_failed = 4
    stagnated = 5

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    RESULTS.successful: "converged: the KKT residual is below the tolerance",
    RESULTS.max_steps_reached: "stopped after max_steps without reaching the tolerance; raise max_steps, or "
    "resume from the returned state",
    RESULTS.nonfinite: "a step produced non-finite values (NaN or Inf); the last finite iterate is returned",
    RESULTS.infeasible: "the constraints appear infeasible: the penalty grew to its limit while the "
    "infeasibility stopped decreasing at a stationary point of the constraint violation",
    RESULTS.line_search_failed: "the line search could not decrease the merit function; the iterate is "
    "returned as it is (often a sign of inconsistent derivatives or a badly scaled problem)",
    RESULTS.stagnated: "the iterates stopped changing before the KKT residual reached the tolerance",
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
        return (f"Solution({self.result.name}: value={self.value:.10g}, kkt={self.kkt:.3g}, "
                f"infeasibility={self.infeasibility:.3g}, steps={self.steps})")


class Carry(NamedTuple):
    """What the loop carries: the solver state and the driver's bookkeeping."""

    state: Any
    key: jax.Array
    steps: jax.Array  # int32: steps taken
    done: jax.Array  # bool
    result: jax.Array  # int32: a RESULTS code
    bad_field: jax.Array  # int32: the state field that went non-finite (-1: none)
    history: Any  # dict of float arrays, length max_steps + 1


def _field_finite(state) -> jax.Array:
    """One flag per field of the state (a NamedTuple): all of its float leaves finite. A field
    named ``extra`` (a solver's own bookkeeping, such as an optax state, which may hold
    infinities by design) is not checked."""
    return jnp.stack([jnp.bool_(True) if f == "extra" else all_finite(getattr(state, f)) for f in state._fields])


def _record(history, i, state):
    return {k: history[k].at[i].set(jnp.asarray(getattr(state, k), history[k].dtype)) for k in history}


def start(solver, problem, x0, lam0, mu0, key, max_steps: int, tol) -> Carry:
    key, sub = jax.random.split(key)
    state = solver.init(problem, x0, lam0, mu0, sub)
    dtype = jnp.result_type(x0)
    history = {k: jnp.full((max_steps + 1,), jnp.nan, dtype) for k in ("value", "kkt", "infeasibility")}
    history = _record(history, 0, state)
    done, result = solver.terminate(problem, state, tol)
    finite = jnp.all(_field_finite(state))
    return Carry(
        state=state, key=key, steps=jnp.int32(0),
        done=done | ~finite,
        result=jnp.where(finite, result, RESULTS.nonfinite).astype(jnp.int32),
        bad_field=jnp.where(finite, -1, jnp.argmin(_field_finite(state))).astype(jnp.int32),
        history=history,
    )


def advance(solver, problem, carry: Carry, until, tol, report_every=None, token=0) -> Carry:
    """Steps until ``carry.steps == until`` or the solver is done (a ``lax.while_loop``).
    With ``report_every``, every ``k``-th step sends ``(step, kkt, value)`` to the host
    receiver of ``token`` (an unordered callback: the loop does not wait)."""

    def cond(c: Carry):
        return (~c.done) & (c.steps < until)

    def body(c: Carry) -> Carry:
        key, sub = jax.random.split(c.key)
        new = solver.step(problem, c.state, sub)
        fields = _field_finite(new)
        finite = jnp.all(fields)
        state = jax.tree.map(lambda a, b: jax.lax.select(finite, a, b), new, c.state)
        done, result = solver.terminate(problem, state, tol)
        steps = c.steps + finite.astype(jnp.int32)
        _progress.maybe_report(report_every, finite, token, steps, state.kkt, state.value)
        return Carry(
            state=state, key=jnp.where(finite, key, c.key), steps=steps,  # a failed step can be replayed
            done=done | ~finite,
            result=jnp.where(finite, result, RESULTS.nonfinite).astype(jnp.int32),
            bad_field=jnp.where(finite, -1, jnp.argmin(fields)).astype(jnp.int32),
            history=_record(c.history, steps, state),
        )

    return jax.lax.while_loop(cond, body, carry)


def finish(carry: Carry, max_steps: int) -> Carry:
    """Mark a run that used its budget without converging."""
    ran_out = (~carry.done) & (carry.steps >= max_steps)
    result = jnp.where(ran_out, RESULTS.max_steps_reached, carry.result).astype(jnp.int32)
    return carry._replace(result=result)


def message(result: RESULTS, carry_host: Carry) -> str:
    text = result.message
    if result == RESULTS.nonfinite:
        fields = carry_host.state._fields
        bad = int(carry_host.bad_field)
        what = fields[bad] if 0 <= bad < len(fields) else "the state"
        text = f"step {int(carry_host.steps) + 1} produced non-finite values in `{what}`; the last finite iterate " \
               f"(after step {int(carry_host.steps)}) is returned"
    return text


def trim_history(history, steps: int) -> dict:
    return {k: np.asarray(v)[: steps + 1] for k, v in history.items()}
