"""Constrained programs: ``ex.subject_to``, the constraints pass, the solver driver, ExactAL.

Exact answers come from closed forms: an equality-constrained QP is solved by its (linear)
KKT system; a linear objective on a sphere cut by a hyperplane has its optimum in closed
form; HS6 and BT2-like problems have known optima (CUTEst). Solvers run in float64.
"""

from __future__ import annotations

import numpy as np
import numpyro.distributions as dist
import pytest

import jax
import jax.numpy as jnp

import estimax as ex
from estimax.solvers import RESULTS, ExactAL


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


# --- the language and the pass --------------------------------------------------------------
def _stochastic(x, a):
    xi = ex.sample(dist.Normal(0.0, 1.0), name="xi")
    u = ex.sample(dist.Normal(0.0, 1.0), name="unused_by_constraints")
    ex.subject_to(eq=jnp.sum(x**2) - 1.0, name="sphere")
    ex.subject_to(le=x * xi - a, name="cap")
    ex.subject_to(ge=x[0])
    return jnp.sum(x) + u * x[1]


def test_explain_lists_constraints_kinds_and_multipliers():
    plan = ex.explain(_stochastic, jnp.ones(3), 1.0)
    assert [c[0] for c in plan.constraints] == ["sphere", "cap", "le_2"]
    assert plan.constraints[0][1:3] == ("== 0 (scalar)", "λ[sphere]")
    assert plan.constraints[1][1:3] == ("E[...] <= 0 (shape (3,))", "μ[cap] >= 0")
    assert plan.constraints[2][1] == ">= 0 (scalar; solved as -value <= 0)"  # as written: ge=
    assert plan.constraints[0][3].endswith("test_constraints.py:31")  # where `sphere` is written
    text = str(plan)
    assert "constraints (solved with ex.solve" in text and "μ[cap] >= 0" in text


def test_split_keeps_what_each_piece_needs():
    from estimax.transforms._constraints import split

    parts = split(_stochastic, (jnp.ones(3), 1.0))
    assert parts.objective.stochastic  # it uses `unused_by_constraints`
    sphere, cap, ge = parts.constraints
    assert not sphere.stochastic and cap.stochastic and not ge.stochastic
    # dead-code elimination: the cap's program draws only `xi`
    names = [e.params["spec"].name for e in cap.jaxpr.eqns if e.primitive.name == "estimax_sample"]
    assert names == ["xi"]
    x = jnp.array([0.5, -0.25, 2.0])
    np.testing.assert_allclose(sphere(x, 1.0), jnp.sum(x**2) - 1.0)
    np.testing.assert_allclose(ge(x, 1.0), -x[0])


def test_a_constrained_program_is_not_differentiated_as_if_unconstrained():
    with pytest.raises(ex.EstimaxError, match="states constraints .*'sphere'.*ex.solve"):
        ex.grad(_stochastic)(jax.random.PRNGKey(0), jnp.ones(3), 1.0)
    with pytest.raises(ex.EstimaxError, match="states constraints"):
        ex.expectation(_stochastic).estimate(jax.random.PRNGKey(0), jnp.ones(3), 1.0)


@pytest.mark.parametrize(
    "program, error, match",
    [
        (lambda x: (ex.subject_to(eq=x[0] == 1.0), x.sum())[1], ex.ArgumentError, r"floating point; got booleans \(a comparison\?\)"),
        (lambda x: (ex.subject_to(eq=x[0], le=x[1]), x.sum())[1], ex.ArgumentError, "exactly one of .*got eq=, le="),
        (lambda x: (ex.subject_to(), x.sum())[1], ex.ArgumentError, "got none"),
        (lambda x: (ex.subject_to(le="x"), x.sum())[1], ex.ArgumentError, "expects a number or an array"),
        (lambda x: (ex.subject_to(le=x[0], name=3), x.sum())[1], ex.ArgumentError, "name=.*non-empty string"),
        (lambda x: (ex.subject_to(eq=jnp.ones(2), name="const"), x.sum())[1], ex.ProgramError,
         "constraint 'const' .*does not depend on the optimized parameters"),
        (lambda x: (jax.jit(lambda y: ex.subject_to(eq=y[0]))(x), x.sum())[1], ex.UnsupportedError,
         "constraint 'eq_0' .*inside `jit`.*top level"),
        (lambda x: (ex.subject_to(eq=x[0], name="a"), ex.subject_to(le=x[1], name="a"), x.sum())[2],
         ex.ProgramError, "two constraints are named 'a'"),
        (lambda x: (ex.subject_to(eq=x[0]), x)[1], ex.ProgramError, r"objective .* must be a scalar; it returns \(3,\)"),
        (lambda x: (jax.vmap(lambda y: ex.subject_to(eq=y))(x), x.sum())[1], ex.EstimaxError, "inside jax.vmap"),
    ],
    ids=["comparison", "two-kinds", "no-kind", "string", "bad-name", "constant", "in-jit", "duplicate",
         "vector-objective", "in-vmap"],
)
def test_malformed_constraints_are_named(program, error, match):
    with pytest.raises(error, match=match):
        ex.solve(program, jnp.ones(3))


