"""``ex.argmin``: inner problems as values, and their hypergradients, against closed forms.

Ridge regression (unconstrained inner problem) has a closed-form solution, so its
hypergradient, forward and reverse, and its second derivatives are exact here; an
equality-constrained projection and a separable inequality-constrained problem have closed
forms too. Implicit and (long) unrolled hypergradients agree; a truncated unrolled one does
not, and says so in its certificate. A stochastic outer program with an inner argmin is
unbiased (a statistical test against quadrature). Then the errors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import estimax as ex
from problems import Compiles as _Compiles
from estimax.solvers import RESULTS
from estimax.testing import assert_unbiased


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _data(n=40, d=6, seed=0):
    rng = np.random.default_rng(seed)
    X, Xv = rng.standard_normal((n, d)), rng.standard_normal((n // 2, d))
    w = rng.standard_normal(d)
    return X, X @ w + 0.5 * rng.standard_normal(n), Xv, Xv @ w + 0.5 * rng.standard_normal(n // 2)


X, Y, XV, YV = _data()  # NumPy float64: the tests run in float64
D = X.shape[1]


def ridge(w, log_lam, X, y):
    return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.sum(jnp.exp(log_lam) * w**2)


def val_loss(w):
    return 0.5 * jnp.mean((XV @ w - YV) ** 2)


def outer(log_lam, **kw):
    return val_loss(ex.argmin(ridge, jnp.zeros(D), log_lam, X, Y, **kw))


def outer_exact(log_lam):
    a = X.T @ X / X.shape[0] + jnp.diag(jnp.exp(log_lam) * jnp.ones(D))
    return val_loss(jnp.linalg.solve(a, X.T @ Y / X.shape[0]))


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


SCALAR, PER_FEATURE = np.asarray(-1.0), np.linspace(-2.0, 0.5, D)

METHODS = [
    dict(),  # "auto": the dense solve at this size
    dict(linear_solver="cg"),
    dict(linear_solver="gmres"),
    dict(linear_solver="neumann"),
    dict(solver=ex.solvers.Newton(linear_solver="cg")),
    dict(solver=ex.solvers.LBFGS()),
    dict(method="unrolled", steps=3),  # Newton(line_search=False): exact after one step on a quadratic
]


@pytest.mark.parametrize("kw", METHODS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_ridge_hypergradient_matches_the_closed_form(kw):
    """A scalar penalty and one per feature, in one compiled call."""
    grads = jax.jit(lambda a, b: (jax.grad(lambda l: outer(l, **kw))(a), jax.grad(lambda l: outer(l, **kw))(b)))
    # L-BFGS stops at ‖∇f‖ <= 1e-10, so its solution (and hypergradient) is that close
    tol = 1e-7 if isinstance(kw.get("solver"), ex.solvers.LBFGS) else 1e-9
    for g, lam in zip(grads(SCALAR, PER_FEATURE), (SCALAR, PER_FEATURE)):
        assert _rel(g, jax.grad(outer_exact)(lam)) < tol


def test_forward_mode_second_order_and_vmap():
    v = jnp.arange(1.0, D + 1.0)
    lams = jnp.linspace(-2.0, 1.0, 5)

    @jax.jit
    def derivatives(lam):
        return (jax.jacfwd(outer)(lam), jax.hessian(outer)(lam),
                jax.jvp(jax.grad(outer), (lam,), (v,))[1],  # forward over reverse
                jax.vmap(jax.grad(outer))(lams))

    fwd, hess, hvp, batched = derivatives(PER_FEATURE)
    assert _rel(fwd, jax.grad(outer_exact)(PER_FEATURE)) < 1e-9
    assert _rel(hess, jax.hessian(outer_exact)(PER_FEATURE)) < 1e-8
    assert _rel(hvp, jax.hessian(outer_exact)(PER_FEATURE) @ v) < 1e-8
    assert _rel(batched, jax.vmap(jax.grad(outer_exact))(lams)) < 1e-9


def test_closed_over_values_get_derivatives():
    def outer_closure(log_lam):
        w = ex.argmin(lambda w: ridge(w, log_lam, X, Y), jnp.zeros(D))
        return val_loss(w)

    assert _rel(jax.jit(jax.grad(outer_closure))(PER_FEATURE), jax.grad(outer_exact)(PER_FEATURE)) < 1e-9


def test_inner_value_is_differentiable_by_the_envelope_theorem():
    def value(log_lam):
        _, info = ex.argmin(ridge, jnp.zeros(D), log_lam, X, Y, full_output=True)
        return info.value

    def value_exact(log_lam):
        a = X.T @ X / X.shape[0] + jnp.diag(jnp.exp(log_lam) * jnp.ones(D))
        return ridge(jnp.linalg.solve(a, X.T @ Y / X.shape[0]), log_lam, X, Y)

    assert _rel(jax.grad(value)(PER_FEATURE), jax.grad(value_exact)(PER_FEATURE)) < 1e-9


def test_eager_grad_stages_the_inner_solve_once():
    """A second eager ``jax.grad`` through ``ex.argmin`` compiles nothing, and agrees with the
    compiled one and the closed form."""
    hypergradient = jax.grad(outer)
    hypergradient(PER_FEATURE)
    with _Compiles() as again:
        eager = hypergradient(PER_FEATURE + 0.25)
    assert again.n == 0
    np.testing.assert_allclose(eager, jax.jit(hypergradient)(PER_FEATURE + 0.25), rtol=1e-12, atol=1e-15)
    assert _rel(eager, jax.grad(outer_exact)(PER_FEATURE + 0.25)) < 1e-9


SHIFT = {"number": 1.0, "array": np.ones(3)}


def shifted(w, t):  # closes over a Python number and an array, both read when it is traced
    return 0.5 * jnp.sum((w - SHIFT["number"] * SHIFT["array"] * t) ** 2)


def test_changed_closed_over_values_give_their_own_answers():
    """``w* = c a t``, so ``d/dt |w*|² = 2 (c a)² t``: a changed number is another problem
    (compiled again), a changed array the same one with another input (nothing compiled)."""
    t = jnp.array([0.5, -1.0, 2.0])
    hypergradient = jax.grad(lambda t: jnp.sum(ex.argmin(shifted, jnp.zeros(3), t) ** 2))
    try:
        np.testing.assert_allclose(hypergradient(t), 2 * t, rtol=1e-12)
        SHIFT["number"] = 2.0
        np.testing.assert_allclose(hypergradient(t), 8 * t, rtol=1e-12)
        SHIFT["array"] = np.array([1.0, 3.0, -1.0])
        with _Compiles() as compiles:
            g = hypergradient(t)
        assert compiles.n == 0
        np.testing.assert_allclose(g, 2 * (2.0 * SHIFT["array"]) ** 2 * t, rtol=1e-12)
    finally:
        SHIFT.update(number=1.0, array=np.ones(3))


def test_staged_solves_are_bounded_and_hold_no_tracers(monkeypatch):
    from estimax.solvers import _argmin  # the cache of staged inner solves

    monkeypatch.setattr(_argmin, "_SOLVES_SIZE", 2)
    for c in (1.0, 2.0, 3.0):  # three problems: the first is dropped
        ex.argmin(lambda w, t: jnp.sum((w - c * t) ** 2), jnp.zeros(2), jnp.ones(2))
    assert len(_argmin._SOLVES) <= 2

    def closing_over(t):  # the inner objective closes over the outer (traced) argument
        return jnp.sum(ex.argmin(lambda w: jnp.sum((w - t) ** 2) + jnp.sum(w**4), t) ** 2)

    with jax.checking_leaks():
        jax.jit(jax.grad(closing_over))(jnp.array([0.5, -1.0]))


def quartic(w, t):
    return 0.5 * jnp.sum((w - t) ** 2) + 0.1 * jnp.sum(w**4)


def test_implicit_and_long_unrolled_agree_truncated_does_not():
    t = jnp.array([0.5, -1.5, 2.0])

    def outer_q(t, **kw):
        return jnp.sum(jnp.sin(ex.argmin(quartic, jnp.zeros(3), t, **kw)))

    gd = ex.solvers.GradientDescent(learning_rate=0.2)

    @jax.jit
    def grads(t):
        return (jax.grad(outer_q)(t), jax.grad(lambda t: outer_q(t, method="unrolled", solver=gd, steps=400))(t),
                jax.grad(lambda t: outer_q(t, method="unrolled", solver=gd, steps=400, truncate=2))(t))

    implicit, unrolled, truncated = grads(t)
    assert _rel(unrolled, implicit) < 1e-8  # gradient descent stops (freezes) at ‖∇f‖ <= 1e-10
    assert _rel(truncated, implicit) > 1e-2
    # the closed form: w + 0.4 w³ = t, so dw/dt = 1 / (1 + 1.2 w²)
    w = ex.argmin(quartic, jnp.zeros(3), t)
    assert _rel(implicit, jnp.cos(w) / (1 + 1.2 * w**2)) < 1e-9


def simplex_projection(w, a):
    ex.subject_to(eq=jnp.sum(w) - 1.0, name="sum_to_one")
    return 0.5 * jnp.sum((w - a**2) ** 2)


@pytest.mark.parametrize("linear_solver", ["auto", "gmres"])  # "auto" is the dense solve at this size
def test_equality_constrained_inner_problem(linear_solver):
    a = jnp.array([0.3, -1.2, 0.8, 2.0])

    def exact(a):
        b = a**2
        return b - (jnp.sum(b) - 1.0) / b.size

    def f(a):
        return ex.argmin(simplex_projection, jnp.zeros(4), a, linear_solver=linear_solver, full_output=True)

    @jax.jit
    def everything(a):
        return f(a), jax.jacrev(lambda a: f(a)[0])(a), jax.jacfwd(lambda a: f(a)[0])(a)

    (w, info), rev, fwd = everything(a)
    assert _rel(w, exact(a)) < 1e-10
    assert _rel(rev, jax.jacfwd(exact)(a)) < 1e-9
    assert _rel(fwd, jax.jacfwd(exact)(a)) < 1e-9
    # the multiplier of sum(w) = 1 is -(w - a²) for every coordinate: (sum(a²) - 1) / n
    assert abs(float(info.multipliers["sum_to_one"]) - float((jnp.sum(a**2) - 1.0) / 4)) < 1e-9


def capped(w, t):
    ex.subject_to(le=w - 1.0, name="cap")
    return quartic(w, t)


def test_inequality_constrained_inner_problem():
    t = jnp.array([0.5, 3.0, -2.0, 1.5])  # caps active at coordinates 1 and 3
    f = lambda t: ex.argmin(capped, jnp.zeros(4), t)  # noqa: E731
    (w, info), jac = jax.jit(lambda t: (ex.argmin(capped, jnp.zeros(4), t, full_output=True), jax.jacrev(f)(t)))(t)
    assert int(info.result) == RESULTS.successful
    free = np.array([True, False, True, False])
    assert np.allclose(np.asarray(w)[~free], 1.0, atol=1e-9)
    wf = np.asarray(w)[free]
    assert np.allclose(wf + 0.4 * wf**3, np.asarray(t)[free], atol=1e-9)
    expected = np.diag(np.where(free, 1.0 / (1.0 + 1.2 * np.asarray(w) ** 2), 0.0))
    assert np.max(np.abs(np.asarray(jac) - expected)) < 1e-7
    # an active cap's multiplier: t - w - 0.4 w³ at w = 1
    assert np.allclose(np.asarray(info.multipliers["cap"])[~free], np.asarray(t)[~free] - 1.4, atol=1e-7)


def shrink(w, t):
    return 0.5 * jnp.sum((w - t) ** 2) + 0.25 * jnp.sum(w**4)


@ex.expectation
def noisy_outer(theta):
    xi = ex.sample(dist.Normal(theta, 1.0), name="xi")
    return ex.argmin(shrink, jnp.zeros(()), xi) ** 2


@pytest.mark.slow
def test_stochastic_outer_program_with_an_inner_argmin_is_unbiased():
    theta = 0.7
    xs, wts = np.polynomial.hermite_e.hermegauss(80)

    def w_star(x):  # the real root of w³ + w - x
        roots = np.roots([1.0, 0.0, 1.0, -x])
        return float(np.real(roots[np.argmin(np.abs(np.imag(roots)))]))

    ws = np.array([w_star(theta + x) for x in xs])
    exact = float(np.sum(wts * 2 * ws / (1 + 3 * ws**2)) / np.sqrt(2 * np.pi))  # E[d/dθ w*(θ + ε)²]
    assert_unbiased(jax.jit(lambda k: ex.grad(noisy_outer)(k, theta)), exact, seed=("argmin-unbiased", theta),
                    n=4000)


def test_explain_lists_the_inner_problems():
    def program(log_lam):
        w = ex.argmin(ridge, jnp.zeros(D), log_lam, X, Y, name="ridge")
        v = ex.argmin(quartic, jnp.zeros(3), w[:3], method="unrolled", steps=50,
                      solver=ex.solvers.GradientDescent(0.2), name="smooth")
        return jnp.sum(v)

    plan = ex.explain(program, SCALAR)
    assert [a.name for a in plan.argmins] == ["ridge", "smooth"]
    assert plan.argmins[0].solver == "Newton" and plan.argmins[0].linear_solver == "dense"
    assert plan.argmins[0].certificate.startswith("exact")
    assert plan.certificate.kind == "consistent"  # the unrolled one
    text = str(plan)
    assert "inner problems (ex.argmin)" in text and "unrolled, 50 steps" in text and "test_bilevel.py" in text


def test_a_solve_that_does_not_converge_is_reported():
    w, info = ex.argmin(quartic, jnp.zeros(3), jnp.array([3.0, -3.0, 1.0]), max_steps=1, throw=False,
                        full_output=True)
    assert int(info.result) == RESULTS.max_steps_reached and int(info.steps) == 1
    with pytest.raises(Exception, match="did not converge"):
        jax.block_until_ready(ex.argmin(quartic, jnp.zeros(3), jnp.array([3.0, -3.0, 1.0]), max_steps=1))


def test_errors_name_the_mistake():
    with pytest.raises(ex.ProgramError, match="does not depend on the inner variables"):
        ex.argmin(lambda w, t: jnp.sum(t**2), jnp.zeros(2), jnp.ones(2))

    def random_inner(w, t):
        return jnp.sum((w - t - ex.sample(dist.Normal(0.0, 1.0), name="noise")) ** 2)

    with pytest.raises(ex.ProgramError, match="random choices"):
        ex.argmin(random_inner, jnp.zeros(2), jnp.ones(2))
    with pytest.raises(ex.ProgramError, match="must be a scalar"):
        ex.argmin(lambda w, t: (w - t) ** 2, jnp.zeros(2), jnp.ones(2))
    with pytest.raises(ex.ProgramError, match="floating-point"):
        ex.argmin(quartic, jnp.zeros(3, jnp.int32), jnp.ones(3))
    with pytest.raises(ex.ArgumentError, match="method is one of"):
        ex.argmin(quartic, jnp.zeros(3), jnp.ones(3), method="magic")
    with pytest.raises(ex.ProgramError, match="cannot"):
        ex.argmin(quartic, jnp.zeros(3), jnp.ones(3), method="unrolled", solver=ex.solvers.LBFGS())
    with pytest.raises(ex.ArgumentError, match="indefinite"):
        ex.argmin(simplex_projection, jnp.zeros(3), jnp.ones(3), linear_solver="cg")
    with pytest.raises(ex.ArgumentError, match="unconstrained inner problems"):
        ex.argmin(simplex_projection, jnp.zeros(3), jnp.ones(3), method="unrolled")


# --- LV-HBA: coupled lower-level constraints ----------------------------------------------------
N_TOY = 100


@jax.custom_jvp
def _first_order_only(v):
    """``v``, whose first derivative exists and whose second derivative raises: a solver that
    forms a Hessian (or a Hessian-vector product) of the lower objective fails on it."""
    return v


@_first_order_only.defjvp
def _first_order_only_jvp(primals, tangents):
    (v,), (t,) = primals, tangents
    return _first_order_only(v), _no_second_derivative(t)


@jax.custom_jvp
def _no_second_derivative(t):
    return t


@_no_second_derivative.defjvp
def _no_second_derivative_jvp(primals, tangents):
    raise AssertionError("a second derivative of the lower objective was taken")


def toy_upper(x, y):
    y1, y2 = y[:N_TOY], y[N_TOY:]
    return 0.5 * jnp.sum((x - y2) ** 2) + 0.5 * jnp.sum((y1 - 1.0) ** 2)


def toy_lower(y, x):
    """The LV-HBA paper's toy: ``min_y ½‖y₁‖² − xᵀy₁ + 1ᵀy₂`` s.t. ``1ᵀx + 1ᵀy = 0``. Its
    solutions are ``y₁ = x + 1`` and any ``y₂`` with the right sum (not a single point); the
    optimistic bilevel solution is ``x = -0.3``, ``y₁ = 0.7``, ``y₂ = -0.4`` (every entry)."""
    y1, y2 = _first_order_only(y[:N_TOY]), y[N_TOY:]
    ex.subject_to(eq=jnp.sum(x) + jnp.sum(y), name="coupled")
    return 0.5 * jnp.sum(y1**2) - x @ y1 + jnp.sum(y2)


def _toy_errors(sol):
    x, y = sol.params
    y_star = np.concatenate([np.full(N_TOY, 0.7), np.full(N_TOY, -0.4)])
    return (float(np.linalg.norm(np.asarray(x) + 0.3) / np.linalg.norm(np.full(N_TOY, 0.3))),
            float(np.linalg.norm(np.asarray(y) - y_star) / np.linalg.norm(y_star)))


def test_lvhba_solves_the_coupled_constraint_toy_without_second_derivatives():
    start = (np.full(N_TOY, 10.0), np.full(2 * N_TOY, 10.0))
    sol = ex.solve_bilevel(toy_upper, toy_lower, *start, max_steps=10000)
    err_x, err_y = _toy_errors(sol)
    assert err_x <= 1e-3 and err_y <= 1e-3, (err_x, err_y)
    assert sol.infeasibility < 1e-9  # every iterate is projected onto the coupled constraint
    assert set(sol.multipliers) == {"coupled"} and sol.steps == 10000


def test_lvhba_with_the_papers_simultaneous_steps_does_not_converge():
    """The toy script's update (simultaneous θ/λ steps, its step sizes and penalty) oscillates
    and grows: the reason the default takes extragradient steps with estimated step sizes."""
    script = ex.solvers.LVHBA(inner="simultaneous", eta=0.01, alpha=0.008, beta=0.02, c0=0.025, p=0.3)
    sol = ex.solve_bilevel(toy_upper, toy_lower, np.full(N_TOY, 10.0), np.full(2 * N_TOY, 10.0), solver=script,
                           max_steps=1500)
    assert _toy_errors(sol)[0] > 1.0


def test_solve_bilevel_errors():
    def constrained_upper(x, y):
        ex.subject_to(le=x[0] - 1.0, name="cap")
        return toy_upper(x, y)

    with pytest.raises(ex.ProgramError, match="upper program states constraints"):
        ex.solve_bilevel(constrained_upper, toy_lower, np.zeros(N_TOY), np.zeros(2 * N_TOY))
    with pytest.raises(ex.ArgumentError, match="p=...."):
        ex.solvers.LVHBA(p=0.6)
    with pytest.raises(ex.ArgumentError, match="solver= takes"):
        ex.solve_bilevel(toy_upper, toy_lower, np.zeros(N_TOY), np.zeros(2 * N_TOY), solver=ex.solvers.Newton())


# --- BSVRB: many lower-level problems, a few sampled per step -------------------------------------
def _multiblock_problem(m=8, n=30, n_val=200, d=10, seed=0):
    """m ridge regressions sharing one log-penalty x: few noisy training samples per block, a
    validation set per block. F(x) has a closed form (each block's ridge solution)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(m, d))
    a, c = rng.normal(size=(m, n, d)), rng.normal(size=(m, n_val, d))
    b = np.einsum("mnd,md->mn", a, w) + 1.5 * rng.normal(size=(m, n))
    e = np.einsum("mnd,md->mn", c, w) + 1.5 * rng.normal(size=(m, n_val))
    inner_data, outer_data = {"a": a, "b": b}, {"a": c, "b": e}

    def inner(y, x, batch):
        return 0.5 * jnp.mean((batch["a"] @ y - batch["b"]) ** 2) + 0.5 * jnp.exp(x[0]) * jnp.sum(y**2)

    def outer(x, y, batch):
        return 0.5 * jnp.mean((batch["a"] @ y - batch["b"]) ** 2)

    def exact(x):
        def block(ai, bi, ci, ei):
            y = jnp.linalg.solve(ai.T @ ai / n + jnp.exp(x[0]) * jnp.eye(d), ai.T @ bi / n)
            return 0.5 * jnp.mean((ci @ y - ei) ** 2)

        return jnp.mean(jax.vmap(block)(a, b, c, e))

    grid = jnp.linspace(-8.0, 4.0, 241)[:, None]
    x = grid[jnp.argmin(jax.vmap(exact)(grid))]  # then Newton on the closed form, from the grid's best
    for _ in range(20):
        x = x - jax.grad(exact)(x) / jax.hessian(exact)(x)[0, 0]
    assert float(exact(x)) <= float(jnp.min(jax.vmap(exact)(grid))) + 1e-12
    return inner, outer, inner_data, outer_data, jax.jit(exact), float(exact(x))


@pytest.mark.parametrize("version,blocks", [(1, 2), (2, 8)])
def test_bsvrb_reaches_the_multiblock_optimum(version, blocks):
    inner, outer, inner_data, outer_data, exact, f_star = _multiblock_problem()
    solver = ex.solvers.BSVRB(blocks=blocks, batch=32, version=version, lr=0.03, inner_lr=0.2, system_lr=0.2)
    sol = ex.solve_multiblock(outer, inner, jnp.ones(1), jnp.zeros(10), outer_data, inner_data, solver=solver,
                              max_steps=3000, record_every=100, evaluate=exact, key=jax.random.PRNGKey(version))
    gaps = np.array([v for _, v in sol.stats["trace"]]) - f_star
    assert np.all(gaps >= -1e-12)  # f_star is the minimum
    assert gaps[0] > 0.5  # from far away
    assert np.mean(gaps[-15:]) < 1e-3, gaps  # the last 1500 steps: near the optimum on average
    x, y = sol.params
    assert y.shape == (8, 10) and x.shape == (1,)


def test_bsvrb_errors():
    inner, outer, inner_data, outer_data, _, _ = _multiblock_problem()
    with pytest.raises(ex.ProgramError, match="only 8 blocks"):
        ex.solve_multiblock(outer, inner, jnp.ones(1), jnp.zeros(10), outer_data, inner_data,
                            solver=ex.solvers.BSVRB(blocks=9))
    with pytest.raises(ex.ArgumentError, match="version"):
        ex.solvers.BSVRB(version=3)
    with pytest.raises(ex.ProgramError, match="leading"):
        ex.solve_multiblock(outer, inner, jnp.ones(1), jnp.zeros(10), outer_data,
                            {"a": inner_data["a"][:4], "b": inner_data["b"][:4]})


def test_bounds_on_the_inner_variables():
    """``bounds=`` are inequality constraints of the inner problem: the solution of
    ``min ½(w - t)² + 0.1 w⁴`` over ``w <= 1`` and its derivative, as with ``ex.subject_to``."""
    t = jnp.array([0.5, 3.0, -2.0, 1.5])

    def f(t):
        return ex.argmin(quartic, jnp.zeros(4), t, bounds=(None, np.ones(4)), full_output=True)

    (w, info), jac = jax.jit(lambda t: (f(t), jax.jacrev(lambda t: f(t)[0])(t)))(t)
    (w_ref, _), jac_ref = jax.jit(lambda t: (ex.argmin(capped, jnp.zeros(4), t, full_output=True),
                                             jax.jacrev(lambda t: ex.argmin(capped, jnp.zeros(4), t))(t)))(t)
    assert np.allclose(w, w_ref, atol=1e-8) and np.allclose(jac, jac_ref, atol=1e-6)
    assert set(info.multipliers) == {"bounds/upper"}
    with pytest.raises(ex.ProgramError, match="lower bound exceeds"):
        ex.argmin(quartic, jnp.zeros(2), jnp.ones(2), bounds=(np.ones(2), np.zeros(2)))
    with pytest.raises(ex.ArgumentError, match="concrete values"):
        jax.jit(lambda u: ex.argmin(quartic, jnp.zeros(2), jnp.ones(2), bounds=(None, u)))(jnp.ones(2))
