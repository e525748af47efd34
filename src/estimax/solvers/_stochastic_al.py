"""Stochastic gradient descent–ascent on the augmented Lagrangian, for expectations.

For ``min E[f(x, ξ)]`` subject to ``E[c(x, ξ)] = 0`` and ``E[g(x, ξ)] <= 0`` (bounds
included in ``g``) the solver works on the augmented Lagrangian with slacks ``s >= 0`` for
the inequalities,

    L_ρ(x, s; λ, μ) = F + λᵀC + (ρ/2)‖C‖² + μᵀ(G + s) + (ρ/2)‖G + s‖²,

with ``F = E[f]``, ``C = E[c]``, ``G = E[g]``. Minimizing over ``s >= 0`` gives back the PHR
term ``(1/(2ρ)) Σ (max(0, μ + ρG)² − μ²)``; keeping ``s`` explicit keeps the penalty a
polynomial in the expectations, so that its gradient has an **unbiased** estimate (a
``max`` of a noisy estimate would be biased). Each step draws a fresh key and splits it
into independent keys ``k_f, k₁, k₂``:

1. **Primal descent.** ``∇ₓL_ρ ≈ ∇f̂(k_f) + J_ĉ(k₂)ᵀ(λ + ρ ĉ(k₁)) + J_ĝ(k₂)ᵀ(μ + ρ(ĝ(k₁) + s))``
   and ``∇ₛL_ρ ≈ μ + ρ(ĝ(k₁) + s)``: the value that multiplies a Jacobian comes from another
   key than the Jacobian, so the product's expectation is the product of expectations (the
   same value and Jacobian from one sample would be biased by ``ρ Cov(ĉ, J_ĉ)``). The
   ``optimizer`` (an optax transformation; default ``optax.adam(1e-2)``) updates ``(x, s)``;
   then ``s ← max(0, s)``.
2. **Dual ascent** (simultaneous with the primal step) with the step's estimates ``ĉ(k₁)``,
   ``ĝ(k₁)``, unbiased for the constraints at the current iterate:
   ``λ ← λ + η ĉ``, ``μ ← max(0, μ + η(ĝ + s))``, with ``η = dual_lr`` (a number, or a
   schedule: a function of the step count, as optax schedules are).

Estimates are noisy, so the state keeps exponential moving averages (weight ``ema`` on the
past) of ``f̂``, of the Lagrangian gradient ``∇f̂ + J_ĉᵀλ + J_ĝᵀμ``, of ``ĉ`` and of ``ĝ``;
``value``, ``kkt`` (``max(‖∇L‖∞, ‖c‖∞, ‖max(0, g)‖∞, ‖μ ⊙ g‖∞)`` of the averages) and
``infeasibility`` are those of the averages. The run stops when that KKT residual is below
the tolerance, else after ``max_steps`` (``RESULTS.max_steps_reached``: the usual end of a
stochastic run). For a deterministic problem the same iteration is an ordinary gradient
descent–ascent.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .._errors import ArgumentError, ProgramError
from ._base import Solver
from ._solution import RESULTS


class StochasticLagrangianState(NamedTuple):
    x: jax.Array
    lam: jax.Array
    mu: jax.Array
    value: jax.Array  # moving average of f̂
    kkt: jax.Array  # KKT residual of the moving averages
    infeasibility: jax.Array  # violation of the moving averages
    slack: jax.Array  # s >= 0, one per inequality
    opt_state: Any  # the optimizer's state over (x, s)
    count: jax.Array  # int32: steps taken
    grad_avg: jax.Array  # moving average of the Lagrangian gradient estimate
    eq_avg: jax.Array  # moving average of ĉ
    ineq_avg: jax.Array  # moving average of ĝ
    violation_grad_avg: jax.Array  # moving average of the violation's gradient J_Cᵀĉ + J_Gᵀ(ĝ + s)
    window_violation: jax.Array  # the violation at the start of the current window
    stuck: jax.Array  # int32: windows in a row at a stationary point of the violation


@dataclasses.dataclass(frozen=True)
class StochasticLagrangian(Solver):
    """Stochastic gradient descent–ascent on the augmented Lagrangian (see the module doc).

    **Arguments** (defaults in parentheses):

    - ``optimizer``: an optax ``GradientTransformation`` for the primal variables (``None``:
      ``optax.adam(1e-2)``);
    - ``dual_lr`` (1e-2): the multipliers' step size, a number or a schedule ``count -> step``;
    - ``rho`` (1.0): the penalty of the augmented Lagrangian (fixed);
    - ``ema`` (0.99): the moving averages' weight on the past;
    - ``max_steps`` (2000): the default budget of steps;
    - ``infeasible_stationarity`` (0.05), ``infeasible_patience`` (2): the run stops with
      ``RESULTS.infeasible`` when, for ``infeasible_patience`` windows of ``3 / (1 - ema)``
      steps in a row, the averaged violation stayed above the tolerance and fell by less
      than 10%, while the averaged gradient of ``½‖C‖² + ½‖G + s‖²`` was at most
      ``infeasible_stationarity`` times the violation: the primal steps can no longer reduce
      the violation and the multipliers grow without bound. (Of a feasible problem with a
      nondegenerate Jacobian that ratio is about the Jacobian's scale.)
    """

    optimizer: Any = None
    dual_lr: float | Callable = 1e-2
    rho: float = 1.0
    ema: float = 0.99
    max_steps: int = 2000
    infeasible_stationarity: float = 0.05
    infeasible_patience: int = 2

    name = "stochastic Lagrangian (gradient descent-ascent)"
    certificate = ("unbiased", "primal and dual steps use unbiased estimates of the augmented Lagrangian's "
                   "derivatives; the iterate is a stochastic approximation, not a certified optimum")

    def __post_init__(self):
        opt = self.optimizer
        if opt is not None and not (hasattr(opt, "init") and hasattr(opt, "update")):
            raise ArgumentError(
                "StochasticLagrangian(optimizer=...) takes an optax transformation such as "
                f"optax.adam(1e-2); got {type(opt).__name__}."
            )
        if not callable(self.dual_lr) and not (isinstance(self.dual_lr, (int, float)) and self.dual_lr > 0):
            raise ArgumentError(f"StochasticLagrangian(dual_lr=...) must be a positive number or a schedule; "
                               f"got {self.dual_lr!r}.")
        if not (isinstance(self.rho, (int, float)) and self.rho >= 0):
            raise ArgumentError(f"StochasticLagrangian(rho=...) must be a number >= 0; got {self.rho!r}.")
        if not (isinstance(self.ema, (int, float)) and 0 <= self.ema < 1):
            raise ArgumentError(f"StochasticLagrangian(ema=...) must be in [0, 1); got {self.ema!r}.")
        for field in ("max_steps", "infeasible_patience"):
            value = getattr(self, field)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ArgumentError(f"StochasticLagrangian({field}=...) must be a positive integer; got {value!r}.")
        if not (isinstance(self.infeasible_stationarity, (int, float)) and self.infeasible_stationarity > 0):
            raise ArgumentError("StochasticLagrangian(infeasible_stationarity=...) must be a positive number; "
                                f"got {self.infeasible_stationarity!r}.")

    def check(self, problem) -> None:
        if problem.n == 0:
            raise ProgramError("StochasticLagrangian: the problem has no parameters to optimize.")

    def _optimizer(self):
        return optax.adam(1e-2) if self.optimizer is None else self.optimizer

    def _dual_lr(self, count):
        return self.dual_lr(count) if callable(self.dual_lr) else self.dual_lr

    # -- estimates ---------------------------------------------------------------------------
    def gradient_estimate(self, p, x, slack, lam, mu, key):
        """Estimates at ``(x, s; λ, μ)``, each unbiased given that point:
        ``(grad_x, grad_s, grad_lagrangian, f̂, ĉ, ĝ, ∇V)`` with ``(grad_x, grad_s)`` the augmented
        Lagrangian's gradient, ``grad_lagrangian`` the ordinary Lagrangian's ``∇F + J_Cᵀλ + J_Gᵀμ``,
        ``ĉ``, ``ĝ`` the constraint values (from key ``k₁``), and ``∇V`` the gradient of the
        violation ``½‖C‖² + ½‖G + s‖²``."""
        k_f, k1e, k1i, k2e, k2i = jax.random.split(key, 5)
        f_hat, grad_f = jax.value_and_grad(p.f)(x, k_f)
        c1, g1 = p.eq(x, k1e), p.ineq(x, k1i)  # values: key 1
        _, vjp_c = jax.vjp(lambda y: p.eq(y, k2e), x)  # Jacobians: key 2
        _, vjp_g = jax.vjp(lambda y: p.ineq(y, k2i), x)
        w_eq = lam + self.rho * c1
        w_in = mu + self.rho * (g1 + slack)
        grad_x = grad_f + vjp_c(w_eq)[0] + vjp_g(w_in)[0]
        grad_lagrangian = grad_f + vjp_c(lam)[0] + vjp_g(mu)[0]
        violation_grad = vjp_c(c1)[0] + vjp_g(g1 + slack)[0]  # of ½‖C‖² + ½‖G + s‖², unbiased too
        return grad_x, w_in, grad_lagrangian, f_hat, c1, g1, violation_grad

    @staticmethod
    def _kkt(grad_avg, eq_avg, ineq_avg, mu):
        violation = jnp.maximum(_inf_norm(eq_avg), _inf_norm(jnp.maximum(0.0, ineq_avg)))
        kkt = jnp.maximum(jnp.maximum(_inf_norm(grad_avg), violation), _inf_norm(mu * ineq_avg))
        return kkt, violation

    # -- the solver protocol -----------------------------------------------------------------
    def init(self, p, x0, lam0, mu0, key) -> StochasticLagrangianState:
        dtype = x0.dtype
        lam = jnp.zeros((p.m_eq,), dtype) if lam0 is None else jnp.asarray(lam0, dtype)
        mu = jnp.zeros((p.m_in,), dtype) if mu0 is None else jnp.asarray(mu0, dtype)
        k_f, k_e, k_i = jax.random.split(key, 3)  # one estimate of each piece (the averages' start)
        f_hat, grad_f = jax.value_and_grad(p.f)(x0, k_f)
        c, vjp_c = jax.vjp(lambda y: p.eq(y, k_e), x0)
        g, vjp_g = jax.vjp(lambda y: p.ineq(y, k_i), x0)
        grad_l = grad_f + vjp_c(lam)[0] + vjp_g(mu)[0]
        slack = jnp.maximum(0.0, -g)  # the best slack for this estimate of g
        kkt, violation = self._kkt(grad_l, c, g, mu)
        return StochasticLagrangianState(
            x=x0, lam=lam, mu=mu, value=f_hat, kkt=kkt, infeasibility=violation, slack=slack,
            opt_state=self._optimizer().init((x0, slack)), count=jnp.int32(0),
            grad_avg=grad_l, eq_avg=c, ineq_avg=g, violation_grad_avg=vjp_c(c)[0] + vjp_g(g + slack)[0],
            window_violation=violation, stuck=jnp.int32(0),
        )

    def _window(self) -> int:
        return max(1, round(3.0 / (1.0 - self.ema)))

    def step(self, p, s: StochasticLagrangianState, key) -> StochasticLagrangianState:
        grad_x, grad_s, grad_l, f_hat, c, g, v_grad = self.gradient_estimate(p, s.x, s.slack, s.lam, s.mu, key)
        updates, opt_state = self._optimizer().update((grad_x, grad_s), s.opt_state, (s.x, s.slack))
        x, slack = optax.apply_updates((s.x, s.slack), updates)
        slack = jnp.maximum(0.0, slack)
        # dual ascent with this step's value estimates (drawn with this step's fresh key; unbiased
        # for the constraints at the current iterate, like the primal gradient)
        eta = jnp.asarray(self._dual_lr(s.count), s.x.dtype)
        lam = s.lam + eta * c
        mu = jnp.maximum(0.0, s.mu + eta * (g + s.slack))

        beta = self.ema
        avg = lambda old, new: beta * old + (1.0 - beta) * new  # noqa: E731
        grad_avg, eq_avg, ineq_avg = avg(s.grad_avg, grad_l), avg(s.eq_avg, c), avg(s.ineq_avg, g)
        kkt, violation = self._kkt(grad_avg, eq_avg, ineq_avg, mu)
        v_grad_avg = avg(s.violation_grad_avg, v_grad)
        # at the end of each window: was the violation stuck at a stationary point of itself?
        boundary = (s.count + 1) % self._window() == 0
        stuck_here = (violation > 0.9 * s.window_violation) & (
            _inf_norm(v_grad_avg) <= self.infeasible_stationarity * violation)
        stuck = jnp.where(boundary, jnp.where(stuck_here, s.stuck + 1, 0), s.stuck).astype(jnp.int32)
        return StochasticLagrangianState(
            x=x, lam=lam, mu=mu, value=avg(s.value, f_hat), kkt=kkt, infeasibility=violation, slack=slack,
            opt_state=opt_state, count=s.count + 1, grad_avg=grad_avg, eq_avg=eq_avg, ineq_avg=ineq_avg,
            violation_grad_avg=v_grad_avg, window_violation=jnp.where(boundary, violation, s.window_violation),
            stuck=stuck,
        )

    def terminate(self, p, s: StochasticLagrangianState, tol):
        del p
        converged = s.kkt <= tol  # else the driver stops at max_steps (max_steps_reached)
        infeasible = (~converged) & (s.infeasibility > tol) & (s.stuck >= self.infeasible_patience)
        result = jnp.where(infeasible, RESULTS.infeasible, RESULTS.successful).astype(jnp.int32)
        return converged | infeasible, result

    def stats(self, s: StochasticLagrangianState) -> dict:
        return {"rho": float(self.rho), "slack_max": float(jnp.max(s.slack, initial=0.0))}


def _inf_norm(v) -> jax.Array:
    return jnp.max(jnp.abs(v), initial=0.0)
