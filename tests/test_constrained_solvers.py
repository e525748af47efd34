"""The solvers AugmentedLagrangian and StochasticLagrangian against known optima.

A solver × problem matrix (in the style of optimistix's tests): HS71 (equality, inequality
and bounds; f* = 17.0140173), an equality-constrained QP (its optimum solves the KKT linear
system) and a bound-constrained Rosenbrock function (optimum on the bound, in closed form).
The KKT residual of each result is recomputed here from the problem's own functions and the
returned multipliers. Then: infeasible problems are detected (never reported successful),
runs are deterministic, and a constraint in expectation is solved by StochasticLagrangian,
with statistical checks of the answer and of the unbiasedness of its gradient estimate.
Deterministic problems run in float64; the stochastic ones in float32 (their noise is far
above its rounding, and they compile faster).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import estimax as ex
from estimax.solvers import RESULTS, AugmentedLagrangian, ExactAL, StochasticLagrangian
from estimax.solvers._problem import Problem
from estimax.testing import assert_unbiased
from estimax.transforms._constraints import split


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


f64 = pytest.mark.usefixtures("x64")


# --- the problems, as plain functions (for the independent KKT check) and as programs ----------
@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    f: Callable
    eq: Callable | None  # eq(x) == 0
    le: Callable | None  # le(x) <= 0
    x0: tuple
    bounds: tuple | None
    x_star: tuple
    f_star: float

    def program(self):
        return _PROGRAMS[self.name]

    def bounds_arrays(self):
        if self.bounds is None:
            return None
        return tuple(jnp.asarray(b, jnp.float64) for b in self.bounds)


def _hs71_f(x):
    return x[0] * x[3] * (x[0] + x[1] + x[2]) + x[2]


HS71 = Case(
    "hs71", _hs71_f,
    eq=lambda x: jnp.sum(x**2, keepdims=True) - 40.0,
    le=lambda x: 25.0 - jnp.prod(x, keepdims=True),
    x0=(1.0, 5.0, 5.0, 1.0), bounds=((1.0,) * 4, (5.0,) * 4),
    x_star=(1.0, 4.74299963, 3.82114998, 1.37940829), f_star=17.0140173,
)

# the equality QP  min ½xᵀQx + qᵀx  s.t.  Ax = b:  [[Q, Aᵀ], [A, 0]] (x, λ) = (-q, b)
_Q = np.array([[4.0, 1.0, 0.0, 0.0], [1.0, 3.0, 0.5, 0.0], [0.0, 0.5, 2.0, 0.2], [0.0, 0.0, 0.2, 1.0]])
_q = np.array([1.0, -2.0, 0.5, 1.0])
_A = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 2.0, 0.0]])
_b = np.array([1.0, 0.5])
_KKT = np.block([[_Q, _A.T], [_A, np.zeros((2, 2))]])
_QP_SOLUTION = np.linalg.solve(_KKT, np.concatenate([-_q, _b]))
QP = Case(
    "eq_qp",
    lambda x: 0.5 * x @ jnp.asarray(_Q) @ x + jnp.asarray(_q) @ x,
    eq=lambda x: jnp.asarray(_A) @ x - jnp.asarray(_b), le=None,
    x0=(0.0, 0.0, 0.0, 0.0), bounds=None,
    x_star=tuple(_QP_SOLUTION[:4]),
    f_star=float(0.5 * _QP_SOLUTION[:4] @ _Q @ _QP_SOLUTION[:4] + _q @ _QP_SOLUTION[:4]),
)

# Rosenbrock on [-2, 0.5] x [-2, 2]: the optimum (0.5, 0.25) is on the bound x₀ <= 0.5, where
# ∂f/∂x₀ = -2(1 - x₀) = -1, so the bound's multiplier is 1; f* = (1 - 0.5)² = 0.25.
BOUNDED = Case(
    "bounded_rosenbrock",
    lambda x: (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2,
    eq=None, le=None,
    x0=(-1.2, 1.0), bounds=((-2.0, -2.0), (0.5, 2.0)),
    x_star=(0.5, 0.25), f_star=0.25,
)

CASES = {c.name: c for c in (HS71, QP, BOUNDED)}


def _as_program(case: Case):
    def program(x):
        if case.eq is not None:
            ex.subject_to(eq=case.eq(x), name="eq")
        if case.le is not None:
            ex.subject_to(le=case.le(x), name="le")
        return case.f(x)

    program.__name__ = case.name
    return ex.expectation(program)  # one program object per case: ex.solve reuses its compilation


_PROGRAMS = {name: _as_program(c) for name, c in CASES.items()}


def _solve(case: Case, solver, **kw):
    x0 = jnp.asarray(case.x0, jnp.float64)
    return ex.solve(case.program(), x0, solver=solver, bounds=case.bounds_arrays(), **kw)


def _kkt_residual(case: Case, sol) -> float:
    """max(‖∇f + J_cᵀλ + J_gᵀμ‖∞, ‖c‖∞, ‖max(0, g)‖∞, ‖μ ⊙ g‖∞), from the case's own functions."""
    x = jnp.asarray(sol.params)
    grad = jax.grad(case.f)(x)
    parts = []
    if case.eq is not None:
        c = case.eq(x)
        grad = grad + jax.vjp(case.eq, x)[1](jnp.asarray(sol.multipliers["eq"]).reshape(c.shape))[0]
        parts.append(np.abs(c))
    gs, mus = [], []
    if case.le is not None:
        g = case.le(x)
        mu = jnp.asarray(sol.multipliers["le"]).reshape(g.shape)
        grad = grad + jax.vjp(case.le, x)[1](mu)[0]
        gs.append(g)
        mus.append(mu)
    if case.bounds is not None:
        lower, upper = (jnp.asarray(b, jnp.float64) for b in case.bounds)
        mu_lo, mu_hi = sol.multipliers["bounds/lower"], sol.multipliers["bounds/upper"]
        grad = grad - mu_lo + mu_hi
        gs += [lower - x, x - upper]
        mus += [mu_lo, mu_hi]
    for g, mu in zip(gs, mus):
        assert np.all(np.asarray(mu) >= 0), "inequality multipliers must be >= 0"
        parts += [np.maximum(0.0, g), np.abs(mu * g)]
    parts.append(np.abs(grad))
    return float(max(np.max(np.asarray(p)) for p in parts))


