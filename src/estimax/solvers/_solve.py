"""``ex.solve``: a program with constraints, solved by one of the solvers on the driver."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import os
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from .._errors import ProgramError
from ..transforms._estimate import as_program as _as_program
from ..runtime import _progress
from ..runtime import _identity
from ..runtime._checkpoint import Checkpointer, _words, as_checkpoint, digest, interrupted, stop_on_signals
from ..transforms._constraints import split
from . import _driver
from ._driver import RESULTS, Solution, SolverError
from ._problem import Problem

# 3: a run identified by its program, solver, data, start, ... (runtime/_identity); the history
# saved apart from the loop's state, so that max_steps may be raised on resume
_CHECKPOINT_FORMAT = "estimax-solve/3"


def _default_solver(problem: Problem):
    from ._al import AugmentedLagrangian
    from ._exact_al import ExactAL
    from ._stochastic_al import StochasticLagrangian

    if problem.stochastic:
        return StochasticLagrangian()
    if problem.m_in == 0:
        return ExactAL()
    return AugmentedLagrangian()


def _signature(args) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(args)
    return treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves)


def _bounds_key(bounds) -> str:
    if bounds is None:
        return "none"
    leaves, treedef = jax.tree_util.tree_flatten(bounds, is_leaf=lambda x: x is None)
    h = hashlib.sha256(str(treedef).encode())
    for leaf in leaves:
        h.update(b"none" if leaf is None else np.ascontiguousarray(np.asarray(leaf, float)).tobytes())
    return h.hexdigest()


class _Compiled:
    """A problem and its compiled loop, for one program, solver, argument shapes and options."""

    def __init__(self, problem: Problem, solver, max_steps: int, tol: float, report_every: int | None = None):
        self.problem, self.solver, self.max_steps, self.tol = problem, solver, max_steps, tol
        self.compile_s = 0.0

        def start(x0, lam0, mu0, key, data):
            bound = problem.bind(data)
            return _driver.start(solver, bound, x0, lam0, mu0, key, max_steps, tol)

        def advance(carry, until, data):
            bound = problem.bind(data)
            return _driver.advance(solver, bound, carry, until, tol)

        def run(x0, lam0, mu0, key, data, token):
            carry = start(x0, lam0, mu0, key, data)
            bound = problem.bind(data)
            carry = _driver.advance(solver, bound, carry, max_steps, tol, report_every, token)
            return _driver.finish(carry, max_steps)

        self._start, self._advance, self._run = jax.jit(start), jax.jit(advance), jax.jit(run)
        self._aot: dict = {}

    def _compiled(self, name, fn, *args):
        sig = (name, _signature(args))
        hit = self._aot.get(sig)
        if hit is None:
            t0 = time.perf_counter()
            hit = fn.lower(*args).compile()
            self.compile_s += time.perf_counter() - t0
            self._aot[sig] = hit
        return hit

    def run(self, *args):
        return self._compiled("run", self._run, *args)(*args)

    def compile_run(self, *args) -> None:
        self._compiled("run", self._run, *args)

    def start(self, *args):
        return self._compiled("start", self._start, *args)(*args)

    def advance(self, carry, until, data):
        until = jnp.int32(until)
        return self._compiled("advance", self._advance, carry, until, data)(carry, until, data)


_CACHE: "collections.OrderedDict[tuple, _Compiled]" = collections.OrderedDict()
_CACHE_SIZE = 16


def _cache_get(key, build) -> _Compiled:
    """The compiled loop for ``key`` (program and solver compared by identity/equality, as
    ``jax.jit`` compares functions), kept for the last few keys."""
    try:
        hash(key)
    except TypeError:  # an unhashable solver: no reuse
        return build()
    hit = _CACHE.get(key)
    if hit is None:
        hit = _CACHE[key] = build()
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return hit


def solve(
    program,
    params,
    *data,
    solver=None,
    bounds=None,
    maximize: bool = False,
    max_steps: int | None = None,
    tol: float | None = None,
    key=None,
    multipliers: dict | None = None,
    throw: bool = False,
    progress: bool | None = False,
    checkpoint: str | os.PathLike | None = None,
    every: int = 50,
) -> Solution:
    """Solve the constrained problem stated by ``program(params, *data)``.

    The program's value is the objective; its ``ex.subject_to`` calls are the constraints.
    ``params`` (a pytree of floating-point arrays) is the starting point; ``data`` are the
    program's other arguments (not optimized).

    Args:
        solver: ``ex.solvers.ExactAL()`` (equalities; exact derivatives), ``ex.solvers.
            AugmentedLagrangian()`` (equalities, inequalities, bounds) or ``ex.solvers.
            StochasticLagrangian()`` (objectives or constraints that are expectations). Default:
            the first that applies, in the order stochastic, equalities only, general.
        bounds: ``(lower, upper)``, pytrees shaped like ``params`` (``None`` or ``±inf`` for no
            bound), or ``{name: (lower, upper)}`` for dict parameters; inequality constraints
            named ``bounds/lower`` and ``bounds/upper``.
        maximize: maximize the objective instead of minimizing it.
        max_steps: the solver's iteration budget (default: the solver's ``max_steps``, else 500).
        tol: the KKT residual at which the run succeeds (default ``1e-6`` for float64
            parameters, ``1e-4`` for float32, whose rounding limits the attainable residual).
        key: a PRNG key (randomized solvers and stochastic problems; default ``PRNGKey(0)``).
            Same key, same inputs: the same iterates.
        multipliers: initial multipliers by constraint name (default: the solver's choice).
        throw: raise a :class:`SolverError` (carrying the solution) when the run does not succeed.
        progress: show a progress line (step, KKT residual, value) every ``every`` steps while
            the run goes, sent from inside the compiled loop by host callbacks that the loop
            does not wait for (with ``checkpoint=``, between chunks of ``every`` steps).
        checkpoint: a folder (or an ``estimax.Checkpoint``): the whole run state (solver
            state, PRNG key, step, history) is saved there atomically (orbax) every
            ``every`` steps and when the run is
            interrupted (Ctrl-C, SIGTERM: the chunk finishes, the state is saved, then
            ``KeyboardInterrupt`` is raised, with the signal as ``.signum``); calling ``solve``
            again with the same arguments resumes from it and ends where an uninterrupted run
            would (``max_steps`` may be raised to continue a run). A folder written for another
            run -- another staged program, solver options (an optax optimizer's hyperparameters
            among them), data, start, key, bounds or ``tol`` -- is refused, naming what differs;
            ``Checkpoint(folder, resume=False)`` starts over. The folder is locked while the run
            goes.

    Returns:
        A :class:`Solution`.
    """
    user_program = program  # the cache compares what the caller passed (a plain function is wrapped anew)
    program = _as_program(program, "ex.solve")
    if not isinstance(max_steps, (int, type(None))) or isinstance(max_steps, bool) or (max_steps is not None and max_steps < 1):
        raise ProgramError(f"ex.solve: max_steps must be a positive integer; got {max_steps!r}.")
    if tol is None:
        flat, _ = jax.flatten_util.ravel_pytree(params)
        tol = 1e-6 if jnp.result_type(flat) == jnp.float64 else 1e-4
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ProgramError(f"ex.solve: tol must be a positive number; got {tol!r}.")
    if not (isinstance(every, int) and every >= 1):
        raise ProgramError(f"ex.solve: every must be a positive integer; got {every!r}.")
    checkpoint = as_checkpoint(checkpoint, "ex.solve")
    if checkpoint is not None and checkpoint.every:
        every = checkpoint.every
    args = (params, *data)
    signature = _signature(args)

    def build() -> _Compiled:
        problem = Problem(split(program, args), params, bounds=bounds, maximize=maximize)
        chosen = solver if solver is not None else _default_solver(problem)
        chosen.check(problem)
        steps = max_steps or getattr(chosen, "max_steps", None) or 500
        return _Compiled(problem, chosen, steps, float(tol), report_every)

    report_every = every if (progress and checkpoint is None) else None  # progress from inside the loop
    entry = _cache_get((user_program, solver, signature, _bounds_key(bounds), bool(maximize), max_steps, float(tol),
                        report_every), build)
    problem, chosen = entry.problem, entry.solver
    x0, _ = jax.flatten_util.ravel_pytree(params)
    x0 = jnp.asarray(x0, problem.dtype)
    lam0, mu0 = _initial_multipliers(problem, multipliers)
    key = jax.random.PRNGKey(0) if key is None else key
    data_leaves = tuple(jax.tree_util.tree_leaves(data))

    compile_before = entry.compile_s
    if checkpoint is None:  # one compiled loop; progress (if any) by host callbacks from inside it
        def show(step, kkt, value):
            print(f"\r{program.name}: step {step}  KKT {kkt:.3e}  value {value:.8g}", end="", flush=True)

        with _progress.receiving(show if progress else None) as token:
            entry.compile_run(x0, lam0, mu0, key, data_leaves, token)  # compile outside the timed run
            t0 = time.perf_counter()
            carry = jax.block_until_ready(entry.run(x0, lam0, mu0, key, data_leaves, token))
            solve_s = time.perf_counter() - t0
        if progress:
            print()
    else:
        identity, about = _run_identity(program, args, chosen, x0, lam0, mu0, key, bounds, maximize, tol)
        carry, solve_s = _chunked(entry, x0, lam0, mu0, key, data_leaves, checkpoint, every, progress,
                                  program.name, identity, about)
    host = jax.device_get(carry)
    result = RESULTS(int(host.result))
    where = _replay_nonfinite(entry, carry, data_leaves) if result == RESULTS.nonfinite else None
    state = host.state
    steps = int(host.steps)
    value = float(state.value)
    solution = Solution(
        params=problem.unravel(jnp.asarray(state.x)),
        value=-value if problem.maximize else value,
        multipliers=problem.multipliers(jnp.asarray(state.lam), jnp.asarray(state.mu)),
        kkt=float(state.kkt),
        infeasibility=float(state.infeasibility),
        steps=steps,
        result=result,
        message=_driver.message(result, host) + (f"; the first NaN (or Inf) of the step: {where}" if where else ""),
        history=_history(_driver.trim_history(host.history, steps), problem.maximize),
        stats={"compile_s": entry.compile_s - compile_before, "solve_s": solve_s, "solver": chosen.name,
               **(chosen.stats(state) if hasattr(chosen, "stats") else {})},
        state=state,
    )
    if throw and not solution.success:
        raise SolverError(f"ex.solve({program.name}) with {chosen.name}: {solution.message} "
                          f"(after {steps} steps; KKT residual {solution.kkt:.3g}).", solution)
    return solution


def _replay_nonfinite(entry: _Compiled, carry, data) -> str | None:
    """The failed step replayed on the host with ``jax.debug_nans`` (its key is the carry's:
    a failed step does not advance it), the problem's pieces evaluated one operation at a
    time: the operation, line and piece (objective or constraint) that made the first NaN."""
    from ..transforms._constraints import DIAGNOSING

    _, sub = jax.random.split(carry.key)
    bound = entry.problem.bind(data)
    for check in (jax.debug_nans, jax.debug_infs):
        DIAGNOSING.on = True
        try:
            with check(True), jax.disable_jit(), contextlib.redirect_stdout(io.StringIO()):
                jax.block_until_ready(entry.solver.step(bound, carry.state, sub))
        except FloatingPointError as e:
            if getattr(e, "estimax_located", False):
                return str(e).splitlines()[0]
        except Exception:  # noqa: BLE001  (a diagnosis, never a second failure)
            pass
        finally:
            DIAGNOSING.on = False
    return None


def _history(history, maximize):
    if maximize:
        history = dict(history, value=-history["value"])
    return history


def _initial_multipliers(problem: Problem, multipliers):
    lam = None
    mu = jnp.zeros((problem.m_in,), problem.dtype)
    if multipliers is None:
        return lam, mu
    if not isinstance(multipliers, dict):
        raise ProgramError("ex.solve: multipliers= takes a dict {constraint name: initial multiplier}.")
    segments = {s.name: s for s in (*problem.eq_segments, *problem.ineq_segments)}
    unknown = sorted(set(multipliers) - set(segments))
    if unknown:
        raise ProgramError(f"ex.solve: multipliers for {unknown}, which are not constraints (they are {sorted(segments)}).")
    lam = np.zeros(problem.m_eq)
    mu = np.zeros(problem.m_in)
    for name, value in multipliers.items():
        seg = segments[name]
        try:
            v = np.broadcast_to(np.asarray(value, float), seg.shape).ravel()
        except ValueError:
            raise ProgramError(f"ex.solve: the multiplier of {name!r} has shape {np.shape(value)}; the constraint "
                               f"has shape {seg.shape}.") from None
        (lam if seg.kind == "eq" else mu)[seg.start:seg.start + seg.size] = v
    if np.any(mu < 0):
        raise ProgramError("ex.solve: inequality multipliers must be >= 0.")
    return jnp.asarray(lam, problem.dtype), jnp.asarray(mu, problem.dtype)


def _run_identity(program, args, solver, x0, lam0, mu0, key, bounds, maximize, tol) -> tuple[dict, dict]:
    """What identifies a constrained run in its checkpoint (``runtime/_identity``): the staged
    program, the solver and its options (an optax optimizer among them by its
    hyperparameters; not ``max_steps``, a budget that a resumed run may raise), the data, the
    starting point and multipliers, the key, the bounds and the options; and the numbers found
    in the solver, to say which differs."""
    closed, in_tree, _ = program.stage(args)
    fields = {f.name: getattr(solver, f.name) for f in dataclasses.fields(solver)} \
        if dataclasses.is_dataclass(solver) else {"solver": solver}
    fields.pop("max_steps", None)
    solver_digest, numbers = _identity.describe_with_numbers(fields)  # its kind: options["solver"]
    identity = {
        "program": _identity.program_digest(closed, in_tree),
        "solver": solver_digest,
        "data": digest(args[1:]),
        "start": digest((x0, lam0, mu0)),
        "key": digest(key),
        "bounds": _bounds_key(bounds)[:32],
        "options": {"maximize": bool(maximize), "tol": float(tol),
                    "solver": f"{type(solver).__module__}.{type(solver).__qualname__}"},
    }
    return identity, {"solver": numbers}


def _chunked(entry: _Compiled, x0, lam0, mu0, key, data, checkpoint, every, progress, name, identity, about):
    """The loop in chunks of ``every`` steps: progress between chunks, checkpoints after each
    and on interruption; resumes from ``checkpoint`` (a folder) when it holds one. The history
    is saved apart from the loop's state, as long as the steps taken: a run resumed with a
    larger ``max_steps`` continues where it stopped."""
    carry = entry.start(x0, lam0, mu0, key, data)
    ckpt = None
    if checkpoint is not None:
        ckpt = Checkpointer(checkpoint.directory, format=_CHECKPOINT_FORMAT, meta=dict(checkpoint.meta or {}),
                            identity=identity, about=about, keep=checkpoint.keep, info=checkpoint.info,
                            resume=checkpoint.resume)
        try:
            restored = ckpt.restore(carry._replace(history={}))
            if restored is not None:
                state, host, _ = restored
                steps = int(state.steps)
                if steps > entry.max_steps:
                    raise ProgramError(
                        f"ex.solve: the checkpoint in {ckpt.directory} holds {steps} steps, more than "
                        f"max_steps={entry.max_steps}; pass max_steps={steps} or more to continue it, or "
                        f"{_words('start_over')}.")
                history = {k: np.asarray(v).copy() for k, v in jax.device_get(carry.history).items()}
                for k in history:
                    history[k][: steps + 1] = host[f"history_{k}"][: steps + 1]
                carry = state._replace(history={k: jnp.asarray(v) for k, v in history.items()})
                ckpt.resuming(steps)
        except BaseException:
            ckpt.close()
            raise
    t0 = time.perf_counter()
    try:
        with stop_on_signals(ckpt is not None) as received:
            while True:
                steps = int(carry.steps)
                if bool(carry.done) or steps >= entry.max_steps:
                    break
                carry = jax.block_until_ready(entry.advance(carry, min(steps + every, entry.max_steps), data))
                if ckpt is not None:
                    save_state(ckpt, int(carry.steps), carry)
                if progress:
                    print(f"\r{name}: step {int(carry.steps)}  KKT {float(carry.state.kkt):.3e}  "
                          f"value {float(carry.state.value):.8g}", end="", flush=True)
                if received:  # the exception says which signal stopped the run
                    raise interrupted(received[0])
    finally:
        if ckpt is not None:
            ckpt.close()
        if progress:
            print()
    carry = _driver.finish(carry, entry.max_steps)
    return carry, time.perf_counter() - t0


def save_state(ckpt: Checkpointer, step: int, carry) -> None:
    """One checkpoint of the loop (a separate function, so that tests can interrupt after it):
    the loop's state, and its history up to ``step`` apart."""
    history = {f"history_{k}": np.asarray(v)[: step + 1] for k, v in jax.device_get(carry.history).items()}
    ckpt.save(step, carry._replace(history={}), host=history)
