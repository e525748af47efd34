"""Solvers for unconstrained problems, on the driver: the inner solvers of ``ex.argmin``.

- :class:`Newton`: Newton's method with an Armijo backtracking line search. The Newton
  system is solved densely (the Hessian formed from ``n`` Hessian-vector products, Cholesky
  with a diagonal shift where it is not positive definite) or matrix-free by conjugate
  gradients with the forcing term ``min(0.5, ‖g‖^½)`` (inexact Newton: superlinear near a
  solution). A direction that is not a descent direction is replaced by ``-g``.
- :class:`LBFGS`: ``optax.lbfgs`` with its zoom line search.
- :class:`GradientDescent`: ``x <- x - lr ∇f`` (optionally with momentum), the solver to
  differentiate through when a hypergradient is taken by unrolling.

All three stop at ``‖∇f‖∞ <= tol``. Their states expose what the driver reads (``x``,
``lam`` and ``mu`` empty, ``value``, ``kkt = ‖∇f‖∞``, ``infeasibility = 0``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .._errors import ArgumentError, ProgramError
from ._base import Solver
from ._solution import RESULTS


class UnconstrainedState(NamedTuple):
    x: jax.Array
    lam: jax.Array  # empty
    mu: jax.Array  # empty
    value: jax.Array
    kkt: jax.Array  # ‖∇f‖∞
    infeasibility: jax.Array  # 0
    grad: jax.Array
    step_norm: jax.Array
    ls_failed: jax.Array  # bool
    extra: Any  # the solver's own state (L-BFGS memory, momentum); () when none


def _check_unconstrained(solver, problem) -> None:
    if problem.m_eq or problem.m_in:
        names = [s.name for s in (*problem.eq_segments, *problem.ineq_segments)]
        raise ProgramError(
            f"{type(solver).__name__} solves unconstrained problems; this one has constraints {names}. "
            "Use ex.solvers.ExactAL() (equalities) or ex.solvers.AugmentedLagrangian()."
        )
    if problem.stochastic:
        raise ProgramError(f"{type(solver).__name__} needs exact derivatives; this objective is an expectation.")


def _state(x, value, grad, step_norm, ls_failed, extra) -> UnconstrainedState:
    empty = jnp.zeros((0,), x.dtype)
    return UnconstrainedState(x=x, lam=empty, mu=empty, value=value, kkt=jnp.max(jnp.abs(grad), initial=0.0),
                              infeasibility=jnp.zeros((), x.dtype), grad=grad, step_norm=step_norm,
                              ls_failed=ls_failed, extra=extra)


def _terminate(s: UnconstrainedState, tol):
    converged = s.kkt <= tol
    failed = (~converged) & s.ls_failed
    stalled = (~converged) & (~failed) & (s.step_norm <= 1e-14 * (1.0 + jnp.linalg.norm(s.x)))
    result = jnp.where(converged, RESULTS.successful,
                       jnp.where(failed, RESULTS.line_search_failed,
                                 jnp.where(stalled, RESULTS.stagnated, RESULTS.successful)))
    return converged | failed | stalled, result.astype(jnp.int32)


def _big(dtype):
    return jnp.asarray(jnp.finfo(dtype).max, dtype)


@dataclasses.dataclass(frozen=True)
class Newton(Solver):
    """Newton's method with a backtracking (Armijo) line search.

    - ``linear_solver``: ``"dense"`` (the Hessian formed, Cholesky), ``"cg"`` (matrix-free
      conjugate gradients on Hessian-vector products), or ``"auto"``: dense up to
      ``dense_max`` variables;
    - ``line_search``: ``False`` takes full Newton steps with a dense solve and no loop inside
      the step, so that the step can be differentiated (``ex.argmin(method="unrolled")``);
    - ``max_cg``: conjugate-gradient iterations per step (default ``n``);
    - ``max_backtracks``: halvings of the step.
    """

    linear_solver: str = "auto"
    line_search: bool = True
    dense_max: int = 64
    max_cg: int | None = None
    max_backtracks: int = 40
    armijo: float = 1e-4

    name = "Newton"

    def __post_init__(self):
        if self.linear_solver not in ("auto", "dense", "cg"):
            raise ArgumentError(f"Newton(linear_solver=...) is 'auto', 'dense' or 'cg'; got {self.linear_solver!r}.")
        if not self.line_search and self.linear_solver == "cg":
            raise ArgumentError("Newton(line_search=False) takes dense steps; it cannot be combined with linear_solver='cg'.")

    @property
    def unrollable(self) -> bool:
        return not self.line_search

    def check(self, problem) -> None:
        _check_unconstrained(self, problem)

    def _dense(self, n) -> bool:
        return (not self.line_search) or self.linear_solver == "dense" or (self.linear_solver == "auto" and n <= self.dense_max)

    def init(self, p, x0, lam0, mu0, key) -> UnconstrainedState:
        del lam0, mu0, key
        value, grad = jax.value_and_grad(p.f)(x0)
        return _state(x0, value, grad, _big(x0.dtype), jnp.bool_(False), ())

    def step(self, p, s: UnconstrainedState, key) -> UnconstrainedState:
        del key
        x, g = s.x, s.grad
        n, dtype = x.shape[0], x.dtype
        _, hvp = jax.linearize(jax.grad(p.f), x)
        if not self.line_search:  # a plain Newton step: differentiable, no loops
            h = jax.vmap(hvp, out_axes=1)(jnp.eye(n, dtype=dtype))
            d = -jnp.linalg.solve(h, g)
            x_new = x + d
            value, grad = jax.value_and_grad(p.f)(x_new)
            return _state(x_new, value, grad, jnp.linalg.norm(d), jnp.bool_(False), ())
        g_norm = jnp.linalg.norm(g)
        if self._dense(n):
            h = jax.vmap(hvp, out_axes=1)(jnp.eye(n, dtype=dtype))
            h = 0.5 * (h + h.T)
            scale = jnp.max(jnp.abs(jnp.diag(h)), initial=0.0) + jnp.finfo(dtype).tiny

            def chol_cond(c):
                return ~jnp.all(jnp.isfinite(c[1])) & (c[2] < 60)

            def chol_body(c):  # a shift that makes the Hessian positive definite
                tau, _, i = c
                tau = jnp.where(i == 0, 1e-8 * scale, 10.0 * tau)
                return tau, jnp.linalg.cholesky(h + tau * jnp.eye(n, dtype=dtype)), i + 1

            chol0 = jnp.linalg.cholesky(h)
            _, chol, _ = jax.lax.while_loop(chol_cond, chol_body, (jnp.zeros((), dtype), chol0, jnp.int32(0)))
            d = -jax.scipy.linalg.cho_solve((chol, True), g)
        else:
            forcing = jnp.minimum(0.5, jnp.sqrt(g_norm))
            d, _ = jax.scipy.sparse.linalg.cg(hvp, -g, tol=forcing, maxiter=self.max_cg or n)
        slope = jnp.vdot(g, d)
        bad = ~jnp.all(jnp.isfinite(d)) | (slope >= -1e-12 * g_norm * jnp.linalg.norm(d))
        d = jnp.where(bad, -g, d)
        slope = jnp.where(bad, -g_norm**2, slope)

        def trial(alpha):
            return jax.value_and_grad(p.f)(x + alpha * d)

        # Armijo, with a rounding allowance: near a solution the decrease a step promises is
        # below the resolution of f, and the full Newton step is then the right one
        slack = 4.0 * jnp.finfo(dtype).eps * (1.0 + jnp.abs(s.value))

        def accept(alpha, v):
            return v <= s.value + self.armijo * alpha * slope + slack

        def ls_cond(c):
            alpha, (v, _), i = c
            return ~accept(alpha, v) & (i < self.max_backtracks)

        def ls_body(c):
            alpha, _, i = c
            alpha = 0.5 * alpha
            return alpha, trial(alpha), i + 1

        one = jnp.ones((), dtype)
        alpha, (value, grad), _ = jax.lax.while_loop(ls_cond, ls_body, (one, trial(one), jnp.int32(0)))
        ok = accept(alpha, value) & jnp.isfinite(value)
        x_new = jnp.where(ok, x + alpha * d, x)
        value, grad = jnp.where(ok, value, s.value), jnp.where(ok, grad, g)
        return _state(x_new, value, grad, jnp.where(ok, alpha * jnp.linalg.norm(d), 0.0), ~ok, ())

    def terminate(self, p, s, tol):
        del p
        return _terminate(s, tol)


@dataclasses.dataclass(frozen=True)
class LBFGS(Solver):
    """L-BFGS (``optax.lbfgs``, zoom line search) with ``memory_size`` pairs."""

    memory_size: int = 10

    name = "L-BFGS"
    unrollable = False

    def check(self, problem) -> None:
        _check_unconstrained(self, problem)

    def init(self, p, x0, lam0, mu0, key) -> UnconstrainedState:
        del lam0, mu0, key
        value, grad = jax.value_and_grad(p.f)(x0)
        opt = optax.lbfgs(memory_size=self.memory_size)
        return _state(x0, value, grad, _big(x0.dtype), jnp.bool_(False), opt.init(x0))

    def step(self, p, s: UnconstrainedState, key) -> UnconstrainedState:
        del key
        opt = optax.lbfgs(memory_size=self.memory_size)
        updates, extra = opt.update(s.grad, s.extra, s.x, value=s.value, grad=s.grad, value_fn=p.f)
        x_new = optax.apply_updates(s.x, updates)
        value, grad = jax.value_and_grad(p.f)(x_new)
        ok = jnp.isfinite(value) & (value <= s.value + 1e-6 * jnp.abs(s.value) + jnp.finfo(s.x.dtype).tiny)
        x_new = jnp.where(ok, x_new, s.x)
        return _state(x_new, jnp.where(ok, value, s.value), jnp.where(ok, grad, s.grad),
                      jnp.where(ok, jnp.linalg.norm(updates), 0.0), ~ok, extra)

    def terminate(self, p, s, tol):
        del p
        return _terminate(s, tol)


@dataclasses.dataclass(frozen=True)
class GradientDescent(Solver):
    """``x <- x - learning_rate * ∇f`` (heavy-ball ``momentum`` if given), by ``optax.sgd``.

    No line search and no loop inside a step: the solver to differentiate through
    (``ex.argmin(method="unrolled")``).
    """

    learning_rate: float = 0.1
    momentum: float | None = None

    name = "gradient descent"
    unrollable = True

    def __post_init__(self):
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ArgumentError(f"GradientDescent(learning_rate=...) must be a positive number; got {self.learning_rate!r}.")

    def _opt(self):
        return optax.sgd(self.learning_rate, momentum=self.momentum)

    def check(self, problem) -> None:
        _check_unconstrained(self, problem)

    def init(self, p, x0, lam0, mu0, key) -> UnconstrainedState:
        del lam0, mu0, key
        value, grad = jax.value_and_grad(p.f)(x0)
        return _state(x0, value, grad, _big(x0.dtype), jnp.bool_(False), self._opt().init(x0))

    def step(self, p, s: UnconstrainedState, key) -> UnconstrainedState:
        del key
        updates, extra = self._opt().update(s.grad, s.extra, s.x)
        x_new = optax.apply_updates(s.x, updates)
        value, grad = jax.value_and_grad(p.f)(x_new)
        return _state(x_new, value, grad, jnp.linalg.norm(updates), jnp.bool_(False), extra)

    def terminate(self, p, s, tol):
        del p
        return _terminate(s, tol)
