"""``ex.solve``: a program with constraints, solved by one of the solvers on the driver."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from .._errors import ArgumentError
from ..runtime import _identity
from ..runtime import _progress
from ..runtime import _sharding
from ..runtime._checkpoint import digest
from ..transforms._constraints import DIAGNOSING, split
from ..transforms._estimate import as_program as _as_program
from . import _driver, _runner
from ._al import AugmentedLagrangian
from ._base import Solver
from ._exact_al import ExactAL
from ._problem import Problem
from ._solution import RESULTS, Solution, SolverError
from ._stochastic_al import StochasticLagrangian

# 3: a run identified by its program, solver, data, start, ... (runtime/_identity); the history
# saved apart from the loop's state, so that max_steps may be raised on resume
_CHECKPOINT_FORMAT = "estimax-solve/3"


def _default_solver(problem: Problem) -> Solver:
    if problem.stochastic:
        return StochasticLagrangian()
    if problem.m_in == 0:
        return ExactAL()
    return AugmentedLagrangian()


def _bounds_key(bounds) -> str:
    if bounds is None:
        return "none"
    leaves, treedef = jax.tree_util.tree_flatten(bounds, is_leaf=lambda x: x is None)
    h = hashlib.sha256(str(treedef).encode())
    for leaf in leaves:
        h.update(b"none" if leaf is None else np.ascontiguousarray(np.asarray(leaf, float)).tobytes())
    return h.hexdigest()


_CACHE: "collections.OrderedDict[tuple, _runner.Compiled]" = collections.OrderedDict()
_CACHE_SIZE = 16


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
    devices=None,
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

        devices: run on several devices, as ``ex.fit`` does (XLA's SPMD partitioning): a
            device count, ``"all"``, a list of devices, a ``jax.sharding.Mesh`` or ``None``
            (one device, the default). The iterate, the multipliers and the data are
            replicated; the outermost ``ex.vmap`` of the program whose lane count the device
            count divides (samples of a stochastic objective, per-point terms) is split over
            the devices. The result equals the one-device result up to the order of
            floating-point sums.

    Returns:
        A :class:`Solution`.

    Raises:
        estimax.ArgumentError: an option is wrong (``max_steps``, ``tol``, ``every``,
            ``key``, ``progress``, ``checkpoint``, ``solver``, ``multipliers``), worded as
            :func:`estimax.fit` words the same mistakes.
    """
    where = "ex.solve"
    user_program = program  # the cache compares what the caller passed (a plain function is wrapped anew)
    program = _as_program(program, where)
    if max_steps is not None:
        max_steps = _runner.positive_int(where, "max_steps", max_steps, "the solver's iteration budget",
                                         _runner.MAX_STEPS - 1)
    if tol is None:
        flat, _ = jax.flatten_util.ravel_pytree(params)
        tol = 1e-6 if jnp.result_type(flat) == jnp.float64 else 1e-4
    tol = _runner.positive_number(where, "tol", tol, "the KKT residual at which the run succeeds")
    every = _runner.positive_int(where, "every", every, "the steps between progress reports and checkpoints")
    _runner.check_progress(where, progress, function=False)
    checkpoint = _runner.as_checkpoint(where, checkpoint)
    if key is not None:
        _runner.check_key(where, key)
    if solver is not None and not isinstance(solver, Solver):
        raise ArgumentError(f"{where}: solver must be one of estimax.solvers (ExactAL(), AugmentedLagrangian(), "
                            f"StochasticLagrangian(), ...); got {type(solver).__name__}.")
    mesh = None if devices is None else _sharding.device_mesh(devices)
    if checkpoint is not None and checkpoint.every:
        every = checkpoint.every
    args = (params, *data)
    signature = _runner.signature(args)
    report_every = every if (progress and checkpoint is None) else None  # progress from inside the loop

    def build() -> _runner.Compiled:
        problem = Problem(split(program, args), params, bounds=bounds, maximize=maximize)
        chosen = solver if solver is not None else _default_solver(problem)
        chosen.check(problem)
        steps = max_steps or chosen.max_steps or 500
        compiled = _runner.Compiled(chosen, problem.bind, tol=tol, length=steps + 1, dtype=problem.dtype,
                                    max_steps=steps, report_every=report_every, mesh=mesh)
        compiled.problem = problem
        return compiled

    entry = _runner.cached(_CACHE, _CACHE_SIZE, (user_program, solver, signature, _bounds_key(bounds), bool(maximize),
                                                 max_steps, tol, report_every, mesh), build)
    problem, chosen = entry.problem, entry.solver
    x0, _ = jax.flatten_util.ravel_pytree(params)
    x0 = jnp.asarray(x0, problem.dtype)
    lam0, mu0 = _initial_multipliers(problem, multipliers)
    key = jax.random.PRNGKey(0) if key is None else key
    data_leaves = tuple(jax.tree_util.tree_leaves(data))
    if mesh is not None:  # the iterate and the data replicated; the program's ex.vmap lanes split
        x0, lam0, mu0, key, data_leaves = _sharding.replicate((x0, lam0, mu0, key, data_leaves), mesh)
    point = (x0, lam0, mu0)

    compile_before = entry.compile_s
    if checkpoint is None:  # one compiled loop; progress (if any) by host callbacks from inside it
        line = _progress.SolverLine(program.name)
        with _progress.receiving(line.show if progress else None) as token:
            entry.compile("run", point, key, data_leaves, token)  # compile outside the timed run
            t0 = time.perf_counter()
            carry = jax.block_until_ready(entry.run(point, key, data_leaves, token))
            solve_s = time.perf_counter() - t0
        if progress:
            line.close()
    else:
        identity, about = _run_identity(program, args, chosen, x0, lam0, mu0, key, bounds, maximize, tol)
        carry, solve_s = _chunked(entry, point, key, data_leaves, checkpoint, every, progress, program.name,
                                  identity, about)
    host = jax.device_get(carry)
    where_nan = _replay_nonfinite(entry, carry, data_leaves) if int(host.result) == RESULTS.nonfinite else None
    state = host.state
    value = float(state.value)
    solution = _runner.solution(
        chosen, host, params=problem.unravel(jnp.asarray(state.x)), value=-value if problem.maximize else value,
        multipliers=problem.multipliers(jnp.asarray(state.lam), jnp.asarray(state.mu)),
        history=_history(_driver.trim_history(host.history, int(host.steps)), problem.maximize),
        stats={"compile_s": entry.compile_s - compile_before, "solve_s": solve_s, "solver": chosen.name},
        where=where_nan)
    if throw and not solution.success:
        raise SolverError(f"ex.solve({program.name}) with {chosen.name}: {solution.message} "
                          f"(after {solution.steps} steps; KKT residual {solution.kkt:.3g}).", solution)
    return solution


