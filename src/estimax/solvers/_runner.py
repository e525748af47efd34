"""The host runner: what every loop does on the host around the device driver.

``ex.fit``, ``ex.solve``, ``ex.solve_bilevel``, ``ex.solve_multiblock`` and ``ex.argmin``'s
inner solve share it:

- :class:`Compiled`: one solver and problem, compiled: ``start``, ``advance`` and the whole
  ``run`` as jitted functions, each compiled ahead of time once per argument signature (the
  seconds spent are ``compile_s``), under a device mesh when there is one; :func:`cached`
  keeps the last few by what the caller passed (compared as ``jax.jit`` compares functions);
- :func:`drive`: the loop in chunks: one ``advance`` per chunk, then the caller's per-chunk
  hook (progress, stopping rules), checkpoints (:mod:`estimax.runtime._checkpoint`) and the
  stop on SIGINT/SIGTERM;
- :func:`open_checkpoint`, :func:`save_state`: a run's folder and one save;
- :func:`locate`: the failed step replayed with ``jax.debug_nans`` / ``debug_infs``, for the
  operation and line that made the first NaN;
- :func:`solution`: a constrained run's :class:`Solution` from its final carry;
- the checks of the options that every front-end takes, with one wording.
"""

from __future__ import annotations

import collections
import contextlib
import io
import numbers
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import ArgumentError
from ..runtime import _checkpoint as _ckpt
from ..runtime import _jax_compat as compat
from ..dsl._program import key_problem
from ._driver import advance as advance_loop
from ._driver import finish, message
from ._driver import start as start_loop
from ._base import Solver
from ._solution import RESULTS, Solution, SolverError

#: the step counter carried through the compiled loop is an int32
MAX_STEPS = 2**31 - 1


# --- compiled loops ------------------------------------------------------------------------------


def signature(args) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves)


class Compiled:
    """A solver on a problem, compiled. ``bind(data)`` makes the problem the solver steps on
    from the run's data (traced arguments, so that one compiled loop serves all data of the
    same shapes); ``length`` is the history buffer's length (``dtype`` its dtype, default
    each recorded value's own); ``max_steps`` the budget of :meth:`run`."""

    def __init__(self, solver: Solver, bind: Callable, *, tol, length: int, dtype=None, max_steps: int | None = None,
                 report_every: int | None = None, mesh=None):
        self.solver, self.bind, self.tol, self.max_steps, self.mesh = solver, bind, tol, max_steps, mesh
        self.compile_s = 0.0

        def start(point, key, data):
            return start_loop(solver, bind(data), point, key, tol, length, dtype)

        def advance(carry, until, base, data, token):
            return advance_loop(solver, bind(data), carry, until, tol, base, report_every, token)

        def run(point, key, data, token):
            problem = bind(data)
            carry = start_loop(solver, problem, point, key, tol, length, dtype)
            carry = advance_loop(solver, problem, carry, max_steps, tol, 0, report_every, token)
            return finish(carry, max_steps)

        self._jitted = {"start": jax.jit(start), "advance": jax.jit(advance), "run": jax.jit(run)}
        self._aot: dict = {}

    def _mesh(self):
        return compat.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def compile(self, name: str, *args):
        """The compiled ``name`` for these arguments (compiled on first use, timed)."""
        sig = (name, signature(args))
        hit = self._aot.get(sig)
        if hit is None:
            t0 = time.perf_counter()
            with self._mesh():  # traced under the mesh: ex.vmap partitions its lanes
                hit = self._jitted[name].lower(*args).compile()
            self.compile_s += time.perf_counter() - t0
            self._aot[sig] = hit
        return hit

    def start(self, point, key, data):
        return self.compile("start", point, key, data)(point, key, data)

    def advance(self, carry, until, base, data, token=0):
        args = (carry, jnp.int32(until), jnp.int32(base), data, jnp.int32(token))
        return self.compile("advance", *args)(*args)

    def run(self, point, key, data, token=0):
        args = (point, key, data, jnp.int32(token))
        return self.compile("run", *args)(*args)


def cached(cache: "collections.OrderedDict", size: int, key, build: Callable[[], Compiled]) -> Compiled:
    """``build()``, remembered in ``cache`` under ``key`` for the last ``size`` keys; an
    unhashable key (an unhashable solver) is not remembered."""
    try:
        hash(key)
    except TypeError:
        return build()
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = build()
        while len(cache) > size:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return hit


# --- the host loop -------------------------------------------------------------------------------


def drive(compiled: Compiled, carry, data, *, max_steps: int, until: Callable[[int], int],
          base: Callable[[int], int] = lambda done: 0, after_chunk: Callable | None = None, ckpt=None,
          save: Callable | None = None, save_now: Callable[[int], bool] = lambda done: True,
          on_interrupt: Callable[[int], None] | None = None, save_at_end: bool = True, token=0):
    """Run ``carry`` in chunks until it is done or holds ``max_steps`` steps: each chunk is
    one ``advance`` to ``until(done)``, its history from index ``base(done)``. After a chunk,
    ``after_chunk(carry, done_before)`` may stop the run (a true value); then, with a
    checkpointer, ``save(carry)`` when ``save_now(steps)``. A run also saves when it ends
    (``save_at_end``) and,
    on SIGINT or SIGTERM, after the chunk in which the signal came, before
    ``KeyboardInterrupt`` (with ``.signum``) is raised. Returns the last carry."""
    saved_at = int(carry.steps) if ckpt is not None and ckpt.latest_step() == int(carry.steps) else None

    def keep(c):
        nonlocal saved_at
        save_state(save, c)
        saved_at = int(c.steps)

    with _ckpt.stop_on_signals(ckpt is not None) as received:
        while True:
            done = int(carry.steps)
            if done >= max_steps or bool(carry.done):
                break
            carry = jax.block_until_ready(compiled.advance(carry, until(done), base(done), data, token))
            if after_chunk is not None and after_chunk(carry, done):
                break
            if ckpt is not None and save_now(int(carry.steps)):
                keep(carry)
            if received:
                if ckpt is not None and saved_at != int(carry.steps):
                    keep(carry)
                if on_interrupt is not None:
                    on_interrupt(int(carry.steps))
                raise _ckpt.interrupted(received[0])
        if ckpt is not None and save_at_end and saved_at != int(carry.steps):
            keep(carry)
    return carry


