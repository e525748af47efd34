"""The device driver: one loop for every solver in estimax (``ex.fit`` among them).

- :func:`start`: the first state (:meth:`Solver.start`), its finiteness and stopping test,
  and the history buffer;
- :func:`advance`: steps until ``carry.steps == until`` or the solver is done, one
  ``lax.while_loop`` whose ``until`` is a traced argument, so that one compiled function
  serves every chunk (a last, shorter one included);
- :func:`finish`: mark a run that used its budget without being done.

Every step is checked: a step that makes a part of the state named by
:meth:`Solver.checked` non-finite is not taken (state and key stay as they were, so the step
can be replayed on the host), the run stops with ``RESULTS.nonfinite`` and ``bad_field``
says which part went bad. The history holds :meth:`Solver.record` of each iterate at index
``steps - base``: ``base`` 0 keeps a whole run (``ex.solve``: index 0 the start); a loop run
in chunks may pass the chunk's first step and a buffer one longer than the chunk
(``ex.fit``). A step that fails is not recorded (a caller that wants its values replays it).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..runtime import _progress
from ..runtime._tree import all_finite
from ._base import Solver
from ._solution import RESULTS


class Carry(NamedTuple):
    """What the loop carries: the solver state and the driver's bookkeeping."""

    state: Any
    key: jax.Array
    steps: jax.Array  # int32: steps taken
    done: jax.Array  # bool
    result: jax.Array  # int32: a RESULTS code
    bad_field: jax.Array  # int32: the checked part of the state that went non-finite (-1: none)
    history: Any  # dict of arrays, one entry per recorded iterate


def _finite(solver: Solver, state) -> jax.Array:
    """One flag per checked part of the state: all of its float leaves finite."""
    return jnp.stack([all_finite(part) for part in solver.checked(state).values()])


def _record(history, i, values):
    return jax.tree.map(lambda h, v: h.at[i].set(jnp.asarray(v, h.dtype)), history, values)


def start(solver: Solver, problem, start_point: tuple, key, tol, length: int, dtype=None) -> Carry:
    """The loop's first carry. ``length``: the history buffer's length; ``dtype``: the
    history's dtype (default: each recorded value's own)."""
    state, key = solver.start(problem, start_point, key)
    records = solver.record(state)
    history = jax.tree.map(lambda v: jnp.full((length,), jnp.nan, dtype or jnp.result_type(v)), records)
    history = _record(history, 0, records)
    done, result = solver.terminate(problem, state, tol)
    fields = _finite(solver, state)
    finite = jnp.all(fields)
    return Carry(
        state=state, key=key, steps=jnp.int32(0),
        done=done | ~finite,
        result=jnp.where(finite, result, RESULTS.nonfinite).astype(jnp.int32),
        bad_field=jnp.where(finite, -1, jnp.argmin(fields)).astype(jnp.int32),
        history=history,
    )


def advance(solver: Solver, problem, carry: Carry, until, tol, base=0, report_every=None, token=0) -> Carry:
    """Steps until ``carry.steps == until`` or the solver is done (a ``lax.while_loop``).
    Step ``i`` draws the ``i``-th key split off the run's key, however the run is chunked.
    With ``report_every``, every ``k``-th step sends ``(step, *solver.report(state))`` to the
    host receiver of ``token`` (an unordered callback: the loop does not wait)."""

    def cond(c: Carry):
        return (~c.done) & (c.steps < until)

    def body(c: Carry) -> Carry:
        key, sub = jax.random.split(c.key)
        new = solver.step(problem, c.state, sub)
        fields = _finite(solver, new)
        finite = jnp.all(fields)
        state = jax.tree.map(lambda a, b: jax.lax.select(finite, a, b), new, c.state)
        done, result = solver.terminate(problem, state, tol)
        steps = c.steps + finite.astype(jnp.int32)
        _progress.maybe_report(report_every, finite, token, steps, *solver.report(state))
        return Carry(
            state=state, key=jnp.where(finite, key, c.key), steps=steps,  # a failed step can be replayed
            done=done | ~finite,
            result=jnp.where(finite, result, RESULTS.nonfinite).astype(jnp.int32),
            bad_field=jnp.where(finite, -1, jnp.argmin(fields)).astype(jnp.int32),
            history=_record(c.history, steps - base, solver.record(state)),
        )

    return jax.lax.while_loop(cond, body, carry)


def finish(carry: Carry, max_steps: int) -> Carry:
    """Mark a run that used its budget without converging."""
    ran_out = (~carry.done) & (carry.steps >= max_steps)
    result = jnp.where(ran_out, RESULTS.max_steps_reached, carry.result).astype(jnp.int32)
    return carry._replace(result=result)


def bad_part(solver: Solver, carry_host: Carry) -> str:
    """The name of the checked part of the state that went non-finite."""
    names = list(solver.checked(carry_host.state))
    bad = int(carry_host.bad_field)
    return names[bad] if 0 <= bad < len(names) else "the state"


def message(solver: Solver, result: RESULTS, carry_host: Carry) -> str:
    text = result.message
    if result == RESULTS.nonfinite:
        text = f"step {int(carry_host.steps) + 1} produced non-finite values in `{bad_part(solver, carry_host)}`; " \
               f"the last finite iterate (after step {int(carry_host.steps)}) is returned"
    return text


def trim_history(history, steps: int) -> dict:
    return {k: np.asarray(v)[: steps + 1] for k, v in history.items()}


__all__ = ["Carry", "advance", "bad_part", "finish", "message", "start", "trim_history"]