def _replay_nonfinite(entry: _runner.Compiled, carry, data) -> str | None:
    """The failed step replayed on the host with ``jax.debug_nans`` (its key is the carry's:
    a failed step does not advance it), the problem's pieces evaluated one operation at a
    time: the operation, line and piece (objective or constraint) that made the first NaN."""
    _, sub = jax.random.split(carry.key)
    bound = entry.problem.bind(data)

    def replay():
        with jax.disable_jit():
            return entry.solver.step(bound, carry.state, sub)

    def diagnosing(on: bool) -> None:
        DIAGNOSING.on = on

    return _runner.locate([replay], setup=diagnosing)


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
        raise ArgumentError("ex.solve: multipliers= takes a dict {constraint name: initial multiplier}.")
    segments = {s.name: s for s in (*problem.eq_segments, *problem.ineq_segments)}
    unknown = sorted(set(multipliers) - set(segments))
    if unknown:
        raise ArgumentError(f"ex.solve: multipliers for {unknown}, which are not constraints (they are {sorted(segments)}).")
    lam = np.zeros(problem.m_eq)
    mu = np.zeros(problem.m_in)
    for name, value in multipliers.items():
        seg = segments[name]
        try:
            v = np.broadcast_to(np.asarray(value, float), seg.shape).ravel()
        except ValueError:
            raise ArgumentError(f"ex.solve: the multiplier of {name!r} has shape {np.shape(value)}; the constraint "
                               f"has shape {seg.shape}.") from None
        (lam if seg.kind == "eq" else mu)[seg.start:seg.start + seg.size] = v
    if np.any(mu < 0):
        raise ArgumentError("ex.solve: inequality multipliers must be >= 0.")
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


def _chunked(entry: _runner.Compiled, point, key, data, checkpoint, every, progress, name, identity, about):
    """The loop in chunks of ``every`` steps: progress between chunks, checkpoints after each
    and on interruption; resumes from ``checkpoint`` (a folder) when it holds one. The history
    is saved apart from the loop's state, as long as the steps taken: a run resumed with a
    larger ``max_steps`` continues where it stopped."""
    carry = entry.start(point, key, data)
    max_steps = entry.max_steps
    ckpt = _runner.open_checkpoint(checkpoint, _CHECKPOINT_FORMAT, identity, about)
    restored = _runner.restore(ckpt, carry._replace(history={}), "ex.solve", "max_steps", max_steps,
                               lambda s: int(s.steps))
    if restored is not None:
        state, host, _ = restored
        steps = int(state.steps)
        history = {k: np.asarray(v).copy() for k, v in jax.device_get(carry.history).items()}
        for k in history:
            history[k][: steps + 1] = host[f"history_{k}"][: steps + 1]
        carry = state._replace(history={k: jnp.asarray(v) for k, v in history.items()})
        ckpt.resuming(steps)

    line = _progress.SolverLine(name)

    def after_chunk(c, before: int) -> bool:
        del before
        if progress:
            line.show(int(c.steps), float(c.state.kkt), float(c.state.value))
        return False

    def save(c) -> None:
        """The loop's state, and its history up to its step apart."""
        step = int(c.steps)
        history = {f"history_{k}": np.asarray(v)[: step + 1] for k, v in jax.device_get(c.history).items()}
        ckpt.save(step, c._replace(history={}), host=history)

    t0 = time.perf_counter()
    try:
        carry = _runner.drive(entry, carry, data, max_steps=max_steps, until=lambda d: min(d + every, max_steps),
                              after_chunk=after_chunk, ckpt=ckpt, save=save, save_at_end=False)
    finally:
        ckpt.close()
        if progress:
            line.close()
    carry = _driver.finish(carry, max_steps)
    return carry, time.perf_counter() - t0