# --- the exact augmented Lagrangian ----------------------------------------------------------
def _qp(n=6, m=3, seed=0, conditioned=False):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    q = a @ a.T + n * np.eye(n)
    g = rng.normal(size=n)
    A = rng.normal(size=(m, n))
    if conditioned:  # K's singular values near 1: what randomized sketch-and-project converges on quickly
        q = np.eye(n) + 0.1 * (a + a.T) / np.sqrt(n)
        A = np.linalg.qr(A.T)[0].T
    b = rng.normal(size=m)
    kkt = np.block([[q, A.T], [A, np.zeros((m, m))]])
    sol = np.linalg.solve(kkt, np.concatenate([-g, b]))
    x_star, lam_star = sol[:n], sol[n:]  # Qx + g + Aᵀλ = 0: ∇f + Jᵀλ = 0 with c = Ax - b

    def program(x):
        ex.subject_to(eq=jnp.asarray(A) @ x - jnp.asarray(b), name="lin")
        return 0.5 * x @ jnp.asarray(q) @ x + jnp.asarray(g) @ x

    return program, x_star, lam_star


@pytest.mark.parametrize("solver", [ExactAL(), ExactAL(sketch_size=4), ExactAL(sketch_size=4, sketch="coordinate")],
                         ids=["identity-sketch", "gaussian-4", "kaczmarz-4"])
def test_exact_al_solves_an_equality_qp_to_its_kkt_solution(solver):
    program, x_star, lam_star = _qp(conditioned=solver.sketch_size is not None)
    sol = ex.solve(program, jnp.zeros(6), solver=solver, tol=1e-9, throw=True)
    np.testing.assert_allclose(sol.params, x_star, atol=1e-8)
    np.testing.assert_allclose(sol.multipliers["lin"], lam_star, atol=1e-7)
    assert sol.kkt <= 1e-9 and sol.success and sol.result == RESULTS.successful
    assert sol.history["kkt"].shape == (sol.steps + 1,) and sol.history["kkt"][-1] == pytest.approx(sol.kkt)
    if solver.sketch_size is None:
        assert sol.steps <= 2  # Newton on a QP: one step (the first solve is exact)


@pytest.mark.parametrize(
    "n, m, rank",
    [(6, 2, 2), (5, 5, 5), (6, 3, 2), (3, 5, 3), (4, 0, 0)],
    ids=["full-rank", "square", "rank-deficient", "more-constraints-than-unknowns", "unconstrained"],
)
@pytest.mark.parametrize("tau", [0.0, 0.3])
def test_exact_al_null_space_solve_is_the_kkt_solve(n, m, rank, tau):
    """The dense Newton solve (null-space form with ``n - m`` Hessian products where ``J`` has
    full row rank; the whole system otherwise) against NumPy's least-squares solution of
    ``K d = -r``, ``K = [[H + τI, Jᵀ], [J, 0]]``; ``c`` in ``range(J)`` so that it exists."""
    from estimax.solvers._exact_al import _NullSpace

    rng = np.random.default_rng([n, m, rank, int(10 * tau)])
    a = rng.normal(size=(n, n))
    h = a @ a.T / n + np.eye(n)  # positive definite: K nonsingular where J has full row rank
    j = rng.normal(size=(m, rank)) @ rng.normal(size=(rank, n)) if m else np.zeros((0, n))
    g, c = rng.normal(size=n), j @ rng.normal(size=n)
    hvp = lambda v: jnp.asarray(h) @ v  # noqa: E731
    ns = _NullSpace(hvp, jnp.asarray(j), jnp.asarray(g), jnp.asarray(c), n, m)
    r = jnp.concatenate([jnp.asarray(g), jnp.asarray(c)])
    d = np.asarray(ns.solve(jnp.asarray(tau), jnp.asarray(j), r))
    kmat = np.block([[h + tau * np.eye(n), j.T], [j, np.zeros((m, m))]])
    want = -np.linalg.lstsq(kmat, np.asarray(r), rcond=None)[0]
    np.testing.assert_allclose(kmat @ d, -np.asarray(r), atol=1e-9)  # solves the system
    np.testing.assert_allclose(d[:n], want[:n], atol=1e-9)  # the step is unique even where λ is not
    t = np.asarray(ns.null_basis @ (ns.null_basis.T @ d[:n]))  # the tangential part and H along it
    if rank == m:
        np.testing.assert_allclose(j @ t, 0.0, atol=1e-9)
    np.testing.assert_allclose(np.asarray(ns.hess(jnp.asarray(t))), h @ t, atol=1e-9)
    made = int(ns.products) - 1  # Hessian products beyond the merit's H∇ₓL
    assert made == (n - m if rank == m and m <= n else n) + (0 < m <= n), made  # + H along the range step