# --- the solver × problem matrix ---------------------------------------------------------------
# StochasticLagrangian on a deterministic problem is plain gradient descent–ascent with Adam:
# with a decaying learning rate it converges on the QP and on the bounded problem; on HS71, with
# a constant one, its iterate jitters at the scale of the learning rate and it uses its budget
# (marked slow: many steps).
SOLVERS = {
    "al": (AugmentedLagrangian(), dict(tol=1e-8), dict(x=1e-6, f=1e-7, kkt=1e-7)),
    "sl": (StochasticLagrangian(optimizer=optax.adam(optax.cosine_decay_schedule(2e-2, 6000, alpha=0.01)),
                                dual_lr=0.1, rho=10.0, max_steps=6000),
           dict(tol=1e-8), dict(x=1e-6, f=1e-7, kkt=1e-7)),
    "sl_long": (StochasticLagrangian(dual_lr=0.1, rho=10.0, max_steps=20000),
                dict(tol=1e-8), dict(x=2e-4, f=1e-5, kkt=2e-3)),
}
MATRIX = [("al", "hs71"), ("al", "eq_qp"), ("al", "bounded_rosenbrock"), ("sl", "eq_qp"),
          ("sl", "bounded_rosenbrock"), pytest.param("sl_long", "hs71", marks=pytest.mark.slow)]


@f64
@pytest.mark.parametrize("solver_name, case_name", MATRIX)
def test_known_optimum(solver_name, case_name):
    case = CASES[case_name]
    solver, options, tols = SOLVERS[solver_name]
    sol = _solve(case, solver, **options)
    if solver_name != "sl_long":
        assert sol.result == RESULTS.successful, sol.message
        assert sol.kkt <= options["tol"]
        assert sol.steps <= (30 if solver_name == "al" else 6000)
    else:  # a KKT residual of 1e-8 is out of reach of Adam with a constant step
        assert sol.result == RESULTS.max_steps_reached
    np.testing.assert_allclose(np.asarray(sol.params), case.x_star, atol=tols["x"], rtol=0)
    assert abs(sol.value - case.f_star) <= tols["f"] * max(1.0, abs(case.f_star))
    assert _kkt_residual(case, sol) <= tols["kkt"]
    # the history starts at the initial point and ends at the returned one
    assert len(sol.history["kkt"]) == sol.steps + 1
    assert sol.history["kkt"][-1] == pytest.approx(sol.kkt)
    if solver_name == "al":
        assert sol.stats["inner_iterations"] > 0