def save_state(save: Callable, carry) -> None:
    """One checkpoint of the loop (a separate function, so that tests can interrupt after it)."""
    save(carry)


def open_checkpoint(checkpoint, format: str, identity: dict, about: dict):
    """The :class:`~estimax.runtime._checkpoint.Checkpointer` of ``checkpoint`` (an
    ``estimax.Checkpoint``), or ``None``."""
    if checkpoint is None:
        return None
    return _ckpt.Checkpointer(checkpoint.directory, format=format, meta=dict(checkpoint.meta or {}),
                              identity=identity, about=about, keep=checkpoint.keep, info=checkpoint.info,
                              resume=checkpoint.resume)


def restore(ckpt, template, where: str, budget: str, max_steps: int, steps_of: Callable):
    """``ckpt.restore(template)`` (``None`` without a checkpoint), refusing one that holds more
    steps than the budget; the checkpointer is closed when it fails."""
    try:
        restored = ckpt.restore(template)
        if restored is not None:
            steps = steps_of(restored[0])
            if steps > max_steps:
                raise ArgumentError(
                    f"{where}: the checkpoint in {ckpt.directory} holds {steps} steps, more than {budget}={max_steps}; "
                    f"pass {budget}={steps} or more to continue it, or {_ckpt._words('start_over')}.")
    except BaseException:
        ckpt.close()
        raise
    return restored


# --- non-finite steps ------------------------------------------------------------------------------


def locate(replays, setup: Callable[[bool], None] | None = None, checks=None) -> str | None:
    """The first line of the located ``FloatingPointError`` that one of ``replays`` (thunks
    that run the failed step) raises under ``jax.debug_nans`` (then ``debug_infs``), or
    ``None``. ``setup(True)``/``setup(False)`` bracket each replay (a diagnosis mode)."""
    for check in checks or (jax.debug_nans, jax.debug_infs):
        for replay in replays:
            if setup is not None:
                setup(True)
            try:
                with check(True), contextlib.redirect_stdout(io.StringIO()):
                    jax.block_until_ready(replay())
            except FloatingPointError as e:
                if getattr(e, "estimax_located", False):
                    return str(e).splitlines()[0]
            except Exception:  # noqa: BLE001  (a diagnosis, never a second failure)
                pass
            finally:
                if setup is not None:
                    setup(False)
    return None


# --- results ---------------------------------------------------------------------------------------


def solution(solver: Solver, host, *, params, value, multipliers, history: dict, stats: dict, where: str | None = None,
             throw: bool = False, what: str = "") -> Solution:
    """A constrained run's :class:`Solution` from its final carry (on the host); with
    ``throw``, a :class:`SolverError` when it did not succeed (``what`` starts the message)."""
    result = RESULTS(int(host.result))
    steps = int(host.steps)
    sol = Solution(
        params=params, value=value, multipliers=multipliers, kkt=float(host.state.kkt),
        infeasibility=float(host.state.infeasibility), steps=steps, result=result,
        message=message(solver, result, host) + (f"; the first NaN (or Inf) of the step: {where}" if where else ""),
        history=history, stats={**stats, **solver.stats(host.state)}, state=host.state,
    )
    if throw and not sol.success:
        raise SolverError(f"{what}: {sol.message}" if what else sol.message, sol)
    return sol


# --- options: one check, one wording ----------------------------------------------------------------


def positive_int(where: str, name: str, value, what: str, limit: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentError(f"{where}: {name} must be an integer >= 1 ({what}); got {value!r}.")
    if value < 1:
        raise ArgumentError(f"{where}: {name} must be >= 1 ({what}); got {name}={value}.")
    if limit is not None and value > limit:
        raise ArgumentError(
            f"{where}: {name}={value} is too large: the compiled loop counts steps in 32-bit integers, so {name} "
            f"must be at most 2**31 - 1 = {limit}" + (
                " (and a chunk keeps one estimate per step on the device: chunks of 100 to 10000 steps are "
                "typical)." if name == "chunk" else "."))
    return int(value)


def positive_number(where: str, name: str, value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (np.isfinite(value) and value > 0):
        raise ArgumentError(f"{where}: {name} must be a positive number ({what}); got {value!r}.")
    return float(value)


def check_key(where: str, key) -> None:
    got = key_problem(key)
    if got is not None:
        raise ArgumentError(
            f"{where}: key must be a single PRNG key (jax.random.key(0) or jax.random.PRNGKey(0)); got {got}.")


def check_progress(where: str, progress, function: bool = True) -> None:
    if progress is None or isinstance(progress, bool) or (function and callable(progress)):
        return
    raise ArgumentError(f"{where}: progress must be True, False, None" + (" or a function (step, value)" if function
                        else "") + f"; got {type(progress).__name__}.")


def as_checkpoint(where: str, checkpoint):
    try:
        return _ckpt.as_checkpoint(checkpoint, where)
    except TypeError as e:
        raise ArgumentError(str(e)) from None


__all__ = ["Compiled", "MAX_STEPS", "cached", "check_key", "check_progress", "drive", "locate", "open_checkpoint",
           "positive_int", "positive_number", "restore", "save_state", "signature", "solution"]