def _sphere(x):
    ex.subject_to(eq=jnp.sum(x**2) - 1.0, name="sphere")
    ex.subject_to(eq=x[0] + x[1] - 0.5, name="plane")
    return jnp.sum(x * jnp.arange(1.0, 6.0))


def _sphere_minimum() -> float:
    # min cᵀx on {‖x‖ = 1} ∩ {aᵀx = 0.5}: x = x_p + r u, x_p = 0.5 a/‖a‖², r = sqrt(1 - ‖x_p‖²),
    # u = -P c/‖P c‖ with P the projection on a's orthogonal complement.
    c, a = np.arange(1.0, 6.0), np.array([1.0, 1, 0, 0, 0])
    xp = 0.5 * a / (a @ a)
    pc = c - (c @ a) / (a @ a) * a
    return float(c @ xp - np.sqrt(1 - xp @ xp) * np.linalg.norm(pc))


def _hs6(x):
    ex.subject_to(eq=10.0 * (x[1] - x[0] ** 2))
    return (1.0 - x[0]) ** 2


def _bt2(x):
    ex.subject_to(eq=x[0] * (1 + x[1] ** 2) + x[2] ** 4 - 4 - 3 * jnp.sqrt(2.0))
    return (x[0] - 1) ** 2 + (x[0] - x[1]) ** 2 + (x[1] - x[2]) ** 4


@pytest.mark.parametrize(
    "program, x0, f_star",
    [
        (_sphere, np.ones(5), _sphere_minimum()),  # a minimum, not the maximum that is also a KKT point
        (_hs6, np.array([-1.2, 1.0]), 0.0),  # CUTEst HS6 from its standard start
        (_bt2, np.array([10.0, 10.0, 10.0]), 0.0325682003932),  # CUTEst BT2 (reference value from scipy)
    ],
    ids=["sphere-plane", "HS6", "BT2"],
)
def test_exact_al_reaches_known_optima(program, x0, f_star):
    sol = ex.solve(program, jnp.asarray(x0), solver=ExactAL(), tol=1e-8, max_steps=200, throw=True)
    assert abs(sol.value - f_star) <= 1e-8 * max(1.0, abs(f_star))
    assert sol.kkt <= 1e-8


def test_same_key_same_iterates_other_key_same_solution():
    program, x_star, _ = _qp(n=8, m=2, seed=3, conditioned=True)
    solver = ExactAL(sketch_size=3)
    a = ex.solve(program, jnp.zeros(8), solver=solver, key=jax.random.PRNGKey(5), tol=1e-10)
    b = ex.solve(program, jnp.zeros(8), solver=solver, key=jax.random.PRNGKey(5), tol=1e-10)
    c = ex.solve(program, jnp.zeros(8), solver=solver, key=jax.random.PRNGKey(6), tol=1e-10)
    np.testing.assert_array_equal(a.history["kkt"], b.history["kkt"])
    np.testing.assert_array_equal(a.params, b.params)
    assert a.stats["inner_iterations"] != c.stats["inner_iterations"] or not np.array_equal(a.history["kkt"], c.history["kkt"])
    np.testing.assert_allclose(c.params, x_star, atol=1e-8)


def test_maximize_and_dict_parameters():
    def program(p):
        ex.subject_to(eq=p["a"] + p["b"] - 2.0, name="budget")
        return -(p["a"] - 3.0) ** 2 - 2.0 * (p["b"] - 1.0) ** 2  # max at a = 5/3, b = 1/3

    sol = ex.solve(program, {"a": jnp.zeros(()), "b": jnp.zeros(())}, maximize=True, tol=1e-10)
    assert sol.success
    np.testing.assert_allclose([sol.params["a"], sol.params["b"]], [5.0 / 3.0, 1.0 / 3.0], atol=1e-9)
    assert sol.value == pytest.approx(-(5 / 3 - 3) ** 2 - 2 * (1 / 3 - 1) ** 2)
    assert sol.history["value"][-1] == pytest.approx(sol.value)