@f64
def test_hs71_multipliers():
    sol = _solve(HS71, AugmentedLagrangian(), tol=1e-8)
    # the known multipliers of HS71 (IPOPT's example, in our sign convention)
    assert float(sol.multipliers["eq"][0]) == pytest.approx(0.161468, abs=1e-5)
    assert float(sol.multipliers["le"][0]) == pytest.approx(0.552294, abs=1e-5)
    np.testing.assert_allclose(np.asarray(sol.multipliers["bounds/lower"]), [1.087871, 0, 0, 0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(sol.multipliers["bounds/upper"]), 0.0, atol=1e-8)


@f64
def test_equality_qp_multipliers_solve_the_kkt_system():
    sol = _solve(QP, AugmentedLagrangian(), tol=1e-8)
    np.testing.assert_allclose(np.asarray(sol.multipliers["eq"]), _QP_SOLUTION[4:], atol=1e-6)


# --- infeasible problems -------------------------------------------------------------------------
@ex.expectation
def _contradictory_bounds(x):
    ex.subject_to(le=x + 1.0, name="at_most_minus_one")  # x <= -1
    ex.subject_to(ge=x - 1.0, name="at_least_one")  # x >= 1
    return jnp.sum(x**2)


@ex.expectation
def _negative_norm(x):
    ex.subject_to(eq=jnp.sum(x**2) + 1.0, name="impossible")  # ‖x‖² + 1 = 0
    return jnp.sum(x)


@f64
@pytest.mark.parametrize("program, x0", [(_contradictory_bounds, [0.3]),
                                         pytest.param(_negative_norm, [0.5, -1.0], marks=pytest.mark.slow)],
                         ids=["x<=-1_and_x>=1", "norm2+1=0"])
def test_infeasible_problem_is_detected(program, x0):
    sol = ex.solve(program, jnp.asarray(x0, jnp.float64), solver=AugmentedLagrangian())
    assert sol.result == RESULTS.infeasible, sol
    assert not sol.success
    assert sol.infeasibility >= 0.99  # the violation's least value is 1 for both problems
    assert sol.steps < AugmentedLagrangian().max_steps
    with pytest.raises(ex.solvers.SolverError, match="infeasible"):
        ex.solve(program, jnp.asarray(x0, jnp.float64), solver=AugmentedLagrangian(), throw=True)


@ex.expectation
def _square_plus_one(x):
    ex.subject_to(eq=x[0] ** 2 + 1.0, name="impossible")  # x0² + 1 = 0
    ex.subject_to(eq=x[1] - 2.0, name="fine")
    return x[0] ** 2 + x[1] ** 2


@ex.expectation
def _noisy_negative_norm(x):
    noise = ex.sample(dist.Normal(0.0, 0.3), name="noise")
    ex.subject_to(eq=jnp.sum(x**2) + 1.0 + noise, name="impossible")  # E: ‖x‖² + 1 = 0
    return jnp.sum(x)


_INFEASIBLE = {
    "default-x0^2+1=0": (_square_plus_one, [1.0, 0.0], None),
    "exact_al-norm2+1=0": (_negative_norm, [0.5, -1.0], ExactAL()),
    "exact_al-x0^2+1=0": (_square_plus_one, [1.0, 0.0], ExactAL()),
    "al-x0^2+1=0": (_square_plus_one, [1.0, 0.0], AugmentedLagrangian()),
    "sl-bounds": (_contradictory_bounds, [0.3], StochasticLagrangian(max_steps=5000)),
    "sl-norm2+1=0": (_negative_norm, [0.5, -1.0], StochasticLagrangian(max_steps=5000)),
    "sl-noisy-norm2+1=0": (_noisy_negative_norm, [0.5, -1.0], StochasticLagrangian(max_steps=5000)),
}


@f64
@pytest.mark.parametrize("case", list(_INFEASIBLE))
def test_every_solver_reports_an_infeasible_problem(case):
    """Each solver, and the default choice, stops an infeasible problem with RESULTS.infeasible
    (a stationary point of the violation with the violation above the tolerance), before its
    step budget, with a message that says what it means; `throw=True` raises it."""
    program, x0, solver = _INFEASIBLE[case]
    x0 = jnp.asarray(x0, jnp.float64)
    sol = ex.solve(program, x0, solver=solver, key=jax.random.PRNGKey(3))
    assert sol.result == RESULTS.infeasible, (sol.result, sol.steps, sol.params)
    assert not sol.success and sol.infeasibility >= 0.9  # the least violation is 1 in every case
    assert "infeasible" in sol.message and "stationary point of the constraint violation" in sol.message
    assert sol.steps < (getattr(solver, "max_steps", None) or 1000)
    with pytest.raises(ex.solvers.SolverError, match="infeasible"):
        ex.solve(program, x0, solver=solver, key=jax.random.PRNGKey(3), throw=True)


def test_stochastic_lagrangian_never_reports_an_infeasible_problem_solved():
    sol = ex.solve(_contradictory_bounds, jnp.asarray([0.3]), solver=StochasticLagrangian(max_steps=300))
    assert sol.result == RESULTS.max_steps_reached
    assert sol.infeasibility >= 0.9


# --- determinism -----------------------------------------------------------------------------------
@f64
def test_augmented_lagrangian_is_deterministic():
    a = _solve(HS71, AugmentedLagrangian(), tol=1e-8)
    b = _solve(HS71, AugmentedLagrangian(), tol=1e-8, key=jax.random.PRNGKey(7))
    np.testing.assert_array_equal(np.asarray(a.params), np.asarray(b.params))
    for k in ("value", "kkt", "infeasibility"):
        np.testing.assert_array_equal(a.history[k], b.history[k])


# --- a constraint in expectation ---------------------------------------------------------------------
# min E[(x - ξ)²]  s.t.  E[ξ x] - 1 <= 0,  ξ ~ Normal(m, s).  E[(x - ξ)²] = (x - m)² + s² and
# E[ξ x] = m x: with m = 2 the unconstrained optimum x = m violates m x <= 1, so the constraint
# is active: x* = 1/m = 0.5, and stationarity 2(x* - m) + μ* m = 0 gives μ* = 2(m - x*)/m = 1.5;
# the optimal value is (x* - m)² + s² = 3.25 for s = 1.
M, S = 2.0, 1.0
X_STAR, MU_STAR, F_STAR = 1.0 / M, 2.0 * (M - 1.0 / M) / M, (1.0 / M - M) ** 2 + S**2


@ex.expectation
def _budget(x, m, s):
    xi = ex.sample(dist.Normal(m, s), name="xi")
    ex.subject_to(le=xi * x - 1.0, name="budget")
    return (x - xi) ** 2


STEPS = 1500
SEEDS = 6
_STOCHASTIC = StochasticLagrangian(
    optimizer=optax.adam(optax.cosine_decay_schedule(0.05, STEPS, alpha=0.01)),
    dual_lr=optax.cosine_decay_schedule(0.1, STEPS, alpha=0.01), max_steps=STEPS,
)


def _budget_run(seed: int):
    return ex.solve(_budget, jnp.asarray(0.0), M, S, solver=_STOCHASTIC, key=jax.random.PRNGKey(seed))


def test_stochastic_lagrangian_solves_a_constraint_in_expectation():
    runs = [_budget_run(seed) for seed in range(SEEDS)]
    xs = np.array([float(r.params) for r in runs])
    mus = np.array([float(r.multipliers["budget"]) for r in runs])
    for r in runs:
        assert r.result == RESULTS.max_steps_reached  # the noisy KKT residual stays above 1e-6
        assert r.stats["solver"] == StochasticLagrangian.name
    # Each run's final iterate is x* + (a deterministic bias, negligible here: the saddle point
    # of the augmented Lagrangian is exactly (x*, μ*), and the steps decay) + noise, the noise
    # being independent across seeds. Its spread `sd` between seeds measures the optimizer's
    # noise at the end of the run (the step sizes decay, so the iterate's jitter freezes at the
    # scale of the late step sizes); the mean of SEEDS runs has standard error sd/√SEEDS, and a
    # correct solver puts x* within 5 standard errors of it. The spread itself must be small:
    # Adam's steps are of the order of its learning rate, here at most 0.05 and decaying, so a
    # spread above 0.1 would mean the iteration does not settle.
    for values, exact in ((xs, X_STAR), (mus, MU_STAR)):
        sd = values.std(ddof=1)
        assert 0 < sd < 0.1 * max(1.0, exact)
        assert abs(values.mean() - exact) <= 5 * sd / np.sqrt(SEEDS), (values, exact)
    # the value and the infeasibility are reported from moving averages of the estimates (the
    # 0.05 allows for the average's lag behind the iterate in the last ~100 steps)
    values = np.array([r.value for r in runs])
    assert abs(values.mean() - F_STAR) <= 5 * values.std(ddof=1) / np.sqrt(SEEDS) + 0.05
    assert max(r.infeasibility for r in runs) < 0.3
    # same key, same run: the iterates and the whole history are identical
    again = _budget_run(0)
    assert float(again.params) == xs[0]
    for k in ("value", "kkt", "infeasibility"):
        np.testing.assert_array_equal(again.history[k], runs[0].history[k])
    assert len({float(x) for x in xs}) == SEEDS  # other keys, other runs


def _bound_problem():
    args = (jnp.asarray(0.0), M, S)
    problem = Problem(split(_budget, args), args[0])
    return problem.bind(jax.tree_util.tree_leaves(args[1:]))


def test_stochastic_lagrangian_gradient_estimate_is_unbiased():
    """At a fixed (x, s'; μ), the estimate of (∇ₓL_ρ, ∇ₛL_ρ) averages to the exact gradient of
    L_ρ = (x - m)² + s² + μ(m x - 1 + s') + (ρ/2)(m x - 1 + s')², s' the slack."""
    p = _bound_problem()
    rho = 2.0
    x, slack, mu = jnp.asarray([1.0]), jnp.asarray([0.3]), jnp.asarray([0.7])
    lam = jnp.zeros((0,))
    solver = StochasticLagrangian(rho=rho)
    residual = M * x - 1.0 + slack
    exact = (2.0 * (x - M) + M * (mu + rho * residual), mu + rho * residual)

    def estimate(key):
        gx, gs, *_ = solver.gradient_estimate(p, x, slack, lam, mu, key)
        return gx, gs

    assert_unbiased(estimate, exact, seed="sl-gradient", n=10_000)

    # the test has the power to see the bias of the naive estimator, which takes the value and
    # the Jacobian of the constraint from one sample: E[ξ (μ + ρ(ξ x - 1 + s'))] exceeds the
    # exact m (μ + ρ(m x - 1 + s')) by ρ s² x = 2, tens of standard errors here.
    def naive(key):
        g, vjp = jax.vjp(lambda y: p.ineq(y, key), x)
        w = mu + rho * (g + slack)
        return jax.grad(p.f)(x, jax.random.split(key)[0]) + vjp(w)[0], w

    with pytest.raises(AssertionError, match="mean"):
        assert_unbiased(naive, exact, seed="sl-gradient-naive", n=10_000)


# --- what each solver accepts ------------------------------------------------------------------------
def test_augmented_lagrangian_refuses_a_stochastic_problem():
    with pytest.raises(ex.ProgramError, match="StochasticLagrangian"):
        ex.solve(_budget, jnp.asarray(0.0), M, S, solver=AugmentedLagrangian())


@pytest.mark.parametrize("bad", [dict(rho0=0.0), dict(growth=1.0), dict(decrease=1.5), dict(max_inner=0),
                                 dict(rho0=10.0, rho_max=1.0)])
def test_augmented_lagrangian_options_are_checked(bad):
    with pytest.raises(ex.ArgumentError, match="|".join(bad)):  # the message names the option
        AugmentedLagrangian(**bad)


@pytest.mark.parametrize("bad", [dict(optimizer="adam"), dict(dual_lr=-1.0), dict(rho=-1.0), dict(ema=1.0),
                                 dict(max_steps=0)])
def test_stochastic_lagrangian_options_are_checked(bad):
    with pytest.raises(ex.ArgumentError, match="|".join(bad)):  # the message names the option
        StochasticLagrangian(**bad)


def test_default_solvers_are_equal_so_compilations_are_reused():
    assert AugmentedLagrangian() == AugmentedLagrangian()
    assert StochasticLagrangian() == StochasticLagrangian()
    assert hash(StochasticLagrangian()) == hash(StochasticLagrangian())
