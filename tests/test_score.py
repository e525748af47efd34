"""Score matching (DSM, SSM) and f-distill: closed forms, identities, statistical tests."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from hypothesis import given
from hypothesis import strategies as st

import estimax as ex
from estimax.objectives import _fdistill as F
from estimax.objectives import _score as S
from estimax.testing import key_from, seed_from


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


D = 2
MU = jnp.array([0.5, -1.0])
C = jnp.array([[1.0, 0.3], [0.3, 0.5]])


def _noised(schedule, t):
    a, s = schedule.alpha(t), schedule.sigma(t)
    return a, s, a**2 * C + s**2 * jnp.eye(D)


def _population(program, n=64):
    """The program with its data drawn from N(MU, C) inside (the population objective)."""

    @ex.expectation
    def pop(params):
        z = ex.sample(dist.Normal(jnp.zeros((n, D)), 1.0).to_event(2), name="z0")
        return program(params, MU[None] + z @ jnp.linalg.cholesky(C).T)

    return pop


def _estimates(fn, key, draws):
    return jax.vmap(lambda k: fn(k))(jax.random.split(key, draws))


def _stats(samples):
    samples = np.asarray(samples)
    return samples.mean(0), samples.std(0, ddof=1) / math.sqrt(samples.shape[0])


# --- the weightings: derived, and equal to the score-space loss --------------------------------
SCHEDULES = {"vp": S.vp(), "ve": S.ve(0.02, 20.0), "cosine": S.Schedule(lambda t: jnp.cos(0.5 * jnp.pi * t),
                                                                        lambda t: jnp.sin(0.5 * jnp.pi * t), 0.01, 0.99)}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction", S.PREDICTIONS)
@pytest.mark.parametrize("weighting", ["sigma2", "likelihood"])
def test_native_loss_is_the_score_space_loss(schedule, prediction, weighting):
    sch = SCHEDULES[schedule]
    rng = np.random.default_rng(seed_from(schedule, prediction, weighting))
    t = jnp.asarray(rng.uniform(sch.t_min, sch.t_max, size=5))
    x0, eps, out = (jnp.asarray(rng.normal(size=(5, D))) for _ in range(3))
    a, s = sch.alpha(t)[:, None], sch.sigma(t)[:, None]
    x_t = a * x0 + s * eps
    lam = S.weighting_fn(weighting, sch)(t)
    native = S.loss_weight(sch, prediction, weighting)(t) * jnp.sum((out - S.target(prediction, x0, eps, a, s)) ** 2, 1)
    score_space = lam * jnp.sum((S.to_score(prediction, out, x_t, a, s) - (-eps / s)) ** 2, 1)
    np.testing.assert_allclose(native, score_space, rtol=1e-10)


def test_likelihood_weighting_is_derived_from_the_schedule():
    t = jnp.linspace(0.05, 0.95, 7)
    np.testing.assert_allclose(S.vp(0.1, 20.0).g2(t), 0.1 + 19.9 * t, rtol=1e-10)  # β(t)
    ve = S.ve(0.02, 20.0)
    np.testing.assert_allclose(ve.g2(t), 2 * ve.sigma(t) ** 2 * math.log(1000.0), rtol=1e-10)
    # eps-prediction with λ = σ² is DDPM's plain MSE; x0-prediction's weight is the SNR
    np.testing.assert_allclose(S.loss_weight(S.vp(), "eps")(t), 1.0, rtol=1e-12)
    np.testing.assert_allclose(S.loss_weight(S.vp(), "x0")(t), S.vp().snr(t), rtol=1e-10)


# --- DSM against Gaussian closed forms ---------------------------------------------------------
def _linear_score(params, x, t):
    return x @ params["A"].T + params["b"][None]


@pytest.mark.parametrize("prediction", ["score", "eps"])
def test_dsm_minimizer_is_the_true_score(prediction):
    """Gaussian data, one noise level: the expected DSM gradient vanishes at the true score
    s(x) = -C_t⁻¹(x - αμ) and not at a perturbed one (5 standard errors)."""
    sch = S.vp()
    t0 = 0.3
    a, s, Ct = _noised(sch, t0)
    P = jnp.linalg.inv(Ct)
    true = {"A": -P, "b": a * P @ MU}
    if prediction == "eps":  # ε̂ = -σ ŝ: the same model in ε-parameterization
        net = lambda p, x, t: -S.vp().sigma(t)[:, None] * _linear_score(p, x, t)
    else:
        net = _linear_score
    program = _population(S.dsm(net, sch, prediction=prediction, time=dist.Delta(t0)))
    grad = jax.jit(ex.grad(program))
    flat = lambda g: jnp.concatenate([g["A"].ravel(), g["b"]])
    at_truth = _estimates(lambda k: flat(grad(k, true)), key_from("dsm-truth", prediction), 400)
    mean, se = _stats(at_truth)
    assert np.all(np.abs(mean) < 5 * se), (mean, se)
    off = {"A": true["A"] + 0.2 * jnp.eye(D), "b": true["b"]}
    away = _estimates(lambda k: flat(grad(k, off)), key_from("dsm-off", prediction), 400)
    mean, se = _stats(away)
    assert np.max(np.abs(mean) / se) > 10


_ESM_T0, _ESM_SCHEDULE = 0.5, S.ve(0.5, 2.0, t_min=0.0)


@functools.lru_cache(maxsize=None)
def _dsm_draws():
    """200 DSM estimates at given parameters, compiled once for every hypothesis example."""
    program = _population(S.dsm(_linear_score, _ESM_SCHEDULE, prediction="score",
                                weighting=lambda t: jnp.ones_like(t), time=dist.Delta(_ESM_T0)), n=256)
    return jax.jit(lambda key, params: jax.vmap(lambda k: program.estimate(k, params))(jax.random.split(key, 200)))


@given(st.lists(st.floats(-1.0, 1.0), min_size=6, max_size=6))
def test_dsm_minus_explicit_score_matching_is_a_model_independent_constant(values):
    """E‖s(x̃) + ε/σ‖² - E‖s(x̃) - ∇log p_σ(x̃)‖² = d/σ² - tr C_σ⁻¹ for any model s (here linear,
    drawn by hypothesis), with C_σ the noised covariance."""
    A = jnp.asarray(values[:4]).reshape(D, D)
    b = jnp.asarray(values[4:])
    a, s, Ct = _noised(_ESM_SCHEDULE, _ESM_T0)
    P = jnp.linalg.inv(Ct)
    mean, se = _stats(_dsm_draws()(key_from("dsm-esm", *values), {"A": A, "b": b}))
    M = A + P
    esm = jnp.trace(M @ Ct @ M.T) + jnp.sum((A @ (a * MU) + b) ** 2)  # s - ∇log p_t = M(x - αμ) + Aαμ + b
    constant = D / s**2 - jnp.trace(P)
    assert abs(mean - (esm + constant)) < 5 * se, (mean, esm + constant, se)


def _mixture(t, sch):
    means = jnp.array([[-2.0, 0.0], [2.0, 1.0]])
    weights = jnp.array([0.3, 0.7])
    a, s = sch.alpha(t), sch.sigma(t)

    def score(x):  # the noised mixture's score: components N(a m_k, (a² 0.25 + s²) I)
        var = a**2 * 0.25 + s**2
        logits = jnp.log(weights) - jnp.sum((x[None] - a * means) ** 2, -1) / (2 * var)
        resp = jax.nn.softmax(logits)
        return jnp.sum(resp[:, None] * (-(x[None] - a * means) / var), 0)

    return means, weights, score


def test_dsm_gradient_vanishes_at_a_gaussian_mixtures_closed_form_score():
    sch = S.vp()
    means, weights, _ = _mixture(0.0, sch)

    def net(theta, x, t):  # the true score plus theta times features: the truth at theta = 0
        truth = jax.vmap(lambda xi, ti: _mixture(ti, sch)[2](xi))(x, t)
        return truth + theta[0] * jnp.tanh(x) + theta[1] * x * t[:, None]

    dsm = S.dsm(net, sch, prediction="score", weighting="likelihood")

    @ex.expectation
    def pop(theta):
        u = ex.sample(dist.Uniform(jnp.zeros(64), 1.0).to_event(1), name="u")
        k = (u > weights[0]).astype(jnp.int32)  # component 1 with probability weights[1]
        x0 = ex.sample(dist.Normal(means[k], 0.5).to_event(1), name="x0")
        return dsm(theta, x0)

    grad = jax.jit(ex.grad(pop))
    g = _estimates(lambda k: grad(k, jnp.zeros(2)), key_from("mixture"), 400)
    mean, se = _stats(g)
    assert np.all(np.abs(mean) < 5 * se), (mean, se)
    g = _estimates(lambda k: grad(k, jnp.array([0.3, 0.0])), key_from("mixture-off"), 400)
    mean, se = _stats(g)
    assert np.max(np.abs(mean) / se) > 10


# --- sliced score matching ----------------------------------------------------------------------
@pytest.mark.parametrize("variance_reduction", [True, False])
def test_ssm_is_unbiased_for_hyvarinens_objective(variance_reduction):
    A = jnp.array([[-1.2, 0.2], [0.1, -0.7]])
    b = jnp.array([0.3, -0.2])
    params = {"A": A, "b": b}

    def exact(p):
        A, b = p["A"], p["b"]
        return jnp.trace(A) + 0.5 * (jnp.trace(A @ C @ A.T) + jnp.sum((A @ MU + b) ** 2))

    program = _population(S.ssm(lambda p, x: x @ p["A"].T + p["b"][None], projections=2, variance_reduction=variance_reduction))
    values = _estimates(lambda k: jax.jit(program.estimate)(k, params), key_from("ssm", variance_reduction), 400)
    mean, se = _stats(values)
    assert abs(mean - exact(params)) < 5 * se
    grads = _estimates(lambda k: jax.jit(ex.grad(program))(k, params)["A"].ravel(), key_from("ssm-g", variance_reduction), 400)
    mean, se = _stats(grads)
    assert np.all(np.abs(mean - jax.grad(exact)(params)["A"].ravel()) < 5 * se)


def test_variance_reduction_removes_the_projections_variance_of_the_quadratic_term():
    """At one data point the only randomness is the direction v ~ N(0, I). For the linear
    score s(x) = Ax + b, an estimate is the Gaussian quadratic form vᵀMv with M = sym(A)
    (SSM-VR) or M = sym(A) + ½ssᵀ (SSM), whose variance is 2‖M‖²_F. Both measured variances
    must match their closed forms, and where the score is large (here ‖s‖² ≈ 16) the
    reduction is large (exact ratio ≈ 0.04)."""
    A, b = jnp.array([[-1.2, 0.2], [0.1, -0.7]]), jnp.array([0.3, -0.2])
    params, x0 = {"A": A, "b": b}, jnp.array([[3.0, -2.0]])
    s0 = np.asarray(A @ x0[0] + b, np.float64)
    sym = np.asarray(0.5 * (A + A.T), np.float64)
    exact = {True: 2 * np.sum(sym**2), False: 2 * np.sum((sym + 0.5 * np.outer(s0, s0)) ** 2)}
    assert exact[True] / exact[False] < 0.05
    n, measured = 20000, {}
    for vr in (True, False):
        program = S.ssm(lambda p, x: x @ p["A"].T + p["b"][None], variance_reduction=vr)
        v = np.asarray(_estimates(lambda k: program.estimate(k, params, x0), key_from("ssm-var", vr), n), np.float64)
        c = v - v.mean()
        var = np.mean(c**2) * n / (n - 1)
        se = math.sqrt((np.mean(c**4) - var**2) / n)  # the sample variance's standard error
        assert abs(var - exact[vr]) < 5 * se, (vr, var, exact[vr], se)
        measured[vr] = (var, se)
    assert measured[True][0] + 5 * measured[True][1] < measured[False][0] - 5 * measured[False][1]


# --- f-distill ----------------------------------------------------------------------------------
@given(st.floats(0.05, 20.0))
def test_weight_identities(r):
    h = {name: float(F.weight(name)(r)) for name in F.DIVERGENCES}
    assert h["reverse_kl"] == pytest.approx(1.0, rel=1e-9)
    assert h["forward_kl"] == pytest.approx(r, rel=1e-9)
    assert h["jensen_shannon"] == pytest.approx(r / (r + 1), rel=1e-9)
    assert h["softened_reverse_kl"] == pytest.approx(1 / (r + 1), rel=1e-9)
    assert h["squared_hellinger"] == pytest.approx(0.5 * math.sqrt(r), rel=1e-9)
    assert h["jensen_shannon"] + h["softened_reverse_kl"] == pytest.approx(h["reverse_kl"], rel=1e-9)
    assert h["jeffreys"] == pytest.approx(h["forward_kl"] + h["reverse_kl"], rel=1e-9)
    assert float(F.weight(F.alpha_divergence(0.5))(r)) == pytest.approx(math.sqrt(r), rel=1e-9)
    for f in F.DIVERGENCES.values():  # f(1) = 0
        assert abs(float(f(1.0))) < 1e-12


TEACHER = (1.0, 0.7)  # p = N(1, 0.7²)
GRID = np.linspace(-15, 15, 60001)


def _divergence(f, mu, log_s):
    """D_f(p ‖ q) = ∫ q f(p/q) by the trapezoid rule (Gaussians: exact to ~1e-12)."""
    p = dist.Normal(*TEACHER).log_prob(GRID)
    q = dist.Normal(mu, jnp.exp(log_s)).log_prob(GRID)
    integrand = jnp.exp(q) * f(jnp.exp(p - q))
    return jnp.trapezoid(integrand, GRID)


@pytest.mark.parametrize("name", [*F.DIVERGENCES, "alpha_0.5"])
def test_fdistill_gradient_matches_finite_differences_of_the_divergence(name):
    f = F.alpha_divergence(0.5) if name == "alpha_0.5" else F.DIVERGENCES[name]
    theta = jnp.array([0.2, math.log(1.3)])  # student: x = mu + exp(log_s) z
    student = lambda th: dist.Normal(th[0], jnp.exp(th[1]))
    program = F.fdistill(
        generator=lambda th, z: th[0] + jnp.exp(th[1]) * z,
        teacher_score=lambda x, t, th: -(x - TEACHER[0]) / TEACHER[1] ** 2,
        fake_score=lambda x, t, th: -(x - th[0]) / jnp.exp(2 * th[1]),
        log_ratio=lambda x, t, th: dist.Normal(*TEACHER).log_prob(x) - student(th).log_prob(x),
        f=f, batch=32, exact=True,
    )
    assert ex.explain(program, theta, theta).certificate.kind == "unbiased"
    # the scores and ratio take the student's parameters as data (no gradient through them)
    grad = jax.jit(lambda k, th: ex.grad(program)(k, th, jax.lax.stop_gradient(th)))
    g = _estimates(lambda k: grad(k, theta), key_from("fdistill", name), 400)
    mean, se = _stats(g)
    eps = 1e-5
    fd = jnp.array([(_divergence(f, *(theta + eps * e)) - _divergence(f, *(theta - eps * e))) / (2 * eps)
                    for e in jnp.eye(2)])
    assert np.all(np.abs(mean - fd) < 5 * se + 1e-7), (name, mean, fd, se)


def test_fdistill_certificates_and_errors():
    common = dict(generator=lambda th, z: th + z, teacher_score=lambda x, t: -x, fake_score=lambda x, t: -x,
                  log_ratio=lambda x, t: 0.0 * x)
    th = jnp.zeros(())
    assert ex.explain(F.fdistill(**common), th).certificate.kind == "consistent"
    assert ex.explain(F.fdistill(**common, exact=True, normalize=True), th).certificate.kind == "consistent"
    assert ex.explain(F.fdistill(**common, clamp=(0.1, 10.0)), th).certificate.kind == "biased"
    with pytest.raises(ex.ArgumentError, match="unknown divergence 'kl'"):
        F.fdistill(**common, f="kl")
    with pytest.raises(ex.ArgumentError, match="prediction='noise'"):
        S.dsm(_linear_score, prediction="noise")
    with pytest.raises(ex.ArgumentError, match="weighting='snr'"):
        S.dsm(_linear_score, weighting="snr")
    bad = S.dsm(lambda p, x, t: x[:, :1], S.vp())
    with pytest.raises(ex.ProgramError, match=r"returned shape \(4, 1\); expected \(4, 2\)"):
        bad.estimate(jax.random.key(0), None, jnp.zeros((4, 2)))