def test_exact_al_refuses_what_it_cannot_solve():
    def ineq(x):
        ex.subject_to(le=x[0] - 1.0, name="cap")
        return jnp.sum(x**2)

    with pytest.raises(ex.ProgramError, match=r"ExactAL solves equality-constrained.*\['cap'\].*AugmentedLagrangian"):
        ex.solve(ineq, jnp.ones(2), solver=ExactAL())

    def noisy(x):
        xi = ex.sample(dist.Normal(0.0, 1.0), name="xi")
        ex.subject_to(eq=x[0] - 1.0)
        return jnp.sum((x - xi) ** 2)

    with pytest.raises(ex.ProgramError, match="ExactAL needs exact derivatives.*StochasticLagrangian"):
        ex.solve(noisy, jnp.ones(2), solver=ExactAL())
    with pytest.raises(ex.ArgumentError, match="sketch="):
        ExactAL(sketch="sparse")


# --- the driver ---------------------------------------------------------------------------------
def test_budget_non_finite_and_throw():
    sol = ex.solve(_hs6, jnp.array([-1.2, 1.0]), solver=ExactAL(), max_steps=2)
    assert sol.result == RESULTS.max_steps_reached and not sol.success and sol.steps == 2
    assert "max_steps" in sol.message
    with pytest.raises(ex.solvers.SolverError, match="after 2 steps") as info:
        ex.solve(_hs6, jnp.array([-1.2, 1.0]), solver=ExactAL(), max_steps=2, throw=True)
    assert info.value.solution.steps == 2

    def log_barrier(x):
        ex.subject_to(eq=x[0] + x[1] - 1.0)
        return -jnp.sum(jnp.log(x))

    bad = ex.solve(log_barrier, jnp.array([-1.0, 2.0]), solver=ExactAL())
    assert bad.result == RESULTS.nonfinite and bad.steps == 0
    assert "non-finite values in `value`" in bad.message


def test_bad_options_are_named():
    with pytest.raises(ex.ArgumentError, match="max_steps must be >= 1"):
        ex.solve(_hs6, jnp.ones(2), max_steps=0)
    with pytest.raises(ex.ArgumentError, match="tol must be a positive number"):
        ex.solve(_hs6, jnp.ones(2), tol=-1.0)
    with pytest.raises(ex.ArgumentError, match=r"multipliers for \['nope'\]"):
        ex.solve(_sphere, jnp.ones(5), multipliers={"nope": 1.0})
    with pytest.raises(ex.ArgumentError, match="the multiplier of 'sphere' has shape"):
        ex.solve(_sphere, jnp.ones(5), multipliers={"sphere": jnp.ones(3)})
    with pytest.raises(ex.ProgramError, match=r"lower bound of parameter leaf 0 has shape \(2,\)"):
        ex.solve(_sphere, jnp.ones(5), bounds=(jnp.zeros(2), None))


def test_checkpoint_resume_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch):
    from estimax.solvers import _runner

    solver = ExactAL(sketch_size=3)
    program, _, _ = _qp(n=8, m=2, seed=1, conditioned=True)
    plain = ex.solve(program, jnp.zeros(8), solver=solver, tol=1e-12, max_steps=12)
    path = tmp_path / "run"
    real_save = _runner.save_state
    saves = []

    def interrupt_after_first_save(*a, **k):  # Ctrl-C right after the first checkpoint
        real_save(*a, **k)
        saves.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(_runner, "save_state", interrupt_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        ex.solve(program, jnp.zeros(8), solver=solver, tol=1e-12, max_steps=12, checkpoint=path, every=2)
    monkeypatch.setattr(_runner, "save_state", real_save)
    assert saves and path.exists()
    resumed = ex.solve(program, jnp.zeros(8), solver=solver, tol=1e-12, max_steps=12, checkpoint=path, every=2)
    assert resumed.steps == plain.steps
    np.testing.assert_array_equal(resumed.params, plain.params)
    np.testing.assert_array_equal(resumed.history["kkt"], plain.history["kkt"])
    # a checkpoint of another run is refused with what differs (a larger max_steps continues it)
    with pytest.raises(ex.EstimaxError, match=r"written by another run: its options differ: tol 1e-12 \(now 1e-10\)"):
        ex.solve(program, jnp.zeros(8), solver=solver, tol=1e-10, max_steps=12, checkpoint=path, every=2)
