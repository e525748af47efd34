"""The bilevel pass: ``ex.argmin`` as a differentiable value, and its hypergradients.

``ex.argmin(inner, init, *args)`` solves the inner problem ``min_y inner(y, *args)``
(constraints stated in ``inner`` with ``ex.subject_to`` included) with a solver on the
driver, and returns ``y*(args)``. The pass decides how derivatives of ``y*`` with respect to
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

import dataclasses
from typing import NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from .._errors import ProgramError
from ..runtime import _jax_compat as compat

LINEAR_SOLVERS = ("auto", "cg", "gmres", "dense", "neumann")
METHODS = ("implicit", "unrolled")


@dataclasses.dataclass(frozen=True)
class ArgminSpec:
    """What ``explain`` shows of one ``ex.argmin``: its name, hypergradient method, inner
    solver, linear solver, the certificate of its derivatives and where it is written."""

    name: str
    method: str
    solver: str
    linear_solver: str
    certificate: str
    location: str | None
    n: int
    m_eq: int
    m_in: int

    def describe_method(self) -> str:
        if self.method == "implicit":
            return f"implicit ({self.linear_solver})"
        return self.linear_solver  # "unrolled, N steps (last K differentiated)"


class ArgminInfo(NamedTuple):
    """How an inner solve ended (``ex.argmin(..., full_output=True)``).

    - ``result``: a :class:`~estimax.solvers.RESULTS` code (int32; 0 is success);
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


class Inner:
    """One staged inner problem with its solver and hypergradient method, as a function of
    ``(x0, args, consts)``: the start, the flat outer arguments and the program's constants."""

    def __init__(self, problem, solver, *, method, linear_solver, max_steps, tol, linear_tol, steps, truncate):
        self.problem, self.solver = problem, solver
        self.method, self.linear_solver = method, linear_solver
        self.max_steps, self.tol, self.linear_tol = max_steps, tol, linear_tol
        self.steps, self.truncate = steps, truncate
        self.size = problem.n + problem.m_eq + problem.m_in
        self._implicit = jax.custom_jvp(self._solve)
        self._implicit.defjvp(self._jvp)

    # -- the inner solve ---------------------------------------------------------------------
    def _solve(self, x0, key, args, consts):
        from ..solvers import _driver

        bound = self.problem.bind(args, consts)
        lam0 = None if self.problem.m_eq else jnp.zeros((0,), x0.dtype)
        mu0 = jnp.zeros((self.problem.m_in,), x0.dtype)
        carry = _driver.start(self.solver, bound, x0, lam0, mu0, key, self.max_steps, self.tol)
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
        from ..solvers._driver import RESULTS

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
        raise ProgramError(f"{where}: method is one of {METHODS}; got {method!r}.")
    if linear_solver not in LINEAR_SOLVERS:
        raise ProgramError(f"{where}: linear_solver is one of {LINEAR_SOLVERS}; got {linear_solver!r}.")
    if constrained and linear_solver in ("cg", "neumann"):
        raise ProgramError(
            f"{where}: linear_solver={linear_solver!r} needs a symmetric positive definite system; the inner "
            "problem has constraints, whose KKT system is indefinite. Use 'gmres', 'dense' or 'auto'."
        )


def choose_linear_solver(linear_solver: str, size: int, constrained: bool) -> str:
    if linear_solver != "auto":
        return linear_solver
    if size <= 64:
        return "dense"
    return "gmres" if constrained else "cg"


__all__ = ["ArgminSpec", "ArgminInfo", "Inner", "check_method", "choose_linear_solver"]
