"""Bilevel problems whose lower level has constraints coupling both levels: LV-HBA.

``ex.solve_bilevel(upper, lower, x0, y0, *data)`` solves the optimistic bilevel problem

    min_{x, y}  F(x, y)   s.t.  y ∈ S(x) = argmin_y { f(x, y) : g(x, y) <= 0, h(x, y) = 0 }
                                (x, y) ∈ C = { g(x, y) <= 0, h(x, y) = 0 }

with ``F = upper(x, y, *data)`` and ``f = lower(y, x, *data)``, whose ``ex.subject_to`` calls
state ``g`` and ``h``. The lower level's solution set need not be a single point (the upper
level then picks the best one) and its constraints may involve ``x``.

:class:`LVHBA` follows the seed paper "Constrained Bi-Level Optimization: Proximal Lagrangian
Value function Approach and Hessian-free Algorithm". The proximal Lagrangian value function

    v_γ(x, y, z) = min_θ max_λ  f(x, θ) + λᵀg(x, θ) + ‖θ − y‖²/(2γ₁) − ‖λ − z‖²/(2γ₂)

(``λ >= 0`` for inequalities, free for equalities) is smooth, and ``f − v_γ <= 0`` holds
exactly on the lower level's solutions, so the problem becomes ``min F/c + f − v_γ`` over
``C`` with a penalty ``c_k = c₀ (k + 1)^p`` that grows. One iteration:

1. one step of the saddle-point problem defining ``v_γ`` at ``(x, y, z)``, from the last
   ``(θ, λ)``;
2. a projected gradient step on ``F/c_k + f − v_γ`` in ``(x, y)`` (``∇v_γ`` by Danskin's
   theorem from ``(θ, λ)``: first derivatives only, no Hessian anywhere) and in ``z``.

**What differs from the paper's toy script**, and why:

- *Extragradient* saddle-point steps (``inner="extragradient"``, the default) instead of the
  simultaneous gradient descent-ascent of the script: with the coupling ``λᵀg`` bilinear,
  simultaneous steps rotate around the saddle point and, at the script's step sizes, the
  iterates oscillate and blow up (measured on the toy: error 62 after 1500 iterations).
  ``"alternating"`` (θ first, then λ at the new θ) and ``"simultaneous"`` remain available.
- *Step sizes from Lipschitz estimates*, computed once at the start from gradient differences
  (power iterations; still no Hessian): ``η = s / (max(L_θ, 1/γ₂) + ‖J_θ g‖)`` for the
  saddle-point steps, ``α = min(s / (L_F/c₀ + L_f + 1/γ₁), η)`` for ``(x, y)`` and ``β = η``
  for ``z`` (``s = safety``, 0.5). ``(x, y)`` may not move faster than ``(θ, λ)`` can
  follow: the script's larger ``(x, y)`` steps diverge.
- *A larger initial penalty* (``c₀ = 5`` instead of 0.025, ``p = 0.49 < 1/2`` as the
  analysis requires): the penalized problem's solution is off by ``O(1/c)`` (0.31/c on the
  toy, measured at fixed ``c``), so a solution to 1e-3 needs ``c`` in the hundreds; from
  0.025 that takes hundreds of thousands of iterations. On the toy (n = 100) the defaults
  reach relative errors of 4e-4 in ``x`` and 6e-4 in ``y`` in 10000 iterations (under 2 s
  on a CPU core).

The projection onto ``C`` is exact for affine constraints (one least-squares correction);
nonlinear ones are linearized and the correction repeated (``projection_steps``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp

from .._errors import ArgumentError, ProgramError
from ..transforms._constraints import split
from ..transforms._estimate import as_program as _as_program
from ._driver import trim_history
from ._runner import Compiled
from ._runner import solution as assemble
from ._base import Solver
from ._problem import Problem
from ._solution import RESULTS, SolverError


class LVHBAState(NamedTuple):
    x: jax.Array  # (x, y) flattened together
    lam: jax.Array  # the lower level's multipliers λ (equalities, then inequalities)
    mu: jax.Array  # empty
    value: jax.Array  # F(x, y)
    kkt: jax.Array  # max(‖projected gradient mapping‖∞, lower-level gap)
    infeasibility: jax.Array  # the constraints' violation at (x, y)
    theta: jax.Array  # the proximal lower-level variable
    z: jax.Array  # the proximal multiplier center
    gap: jax.Array  # f(x, y) − v_γ(x, y, z), estimated from (θ, λ)
    k: jax.Array  # int32: iterations taken (for the penalty c_k)
    alpha: jax.Array
    eta: jax.Array
    beta: jax.Array


@dataclasses.dataclass(frozen=True)
class LVHBA(Solver):
    """The single-loop, Hessian-free LV-HBA method for bilevel problems with coupled
    lower-level constraints (see the module doc for the method and what differs from the
    paper's script).

    - ``gamma1``, ``gamma2``: the proximal parameters of ``v_γ`` (10, 10);
    - ``c0``, ``p``: the penalty ``c_k = c0 (k + 1)^p`` (5, 0.49);
    - ``alpha``, ``eta``, ``beta``: the step sizes of ``(x, y)``, ``(θ, λ)`` and ``z``
      (default: from Lipschitz estimates, scaled by ``safety``);
    - ``inner``: ``"extragradient"``, ``"alternating"`` or ``"simultaneous"``;
    - ``multiplier_bound``: ``|λ|, |z| <= multiplier_bound`` (the paper's ``u``, 1e3);
    - ``projection_steps``: linearize-and-correct rounds of the projection onto ``C``.
    """

    gamma1: float = 10.0
    gamma2: float = 10.0
    c0: float = 5.0
    p: float = 0.49
    alpha: float | None = None
    eta: float | None = None
    beta: float | None = None
    inner: str = "extragradient"
    safety: float = 0.5
    multiplier_bound: float = 1e3
    projection_steps: int = 10
    max_steps: int = 5000

    name = "LV-HBA (proximal Lagrangian value function, Hessian-free)"
    certificate = ("consistent", "a penalty method: the solution of the penalized problem approaches the "
                   "bilevel solution as the penalty grows")

    def __post_init__(self):
        if self.inner not in ("extragradient", "alternating", "simultaneous"):
            raise ArgumentError(f"LVHBA(inner=...) is 'extragradient', 'alternating' or 'simultaneous'; got {self.inner!r}.")
        for field in ("gamma1", "gamma2", "c0", "safety", "multiplier_bound"):
            if not getattr(self, field) > 0:
                raise ArgumentError(f"LVHBA({field}=...) must be positive; got {getattr(self, field)!r}.")
        if not 0 <= self.p < 0.5:
            raise ArgumentError(f"LVHBA(p=...) must be in [0, 1/2) (the analysis needs p < 1/2); got {self.p!r}.")

    def check(self, problem) -> None:
        del problem

    # -- pieces ------------------------------------------------------------------------------
    def _project_multipliers(self, p, lam):
        u = self.multiplier_bound
        if p.m_in == 0:
            return jnp.clip(lam, -u, u)
        return jnp.concatenate([jnp.clip(lam[:p.m_eq], -u, u), jnp.clip(lam[p.m_eq:], 0.0, u)])

    def _saddle_field(self, p, xs, ys, z, theta, lam):
        """``(∇_θ, -∇_λ)`` of the proximal Lagrangian at ``(θ, λ)``."""
        def lag(t):
            return p.f(xs, t) + jnp.vdot(lam, p.g(xs, t))
        g_theta = jax.grad(lag)(theta) + (theta - ys) / self.gamma1
        g_lam = -(p.g(xs, theta) - (lam - z) / self.gamma2)
        return g_theta, g_lam

    def _saddle_step(self, p, xs, ys, z, theta, lam, eta):
        if self.inner == "simultaneous":
            gt, gl = self._saddle_field(p, xs, ys, z, theta, lam)
            return theta - eta * gt, self._project_multipliers(p, lam - eta * gl)
        if self.inner == "alternating":
            gt, _ = self._saddle_field(p, xs, ys, z, theta, lam)
            theta = theta - eta * gt
            _, gl = self._saddle_field(p, xs, ys, z, theta, lam)
            return theta, self._project_multipliers(p, lam - eta * gl)
        gt, gl = self._saddle_field(p, xs, ys, z, theta, lam)
        th_half, lam_half = theta - eta * gt, self._project_multipliers(p, lam - eta * gl)
        gt, gl = self._saddle_field(p, xs, ys, z, th_half, lam_half)
        return theta - eta * gt, self._project_multipliers(p, lam - eta * gl)

    def _lipschitz(self, grad_fn, w, key, iters=20):
        """The largest curvature of the function whose gradient is ``grad_fn``, near ``w``, by a
        power iteration on gradient differences (no Hessian)."""
        g0 = grad_fn(w)
        eps = 1e-4 * (1.0 + jnp.linalg.norm(w))

        def body(_, v):
            hv = (grad_fn(w + eps * v) - g0) / eps
            return hv / jnp.maximum(jnp.linalg.norm(hv), jnp.finfo(w.dtype).tiny)

        v0 = jax.random.normal(key, w.shape, w.dtype)
        v = jax.lax.fori_loop(0, iters, body, v0 / jnp.linalg.norm(v0))
        return jnp.linalg.norm((grad_fn(w + eps * v) - g0) / eps)

    def _jacobian_norm(self, fn, w, key, iters=20):
        """``‖J‖₂`` of ``fn`` at ``w`` by a power iteration on ``JᵀJ`` (first derivatives)."""
        _, jvp = jax.linearize(fn, w)
        _, vjp = jax.vjp(fn, w)

        def body(_, v):
            u = vjp(jvp(v))[0]
            return u / jnp.maximum(jnp.linalg.norm(u), jnp.finfo(w.dtype).tiny)

        v0 = jax.random.normal(key, w.shape, w.dtype)
        v = jax.lax.fori_loop(0, iters, body, v0 / jnp.linalg.norm(v0))
        return jnp.linalg.norm(jvp(v))

    # -- the solver protocol -----------------------------------------------------------------
    def init(self, p, w0, lam0, mu0, key) -> LVHBAState:
        del mu0
        dtype = w0.dtype
        w0 = p.project(w0)
        xs, ys = w0[:p.n_x], w0[p.n_x:]
        theta = ys
        lam = jnp.zeros((p.m,), dtype) if lam0 is None else self._project_multipliers(p, jnp.asarray(lam0, dtype))
        z = lam
        k1, k2, k3 = jax.random.split(key, 3)
        if p.m:
            l_g = self._jacobian_norm(lambda t: p.g(xs, t), theta, k1)
        else:
            l_g = jnp.zeros((), dtype)
        l_theta = self._lipschitz(lambda t: jax.grad(lambda s: p.f(xs, s) + jnp.vdot(lam, p.g(xs, s)))(t), theta, k2)
        eta = self.safety / (jnp.maximum(l_theta + 1.0 / self.gamma1, 1.0 / self.gamma2) + l_g)
        l_out = self._lipschitz(jax.grad(lambda w: p.F(w[:p.n_x], w[p.n_x:]) / self.c0 + p.f(w[:p.n_x], w[p.n_x:])),
                                w0, k3)
        alpha = jnp.minimum(self.safety / (l_out + 1.0 / self.gamma1), eta)
        eta = eta if self.eta is None else jnp.asarray(self.eta, dtype)
        alpha = alpha if self.alpha is None else jnp.asarray(self.alpha, dtype)
        beta = eta if self.beta is None else jnp.asarray(self.beta, dtype)
        return LVHBAState(
            x=w0, lam=lam, mu=jnp.zeros((0,), dtype), value=p.F(xs, ys), kkt=jnp.asarray(jnp.finfo(dtype).max, dtype),
            infeasibility=p.violation(w0), theta=theta, z=z, gap=jnp.zeros((), dtype), k=jnp.int32(0),
            alpha=jnp.asarray(alpha, dtype), eta=jnp.asarray(eta, dtype), beta=jnp.asarray(beta, dtype),
        )

    def step(self, p, s: LVHBAState, key) -> LVHBAState:
        del key
        xs, ys = s.x[:p.n_x], s.x[p.n_x:]
        c = self.c0 * (s.k + 1.0) ** self.p
        theta, lam = self._saddle_step(p, xs, ys, s.z, s.theta, s.lam, s.eta)
        # ∇(F/c + f − v_γ) in (x, y, z); ∇v_γ by Danskin's theorem at (θ, λ)
        gF_x, gF_y = jax.grad(p.F, argnums=(0, 1))(xs, ys)
        gf_x, gf_y = jax.grad(p.f, argnums=(0, 1))(xs, ys)
        gv_x = jax.grad(lambda a: p.f(a, theta) + jnp.vdot(lam, p.g(a, theta)))(xs)
        d_x = gF_x / c + gf_x - gv_x
        d_y = gF_y / c + gf_y - (ys - theta) / self.gamma1
        w_new = p.project(s.x - s.alpha * jnp.concatenate([d_x, d_y]))
        z = self._project_multipliers(p, s.z - s.beta * (s.z - lam) / self.gamma2)
        xs_n, ys_n = w_new[:p.n_x], w_new[p.n_x:]
        v = (p.f(xs_n, theta) + jnp.vdot(lam, p.g(xs_n, theta)) + jnp.vdot(theta - ys_n, theta - ys_n) / (2 * self.gamma1)
             - jnp.vdot(lam - z, lam - z) / (2 * self.gamma2))
        gap = p.f(xs_n, ys_n) - v
        mapping = jnp.max(jnp.abs(w_new - s.x)) / s.alpha
        return s._replace(x=w_new, lam=lam, value=p.F(xs_n, ys_n), kkt=jnp.maximum(mapping, jnp.maximum(gap, 0.0)),
                          infeasibility=p.violation(w_new), theta=theta, z=z, gap=gap, k=s.k + 1)

    def terminate(self, p, s: LVHBAState, tol):
        del p
        return s.kkt <= tol, jnp.int32(RESULTS.successful)

    def stats(self, s: LVHBAState) -> dict:
        return {"alpha": float(s.alpha), "eta": float(s.eta), "beta": float(s.beta), "gap": float(s.gap),
                "penalty": float(self.c0 * (int(s.k) + 1.0) ** self.p)}


class BilevelProblem:
    """``upper`` and ``lower`` flattened: ``F(x, y)``, ``f(x, y)``, ``g(x, y)`` (the lower level's
    equalities, then its inequalities) on flat vectors, the projection onto ``C``."""

    def __init__(self, upper, lower, x0, y0, data, projection_steps: int):

        self.x0, self.unravel_x = jax.flatten_util.ravel_pytree(x0)
        self.y0, self.unravel_y = jax.flatten_util.ravel_pytree(y0)
        self.n_x, self.n_y = int(self.x0.size), int(self.y0.size)
        self.dtype = jnp.result_type(self.x0, self.y0)
        self.data = tuple(jax.tree_util.tree_leaves(data))
        self._upper = _as_program(upper, "ex.solve_bilevel")
        up = split(self._upper, (x0, y0, *data), n_param_leaves=len(jax.tree_util.tree_leaves((x0, y0))))
        if up.constraints:
            raise ProgramError(
                f"ex.solve_bilevel: the upper program states constraints ({[c.name for c in up.constraints]}); LV-HBA "
                "takes the constraints of the lower program (they bind both levels). State them there."
            )
        low = split(_as_program(lower, "ex.solve_bilevel"), (y0, x0, *data))
        for name, parts in (("upper", up), ("lower", low)):
            if parts.stochastic:
                raise ProgramError(f"ex.solve_bilevel: the {name} program has random choices; LV-HBA needs "
                                   "deterministic levels.")
        self.lower = Problem(low, y0)
        self.m_eq, self.m_in = self.lower.m_eq, self.lower.m_in
        self.m = self.m_eq + self.m_in
        self.projection_steps = projection_steps
        self._up = up

    def _x_leaves(self, xs):
        return jax.tree_util.tree_leaves(self.unravel_x(xs))

    def F(self, xs, ys):
        leaves = jax.tree_util.tree_leaves((self.unravel_x(xs), self.unravel_y(ys)))
        return jnp.asarray(self._up.objective(*leaves, *self.data), self.dtype)

    def _bound(self, xs):
        return self.lower.bind([*self._x_leaves(xs), *self.data])

    def f(self, xs, ys):
        return self._bound(xs).f(ys)

    def g(self, xs, ys):
        b = self._bound(xs)
        parts = []
        if self.m_eq:
            parts.append(b.eq(ys))
        if self.m_in:
            parts.append(b.ineq(ys))
        return jnp.concatenate(parts) if parts else jnp.zeros((0,), self.dtype)

    def _gw(self, w):
        return self.g(w[:self.n_x], w[self.n_x:])

    def violation(self, w):
        if not self.m:
            return jnp.zeros((), self.dtype)
        c = self._gw(w)
        return jnp.max(jnp.concatenate([jnp.abs(c[:self.m_eq]), jnp.maximum(c[self.m_eq:], 0.0)]), initial=0.0)

    def project(self, w):
        """The projection onto ``C``: least-squares corrections on the equalities and the violated
        inequalities, linearized at the current point (exact in one round for affine ones)."""
        if not self.m:
            return w

        def body(_, w):
            c, vjp = jax.vjp(self._gw, w)
            active = jnp.concatenate([jnp.ones((self.m_eq,), bool), c[self.m_eq:] > 0])
            r = jnp.where(active, c, 0.0)
            jmat = jax.vmap(lambda e: vjp(e)[0])(jnp.eye(self.m, dtype=w.dtype))  # rows of J (m first derivatives)
            jmat = jnp.where(active[:, None], jmat, 0.0)
            coef = jnp.linalg.lstsq(jmat @ jmat.T, r)[0]
            return w - jmat.T @ coef

        return jax.lax.fori_loop(0, self.projection_steps, body, w)


def solve_bilevel(upper, lower, x0, y0, *data, solver=None, max_steps: int | None = None, tol: float = 1e-6,
                  key=None, throw: bool = False):
    """Solve ``min_{x,y} upper(x, y, *data)`` subject to ``y ∈ argmin_y lower(y, x, *data)``
    (the lower program's ``ex.subject_to`` constraints may involve ``x``; they bind both levels).

    ``solver``: :class:`ex.solvers.LVHBA` (the default). Returns a :class:`~estimax.solvers.Solution`
    whose ``params`` is ``(x, y)``, ``value`` the upper objective, ``multipliers`` the lower
    level's (by constraint name), ``history`` the upper objective, the stopping measure (as
    ``kkt``) and the constraint violation per iteration, and ``stats`` the step sizes, the
    final penalty and the lower-level gap ``f − v_γ``.
    """
    solver = LVHBA() if solver is None else solver
    if not isinstance(solver, LVHBA):
        raise ArgumentError(f"ex.solve_bilevel: solver= takes ex.solvers.LVHBA(...); got {type(solver).__name__}.")
    problem = BilevelProblem(upper, lower, x0, y0, data, solver.projection_steps)
    steps = max_steps or solver.max_steps
    key = jax.random.PRNGKey(0) if key is None else key
    w0 = jnp.concatenate([jnp.asarray(problem.x0, problem.dtype), jnp.asarray(problem.y0, problem.dtype)])

    compiled = Compiled(solver, lambda data: problem, tol=tol, length=steps + 1,
                                dtype=jnp.result_type(w0), max_steps=steps)
    compiled.compile("run", (w0, None, None), key, (), jnp.int32(0))
    t0 = time.perf_counter()
    carry = jax.block_until_ready(compiled.run((w0, None, None), key, ()))
    solve_s = time.perf_counter() - t0
    host = jax.device_get(carry)
    s = host.state
    segments = [*problem.lower.eq_segments, *problem.lower.ineq_segments]
    lam = jnp.asarray(s.lam)
    multipliers = {seg.name: jnp.reshape(lam[(seg.start if seg.kind == "eq" else problem.m_eq + seg.start):][:seg.size],
                                         seg.shape) for seg in segments}
    w = jnp.asarray(s.x)
    solution = assemble(
        solver, host, params=(problem.unravel_x(w[:problem.n_x]), problem.unravel_y(w[problem.n_x:])),
        value=float(s.value), multipliers=multipliers, history=trim_history(host.history, int(host.steps)),
        stats={"compile_s": compiled.compile_s, "solve_s": solve_s, "solver": solver.name})
    if throw and not solution.success:
        raise SolverError(f"ex.solve_bilevel with {solver.name}: {solution.message}", solution)
    return solution
