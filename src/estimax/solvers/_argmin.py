"""``ex.argmin``: an inner optimization problem as a value of the outer program.

::

    def inner(w, log_lam, X, y):                      # ridge regression
        return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.exp(log_lam) * jnp.sum(w ** 2)

    def outer(log_lam):
        w = ex.argmin(inner, jnp.zeros(d), log_lam, X_train, y_train)
        return jnp.mean((X_val @ w - y_val) ** 2)

    jax.grad(outer)(0.0)           # the hypergradient, by implicit differentiation

The inner program may state constraints (``ex.subject_to``); it must be deterministic.
``ex.argmin`` binds the ``argmin`` marker of the IR, so ``ex.explain`` of a program that
uses it lists each inner problem with its hypergradient method, inner solver and certificate.

This module holds the function ``ex.argmin``: it checks its arguments, builds the inner
problem, chooses the default solver and runs the inner solve on the solver driver
(``solvers/_driver``) under ``jax.jit``, staged once per inner problem and reused by later
calls of the same problem (:func:`_inner`), eager ones included. The marker primitive and
:class:`ArgminSpec` are the language's (``dsl/_argmin``).

``ex.argmin(inner, init, *args)`` solves the inner problem ``min_y inner(y, *args)``
(constraints stated in ``inner`` with ``ex.subject_to`` included) with a solver on the
driver, and returns ``y*(args)``. The ``method`` decides how derivatives of ``y*`` with respect to
``args`` (and to everything ``inner`` closes over) are computed:

- ``method="implicit"``: implicit differentiation of the optimality conditions
  ``F(z*, θ) = 0``, ``z = (y, λ, μ)``:

      unconstrained      F = ∇_y f
      constrained        F = (∇_y L, c, μ ⊙ g),   L = f + λᵀc + μᵀg

  so ``∂_z F ż = -∂_θ F θ̇``, solved matrix-free (JAX's conjugate gradients for the
  symmetric positive definite Hessian of an unconstrained problem, GMRES for KKT systems,
  a Neumann series, or a dense solve for small systems). It is a ``jax.custom_jvp`` rule:
  forward and reverse mode (JAX transposes the linear solve), every order (the rule is
  differentiable again), ``vmap``. The inner value ``f(y*, θ)`` gets its derivative from the
  envelope theorem, ``∂_θ L(y*, λ*, μ*, θ)``: no linear solve at all. Exact up to the inner
  solver's tolerance, when the inner solve converged (``throw=True`` refuses a run that did
  not) and ``∂_z F`` is nonsingular there (a strict local minimum; strict complementarity
  and independent active constraint gradients for a constrained inner problem).
- ``method="unrolled"``: plain automatic differentiation through ``steps`` iterations of a
  solver whose step has no loop inside (``GradientDescent``, ``Newton(line_search=False)``);
  with ``truncate=K`` only the last ``K`` steps are differentiated. It is the exact
  derivative of the truncated solve, which tends to the implicit one as the solve converges:
  ``consistent``.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import NamedTuple

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from .._errors import ArgumentError, ProgramError
from ..dsl._argmin import ARGMIN_SCOPE, ArgminSpec, argmin_p
from ..dsl._primitives import _caller_location, _current_scope
from ..runtime import _jax_compat as compat
from ..transforms._constraints import split
from ..transforms._estimate import as_program as _as_program
from . import _driver
from ._al import AugmentedLagrangian
from ._base import Solver
from ._exact_al import ExactAL
from ._problem import Problem
from ._solution import RESULTS
from ._unconstrained import Newton

LINEAR_SOLVERS = ("auto", "cg", "gmres", "dense", "neumann")
METHODS = ("implicit", "unrolled")


def argmin(inner, init, *args, method: str = "implicit", solver=None, linear_solver: str = "auto",
           tol: float | None = None, max_steps: int | None = None, linear_tol: float | None = None,
           steps: int | None = None, truncate: int | None = None, key=None, throw: bool = True,
           full_output: bool = False, name: str | None = None, bounds=None):
    """The solution ``y*`` of ``min_y inner(y, *args)``, differentiable with respect to ``args``
    (and to the values ``inner`` closes over).

    Args:
        inner: the inner objective ``inner(y, *args) -> scalar``: a function or an
            ``@ex.expectation`` program without random choices; ``ex.subject_to`` in it states
            constraints on ``y``.
        init: the starting point, a pytree of floating-point arrays (not differentiated).
        args: the outer arguments; derivatives of ``y*`` flow to them.
        method: ``"implicit"`` (implicit differentiation of the optimality conditions; exact up
            to the inner tolerance) or ``"unrolled"`` (differentiate through ``steps`` solver
            iterations; ``truncate=K`` differentiates only the last ``K``).
        solver: the inner solver. Default: ``ex.solvers.Newton()`` without constraints
            (``Newton(line_search=False)`` when unrolled), ``ExactAL()`` with equalities,
            ``AugmentedLagrangian()`` with inequalities.
        linear_solver: for ``"implicit"``: ``"cg"``, ``"gmres"``, ``"neumann"``, ``"dense"`` or
            ``"auto"`` (dense up to 64 unknowns, else CG without constraints, GMRES with them).
        tol: the inner KKT tolerance (default ``1e-10`` in float64, ``1e-5`` in float32);
            ``linear_tol``: the relative tolerance of the implicit linear solve (default: ``tol``
            scaled, ``1e-10`` / ``1e-6``).
        max_steps: the inner solver's iteration budget (default 100; ``steps`` when unrolled).
        throw: with ``"implicit"``, fail at run time (an error naming this argmin) when the
            inner solve did not converge: its derivatives would be wrong.
        full_output: return ``(y*, ArgminInfo)``: the result code, steps, KKT residual,
            inner value (differentiable) and multipliers.
        name: the name ``explain`` shows (default ``argmin_0``, ``argmin_1``, ...).
        bounds: ``(lower, upper)`` on the inner variables, shaped like ``init`` (``None`` or
            ``±inf`` for none; concrete values, not traced), as in ``ex.solve``: inequality constraints ``bounds/lower`` and
            ``bounds/upper``, differentiated through the KKT system like the others.
    """
    counts = _current_scope().counts
    index = counts.get("#argmin", 0)
    counts["#argmin"] = index + 1
    if name is None:
        name = f"argmin_{index}"
    where = f"ex.argmin({name!r})"
    if not isinstance(name, str) or not name:
        raise ArgumentError(f"ex.argmin(name=...) expects a non-empty string; got {name!r}.")
    if solver is not None and not isinstance(solver, Solver):
        raise ArgumentError(f"{where}: solver must be one of estimax.solvers (Newton(), LBFGS(), GradientDescent(), "
                            f"ExactAL(), AugmentedLagrangian()); got {type(solver).__name__}.")
    program = _as_program(inner, where)
    leaves = jax.tree_util.tree_leaves(init)
    if not leaves or not all(compat.is_float_dtype(jnp.result_type(x)) for x in leaves):
        raise ProgramError(f"{where}: init (the inner variables' starting point) must be a non-empty pytree of "
                           f"floating-point arrays; got {jax.tree_util.tree_map(lambda x: jnp.result_type(x), init)}.")
    for i, a in enumerate(jax.tree_util.tree_leaves(args)):
        if not hasattr(a, "dtype") and not isinstance(a, (int, float, bool, complex)):
            raise ProgramError(f"{where}: argument leaf {i} is a {type(a).__name__}; arguments are arrays.")
    try:
        parts = split(program, (init, *args))
    except ProgramError as e:
        raise ProgramError(f"{where}: {e}") from None
    if parts.stochastic:
        raise ProgramError(
            f"{where}: the inner objective {program.name!r} has random choices (ex.sample); an inner problem must be "
            "deterministic. Average the randomness out (a fixed sample passed as an argument), or state the bilevel "
            "problem for a stochastic bilevel solver."
        )
    used = compat.dce_jaxpr(parts.objective.jaxpr, [True], instantiate=True)[1]
    if not parts.constraints and not any(used[:parts.n_param_leaves]):
        raise ProgramError(f"{where}: the inner objective {program.name!r} does not depend on the inner variables "
                           "(its first argument): there is nothing to minimize.")
    try:
        problem = Problem(parts, init, bounds=bounds)
    except ProgramError as e:
        raise ProgramError(f"{where}: {str(e).replace('ex.solve: ', '')}") from None
    except jax.errors.TracerArrayConversionError:
        raise ArgumentError(f"{where}: bounds= must be concrete values (NumPy arrays or numbers): which entries are "
                           "bounded is part of the problem's structure. Got traced arrays.") from None
    constrained = bool(problem.m_eq or problem.m_in)
    check_method(method, linear_solver, constrained, where)
    if method == "unrolled" and constrained:
        raise ArgumentError(f"{where}: method='unrolled' supports unconstrained inner problems; this one has "
                           "constraints. Use method='implicit' (through the KKT system).")
    if solver is None:
        solver = (Newton(line_search=(method != "unrolled")) if not constrained
                  else ExactAL() if not problem.m_in else AugmentedLagrangian())
    try:
        solver.check(problem)
    except ProgramError as e:
        raise ProgramError(f"{where}: {e}") from None
    if method == "unrolled" and not solver.unrollable:
        raise ProgramError(
            f"{where}: method='unrolled' differentiates through the solver's steps, which {solver.name} cannot "
            "(its step loops inside, e.g. a line search). Use ex.solvers.GradientDescent(learning_rate=...) or "
            "ex.solvers.Newton(line_search=False), or method='implicit'."
        )
    f64 = problem.dtype == jnp.float64
    tol = (1e-10 if f64 else 1e-5) if tol is None else tol
    linear_tol = (1e-10 if f64 else 1e-6) if linear_tol is None else linear_tol
    if method == "unrolled":
        steps = 100 if steps is None else steps
        if not (isinstance(steps, int) and steps >= 1):
            raise ArgumentError(f"{where}: steps must be a positive integer; got {steps!r}.")
        if truncate is not None and not (isinstance(truncate, int) and 1 <= truncate <= steps):
            raise ArgumentError(f"{where}: truncate must be an integer in [1, steps={steps}]; got {truncate!r}.")
    max_steps = max_steps or 100
    size = problem.n + problem.m_eq + problem.m_in
    linear = choose_linear_solver(linear_solver, size, constrained) if method == "implicit" else (
        f"unrolled, {steps} steps" + (f" (last {truncate} differentiated)" if truncate else ""))
    key = jax.random.PRNGKey(0) if key is None else key
    inner_solve = _inner(parts, init, bounds, problem, solver, dict(
        method=method, linear_solver=linear, max_steps=max_steps, tol=float(tol), linear_tol=float(linear_tol),
        steps=steps, truncate=truncate))
    certificate = "exact (to the inner tolerance)" if method == "implicit" else "consistent"
    argmin_p.bind(spec=ArgminSpec(name, method, solver.name, linear, certificate, _caller_location(),
                                  problem.n, problem.m_eq, problem.m_in))
    x0 = jnp.asarray(jax.flatten_util.ravel_pytree(init)[0], problem.dtype)
    arg_leaves = [jnp.asarray(a) for a in jax.tree_util.tree_leaves(args)]
    consts = list(parts.objective.consts)
    # the scope marks the solve for the differentiability analysis: its stopping tests and
    # step selections are the inner solver's, covered by the argmin's own certificate
    with jax.named_scope(ARGMIN_SCOPE):
        x, lam, mu, result, nsteps, kkt, value = inner_solve.compiled(x0, key, arg_leaves, consts)
    if throw and method == "implicit":
        x = eqx.error_if(
            x, result != RESULTS.successful,
            f"{where}: the inner solve ({solver.name}) did not converge, so its implicit derivatives would be "
            f"wrong. Raise max_steps (now {max_steps}) or tol, give a better init, or pass throw=False and "
            "read the result with full_output=True.",
        )
    solution = problem.unravel(x)
    if not full_output:
        return solution
    info = ArgminInfo(result=result, steps=nsteps, kkt=kkt, value=value, multipliers=problem.multipliers(lam, mu))
    return solution, info


class ArgminInfo(NamedTuple):
    """How an inner solve ended (``ex.argmin(..., full_output=True)``).

    - ``result``: a :class:`~estimax.solvers.RESULTS` code (int32; ``RESULTS.successful``
      is success);
    - ``steps``: the inner solver's iterations; ``kkt``: its final KKT residual;
    - ``value``: the inner objective at the solution, differentiable with respect to the
      outer arguments (by the envelope theorem with ``method="implicit"``);
    - ``multipliers``: the inner constraints' multipliers by name (``{}`` without constraints).
    """

    result: jax.Array
    steps: jax.Array
    kkt: jax.Array
    value: jax.Array
    multipliers: dict


def _float0_zeros(x):
    return np.zeros(np.shape(x), dtype=jax.dtypes.float0)


def _is_float(x) -> bool:
    return compat.is_float_dtype(jnp.result_type(x))


#: the staged inner solves, most recently used last (see :func:`_inner`)
_SOLVES: collections.OrderedDict = collections.OrderedDict()
_SOLVES_SIZE = 32
_SOLVES_LOCK = threading.Lock()


def _inner(parts, init, bounds, problem, solver, options) -> "Inner":
    """The inner solve of this problem, staged once per problem: a later ``ex.argmin`` of the same
    problem reuses it, so an eager ``jax.grad`` through ``ex.argmin`` traces and compiles the
    solver once, as ``jax.jit`` would.

    The key is what the solve depends on, by content: each piece's jaxpr (its literal values
    included, so a changed Python number the inner objective closes over is another problem),
    the arguments' structure and avals, the bounds, the solver and the options. The values the
    inner objective closes over (arrays) and the arguments are inputs of the solve, not part of
    the key. The cached solve holds no trace's values (its problem is built without them), and
    the cache keeps the ``_SOLVES_SIZE`` most recently used.
    """
    try:
        key = (type(solver), solver, tuple(sorted(options.items())), parts.in_tree, parts.n_param_leaves,
               tuple(_piece_key(p) for p in (parts.objective, *parts.constraints)),
               jax.tree_util.tree_structure(init),
               tuple(compat.aval_of(x) for x in jax.tree_util.tree_leaves(init)),
               problem.lower.tobytes(), problem.upper.tobytes())
        hash(key)
    except TypeError:  # an unhashable solver (or aval): staged for this call only
        return Inner(problem, solver, **options)
    with _SOLVES_LOCK:
        hit = _SOLVES.get(key)
        if hit is not None:
            _SOLVES.move_to_end(key)
            return hit
    bare = dataclasses.replace(parts, objective=dataclasses.replace(parts.objective, consts=()),
                               constraints=tuple(dataclasses.replace(c, consts=()) for c in parts.constraints))
    zeros = jax.tree.map(lambda x: np.zeros(np.shape(x), jnp.result_type(x)), init)
    with jax.ensure_compile_time_eval():  # concrete even inside the caller's trace
        inner = Inner(Problem(bare, zeros, bounds=bounds), solver, **options)
    with _SOLVES_LOCK:
        inner = _SOLVES.setdefault(key, inner)
        while len(_SOLVES) > _SOLVES_SIZE:
            _SOLVES.popitem(last=False)
    return inner


def _piece_key(piece) -> tuple:
    return (piece.name, piece.kind, piece.shape, str(piece.dtype), piece.stochastic, piece.stated,
            compat.jaxpr_key(piece.jaxpr))


class Inner:
    """One staged inner problem with its solver and hypergradient method, as a function of
    ``(x0, args, consts)``: the start, the flat outer arguments and the program's constants.
    ``compiled`` is the same function under ``jax.jit``: traced once per argument signature."""

    def __init__(self, problem, solver, *, method, linear_solver, max_steps, tol, linear_tol, steps, truncate):
        self.problem, self.solver = problem, solver
        self.method, self.linear_solver = method, linear_solver
        self.max_steps, self.tol, self.linear_tol = max_steps, tol, linear_tol
        self.steps, self.truncate = steps, truncate
        self.size = problem.n + problem.m_eq + problem.m_in
        self._implicit = jax.custom_jvp(self._solve)
        self._implicit.defjvp(self._jvp)
        self.compiled = jax.jit(self.__call__)

    # -- the inner solve ---------------------------------------------------------------------
    def _solve(self, x0, key, args, consts):
        # inside the caller's trace: the device driver alone (no host loop to run)
        bound = self.problem.bind(args, consts)
        lam0 = None if self.problem.m_eq else jnp.zeros((0,), x0.dtype)
        mu0 = jnp.zeros((self.problem.m_in,), x0.dtype)
        carry = _driver.start(self.solver, bound, (x0, lam0, mu0), key, self.tol, self.max_steps + 1,
                              jnp.result_type(x0))
        carry = _driver.finish(_driver.advance(self.solver, bound, carry, self.max_steps, self.tol), self.max_steps)
        s = carry.state
        return s.x, s.lam, s.mu, carry.result, carry.steps, s.kkt, s.value

    def __call__(self, x0, key, args, consts):
        """Everything the solve reads is an input here (nothing closed over): the pass may
        re-trace the derivative rule after the program was staged."""
        if self.method == "unrolled":
            return self._unrolled(x0, key, args, consts)
        x0 = jax.lax.stop_gradient(x0)
        return self._implicit(x0, key, args, consts)

    # -- implicit differentiation ------------------------------------------------------------
    def _lagrangian_value(self, x, lam, mu, args, consts):
        """``L = f + λᵀc + μᵀg`` at ``x`` (``f`` without constraints)."""
        p = self.problem
        bound = p.bind(args, consts)
        out = bound.f(x)
        if p.m_eq:
            out = out + jnp.vdot(lam, bound.eq(x))
        if p.m_in:
            out = out + jnp.vdot(mu, bound.ineq(x))
        return out

    def _optimality(self, z, args, consts):
        """``F(z, θ)``: zero at a KKT point of the inner problem."""
        p = self.problem
        n, m_eq = p.n, p.m_eq
        x, lam, mu = z[:n], z[n:n + m_eq], z[n + m_eq:]
        stationarity = jax.grad(self._lagrangian_value)(x, lam, mu, args, consts)
        if not (p.m_eq or p.m_in):
            return stationarity
        bound = p.bind(args, consts)
        parts = [stationarity]
        if p.m_eq:
            parts.append(bound.eq(x))
        if p.m_in:
            parts.append(mu * bound.ineq(x))
        return jnp.concatenate(parts)

    def _linear_solve(self, op, b):
        """``A⁻¹ b`` for the linear operator ``op``, as a ``lax.custom_linear_solve`` (so that
        JAX can transpose it, for reverse mode, and differentiate it, for higher orders)."""
        size, kind, tol = self.size, self.linear_solver, self.linear_tol
        symmetric = not (self.problem.m_eq or self.problem.m_in)
        if kind == "dense":
            mat = jax.vmap(op, out_axes=1)(jnp.eye(size, dtype=b.dtype))
            return jnp.linalg.solve(mat, b)
        if kind == "neumann":
            return _neumann(op, b, tol, size)

        def solve(matvec, rhs):
            x0 = jnp.zeros_like(rhs)
            if kind == "cg":
                return jax.scipy.sparse.linalg.cg(matvec, rhs, x0=x0, tol=tol, maxiter=10 * size)[0]
            restart = min(size, 50)
            return jax.scipy.sparse.linalg.gmres(matvec, rhs, x0=x0, tol=tol, restart=restart,
                                                 maxiter=max(1, (10 * size) // restart), solve_method="batched")[0]

        return jax.lax.custom_linear_solve(op, b, solve=solve, transpose_solve=None if symmetric else solve,
                                           symmetric=symmetric)

    def _jvp(self, primals, tangents):
        x0, key, args, consts = primals
        _, _, dargs, dconsts = tangents
        out = self._implicit(x0, key, args, consts)
        x, lam, mu, result, steps, kkt, value = out
        z = jnp.concatenate([x, lam, mu])
        dargs, dconsts = _instantiate(args, dargs), _instantiate(consts, dconsts)
        # ∂_θ F θ̇ and, by the envelope theorem, the value's derivative ∂_θ L θ̇
        rhs = jax.jvp(lambda a, c: self._optimality(z, a, c), (list(args), list(consts)), (dargs, dconsts))[1]
        dvalue = jax.jvp(lambda a, c: self._lagrangian_value(x, lam, mu, a, c), (list(args), list(consts)),
                         (dargs, dconsts))[1]
        fz = lambda zz: self._optimality(zz, args, consts)  # noqa: E731
        op = lambda v: jax.jvp(fz, (z,), (v,))[1]  # noqa: E731  (closes over primal values only)
        dz = self._linear_solve(op, -rhs)
        n, m_eq = self.problem.n, self.problem.m_eq
        dx, dlam, dmu = dz[:n], dz[n:n + m_eq], dz[n + m_eq:]
        tangents_out = (dx, dlam, dmu, _float0_zeros(result), _float0_zeros(steps), jnp.zeros_like(kkt), dvalue)
        return out, tangents_out

    # -- unrolled differentiation ------------------------------------------------------------
    def _unrolled(self, x0, key, args, consts):
        p, solver = self.problem, self.solver
        bound = p.bind(args, consts)
        frozen = p.bind([jax.lax.stop_gradient(a) if _is_float(a) else a for a in args],
                        [jax.lax.stop_gradient(c) if _is_float(c) else c for c in consts])
        key, sub = jax.random.split(key)
        state = solver.init(bound, x0, jnp.zeros((0,), x0.dtype), jnp.zeros((0,), x0.dtype), sub)

        def run(b, state, keys):
            def body(s, k):
                done, _ = solver.terminate(b, s, self.tol)
                new = solver.step(b, s, k)
                return jax.tree.map(lambda old, nw: jnp.where(done, old, nw), s, new), None

            return jax.lax.scan(body, state, keys)[0]

        keys = jax.random.split(key, self.steps)
        cut = self.steps - (self.truncate if self.truncate is not None else self.steps)
        if cut:
            state = jax.lax.stop_gradient(run(frozen, state, keys[:cut]))
        state = run(bound, state, keys[cut:])
        done, result = solver.terminate(bound, state, self.tol)
        result = jnp.where(state.kkt <= self.tol, RESULTS.successful,
                           jnp.where(done, result, RESULTS.max_steps_reached)).astype(jnp.int32)
        return (state.x, state.lam, state.mu, result, jnp.int32(self.steps), state.kkt, state.value)


def _instantiate(primals, tangents):
    """Symbolic-zero tangents as arrays (float0 for integer inputs)."""
    out = []
    for p, t in zip(primals, tangents):
        if type(t).__name__ == "SymbolicZero" or t is None:
            t = jnp.zeros_like(p) if _is_float(p) else _float0_zeros(p)
        out.append(t)
    return out


def _neumann(op, b, tol, size):
    """``A⁻¹ b`` by the Neumann series ``α Σ_k (I - αA)^k b``, ``α = 1/λ_max(A)`` (a power
    iteration's estimate, with a 5% margin); symmetric positive definite ``A`` only. Stops when
    the terms fall below ``tol·‖b‖`` or after ``100·size`` terms."""

    def solve(matvec, rhs):
        v = jnp.ones_like(rhs) / jnp.sqrt(rhs.size)

        def power(_, v):
            w = matvec(v)
            return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(rhs.dtype).tiny)

        v = jax.lax.fori_loop(0, 30, power, v)
        alpha = 1.0 / (1.05 * jnp.maximum(jnp.vdot(v, matvec(v)), jnp.finfo(rhs.dtype).tiny))
        bound = tol * jnp.linalg.norm(rhs)

        def cond(c):
            _, term, i = c
            return (jnp.linalg.norm(term) > bound) & (i < 100 * size)

        def body(c):
            acc, term, i = c
            term = term - alpha * matvec(term)
            return acc + term, term, i + 1

        acc, _, _ = jax.lax.while_loop(cond, body, (rhs, rhs, jnp.int32(0)))
        return alpha * acc

    return jax.lax.custom_linear_solve(op, b, solve=solve, symmetric=True)


def check_method(method, linear_solver, constrained: bool, where: str):
    if method not in METHODS:
        raise ArgumentError(f"{where}: method is one of {METHODS}; got {method!r}.")
    if linear_solver not in LINEAR_SOLVERS:
        raise ArgumentError(f"{where}: linear_solver is one of {LINEAR_SOLVERS}; got {linear_solver!r}.")
    if constrained and linear_solver in ("cg", "neumann"):
        raise ArgumentError(
            f"{where}: linear_solver={linear_solver!r} needs a symmetric positive definite system; the inner "
            "problem has constraints, whose KKT system is indefinite. Use 'gmres', 'dense' or 'auto'."
        )


def choose_linear_solver(linear_solver: str, size: int, constrained: bool) -> str:
    if linear_solver != "auto":
        return linear_solver
    if size <= 64:
        return "dense"
    return "gmres" if constrained else "cg"


__all__ = ["ArgminInfo", "Inner", "argmin", "check_method", "choose_linear_solver"]
