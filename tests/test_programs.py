"""Programs with structure: dependent sites, stochastic conditionals, loops, vmap, nested
expectations. Each against an exact answer, with tolerances from the standard error."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax.scipy.stats import norm

import estimax as ex
from estimax.testing import assert_unbiased, key_from, mean_and_se

N = 20000


def e_abs_normal(mu, s):
    return s * jnp.sqrt(2 / jnp.pi) * jnp.exp(-(mu**2) / (2 * s**2)) + mu * (1 - 2 * norm.cdf(-mu / s))


# --- dependent sites: a discrete choice feeds a continuous site's parameters -------------
DISCRETE = {"enum": ex.enum, "reinforce": ex.reinforce, "mvd": ex.mvd}
CONTINUOUS = {"reparam": ex.reparam, "reinforce": ex.reinforce(baseline=1.0), "mvd": ex.mvd}


@pytest.mark.parametrize("sb", sorted(DISCRETE))
@pytest.mark.parametrize("sz", sorted(CONTINUOUS))
def test_dependent_sites(sb, sz):
    @ex.expectation
    def objective(theta):
        b = ex.sample(dist.Bernoulli(logits=theta["l"]), estimator=DISCRETE[sb], name="b")
        z = ex.sample(dist.Normal(theta["mu"][b], jnp.exp(theta["log_s"])), estimator=CONTINUOUS[sz], name="z")
        return z**2 + z

    def exact(theta):
        p = jax.nn.sigmoid(theta["l"])
        m = theta["mu"]
        s2 = jnp.exp(2 * theta["log_s"])
        e = m**2 + s2 + m
        return (1 - p) * e[0] + p * e[1]

    theta = {"l": jnp.float32(0.4), "mu": jnp.array([-0.5, 1.2]), "log_s": jnp.float32(-0.3)}
    assert_unbiased(ex.grad(objective), jax.grad(exact)(theta), args=(theta,), seed=("dep", sb, sz), n=N)
    assert_unbiased(objective.estimate, exact(theta), args=(theta,), seed=("dep-value", sb, sz), n=N)


# --- a stochastic lax.cond -----------------------------------------------------------------
@pytest.mark.parametrize("sb", sorted(DISCRETE))
def test_stochastic_cond(sb):
    @ex.expectation
    def objective(theta, x):
        z = ex.sample(dist.Normal(theta["mu"], jnp.exp(theta["log_s"])), name="z")
        b = ex.sample(dist.Bernoulli(logits=theta["l"]), estimator=DISCRETE[sb], name="b")
        return jax.lax.cond(b > 0, lambda: (z - x) ** 2, lambda: jnp.abs(z))

    def exact(theta, x):
        mu, s, p = theta["mu"], jnp.exp(theta["log_s"]), jax.nn.sigmoid(theta["l"])
        return p * ((mu - x) ** 2 + s**2) + (1 - p) * e_abs_normal(mu, s)

    theta = {"mu": jnp.float32(0.3), "log_s": jnp.float32(-0.2), "l": jnp.float32(0.5)}
    x = jnp.float32(1.0)
    assert_unbiased(ex.grad(objective), jax.grad(exact)(theta, x), args=(theta, x), seed=("cond", sb), n=N)


def test_sites_inside_cond_branches():
    """Random choices inside the branches: the continuation crosses the cond boundary."""

    @ex.expectation
    def objective(theta):
        b = ex.sample(dist.Bernoulli(logits=theta["l"]), name="b")  # enum by default

        def heads():
            c = ex.sample(dist.Bernoulli(logits=theta["m"]), estimator=ex.mvd, name="c")
            return 3.0 * c + 1.0

        def tails():
            z = ex.sample(dist.Normal(theta["mu"], 1.0), name="z")
            return z**2

        return jax.lax.cond(b > 0, heads, tails)

    def exact(theta):
        p, q = jax.nn.sigmoid(theta["l"]), jax.nn.sigmoid(theta["m"])
        return p * (3 * q + 1) + (1 - p) * (theta["mu"] ** 2 + 1)

    theta = {"l": jnp.float32(-0.3), "m": jnp.float32(0.8), "mu": jnp.float32(0.6)}
    assert ex.explain(objective, theta).site("c").context.startswith("cond")
    assert_unbiased(ex.grad(objective), jax.grad(exact)(theta), args=(theta,), seed="branches", n=N)


# --- enumeration is exact -----------------------------------------------------------------
def test_enumeration_is_exact():
    w = jnp.array([0.5, -1.0, 2.0])

    @ex.expectation
    def objective(theta):
        b = ex.sample(dist.Bernoulli(logits=theta["l"]), estimator=ex.enum, name="b")
        c = ex.sample(dist.Categorical(logits=theta["logits"] + b), estimator=ex.enum, name="c")
        return w[c] ** 2 + b * w[c]

    def exact(theta):
        p = jax.nn.sigmoid(theta["l"])
        total = 0.0
        for b in (0, 1):
            pc = jax.nn.softmax(theta["logits"] + b)
            total += jnp.where(b == 1, p, 1 - p) * jnp.sum(pc * (w**2 + b * w))
        return total

    theta = {"l": jnp.float32(0.3), "logits": jnp.array([0.1, -0.4, 0.7])}
    vg = ex.value_and_grad(objective)
    for seed in range(3):
        v, g = vg(jax.random.PRNGKey(seed), theta)
        np.testing.assert_allclose(v, exact(theta), atol=1e-6)
        ge = jax.grad(exact)(theta)
        for k in theta:
            np.testing.assert_allclose(g[k], ge[k], atol=1e-6)


def test_mvd_lower_variance_than_reinforce_on_bernoulli():
    def make(strategy):
        @ex.expectation
        def objective(l):
            b = ex.sample(dist.Bernoulli(logits=l), estimator=strategy, name="b")
            eps = ex.sample(dist.Normal(0.0, 1.0), name="eps")
            return (b + eps) ** 2 + 2.0

        return ex.grad(objective)

    l = jnp.float32(0.3)
    key = key_from("mvd-vs-reinforce")
    g_mvd = jax.vmap(make(ex.mvd), (0, None))(jax.random.split(key, N), l)
    g_rf = jax.vmap(make(ex.reinforce), (0, None))(jax.random.split(key, N), l)
    # E = p·E(1 + eps)^2 + (1 - p)·E eps^2 + 2 = 2p + (1 - p) + 2
    exact = jax.grad(lambda l: jax.nn.sigmoid(l) * 2.0 + (1 - jax.nn.sigmoid(l)) * 1.0 + 2.0)(l)
    for g in (g_mvd, g_rf):  # both unbiased ...
        assert abs(g.mean() - exact) < 5 * g.std() / np.sqrt(N)
    var_mvd, var_rf = float(g_mvd.var()), float(g_rf.var())
    # ... and the sample variances differ far beyond their sampling error (~2% relative here)
    assert var_mvd < 0.5 * var_rf, (var_mvd, var_rf)


# --- loops ----------------------------------------------------------------------------------
def test_reparam_inside_fori_loop():
    T = 5

    @ex.expectation
    def walk(mu):
        def body(t, z):
            return z + ex.sample(dist.Normal(mu, 1.0), name="step")

        z = jax.lax.fori_loop(0, T, body, jnp.float32(0.0))
        return z**2

    exact = lambda mu: (T * mu) ** 2 + T
    mu = jnp.float32(0.7)
    assert ex.explain(walk, mu).site("step").context == "scan body"
    assert_unbiased(ex.grad(walk), jax.grad(exact)(mu), args=(mu,), seed="fori-reparam", n=N)


def test_reinforce_inside_scan():
    T = 4

    @ex.expectation
    def count(l):
        def body(c, _):
            b = ex.sample(dist.Bernoulli(logits=l), estimator=ex.reinforce(baseline=2.0), name="b")
            return c + b, None

        total, _ = jax.lax.scan(body, jnp.int32(0), None, length=T)
        return jnp.asarray(total, jnp.float32) ** 2

    def exact(l):
        p = jax.nn.sigmoid(l)
        return T * p * (1 - p) + (T * p) ** 2

    l = jnp.float32(-0.4)
    assert_unbiased(ex.grad(count), jax.grad(exact)(l), args=(l,), seed="scan-reinforce", n=N)


def test_enum_inside_loop_is_refused_with_the_site_name():
    @ex.expectation
    def bad(l):
        def body(t, c):
            return c + ex.sample(dist.Bernoulli(logits=l), estimator=ex.enum, name="flip")

        return jnp.asarray(jax.lax.fori_loop(0, 3, body, jnp.int32(0)), jnp.float32)

    with pytest.raises(ex.UnsupportedError, match=r"'flip'.*ex\.enum.*loop"):
        ex.grad(bad)(jax.random.PRNGKey(0), 0.1)
    # without a derivative flowing into it the site is just sampled
    assert np.isfinite(bad.estimate(jax.random.PRNGKey(0), 0.1))


# --- vmap inside a program ------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["reparam", "reinforce", "mvd"])
def test_vmapped_continuous_site(strategy):
    s = {"reparam": ex.reparam, "reinforce": ex.reinforce, "mvd": ex.mvd}[strategy]

    @ex.expectation
    def objective(mus):
        zs = jax.vmap(lambda m: ex.sample(dist.Normal(m, 0.5), estimator=s, name="z"))(mus)
        return jnp.sum(zs**2) + zs[0] * zs[1]

    exact = lambda mus: jnp.sum(mus**2 + 0.25) + mus[0] * mus[1]
    mus = jnp.array([0.3, -0.8, 1.1])
    assert ex.explain(objective, mus).site("z").distribution == "Normal(lanes=(3,))"
    assert_unbiased(ex.grad(objective), jax.grad(exact)(mus), args=(mus,), seed=("vmap", strategy), n=N)


def test_vmapped_discrete_site_enumerated_jointly():
    @ex.expectation
    def objective(ls):
        bs = jax.vmap(lambda l: ex.sample(dist.Bernoulli(logits=l), name="b"))(ls)
        return jnp.prod(bs + 1.0)

    exact = lambda ls: jnp.prod(jax.nn.sigmoid(ls) * 2 + (1 - jax.nn.sigmoid(ls)))
    ls = jnp.array([0.3, -0.8, 1.1])
    plan = ex.explain(objective, ls)
    assert plan.site("b").strategy is ex.enum  # 2**3 joint values: enumerated by default
    v, g = ex.value_and_grad(objective)(jax.random.PRNGKey(0), ls)
    np.testing.assert_allclose(v, exact(ls), rtol=1e-6)
    np.testing.assert_allclose(g, jax.grad(exact)(ls), rtol=1e-5)


# --- nested expectations --------------------------------------------------------------------
def inner_program(theta):
    b = ex.sample(dist.Bernoulli(logits=theta), estimator=ex.reinforce, name="b")
    return (b + 1.0) ** 2


def test_nested_expectation_used_linearly_is_unbiased():
    @ex.expectation
    def outer(theta):
        y = ex.expect(inner_program, n=2)(theta)
        z = ex.sample(dist.Normal(theta, 1.0), name="z")
        return 3.0 * y + z * 2.0 - 1.0

    exact = lambda t: 3.0 * (jax.nn.sigmoid(t) * 4 + (1 - jax.nn.sigmoid(t))) + 2.0 * t - 1.0
    theta = jnp.float32(0.25)
    plan = ex.explain(outer, theta)
    assert plan.certificate.kind == "unbiased"
    assert [s.name for s in plan.sites] == ["inner_program/b", "z"]
    assert_unbiased(ex.grad(outer), jax.grad(exact)(theta), args=(theta,), seed="nested-linear", n=N)


def test_nested_expectation_used_nonlinearly_is_certified_biased():
    @ex.expectation
    def outer(theta):
        return jnp.log(ex.expect(inner_program)(theta))

    plan = ex.explain(outer, 0.25)
    assert plan.certificate.kind == "biased"
    assert any("log" in r for r in plan.certificate.reasons)
    # and the plug-in really is biased: E[log Ŷ] < log E[Y] (Jensen)
    mean, se = mean_and_se(outer.estimate, key_from("jensen"), N, args=(jnp.float32(0.25),))
    p = jax.nn.sigmoid(0.25)
    assert float(mean) < float(jnp.log(4 * p + (1 - p))) - 5 * float(se)


def test_expectation_called_inside_another_program_inlines_its_sites():
    @ex.expectation
    def part(mu):
        return ex.sample(dist.Normal(mu, 1.0), name="z") ** 2

    @ex.expectation
    def whole(mu):
        return part(mu) + ex.sample(dist.Normal(2 * mu, 1.0), name="w")

    plan = ex.explain(whole, 0.5)
    assert [s.name for s in plan.sites] == ["z", "w"]
    exact = lambda mu: mu**2 + 1 + 2 * mu
    mu = jnp.float32(0.5)
    assert_unbiased(ex.grad(whole), jax.grad(exact)(mu), args=(mu,), seed="inline", n=N)


def test_jitted_helper_is_recursed_into():
    @jax.jit
    def helper(l, y):
        b = ex.sample(dist.Bernoulli(logits=l), estimator=ex.mvd, name="b")
        return (b - y) ** 2

    @ex.expectation
    def objective(l):
        return helper(l, 0.3) * 2.0

    exact = lambda l: 2 * (jax.nn.sigmoid(l) * 0.49 + (1 - jax.nn.sigmoid(l)) * 0.09)
    l = jnp.float32(0.2)
    assert ex.explain(objective, l).site("b").strategy is ex.mvd
    assert_unbiased(ex.grad(objective), jax.grad(exact)(l), args=(l,), seed="jit-helper", n=N)


@pytest.mark.parametrize("family", ["Gamma", "Beta", "Dirichlet"])
def test_implicit_reparameterization_is_the_default(family):
    d = {"Gamma": lambda a: dist.Gamma(a, 1.0), "Beta": lambda a: dist.Beta(a, 3.0),
         "Dirichlet": lambda a: dist.Dirichlet(a * jnp.ones(3))}[family]

    @ex.expectation
    def objective(a):
        return jnp.sum(ex.sample(d(a), name="x"))

    site = ex.explain(objective, 2.0).site("x")
    assert site.strategy is ex.reparam and "implicit" in site.reason


def test_enumeration_of_a_larger_support_through_a_conditional():
    """K = 12 > the unroll limit: the continuation is looped over (lax.map) and differentiated."""
    w = jnp.linspace(-1.0, 1.5, 12)

    @ex.expectation
    def objective(theta):
        c = ex.sample(dist.Categorical(logits=theta["logits"]), estimator=ex.enum, name="c")
        z = ex.sample(dist.Normal(theta["mu"], 1.0), name="z")
        return jax.lax.cond(c % 2 == 0, lambda: w[c] * z, lambda: w[c] ** 2 + z**2)

    def exact(theta):
        p = jax.nn.softmax(theta["logits"])
        even = jnp.arange(12) % 2 == 0
        return jnp.sum(p * jnp.where(even, w * theta["mu"], w**2 + theta["mu"] ** 2 + 1.0))

    theta = {"logits": jnp.linspace(0.5, -0.5, 12), "mu": jnp.float32(0.4)}
    assert_unbiased(ex.grad(objective), jax.grad(exact)(theta), args=(theta,), seed="enum-12", n=N)


def test_nested_vmap_site():
    @ex.expectation
    def objective(m):
        z = jax.vmap(jax.vmap(lambda mu: ex.sample(dist.Normal(mu, 1.0), estimator=ex.mvd, name="z")))(m)
        return jnp.sum(z * jnp.arange(6.0).reshape(2, 3))

    m = jnp.arange(6.0).reshape(2, 3) / 10
    assert ex.explain(objective, m).site("z").distribution == "Normal(lanes=(2, 3))"
    exact = lambda m: jnp.sum(m * jnp.arange(6.0).reshape(2, 3))
    assert_unbiased(ex.grad(objective), jax.grad(exact)(m), args=(m,), seed="nested-vmap", n=N)


def test_reinforce_with_a_baseline_function_of_the_distribution():
    @ex.expectation
    def objective(l):
        b = ex.sample(
            dist.Bernoulli(logits=l), estimator=ex.reinforce(baseline=lambda d: 2.0 * d.probs), name="b"
        )
        return (b + 0.5) ** 2

    exact = lambda l: jax.nn.sigmoid(l) * 2.25 + (1 - jax.nn.sigmoid(l)) * 0.25
    l = jnp.float32(-0.6)
    assert "reinforce(baseline=<lambda>)" in str(ex.explain(objective, l))
    assert_unbiased(ex.grad(objective), jax.grad(exact)(l), args=(l,), seed="baseline-fn", n=N)


@pytest.mark.parametrize("strategy", ["enum", "reinforce"])
def test_binomial_finite_support(strategy):
    s = {"enum": ex.enum, "reinforce": ex.reinforce}[strategy]

    @ex.expectation
    def objective(l):
        k = ex.sample(dist.Binomial(total_count=3, logits=l), estimator=s, name="k")
        return (k - 1.0) ** 2

    def exact(l):
        p = jax.nn.sigmoid(l)
        return 3 * p * (1 - p) + (3 * p - 1) ** 2

    l = jnp.float32(0.0)  # NumPyro's own log-density derivative is wrong exactly here
    assert_unbiased(ex.grad(objective), jax.grad(exact)(l), args=(l,), seed=("binomial", strategy), n=N)


def test_while_loop_body_forward_mode():
    @ex.expectation
    def objective(mu):
        def body(c):
            i, z = c
            return i + 1, z + ex.sample(dist.Normal(mu, 1.0), name="step")

        _, z = jax.lax.while_loop(lambda c: c[0] < 3, body, (jnp.int32(0), jnp.float32(0.0)))
        return z

    # d/dmu E[sum of 3 steps] = 3, exactly (pathwise); forward mode through while_loop
    _, t = jax.jvp(lambda m: objective.estimate(jax.random.PRNGKey(0), m), (0.2,), (1.0,))
    np.testing.assert_allclose(t, 3.0, rtol=1e-6)


def test_rao_blackwellization_keeps_unbiasedness_and_cuts_variance():
    """A score multiplies only the cost terms downstream of its site."""

    def terms(theta):
        b1 = ex.sample(dist.Bernoulli(logits=theta["l1"]), estimator=ex.reinforce, name="b1")
        b2 = ex.sample(dist.Bernoulli(logits=theta["l2"] + b1), estimator=ex.reinforce, name="b2")
        noise = ex.sample(dist.Normal(0.0, 3.0), name="noise")
        return [(b1 - 0.3) ** 2, 2.0 * b2 * b1, 5.0 * noise + 10.0, theta["l1"] ** 2]

    @ex.expectation
    def separable(theta):
        a, b, c, d = terms(theta)
        return a + b - (-c) + d / 2.0

    @ex.expectation
    def opaque(theta):  # the same value, summed in one reduction: no decomposition
        a, b, c, d = terms(theta)
        return jnp.sum(jnp.stack([a, b, c, d / 2.0]))

    def exact(theta):
        p1 = jax.nn.sigmoid(theta["l1"])
        p2_given_1 = jax.nn.sigmoid(theta["l2"] + 1.0)
        return p1 * 0.49 + (1 - p1) * 0.09 + 2.0 * p1 * p2_given_1 + 10.0 + theta["l1"] ** 2 / 2

    theta = {"l1": jnp.float32(0.2), "l2": jnp.float32(-0.4)}
    exact_grad = jax.grad(exact)(theta)
    rb = assert_unbiased(ex.grad(separable), exact_grad, args=(theta,), seed="rb", n=N)
    plain = assert_unbiased(ex.grad(opaque), exact_grad, args=(theta,), seed="rb-plain", n=N)
    for k in theta:  # standard errors over the same n: the variance ratio is far beyond noise
        assert rb.se[k] < 0.5 * plain.se[k], (k, rb.se[k], plain.se[k])


def test_traced_baseline_and_ema_state():
    """A baseline passed as a program argument (e.g. a moving average carried as state)."""

    @ex.expectation
    def objective(l, b):
        k = ex.sample(dist.Bernoulli(logits=l), estimator=ex.reinforce(baseline=b), name="k")
        return (k + 0.5) ** 2

    exact = lambda l: jax.nn.sigmoid(l) * 2.25 + (1 - jax.nn.sigmoid(l)) * 0.25
    l = jnp.float32(0.7)
    assert "reinforce(baseline=<argument>)" in str(ex.explain(objective, l, 0.0))
    g_b = jax.jit(ex.grad(objective, argnums=(0, 1)))
    g0, gb = g_b(jax.random.PRNGKey(0), l, jnp.float32(1.0))
    assert gb == 0.0  # the baseline gets no gradient
    # for one Bernoulli, b* = f(1)(1 - p) + f(0) p makes (f - b*)(k - p) constant: zero variance
    p = jax.nn.sigmoid(l)
    b_star = 2.25 * (1 - p) + 0.25 * p
    good = assert_unbiased(ex.grad(objective), jax.grad(exact)(l), args=(l, b_star), seed="b-arg", n=N)
    none = assert_unbiased(ex.grad(objective), jax.grad(exact)(l), args=(l, jnp.float32(0.0)), seed="b-0", n=N)
    assert good.se < 1e-3 * none.se
    # the moving average is b ← 0.9·b + 0.1·f, step by step ...
    b = jnp.float32(0.0)
    for i in range(20):
        f = objective.estimate(jax.random.PRNGKey(i), l, b)
        new = ex.ema_update(b, f, decay=0.9)
        assert float(new) == pytest.approx(0.9 * float(b) + 0.1 * float(f), rel=1e-6)
        b = new

    # ... so after T steps from 0 its mean is (1 − 0.9^T)·E[f], over many independent runs
    def run(key):
        def step(b, k):
            return ex.ema_update(b, objective.estimate(k, l, b), decay=0.9), None

        return jax.lax.scan(step, jnp.float32(0.0), jax.random.split(key, 60))[0]

    finals = np.asarray(jax.vmap(run)(jax.random.split(key_from("ema-runs"), 4000)), np.float64)
    target = (1 - 0.9**60) * float(exact(l))
    assert abs(finals.mean() - target) < 5 * finals.std(ddof=1) / np.sqrt(finals.size), (finals.mean(), target)


def test_rao_blackwellized_gradient_does_not_depend_on_the_batch_size():
    """Regression: an earlier formulation of the masked cost (stack, multiply, reduce) was
    miscompiled by XLA:CPU for lanes >= 10922 of a large vmap over keys under reverse mode."""

    @ex.expectation
    def objective(l, y):
        lw = ex.vmap(
            lambda: jnp.sum(ex.sample(dist.Bernoulli(logits=l).to_event(1), estimator=ex.reinforce, name="b") * (l + y)),
            axis_size=3,
        )()
        return jnp.sum(lw) + 1.0

    l, y = jnp.array([0.3, -0.2, 0.1]), jnp.float32(0.5)
    f = jax.jit(jax.vmap(ex.grad(objective), (0, None, None)))
    keys = jax.random.split(key_from("batch-size"), 12000)
    full = f(keys, l, y)
    chunked = jnp.concatenate([f(keys[i : i + 2000], l, y) for i in range(0, 12000, 2000)])
    np.testing.assert_allclose(full, chunked, rtol=1e-5, atol=1e-5)


T5 = jnp.array([0.1, 0.9, 0.4, 0.7, 0.2])


def _element_cost(h):
    return jnp.tanh(3.0 * (h.astype(jnp.float32) - T5)) ** 2


def _exact_element_cost(theta):
    p = jax.nn.sigmoid(theta)
    return p * jnp.tanh(3.0 * (1 - T5)) ** 2 + (1 - p) * jnp.tanh(3.0 * (0 - T5)) ** 2


def test_per_element_rao_blackwellization_of_a_batched_site():
    """Element b's score multiplies only the terms of element b (as TraceGraph_ELBO does per
    plate element); a term mixing the elements still counts whole."""

    def site(theta):
        return ex.sample(dist.Bernoulli(logits=theta), estimator=ex.reinforce, name="h")

    @ex.expectation
    def per_element(theta):
        h = site(theta)
        return jnp.sum(_element_cost(h) * jnp.exp(theta)) + 0.5 * jnp.sum(theta**2)

    @ex.expectation
    def mixed(theta):
        h = site(theta).astype(jnp.float32)
        return jnp.sum(_element_cost(h)) + 0.1 * jnp.sum(h) ** 2

    @ex.expectation
    def opaque(theta):  # the same value through a contraction over the elements: one signal
        h = site(theta)
        return jnp.dot(_element_cost(h), jnp.exp(theta)) + 0.5 * jnp.sum(theta**2)

    theta = jnp.array([0.3, -0.2, 0.5, 1.0, -1.0])
    exact = jax.grad(lambda t: jnp.sum(_exact_element_cost(t) * jnp.exp(t)) + 0.5 * jnp.sum(t**2))(theta)
    assert "Rao-Blackwellized per element: h (5 elements)" in str(ex.explain(per_element, theta))
    assert "per element" not in str(ex.explain(opaque, theta))
    rb = assert_unbiased(ex.grad(per_element), exact, args=(theta,), seed="rb-elements", n=N)
    plain = assert_unbiased(ex.grad(opaque), exact, args=(theta,), seed="rb-elements-plain", n=N)
    assert np.all(rb.se < 0.5 * plain.se), (rb.se, plain.se)

    def exact_mixed(t):
        p = jax.nn.sigmoid(t)
        return jnp.sum(_exact_element_cost(t)) + 0.1 * (jnp.sum(p * (1 - p)) + jnp.sum(p) ** 2)

    assert_unbiased(ex.grad(mixed), jax.grad(exact_mixed)(theta), args=(theta,), seed="rb-mixed", n=N)


def test_per_element_rao_blackwellization_through_vmap_lanes_and_matmuls():
    """Lanes of ex.vmap are elements; the alignment follows matmuls that keep the element
    axis, broadcasts and reductions over other axes."""
    W = jnp.array([[0.5, -1.0, 0.3], [1.2, 0.2, -0.7]])

    @ex.expectation
    def lanes(l):
        h = ex.vmap(lambda li: ex.sample(dist.Bernoulli(logits=li).to_event(1), estimator=ex.reinforce, name="h"))(l)
        z = jnp.tanh(h.astype(jnp.float32) @ W)  # (4, 3): row b depends on h[b] only
        return jnp.sum(jnp.sum(z**2, axis=1) * jnp.arange(1.0, 5.0))

    l = jnp.array([[0.2, -0.3], [1.0, 0.4], [-0.5, 0.1], [0.0, 0.7]])

    def exact(l):
        p = jax.nn.sigmoid(l)  # (4, 2)
        configs = jnp.array([[0, 0], [0, 1], [1, 0], [1, 1]], jnp.float32)
        probs = jnp.prod(jnp.where(configs[None], p[:, None], 1 - p[:, None]), axis=-1)  # (4 rows, 4 configs)
        cost = jnp.sum(jnp.tanh(configs @ W) ** 2, axis=1)  # (4 configs,)
        return jnp.sum(probs @ cost * jnp.arange(1.0, 5.0))

    assert_unbiased(ex.grad(lanes), jax.grad(exact)(l), args=(l,), seed="rb-lanes", n=N)
    from estimax.transforms._rao_blackwell import analyze

    closed, _, _ = lanes.stage((l,))
    plan = analyze(closed.jaxpr)
    (entries,) = plan.elements.values()
    assert [e is not None for e in entries] == [True]
