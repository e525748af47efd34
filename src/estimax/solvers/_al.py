"""The classical augmented Lagrangian (method of multipliers) for equalities, inequalities and bounds.

For ``min f(x)`` subject to ``c(x) = 0`` and ``g(x) <= 0`` (bounds included in ``g``), the
Powell–Hestenes–Rockafellar augmented Lagrangian is

    L_ρ(x; λ, μ) = f + λᵀc + (ρ/2)‖c‖² + (1/(2ρ)) Σ (max(0, μ + ρ g)² − μ²).

One driver step is one outer iteration at ``(x, λ, μ, ρ)``:

1. **Inner solve.** Minimize ``L_ρ(·; λ, μ)`` from the current ``x`` with L-BFGS
   (``optax.lbfgs`` and its zoom line search), until ``‖∇ₓL_ρ‖∞ <= ω``, or ``max_inner``
   iterations, or ``inner_patience`` iterations without a better iterate (a lower ``L_ρ``;
   or, as near a solution the values stop resolving the steps, one higher by at most a
   relative ``max(4ε, 1e-6)`` with a smaller gradient); the best iterate is kept. The inner
   tolerance tightens with the outer progress: ``ω ← max(inner_tol_min, min(ω, 0.1 · KKT))``, from
   ``ω₀ = min(inner_tol, max(inner_tol_min, 0.1 · KKT₀))``.
2. **Multipliers.** ``λ ← λ + ρ c``, ``μ ← max(0, μ + ρ g)`` (both clipped to
   ``±multiplier_max``). Then ``∇ₓL_ρ`` at the inner solution *is* the gradient of the
   ordinary Lagrangian at the new multipliers, so the inner tolerance bounds the stationarity
   part of the KKT residual.
3. **Penalty.** With ``V = max(‖c‖∞, ‖min(−g, μ/ρ)‖∞)`` (feasibility and complementarity,
   as in ALGENCAN): if ``V`` did not fall below ``decrease · V_previous``, ``ρ ← min(growth · ρ,
   rho_max)`` (unless ``V`` is already below the inner tolerance ``ω``).

**KKT residual**: ``max(‖∇f + J_cᵀλ + J_gᵀμ‖∞, ‖c‖∞, ‖max(0, g)‖∞, ‖μ ⊙ g‖∞)``.

**Infeasibility detection.** An outer iteration is *stuck* when the penalty used was at
least ``min(rho_infeasible, rho_max)``, the inner solution is a stationary point of the
violation ``V₂(x) = ½‖c‖² + ½‖max(0, g)‖²`` (``‖∇V₂‖∞ <= infeasible_stationarity ·
violation``) and the violation fell by less than 10%. After ``infeasible_patience`` stuck
outer iterations in a row (or one, followed by an inner solve that cannot move) with a
violation above the tolerance, the run stops with ``RESULTS.infeasible``. Otherwise an inner
solve that cannot move ``x`` at all (its line search is limited by rounding: the KKT
residual is at the precision floor of the problem) ends the run with ``RESULTS.stagnated``
at the last iterate. The result ``successful`` needs the KKT residual, feasibility
included, below the tolerance: an infeasible problem is never reported solved.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from .._errors import ArgumentError, ProgramError
from ._base import Solver
from ._solution import RESULTS


class ALState(NamedTuple):
    x: jax.Array
    lam: jax.Array
    mu: jax.Array
    value: jax.Array
    kkt: jax.Array
    infeasibility: jax.Array
    rho: jax.Array  # the penalty of the next inner solve
    omega: jax.Array  # the tolerance of the next inner solve
    feas_measure: jax.Array  # V = max(‖c‖∞, ‖min(-g, μ/ρ)‖∞) of the last outer iteration
    stuck: jax.Array  # int32: consecutive outer iterations that look infeasible
    step_norm: jax.Array  # ‖(Δx, Δλ, Δμ)‖∞ of the last outer iteration
    inner_last: jax.Array  # int32: inner iterations of the last outer iteration
    stalled: jax.Array  # bool: the last inner solve could not decrease L_ρ at all
    inner_iterations: jax.Array  # int32: inner iterations, all outer iterations together


@dataclasses.dataclass(frozen=True)
class AugmentedLagrangian(Solver):
    """The method of multipliers (PHR augmented Lagrangian) with L-BFGS inner solves.

    Equalities, inequalities and bounds; deterministic problems (exact derivatives).

    **Arguments** (defaults in parentheses):

    - ``rho0`` (10): the initial penalty; ``rho_max`` (1e8): its cap; ``growth`` (10): its
      factor when the feasibility measure did not fall below ``decrease`` (0.25) times the
      previous one;
    - ``max_inner`` (200): L-BFGS iterations per outer iteration; ``inner_patience`` (20):
      iterations without a better iterate before an inner solve stops; ``memory_size``
      (10): the L-BFGS memory;
    - ``inner_tol`` (0.1): the largest inner tolerance (on ``‖∇ₓL_ρ‖∞``); ``inner_tol_min``
      (1e-12): the smallest;
    - ``multiplier_max`` (1e20): multipliers are clipped to ``[-multiplier_max,
      multiplier_max]``;
    - ``rho_infeasible`` (1e6), ``infeasible_stationarity`` (1e-4), ``infeasible_patience``
      (3): infeasibility detection (see the module documentation);
    - ``max_steps`` (100): the default budget of outer iterations.
    """

    rho0: float = 10.0
    rho_max: float = 1e8
    growth: float = 10.0
    decrease: float = 0.25
    max_inner: int = 200
    inner_patience: int = 20
    memory_size: int = 10
    inner_tol: float = 1e-1
    inner_tol_min: float = 1e-12
    multiplier_max: float = 1e20
    rho_infeasible: float = 1e6
    infeasible_stationarity: float = 1e-4
    infeasible_patience: int = 3
    max_steps: int = 100

    name = "augmented Lagrangian (method of multipliers, L-BFGS)"
    certificate = ("exact", "a deterministic problem solved to the KKT tolerance")

    def __post_init__(self):
        for field in ("rho0", "rho_max", "inner_tol", "inner_tol_min", "multiplier_max", "rho_infeasible",
                      "infeasible_stationarity"):
            if not getattr(self, field) > 0:
                raise ArgumentError(
                    f"AugmentedLagrangian({field}=...) must be positive; got {getattr(self, field)!r}.")
        if not self.rho_max >= self.rho0:
            raise ArgumentError(
                f"AugmentedLagrangian: rho_max ({self.rho_max!r}) must be at least rho0 ({self.rho0!r}).")
        if not self.growth > 1:
            raise ArgumentError(f"AugmentedLagrangian(growth=...) must be above 1; got {self.growth!r}.")
        if not 0 < self.decrease < 1:
            raise ArgumentError(f"AugmentedLagrangian(decrease=...) must be in (0, 1); got {self.decrease!r}.")
        for field in ("max_inner", "inner_patience", "memory_size", "infeasible_patience", "max_steps"):
            value = getattr(self, field)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ArgumentError(
                    f"AugmentedLagrangian({field}=...) must be a positive integer; got {value!r}.")

    def check(self, problem) -> None:
        if problem.stochastic:
            raise ProgramError(
                "AugmentedLagrangian needs exact values and derivatives; this problem's objective or "
                "constraints are expectations (they depend on ex.sample). "
                "Use ex.solvers.StochasticLagrangian()."
            )

    # -- pieces ------------------------------------------------------------------------------
    def _al_value(self, p, x, lam, mu, rho):
        c, g = p.eq(x), p.ineq(x)
        shifted = jnp.maximum(0.0, mu + rho * g)
        return (p.f(x) + jnp.vdot(lam, c) + 0.5 * rho * jnp.vdot(c, c)
                + (0.5 / rho) * (jnp.vdot(shifted, shifted) - jnp.vdot(mu, mu)))

    def _inner(self, p, x, lam, mu, rho, omega):
        """L-BFGS on ``L_ρ(·; λ, μ)`` from ``x``.

        Near a solution the values of ``L_ρ`` stop resolving the steps (rounding; the zoom line
        search then accepts steps by its approximate Wolfe test, which allows values higher by
        a relative 1e-6) and the gradient is not monotone along the L-BFGS path. So L-BFGS runs
        on from each finite iterate, and the solve keeps the *best* iterate: a new one is better
        when its value is lower beyond rounding, or when it is not higher by more than a
        relative ``max(4ε, 1e-6)`` and its ``‖∇ₓL_ρ‖∞`` is smaller. It stops at
        ``‖∇ₓL_ρ‖∞ <= ω`` (at the best iterate), after ``max_inner`` iterations, or after
        ``inner_patience`` iterations without a better one. Returns the best iterate, the
        iteration count, and whether nothing improved on ``x`` although ``‖∇ₓL_ρ(x)‖∞ > ω``.
        """
        fun = lambda y: self._al_value(p, y, lam, mu, rho)  # noqa: E731
        opt = optax.lbfgs(memory_size=self.memory_size)
        from_state = optax.value_and_grad_from_state(fun)
        v0, g0 = jax.value_and_grad(fun)(x)
        eps = jnp.finfo(v0.dtype).eps

        class Inner(NamedTuple):
            y: jax.Array  # L-BFGS's iterate
            st: object
            v: jax.Array
            g: jax.Array
            best: jax.Array
            best_v: jax.Array
            best_norm: jax.Array
            since: jax.Array  # iterations since the best improved
            i: jax.Array
            finite: jax.Array

        def cond(c: Inner):
            return ((c.i < self.max_inner) & (c.best_norm > omega) & (c.since < self.inner_patience)
                    & c.finite)

        def body(c: Inner):
            updates, st = opt.update(c.g, c.st, c.y, value=c.v, grad=c.g, value_fn=fun)
            y = optax.apply_updates(c.y, updates)
            v, g = from_state(y, state=st)
            finite = jnp.isfinite(v) & jnp.all(jnp.isfinite(g))
            norm = _inf_norm(g)
            # lower beyond rounding; or not higher than the line search's approximate Wolfe test
            # allows, with a smaller gradient
            scale = jnp.abs(c.best_v)
            lower = v < c.best_v - 4 * eps * scale
            level = v <= c.best_v + jnp.maximum(4 * eps, _APPROX_DEC_RTOL) * scale
            better = finite & (lower | (level & (norm < c.best_norm)))
            pick = lambda new, old: jnp.where(better, new, old)  # noqa: E731
            return Inner(y, st, v, g, pick(y, c.best), pick(v, c.best_v), pick(norm, c.best_norm),
                         pick(0, c.since + 1), c.i + 1, finite)

        g0_norm = _inf_norm(g0)
        start = Inner(x, opt.init(x), v0, g0, x, v0, g0_norm, jnp.int32(0), jnp.int32(0), jnp.bool_(True))
        out = jax.lax.while_loop(cond, body, start)
        stalled = (out.since == out.i) & (g0_norm > omega)  # no iterate was better than x
        return out.best, out.i, stalled

    def _measures(self, p, x, lam, mu):
        """Value, KKT residual, violation, the Lagrangian's and the violation's gradients at ``x``."""
        value, grad_f = jax.value_and_grad(p.f)(x)
        c, vjp_c = jax.vjp(p.eq, x)
        g, vjp_g = jax.vjp(p.ineq, x)
        plus = jnp.maximum(0.0, g)
        grad_l = grad_f + vjp_c(lam)[0] + vjp_g(mu)[0]
        grad_v = vjp_c(c)[0] + vjp_g(plus)[0]
        violation = jnp.maximum(_inf_norm(c), _inf_norm(plus))
        kkt = jnp.maximum(jnp.maximum(_inf_norm(grad_l), violation), _inf_norm(mu * g))
        return value, kkt, violation, grad_v, c, g

    # -- the solver protocol -----------------------------------------------------------------
    def init(self, p, x0, lam0, mu0, key) -> ALState:
        del key
        dtype = x0.dtype
        lam0 = jnp.zeros((p.m_eq,), dtype) if lam0 is None else jnp.asarray(lam0, dtype)
        mu0 = jnp.zeros((p.m_in,), dtype) if mu0 is None else jnp.asarray(mu0, dtype)
        value, kkt, violation, _, _, _ = self._measures(p, x0, lam0, mu0)
        omega = jnp.minimum(self.inner_tol, jnp.maximum(self.inner_tol_min, 0.1 * kkt)).astype(dtype)
        big = jnp.asarray(jnp.finfo(dtype).max, dtype)  # "none yet" (the driver refuses infinities)
        return ALState(
            x=x0, lam=lam0, mu=mu0, value=value, kkt=kkt, infeasibility=violation,
            rho=jnp.asarray(self.rho0, dtype), omega=omega, feas_measure=big,
            stuck=jnp.int32(0), step_norm=big, inner_last=jnp.int32(0), stalled=jnp.bool_(False),
            inner_iterations=jnp.int32(0),
        )

    def step(self, p, s: ALState, key) -> ALState:
        del key
        rho = s.rho
        x, iterations, stalled = self._inner(p, s.x, s.lam, s.mu, rho, s.omega)
        c, g = p.eq(x), p.ineq(x)
        bound = self.multiplier_max
        lam = jnp.clip(s.lam + rho * c, -bound, bound)
        mu = jnp.clip(jnp.maximum(0.0, s.mu + rho * g), 0.0, bound)
        value, kkt, violation, grad_v, _, _ = self._measures(p, x, lam, mu)

        # the penalty grows when feasibility and complementarity did not improve enough
        measure = jnp.maximum(_inf_norm(c), _inf_norm(jnp.minimum(-g, s.mu / rho)))
        # (not when it is already below the inner tolerance: stationarity is not better than that)
        enough = (measure <= self.decrease * s.feas_measure) | (measure <= s.omega)
        rho_new = jnp.where(enough, rho, jnp.minimum(self.growth * rho, self.rho_max))

        # infeasibility: a large penalty, a stationary point of the violation, no progress
        stuck = ((rho >= min(self.rho_infeasible, self.rho_max))
                 & (_inf_norm(grad_v) <= self.infeasible_stationarity * violation)
                 & (violation >= 0.9 * s.infeasibility) & (violation > 0))
        omega = jnp.maximum(self.inner_tol_min, jnp.minimum(s.omega, 0.1 * kkt)).astype(s.omega.dtype)
        step_norm = jnp.maximum(_inf_norm(x - s.x), jnp.maximum(_inf_norm(lam - s.lam), _inf_norm(mu - s.mu)))
        new = ALState(
            x=x, lam=lam, mu=mu, value=value, kkt=kkt, infeasibility=violation,
            rho=rho_new.astype(rho.dtype), omega=omega, feas_measure=measure.astype(rho.dtype),
            stuck=jnp.where(stuck, s.stuck + 1, 0).astype(jnp.int32),
            step_norm=step_norm.astype(rho.dtype), inner_last=iterations.astype(jnp.int32),
            stalled=jnp.bool_(False),
            inner_iterations=s.inner_iterations + iterations.astype(jnp.int32),
        )
        # an inner solve that could not move x at all: updating the multipliers at the same x
        # would only make them drift; keep the iterate and stop (stagnated)
        kept = s._replace(step_norm=jnp.zeros_like(s.step_norm), inner_last=iterations.astype(jnp.int32),
                          stalled=jnp.bool_(True), inner_iterations=new.inner_iterations)
        return jax.tree.map(lambda a, b: jax.lax.select(stalled, a, b), kept, new)

    def terminate(self, p, s: ALState, tol):
        del p
        converged = s.kkt <= tol
        # enough stuck outer iterations; or a stuck one after which no progress is possible
        evidence = (s.stuck >= self.infeasible_patience) | (s.stalled & (s.stuck >= 1))
        infeasible = (~converged) & (s.infeasibility > tol) & evidence
        # the inner solve could not move, or nothing moved and the penalty cannot grow
        stalled = (~converged) & (~infeasible) & (s.stalled | ((s.step_norm == 0) & (s.rho >= self.rho_max)))
        result = jnp.where(converged, RESULTS.successful,
                           jnp.where(infeasible, RESULTS.infeasible,
                                     jnp.where(stalled, RESULTS.stagnated, RESULTS.successful)))
        return converged | infeasible | stalled, result.astype(jnp.int32)

    def stats(self, s: ALState) -> dict:
        return {"inner_iterations": int(s.inner_iterations), "rho": float(s.rho), "inner_tol": float(s.omega)}


_APPROX_DEC_RTOL = 1e-6  # optax.scale_by_zoom_linesearch's default approx_dec_rtol


def _inf_norm(v) -> jax.Array:
    return jnp.max(jnp.abs(v), initial=0.0)
