"""Compositional objectives: plug-in detection and the tracking estimators (SCGD, SOX, MSVR)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import estimax as ex
from estimax.solvers._fit import fit
from estimax.tracking import MSVR, SCGD, SOX



@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


# --- update sequences against a NumPy transcription ------------------------------------------
# F(θ) = (1/m) Σᵢ log E[gᵢ(θ; ζ)] + (λ/2)‖θ‖² with gᵢ(θ; ζ) = exp(aᵢ·θ + ζ). The "draws" ζ and
# the batch of indices are data passed to each step, so NumPy can replay them exactly.
M, D, B, LAM = 12, 3, 4, 0.1


def _problem(log_space: bool, indexed: bool):
    @ex.expectation
    def program(theta, a, zeta, idx):
        def term(i, z):
            index = dict(index=i, size=M) if indexed else {}
            if log_space:
                return ex.log_expect(lambda th, ai: ai @ th + z, name="g", **index)(theta, a[i])
            return jnp.log(ex.expect(lambda th, ai: jnp.exp(ai @ th + z), name="g", **index)(theta, a[i]))

        values = ex.vmap(term)(idx, zeta)
        return jnp.mean(values) + 0.5 * LAM * theta @ theta

    return program


def _data(steps, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(M, D)) * 0.5
    zetas = rng.normal(size=(steps, B)) * 0.3
    idxs = np.stack([rng.choice(M, B, replace=False) for _ in range(steps)])
    return a, zetas, idxs


def _numpy_run(method: str, beta, gamma, lr, momentum, steps, indexed, log_space):
    a, zetas, idxs = _data(steps)
    theta, mom = np.zeros(D), np.zeros(D)
    # positions: one estimate per index (indexed) or per lane of the batch (not indexed)
    u, seen = np.zeros(M if indexed else B), np.zeros(M if indexed else B, bool)
    prev_theta = theta.copy()
    thetas = []
    for t in range(steps):
        idx, z = idxs[t], zetas[t]
        pos = idx if indexed else np.arange(B)
        l = a[idx] @ theta + z
        l_prev = a[idx] @ prev_theta + z
        if indexed:
            g_gamma = (M - B) / (B * (1 - beta)) + (1 - beta)
        else:
            g_gamma = 1 - beta
        if gamma is not None:
            g_gamma = gamma
        grad = LAM * theta
        for b in range(B):
            p = pos[b]
            if log_space:
                # state s = log u; v = exp(l - s)
                if seen[p]:
                    c = u[p]
                    v = math.exp(l[b] - c)
                    arg = (1 - beta) + beta * v
                    if method == "msvr":
                        arg += g_gamma * (v - math.exp(l_prev[b] - c))
                        arg = max(arg, 0.5 * (1 - beta))
                    s_new = c + math.log(arg)
                else:
                    c, v = l[b], 1.0
                    s_new = l[b]
                # d/dθ of s_new + exp(c - s_new)(v - sg v): exp(c - s_new) v a_i
                grad = grad + math.exp(c - s_new) * v * a[idx[b]] / B
                u[p] = s_new
            else:
                g = math.exp(l[b])
                if seen[p]:
                    u_new = (1 - beta) * u[p] + beta * g
                    if method == "msvr":
                        u_new += g_gamma * (g - math.exp(l_prev[b]))
                else:
                    u_new = g
                grad = grad + (1.0 / u_new) * g * a[idx[b]] / B  # f'(u) ∇g, f = log
                u[p] = u_new
            seen[p] = True
        prev_theta = theta.copy()
        mom = grad + momentum * mom  # optax.sgd(lr, momentum): trace, then scale by -lr
        theta = theta - lr * mom
        thetas.append(theta.copy())
    return np.array(thetas), u


@pytest.mark.parametrize(
    "method,indexed,log_space",
    [("scgd", False, False), ("sox", True, False), ("msvr", True, False), ("sox", True, True), ("msvr", False, True)],
)
def test_updates_equal_a_numpy_transcription(method, indexed, log_space):
    steps, beta, lr, momentum = 25, 0.3, 0.2, 0.5
    a, zetas, idxs = _data(steps)
    program = _problem(log_space, indexed)
    tracking = {"scgd": SCGD(beta), "sox": SOX(beta), "msvr": MSVR(beta)}[method]
    tracker = ex.tracking.track(program, tracking)
    opt = optax.sgd(lr, momentum=momentum)
    theta = jnp.zeros(D)
    args = lambda t: (jnp.asarray(a), jnp.asarray(zetas[t]), jnp.asarray(idxs[t]))
    state, opt_state = tracker.init(theta, *args(0)), opt.init(theta)
    step = jax.jit(tracker.value_and_grad)
    thetas = []
    for t in range(steps):
        (_, grad), state, _ = step(jax.random.key(t), state, theta, *args(t))
        updates, opt_state = opt.update(grad, opt_state)
        theta = optax.apply_updates(theta, updates)
        thetas.append(np.asarray(theta))
    expected, u = _numpy_run(method, beta, None, lr, momentum, steps, indexed, log_space)
    np.testing.assert_allclose(np.array(thetas), expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(state.items["g"].value[0]), u, rtol=1e-12, atol=1e-14)


# --- the plug-in's bias is detected, and tracking removes it -----------------------------------
# log E[exp(X)], X ~ N(θ, 1), is θ + 1/2. Minimizing (log E[exp X] - 2)² gives θ* = 3/2; the
# plug-in with one draw minimizes E[(X - 2)²] instead, at θ = 2.


def _mgf_program(n):
    @ex.expectation
    def program(theta):
        def log_w(th):
            return ex.sample(dist.Normal(th, 1.0), name="x")

        return (ex.log_expect(log_w, n=n, name="log_mgf")(theta) - 2.0) ** 2

    return program


def test_plug_in_bias_is_named_by_explain():
    plan = ex.explain(_mgf_program(1), 0.0)
    assert plan.certificate.kind == "biased"
    text = str(plan)
    assert "ex.log_expect('log_mgf') is the log of an expectation" in text
    assert "`integer_pow` applied to ex.log_expect('log_mgf')" in text
    assert plan.compositions[0][0] == "ex.log_expect('log_mgf')"
    assert "tracked by ex.fit" in text


def test_a_linear_use_of_an_expectation_is_not_a_composition():
    @ex.expectation
    def program(theta):
        m = ex.expect(lambda t: ex.sample(dist.Normal(t, 1.0), name="z") ** 2, name="m")(theta)
        return 3.0 * m - theta

    plan = ex.explain(program, 0.0)
    assert plan.certificate.kind == "unbiased" and plan.compositions == ()


def test_an_exact_expectation_is_not_a_composition():
    """An expectation over an enumerated choice is computed exactly: `log` of it is exact, so
    the program is certified unbiased, ex.fit tracks nothing, and its gradient is the exact
    one (log Σ_k p_k e^{θk})."""
    p = jnp.array([0.2, 0.3, 0.5])

    @ex.expectation
    def program(theta):
        def w(th):
            return jnp.exp(th * ex.sample(dist.Categorical(probs=p), name="k", estimator=ex.enum).astype(th.dtype))

        return (jnp.log(ex.expect(w, n=3, name="mgf")(theta)) - 2.0) ** 2

    plan = ex.explain(program, 0.5)
    assert plan.certificate.kind == "unbiased" and plan.compositions == (), str(plan)
    theta = jnp.float64(0.5)
    exact = jax.grad(lambda t: (jnp.log(jnp.sum(p * jnp.exp(t * jnp.arange(3.0)))) - 2.0) ** 2)(theta)
    got = ex.grad(program)(jax.random.key(0), theta)
    assert jnp.allclose(got, exact, rtol=1e-12), (got, exact)
    result = fit(program, theta, optimizer=optax.sgd(0.01), steps=3, key=jax.random.key(1))
    assert result.tracking is None and "tracking=None" in repr(result)
    # drawn instead of summed: a composition, tracked by SCGD, and the repr says so
    result = fit(_mgf_program(2), theta, optimizer=optax.sgd(0.01), steps=3, key=jax.random.key(1))
    assert "tracking=SCGD(beta=0.1)" in repr(result)


def test_tracking_converges_where_the_plug_in_does_not():
    n, beta, seeds, steps = 1, 0.05, 8, 4000
    program = _mgf_program(n)
    # two time scales: the parameters move slower than the tracked value (lr << beta)
    opt = optax.sgd(optax.cosine_decay_schedule(0.02, steps, alpha=0.01))
    runs = {"tracked": SCGD(beta), "plug-in": None}
    final = {name: np.array([
        float(fit(program, jnp.float64(0.0), optimizer=opt, steps=steps, key=jax.random.key(seed),
                  tracking=tracking, chunk=250).params)
        for seed in range(seeds)
    ]) for name, tracking in runs.items()}
    se = {name: v.std(ddof=1) / math.sqrt(seeds) for name, v in final.items()}
    # The tracked log-mean is biased low by about β/(2-β) · CV²/(2n), CV² = Var(e^X)/Z² = e - 1
    # (a log of a moving average); the fixed point moves up by as much.
    bias = beta / (2 - beta) * (math.e - 1) / (2 * n)
    assert abs(final["tracked"].mean() - 1.5) < 5 * se["tracked"] + bias
    # the plug-in with one draw minimizes E[(X - 2)²]: θ = 2
    assert abs(final["plug-in"].mean() - 2.0) < 5 * se["plug-in"]
    assert final["plug-in"].mean() - 1.5 > 10 * se["plug-in"] + bias


def test_the_tracked_estimator_is_certified_consistent():
    tracker = ex.tracking.track(_mgf_program(2), SCGD(0.1))
    cert = tracker.certificate(0.5)
    assert cert.kind == "consistent"
    assert "ex.log_expect('log_mgf') tracked by SCGD(beta=0.1)" in str(cert)


# --- clear errors ----------------------------------------------------------------------------


def _two_same_names(theta):
    a = ex.expect(lambda t: ex.sample(dist.Normal(t, 1.0), name="z"), name="m")(theta)
    b = ex.expect(lambda t: ex.sample(dist.Normal(t, 2.0), name="z"), name="m")(theta)
    return a**2 + b**2


def _in_scan(theta):
    def body(c, _):
        return c + jnp.log(ex.expect(lambda t: jnp.exp(ex.sample(dist.Normal(t, 1.0), name="z")), name="m")(theta)), None

    return jax.lax.scan(body, 0.0, None, length=2)[0]


def _linear(theta):
    return ex.expect(lambda t: ex.sample(dist.Normal(t, 1.0), name="z"), name="m")(theta)


def _unindexed(theta):
    return jnp.log(ex.expect(lambda t: jnp.exp(ex.sample(dist.Normal(t, 1.0), name="z")), name="m")(theta))


@pytest.mark.parametrize(
    "fn,method,match",
    [
        (_two_same_names, SCGD(), "two tracked expectations are named 'm'"),
        (_in_scan, SCGD(), r"ex.expect\('m'\) is used nonlinearly inside `scan`"),
        (_linear, SCGD(), "uses no expectation nonlinearly"),
        (_unindexed, SOX(), r"ex.expect\('m'\) has no index"),
    ],
)
def test_tracking_errors_name_the_expectation(fn, method, match):
    with pytest.raises((ex.ProgramError, ex.UnsupportedError), match=match):
        ex.tracking.track(fn, method).init(0.5)


def test_index_and_size_are_checked():
    def bad(**kw):
        return lambda theta: jnp.log(ex.expect(lambda t: t**2 + 1.0, name="m", **kw)(theta))

    with pytest.raises(ex.ArgumentError, match="index= and size= go together"):
        ex.explain(bad(index=0), 0.5)
    with pytest.raises(ex.ArgumentError, match="expects integers"):
        ex.explain(bad(index=0.5, size=3), 0.5)
    with pytest.raises(ex.ArgumentError, match="positive integer"):
        ex.explain(bad(index=0, size=0), 0.5)
    with pytest.raises(ex.ProgramError, match="one array of log-weights"):
        ex.explain(lambda t: ex.log_expect(lambda s: (s, s), name="l")(t), 0.5)


def test_fit_tracking_arguments_are_checked():
    opt = optax.sgd(0.1)
    with pytest.raises(ex.ArgumentError, match='tracking must be "auto"'):
        fit(_unindexed, jnp.float64(0.5), optimizer=opt, steps=2, key=jax.random.key(0), tracking="scgd")
    with pytest.raises(ex.ArgumentError, match="tracking_state= was given"):
        fit(_linear, jnp.float64(0.5), optimizer=opt, steps=2, key=jax.random.key(0), tracking_state={})
    with pytest.raises(ValueError, match="beta must be in"):
        MSVR(beta=0.0)


# --- learning unnormalized models: the closed-form tasks ------------------------------------


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_compositional.py"
    spec = importlib.util.spec_from_file_location("bench_compositional", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mu", [0.5, 2.0, 4.0])
def test_gaussian_mean_is_reached_within_the_budget(mu):
    """Noise N(0, 3²), Adam 0.1, SCGD: every seed is within 0.05 of the sample mean within
    100 iterations (bench_compositional.py: median 5 / 23 / 57; NCE 6 / 25 / 133)."""
    b = _bench()
    x = mu + jax.random.normal(jax.random.key(7), (b.N_DATA,), jnp.float32)
    nll, _ = b.gaussian_programs(3.0)
    run = b.trajectory_ours(nll, SCGD(0.1), optax.adam(0.1), 100)
    hits = [b.first_hit(run(x, jax.random.key(seed)), float(jnp.mean(x))) for seed in range(4)]
    assert all(h is not None and h <= 100 for h in hits), hits


def test_a_poor_proposal_is_reported_by_its_effective_sample_size():
    """Noise N(0, 1) for data around 4: the weights exp(4y - 8) have a relative second moment
    of e^16; fit warns and records an ESS near zero."""
    b = _bench()
    x = 4.0 + jax.random.normal(jax.random.key(7), (b.N_DATA,), jnp.float32)
    nll, _ = b.gaussian_programs(1.0)
    with pytest.warns(RuntimeWarning, match=r"ex.log_expect\('log_z'\) have an effective sample size of"):
        r = fit(nll, jnp.float32(0.0), x, optimizer=optax.adam(0.03), steps=300, key=jax.random.key(0), chunk=100)
    assert r.tracking == SCGD() and np.all(r.ess["log_z"][1:] < 0.01)
    # the well-covered case does not warn
    nll3, _ = b.gaussian_programs(3.0)
    r = fit(nll3, jnp.float32(0.0), x, optimizer=optax.adam(0.03), steps=300, key=jax.random.key(0), chunk=100)
    assert np.all(r.ess["log_z"] > 0.1)


@pytest.mark.slow
def test_exponential_family_reaches_the_mle():
    """f(x) = θ·x - Σ(x²/2 + x⁴/4) in d = 10; θ_MLE by quadrature (moment matching)."""
    b = _bench()
    x, theta_mle = b.expfam_problem()
    program = b.expfam_program(x, 512)
    theta = jax.jit(lambda key: b.averaged_run(program, SCGD(0.1), x, 4000, 0.3, key))(jax.random.key(0))
    assert np.linalg.norm(np.asarray(theta) - theta_mle) <= 1e-2


def test_a_discrete_site_of_a_log_expectation_is_drawn_not_summed():
    """log E[exp(θK)], K ~ Categorical(p), written with ex.log_expect: by default K is drawn
    (ex.enum would average the log-weight first and give θ E[K]); tracked, the fixed point of
    (log E e^{θK} - 2)² is the exact root; an explicit ex.enum is certified biased and refused
    by the tracking pass."""
    p = jnp.array([0.2, 0.3, 0.5])

    def program_with(estimator):
        @ex.expectation
        def program(theta):
            def log_w(th):
                return th * ex.sample(dist.Categorical(probs=p), name="k", estimator=estimator).astype(th.dtype)

            return (ex.log_expect(log_w, n=4, name="log_mgf")(theta) - 2.0) ** 2

        return program

    plan = ex.explain(program_with(None), 0.5)
    site = plan.site("log_mgf/k")
    assert site.strategy.describe() != "enum" and "draws of its log-weight" in site.reason, str(plan)
    steps, seeds = 3000, 6
    opt = optax.sgd(optax.cosine_decay_schedule(0.02, steps, alpha=0.01))
    final = np.array([float(fit(program_with(None), jnp.float64(0.5), optimizer=opt, steps=steps, chunk=500,
                                key=jax.random.key(seed), tracking=SCGD(0.05)).params) for seed in range(seeds)])
    root = __import__("scipy.optimize").optimize.brentq(
        lambda t: math.log(float(jnp.sum(p * jnp.exp(t * jnp.arange(3.0))))) - 2.0, 0.0, 5.0)
    # θE[K] = 2 (what an enumerated site would give) is θ = 1.54; the root is 1.36. The tracked
    # log-mean is biased low by about β/(2-β) · Var(e^{θK})/(2 Z²); the fixed point moves up by as much
    z = jnp.sum(p * jnp.exp(root * jnp.arange(3.0)))
    cv2 = float(jnp.sum(p * jnp.exp(2 * root * jnp.arange(3.0))) / z**2 - 1.0)
    bias = 0.05 / 1.95 * cv2 / (2 * 4) / 1.3  # d/dθ log E e^{θK} at the root ≈ 1.3 (tilted mean of K)
    se = final.std(ddof=1) / math.sqrt(seeds)
    assert abs(final.mean() - root) < 5 * se + bias, (final, root, se, bias)
    assert abs(final.mean() - 2.0 / 1.3) > 10 * (se + bias)
    summed = program_with(ex.enum)
    assert ex.explain(summed, 0.5).certificate.kind == "biased"
    assert "uses ex.enum, which averages the log-weight" in str(ex.explain(summed, 0.5))
    with pytest.raises(ex.UnsupportedError, match="site 'k' of ex.log_expect\\('log_mgf'\\) uses ex.enum"):
        fit(summed, jnp.float64(0.5), optimizer=opt, steps=2, key=jax.random.key(0), tracking=SCGD(0.05))
