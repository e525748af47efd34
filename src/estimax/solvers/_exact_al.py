"""Exact augmented Lagrangian with randomized iterative sketching, for equality constraints.

After the seed paper "Constrained Optimization via Exact Augmented Lagrangian and
Randomized Iterative Sketching". Each iteration at ``(x, λ)``:

1. **Newton system, solved inexactly by sketching.** With ``∇L = ∇f + Jᵀλ`` and the
   Lagrangian Hessian ``H`` (Hessian-vector products only; ``J`` by JVP/VJP), solve

       K d = -r,   K = [[H + τI, Jᵀ], [J, 0]],   r = (∇L, c)

   by sketch-and-project: ``d <- d - Y (YᵀY)⁺ Sᵀ(K d + r)`` with ``Y = K S`` for a random
   sketch ``S`` (Gaussian, or columns of the identity: block randomized Kaczmarz) of
   ``sketch_size`` columns, until ``‖K d + r‖ <= δ_k ‖r‖``. A sketch as wide as the system
   is the identity and solves it in one projection (the default up to ``n + m = 2048``: a
   randomized solver pays off on large systems; its iteration count grows with the
   condition number of ``K``). That exact solve is done in null-space form (:class:`_NullSpace`):
   ``n - m`` Hessian-vector products where ``J`` has full row rank, not ``n``. The accuracy ``δ_k = min(δ, ‖r‖^½)`` sharpens as ``r -> 0``
   (the paper's route from linear to superlinear convergence).
2. **Merit function and penalties.** The exact augmented Lagrangian

       φ(x, λ) = L(x, λ) + (η₁/2)‖c‖² + (η₂/2)‖∇ₓL‖²

   must decrease along ``d``: its directional derivative ``Dφ`` (a JVP of ``φ``) must satisfy
   ``Dφ <= -(η₂/2)‖r‖²``. Before that, the step must see curvature at least ``ξ_B`` on the
   Hessian along its tangential part (``d_x`` projected on the null space of ``J``, by
   conjugate gradients on ``J Jᵀ``): otherwise ``τ`` grows (so that it does) and the system
   is solved again. Then, if ``Dφ`` is not negative enough: raise ``η₁`` by factors of ``ν``
   when that suffices (the constraint term of ``Dφ`` is negative); else tighten ``δ``
   tenfold and solve again.
3. **Armijo line search** on ``φ``: ``α = 1, 1/2, ...`` until
   ``φ(x + αd_x, λ + αd_λ) <= φ + β α Dφ``.

Defaults are the paper's code's: ``η₁ = 1``, ``η₂ = 0.1``, ``δ = 0.1``, ``ξ_B = 0.1``,
``β = 0.1``, ``ν = 1.5``. What is ours rather than the paper's: ``ξ_B`` enforced through the
Hessian shift ``τ`` (reduced tenfold at each iteration, so it vanishes near a solution with a
positive definite reduced Hessian, where the exact Newton step gives fast local
convergence); without it the merit function's ``‖∇ₓL‖²`` term makes the maxima of a
problem attractive too. ``ξ_B`` scaled by the Hessian's magnitude when that is below 1
(``xi_scale="hessian"``; on the null space of ``J``, ``‖H Z‖_F/√(n - m)``, with the dense
solve): an absolute threshold forces the shift on any problem whose
Hessian is small (the PDE-control benchmark's is ``h diag(1, α)``, eigenvalues ``1e-2`` and
``1e-4`` at ``n = 100``), and the shifted steps then crawl. And the initial multiplier:
least squares, ``argmin ‖∇f + Jᵀλ‖``, by conjugate gradients on ``J Jᵀ``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .._errors import ArgumentError, ProgramError
from ._base import Solver
from ._solution import RESULTS


class ExactALState(NamedTuple):
    x: jax.Array
    lam: jax.Array
    mu: jax.Array  # no inequalities: empty
    value: jax.Array
    kkt: jax.Array
    infeasibility: jax.Array
    grad_l: jax.Array  # ∇ₓL at (x, lam)
    c: jax.Array  # c(x)
    eta1: jax.Array
    eta2: jax.Array
    tau: jax.Array
    alpha: jax.Array  # the last step length
    step_norm: jax.Array
    ls_failed: jax.Array  # bool
    inner_iterations: jax.Array  # sketch-and-project iterations, all steps together
    matvecs: jax.Array  # products with K, all steps together
    violation_grad: jax.Array  # Jᵀc: the gradient of the violation ½‖c‖²
    stuck: jax.Array  # int32: consecutive iterations at a stationary point of the violation


@dataclasses.dataclass(frozen=True)
class ExactAL(Solver):
    """Exact augmented Lagrangian with a randomized sketching Newton solver (equalities only).

    **Arguments** (defaults as in the paper's code):

    - ``eta1``, ``eta2``: the initial penalties of ``‖c‖²`` and ``‖∇ₓL‖²`` in the merit function;
    - ``delta``: the Newton solve's relative accuracy (sharpened to ``min(delta, ‖r‖^½)``);
    - ``xi_b``: the curvature the Hessian block must have along the step;
    - ``xi_scale``: ``"hessian"`` (default): ``xi_b`` is relative to the Lagrangian Hessian's
      scale when that is below 1 (on the null space of ``J``, ``‖H Z‖_F/√(n - m)``; along the
      gradient, ``‖H∇L‖/‖∇L‖``, with a sketch narrower than the system), so a well-posed but badly scaled problem keeps its Newton steps;
      ``"absolute"``: the paper's absolute threshold;
    - ``beta``: the Armijo constant; ``nu``: the penalty's growth factor;
    - ``sketch``: ``"gaussian"`` or ``"coordinate"`` (block randomized Kaczmarz);
    - ``sketch_size``: columns per sketch (default ``min(n + m, 2048)``; the full size is an
      exact solve);
    - ``max_inner``: sketch-and-project iterations per Newton solve;
    - ``max_backtracks``: halvings of the step in the line search;
    - ``infeasible_stationarity`` (1e-4), ``infeasible_patience`` (3): the run stops with
      ``RESULTS.infeasible`` when the violation is above the tolerance at a stationary point
      of ``½‖c‖²`` (``‖Jᵀc‖∞ <= infeasible_stationarity · ‖c‖∞``) for ``infeasible_patience``
      iterations in a row, or when the line search fails or the steps vanish there: no
      nearby point satisfies the constraints (a local certificate, as in IPOPT's
      restoration phase).
    """

    eta1: float = 1.0
    eta2: float = 0.1
    delta: float = 0.1
    xi_b: float = 0.1
    beta: float = 0.1
    nu: float = 1.5
    sketch: str = "gaussian"
    sketch_size: int | None = None
    max_inner: int = 200
    max_backtracks: int = 40
    max_repairs: int = 20
    xi_scale: str = "hessian"
    infeasible_stationarity: float = 1e-4
    infeasible_patience: int = 3

    name = "exact augmented Lagrangian (sketching)"
    certificate = ("exact", "a deterministic problem solved to the KKT tolerance")

    def __post_init__(self):
        if self.xi_scale not in ("hessian", "absolute"):
            raise ArgumentError(f"ExactAL(xi_scale=...) is 'hessian' or 'absolute'; got {self.xi_scale!r}.")
        if self.sketch not in ("gaussian", "coordinate"):
            raise ArgumentError(f"ExactAL(sketch=...) is 'gaussian' or 'coordinate'; got {self.sketch!r}.")
        patience = self.infeasible_patience
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ArgumentError(f"ExactAL(infeasible_patience=...) must be an integer >= 1; got {patience!r}.")
        for field in ("eta1", "eta2", "delta", "xi_b", "beta", "infeasible_stationarity"):
            if not getattr(self, field) > 0:
                raise ArgumentError(f"ExactAL({field}=...) must be positive; got {getattr(self, field)!r}.")
        if not self.nu > 1:
            raise ArgumentError(f"ExactAL(nu=...) must be above 1; got {self.nu!r}.")

    def check(self, problem) -> None:
        if problem.m_in:
            names = [s.name for s in problem.ineq_segments]
            raise ProgramError(
                f"ExactAL solves equality-constrained problems; this one has inequality constraints or bounds "
                f"{names}. Use ex.solvers.AugmentedLagrangian()."
            )
        if problem.stochastic:
            raise ProgramError(
                "ExactAL needs exact derivatives; this problem's objective or constraints are expectations. "
                "Use ex.solvers.StochasticLagrangian()."
            )

    # -- pieces ------------------------------------------------------------------------------
    @staticmethod
    def _lagrangian(p, x, lam):
        return p.f(x) + jnp.vdot(lam, p.eq(x))

    def _first_order(self, p, x, lam):
        """``(f, ∇ₓL, c, Jᵀc)`` at ``(x, λ)``: ``Jᵀc`` is the violation's gradient."""
        value, grad_f = jax.value_and_grad(p.f)(x)
        c, vjp = jax.vjp(p.eq, x)
        if not p.m_eq:
            return value, grad_f, c, jnp.zeros_like(x)
        return value, grad_f + vjp(lam)[0], c, vjp(c)[0]

    # -- the solver protocol -----------------------------------------------------------------
    def init(self, p, x0, lam0, mu0, key) -> ExactALState:
        del mu0, key
        dtype = x0.dtype
        value, grad_f = jax.value_and_grad(p.f)(x0)
        c, vjp = jax.vjp(p.eq, x0)
        if lam0 is None:
            lam0 = self._least_squares_multiplier(p, x0, grad_f)
        lam0 = jnp.asarray(lam0, dtype)
        grad_l = grad_f + vjp(lam0)[0]
        jt_c = vjp(c)[0]
        return ExactALState(
            x=x0, lam=lam0, mu=jnp.zeros((0,), dtype), value=value, kkt=_kkt(grad_l, c),
            infeasibility=_inf_norm(c), grad_l=grad_l, c=c,
            eta1=jnp.asarray(self.eta1, dtype), eta2=jnp.asarray(self.eta2, dtype), tau=jnp.zeros((), dtype),
            alpha=jnp.zeros((), dtype), step_norm=jnp.asarray(jnp.finfo(dtype).max, dtype), ls_failed=jnp.bool_(False),
            inner_iterations=jnp.int32(0), matvecs=jnp.int32(0), violation_grad=jt_c,
            stuck=self._stationary_violation(jt_c, c).astype(jnp.int32),
        )

    def _stationary_violation(self, jt_c, c):
        """Whether ``x`` is a stationary point of ``½‖c‖²`` with ``c != 0``."""
        return (_inf_norm(c) > 0) & (_inf_norm(jt_c) <= self.infeasible_stationarity * _inf_norm(c))

    def _least_squares_multiplier(self, p, x, grad_f):
        _, jvp = jax.linearize(p.eq, x)
        if p.n + p.m_eq <= (self.sketch_size or 2048):  # dense, as the Newton systems are
            j_mat = jax.vmap(jvp, out_axes=1)(jnp.eye(p.n, dtype=x.dtype)).reshape(p.m_eq, p.n)
            lam = -jnp.linalg.lstsq(j_mat.T, grad_f)[0]
            return jnp.where(jnp.all(jnp.isfinite(lam)), lam, jnp.zeros_like(lam))
        _, vjp = jax.vjp(p.eq, x)
        jjt = lambda v: jvp(vjp(v)[0])  # noqa: E731
        rhs = -jvp(grad_f)
        lam, _ = jax.scipy.sparse.linalg.cg(jjt, rhs, maxiter=2 * p.m_eq + 10, tol=1e-12)
        return jnp.where(jnp.all(jnp.isfinite(lam)), lam, jnp.zeros_like(lam))

    def step(self, p, s: ExactALState, key) -> ExactALState:
        n, m = p.n, p.m_eq
        x, lam = s.x, s.lam
        dtype = x.dtype
        size = p.n + p.m_eq
        width = min(size, self.sketch_size or 2048)
        dense = width >= size
        grad_l_fn = lambda y: jax.grad(self._lagrangian, argnums=1)(p, y, lam)  # noqa: E731
        _, hvp = jax.linearize(grad_l_fn, x)  # H v
        _, jvp = jax.linearize(p.eq, x)  # J v
        _, vjp_c = jax.vjp(p.eq, x)  # Jᵀ w
        g, c = s.grad_l, s.c
        if dense:  # the identity sketch: one exact projection, in the null-space form
            j_mat = (jax.vmap(lambda w: vjp_c(w)[0])(jnp.eye(m, dtype=dtype)) if 0 < m < n  # m reverse
                     else jax.vmap(jvp, out_axes=1)(jnp.eye(n, dtype=dtype)).reshape(m, n))  # or n forward
            ns = _NullSpace(hvp, j_mat, g, c, n, m)
            jvp = lambda v: j_mat @ v  # noqa: E731
            vjp_c = lambda w: (j_mat.T @ w,)  # noqa: E731
        r = jnp.concatenate([g, c])
        r_norm = jnp.linalg.norm(r)
        jt_c = vjp_c(c)[0]
        jjt = lambda v: jvp(vjp_c(v)[0])  # noqa: E731
        h_g, j_g = hvp(g), jvp(g)  # for the merit's directional derivative

        def kmv(z, tau):
            zx, zl = z[:n], z[n:]
            return jnp.concatenate([hvp(zx) + tau * zx + vjp_c(zl)[0], jvp(zx)])

        def solve(tau, delta, key):
            tol = jnp.minimum(delta, jnp.sqrt(r_norm)) * r_norm
            if dense:
                return ns.solve(tau, j_mat, r), jnp.int32(1), jnp.int32(0)

            def cond(c_):
                d, res, j, _ = c_
                return (jnp.linalg.norm(res) > tol) & (j < self.max_inner)

            def body(c_):
                d, res, j, k = c_
                k, sub = jax.random.split(k)
                if self.sketch == "gaussian":
                    sk = jax.random.normal(sub, (size, width), dtype)
                else:
                    idx = jax.random.permutation(sub, size)[:width]
                    sk = jax.nn.one_hot(idx, size, dtype=dtype).T
                y = jax.vmap(lambda col: kmv(col, tau), in_axes=1, out_axes=1)(sk)
                coef = jnp.linalg.lstsq(y.T @ y, sk.T @ res)[0]
                d = d - y @ coef
                return d, kmv(d, tau) + r, j + 1, k

            d0 = jnp.zeros((size,), dtype)
            d, _, j, _ = jax.lax.while_loop(cond, body, (d0, r, jnp.int32(0), key))
            return d, j, j * (width + 1)

        def tangential(dx):
            """``dx`` projected on the null space of ``J`` (least squares on the dense ``J``;
            conjugate gradients on ``J Jᵀ`` without it)."""
            if not m:
                return dx
            if dense:
                return ns.null_basis @ (ns.null_basis.T @ dx)
            y, _ = jax.scipy.sparse.linalg.cg(jjt, jvp(dx), maxiter=2 * m + 10, tol=1e-12)
            return dx - vjp_c(y)[0]

        def phi_dir(d):
            """The directional derivative of ``L + (η₂/2)‖∇ₓL‖²``:
            ``(∇ₓL + η₂ H∇ₓL)·d_x + (c + η₂ J∇ₓL)·d_λ``."""
            return jnp.vdot(g + s.eta2 * h_g, d[:n]) + jnp.vdot(c + s.eta2 * j_g, d[n:])
        target = -0.5 * s.eta2 * r_norm**2
        # the curvature asked of the step: relaxed near a solution, and (by default) in
        # proportion to the Hessian's own scale when that is below 1
        xi = self.xi_b * jnp.minimum(1.0, r_norm)
        if self.xi_scale == "hessian":
            if dense:  # on the null space of J, where the curvature is asked for
                scale = ns.scale
            else:  # the Hessian's magnitude along the gradient, from the product already made
                scale = jnp.linalg.norm(h_g) / jnp.maximum(jnp.linalg.norm(g), jnp.finfo(dtype).tiny)
            xi = xi * jnp.minimum(1.0, scale)

        # -- step 2: a direction along which the merit decreases enough --------------------
        class Repair(NamedTuple):
            d: Any
            tau: Any
            delta: Any
            eta1: Any
            ok: Any
            tries: Any
            inner: Any
            matvecs: Any
            key: Any

        def repair_cond(rp: Repair):
            return (~rp.ok) & (rp.tries < self.max_repairs)

        def repair_body(rp: Repair):
            k, sub = jax.random.split(rp.key)
            d, j, mv = solve(rp.tau, rp.delta, sub)
            dx = d[:n]
            # the reduced Hessian must have curvature >= ξ_B along the step's tangential part
            t = tangential(dx)
            tt = jnp.vdot(t, t)
            curvature = jnp.vdot(t, ns.hess(t) if dense else hvp(t)) + rp.tau * tt
            flat = (tt > 0) & (curvature < xi * tt)
            shift = jnp.maximum(10.0 * rp.tau, rp.tau + 1.01 * (xi * tt - curvature) / jnp.where(tt > 0, tt, 1.0))
            a = phi_dir(d)
            b = jnp.vdot(jt_c, dx)  # the derivative of ‖c‖²/2 along d
            fine = (~flat) & (a + rp.eta1 * b <= target)
            by_penalty = (~flat) & (~fine) & (b < 0)
            needed = (target - a) / jnp.where(b < 0, b, -1.0)  # a + η b <= target  <=>  η >= needed
            powers = jnp.ceil(jnp.log(jnp.maximum(needed / rp.eta1, 1.0)) / jnp.log(self.nu))
            eta1 = jnp.where(by_penalty, rp.eta1 * self.nu ** jnp.maximum(powers, 1.0), rp.eta1)
            tighten = (~flat) & (~fine) & (~by_penalty)
            tau = jnp.where(flat, shift, rp.tau)
            delta = jnp.where(tighten, rp.delta * 0.1, rp.delta)
            return Repair(d, tau, delta, eta1, fine | by_penalty, rp.tries + 1, rp.inner + j, rp.matvecs + mv, k)

        start = Repair(jnp.zeros((size,), dtype), 0.1 * s.tau, jnp.asarray(self.delta, dtype), s.eta1,
                       jnp.bool_(False), jnp.int32(0), jnp.int32(0), jnp.int32(0), key)
        rp = jax.lax.while_loop(repair_cond, repair_body, start)
        d, eta1 = rp.d, rp.eta1
        d_phi = phi_dir(d) + eta1 * jnp.vdot(jt_c, d[:n])

        # -- step 3: Armijo backtracking on the exact augmented Lagrangian ---------------------
        phi0 = s.value + jnp.vdot(lam, c) + 0.5 * eta1 * jnp.vdot(c, c) + 0.5 * s.eta2 * jnp.vdot(g, g)
        dx, dl = d[:n], d[n:]

        def trial(alpha):
            """The merit at ``(x, λ) + α d``, with the first-order information found on the way."""
            value, g_t, c_t, jt_c_t = self._first_order(p, x + alpha * dx, lam + alpha * dl)
            lag = value + jnp.vdot(lam + alpha * dl, c_t)
            return (lag + 0.5 * eta1 * jnp.vdot(c_t, c_t) + 0.5 * s.eta2 * jnp.vdot(g_t, g_t),
                    (value, g_t, c_t, jt_c_t))

        def ls_cond(carry):
            alpha, phi, _, i = carry
            return ~(phi <= phi0 + self.beta * alpha * d_phi) & (i < self.max_backtracks)

        def ls_body(carry):
            alpha, _, _, i = carry
            alpha = 0.5 * alpha
            phi, info = trial(alpha)
            return alpha, phi, info, i + 1

        one = jnp.ones((), dtype)
        phi1, info1 = trial(one)
        alpha, phi, info, _ = jax.lax.while_loop(ls_cond, ls_body, (one, phi1, info1, jnp.int32(0)))
        accepted = (phi <= phi0 + self.beta * alpha * d_phi) & jnp.isfinite(phi)
        alpha = jnp.where(accepted, alpha, jnp.zeros((), dtype))
        x_new, lam_new = x + alpha * dx, lam + alpha * dl
        value, g_new, c_new, jt_c_new = jax.tree.map(lambda a, b: jnp.where(accepted, a, b), info,
                                                     (s.value, g, c, s.violation_grad))
        stationary = self._stationary_violation(jt_c_new, c_new)
        return ExactALState(
            x=x_new, lam=lam_new, mu=s.mu, value=value, kkt=_kkt(g_new, c_new), infeasibility=_inf_norm(c_new),
            grad_l=g_new, c=c_new, eta1=eta1, eta2=s.eta2, tau=rp.tau, alpha=alpha,
            step_norm=alpha * jnp.linalg.norm(d), ls_failed=~accepted,
            inner_iterations=s.inner_iterations + rp.inner, matvecs=s.matvecs + rp.matvecs + (ns.products if dense else 0),
            violation_grad=jt_c_new, stuck=jnp.where(stationary, s.stuck + 1, 0).astype(jnp.int32),
        )

    def terminate(self, p, s: ExactALState, tol):
        del p
        converged = s.kkt <= tol
        stalled = (~converged) & (s.step_norm <= 1e-14 * (1.0 + jnp.linalg.norm(s.x))) & ~s.ls_failed
        failed = (~converged) & s.ls_failed
        # at a stationary point of the violation, with the violation above the tolerance
        infeasible = (~converged) & (s.infeasibility > tol) & (s.stuck >= 1) & (
            (s.stuck >= self.infeasible_patience) | failed | stalled)
        result = jnp.where(converged, RESULTS.successful,
                           jnp.where(infeasible, RESULTS.infeasible,
                                     jnp.where(failed, RESULTS.line_search_failed,
                                               jnp.where(stalled, RESULTS.stagnated, RESULTS.successful))))
        return converged | infeasible | failed | stalled, result.astype(jnp.int32)

    def stats(self, s: ExactALState) -> dict:
        return {"inner_iterations": int(s.inner_iterations), "matvecs": int(s.matvecs),
                "eta1": float(s.eta1), "tau": float(s.tau)}


def _inf_norm(v) -> jax.Array:
    return jnp.max(jnp.abs(v), initial=0.0)


def _kkt(grad_l, c) -> jax.Array:
    return jnp.maximum(_inf_norm(grad_l), _inf_norm(c))


class _NullSpace:
    """The dense Newton system ``K d = -r`` in the basis ``U = [Y Z]`` of ``Jᵀ``'s left
    singular vectors (``Y`` spans ``range(Jᵀ)``, ``Z`` the null space of ``J``).

    With ``J`` of full row rank the range part of the step is fixed by ``J dx = -c`` alone,
    so only ``H Z`` (``n - m`` Hessian-vector products) and ``H (Y w_y)`` (one) are made:
    a problem with as many constraints as unknowns forms no Hessian at all. Where ``J`` loses
    rank (or ``m > n``), the products with ``Y`` are made too and ``K`` is solved whole (LU;
    least squares where it is singular)."""

    def __init__(self, hvp, j_mat, g, c, n, m):
        dtype = j_mat.dtype
        k = min(n, m)
        if m:
            u, sv, vt = jnp.linalg.svd(j_mat.T, full_matrices=True)  # Jᵀ = U[:, :k] diag(sv) vt[:k]
            ok = sv > sv[0] * max(n, m) * jnp.finfo(dtype).eps
            full_rank = jnp.all(ok) if m <= n else jnp.bool_(False)
        else:
            u, sv, vt = jnp.eye(n, dtype=dtype), jnp.zeros((0,), dtype), jnp.zeros((0, 0), dtype)
            ok, full_rank = jnp.zeros((0,), bool), jnp.bool_(True)
        y, z = u[:, :k], u[:, k:]
        products = lambda basis: jax.vmap(hvp, in_axes=1, out_axes=1)(basis)  # noqa: E731
        hz = products(z) if n > k else jnp.zeros((n, 0), dtype)
        if not m:
            hy = jnp.zeros((n, 0), dtype)
        elif m > n:
            hy = products(y)
        else:
            hy = jax.lax.cond(full_rank, lambda: jnp.zeros((n, k), dtype), lambda: products(y))
        self.u, self.y, self.z, self.vt, self.hz = u, y, z, vt, hz
        self.hu = jnp.concatenate([hy, hz], axis=1)  # H U (H Y zero where unneeded)
        self.full_rank, self.static_full = full_rank, (m == 0)
        self.dense_only = m > n
        self.sv = jnp.where(ok, sv, 1.0)
        self.g, self.n, self.m = g, n, m
        null = jnp.concatenate([~ok, jnp.ones((n - k,), bool)]) if m else jnp.ones((n,), bool)
        self.null_basis = u * null[None, :]
        # the range part of the step, and H along it (one product)
        self.w_y = -(vt[:k] @ c) / self.sv if m <= n else jnp.zeros((k,), dtype)
        self.yw = y @ self.w_y
        self.h_yw = hvp(self.yw) if (m and m <= n) else jnp.zeros((n,), dtype)
        cols = (n - k) + jnp.where(full_rank, 0, k)
        self.products = cols + (1 if (m and m <= n) else 0) + 1  # + H∇ₓL for the merit
        self.scale = jnp.where(cols > 0, jnp.linalg.norm(self.hu) / jnp.sqrt(jnp.maximum(cols, 1).astype(dtype)), 1.0)

    def hess(self, t):
        """``H t`` for ``t`` in the null space of ``J`` (any ``t`` where ``J`` lost rank)."""
        return self.hu @ (self.u.T @ t)

    def solve(self, tau, j_mat, r):
        n, m = self.n, self.m
        dtype = r.dtype

        def reduced():
            zt = self.z.T
            hzz = zt @ self.hz
            a = 0.5 * (hzz + hzz.T) + tau * jnp.eye(n - min(n, m), dtype=dtype)
            rhs = -(zt @ (self.g + self.h_yw))
            w_z = jnp.linalg.solve(a, rhs)
            w_z = jax.lax.cond(jnp.all(jnp.isfinite(w_z)), lambda: w_z, lambda: jnp.linalg.lstsq(a, rhs)[0])
            dx = self.yw + self.z @ w_z
            if not m:
                return dx
            rest = self.y.T @ (self.g + self.h_yw + self.hz @ w_z) + tau * self.w_y
            return jnp.concatenate([dx, -self.vt.T @ (rest / self.sv)])

        def whole():
            h = self.hu @ self.u.T
            h = 0.5 * (h + h.T) + tau * jnp.eye(n, dtype=dtype)
            kmat = jnp.block([[h, j_mat.T], [j_mat, jnp.zeros((m, m), dtype)]])
            d = -jnp.linalg.solve(kmat, r)
            return jax.lax.cond(jnp.all(jnp.isfinite(d)), lambda: d, lambda: -jnp.linalg.lstsq(kmat, r)[0])

        if self.static_full:
            return reduced()
        if self.dense_only:
            return whole()
        return jax.lax.cond(self.full_rank, reduced, whole)
