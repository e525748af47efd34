"""``explain``: the per-site plan and the certificate."""

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

import estimax as ex


def test_plan_lists_sites_strategies_and_reasons():
    @ex.expectation
    def objective(theta, x):
        z = ex.sample(dist.Normal(theta["mu"], jnp.exp(theta["log_s"])), name="z")
        b = ex.sample(dist.Bernoulli(logits=theta["l"]), estimator=ex.mvd, name="b")
        c = ex.sample(dist.Categorical(logits=jnp.zeros(4)))
        n = ex.sample(dist.Poisson(theta["r"]))
        bits = ex.sample(dist.Bernoulli(logits=jnp.zeros(10)), name="bits")
        return jax.lax.cond(b > 0, lambda: (z - x) ** 2, lambda: jnp.abs(z)) + c + n + jnp.sum(bits)

    theta = {"mu": 0.0, "log_s": 0.0, "l": 0.0, "r": 1.0}
    plan = ex.explain(objective, theta, 1.0)
    names = [s.name for s in plan.sites]
    assert names == ["z", "b", "categorical_0", "poisson_0", "bits"]
    assert plan.site("z").strategy is ex.reparam and "reparameterized" in plan.site("z").reason
    assert plan.site("b").strategy is ex.mvd and plan.site("b").reason == "chosen in the program"
    assert plan.site("categorical_0").strategy is ex.enum and "4 joint values" in plan.site("categorical_0").reason
    assert plan.site("poisson_0").strategy is ex.reinforce and "no finite support" in plan.site("poisson_0").reason
    assert plan.site("bits").strategy is ex.reinforce and "too large" in plan.site("bits").reason
    assert plan.site("bits").distribution == "Bernoulli(batch=(10,))"
    assert plan.certificate.kind == "unbiased"
    text = str(plan)
    for name in names:
        assert name in text
    assert "certificate: unbiased" in text


def test_explain_shows_baselines():
    @ex.expectation
    def f(l):
        return ex.sample(dist.Bernoulli(logits=l), estimator=ex.reinforce(baseline=0.5), name="b") * 1.0

    assert "reinforce(baseline=0.5)" in str(ex.explain(f, 0.0))


def test_plan_of_a_program_without_random_choices():
    @ex.expectation
    def f(x):
        return x**2

    plan = ex.explain(f, 1.0)
    assert plan.sites == () and plan.certificate.kind == "exact"
    assert str(plan.certificate) == "exact: no random choices"
    assert "site" not in str(plan)  # no empty table header
    assert "(no random choices)" in str(plan)
    v, g = ex.value_and_grad(f)(jax.random.PRNGKey(0), 3.0)
    assert v == 9.0 and g == 6.0


def test_nonlinear_plug_in_is_named():
    def inner(t):
        return ex.sample(dist.Normal(t, 1.0), name="z") ** 2

    @ex.expectation
    def squared(t):
        y = ex.expect(inner)(t)
        return y * y

    @ex.expectation
    def as_parameter(t):
        y = ex.expect(inner)(t)
        return ex.sample(dist.Normal(y, 1.0), name="w")

    @ex.expectation
    def linear(t):
        y = ex.expect(inner)(t)
        return jnp.sum(jnp.stack([y, 2 * y]) * jnp.array([1.0, 3.0])) - y / 4.0

    c = ex.explain(squared, 0.1).certificate
    assert c.kind == "biased" and any("product" in r for r in c.reasons)
    c = ex.explain(as_parameter, 0.1).certificate
    assert c.kind == "biased" and any("'w'" in r for r in c.reasons)
    assert ex.explain(linear, 0.1).certificate.kind == "unbiased"


def test_vmapped_nested_expectation():
    def inner(t):
        return ex.sample(dist.Normal(t, 1.0), name="z")

    @ex.expectation
    def outer(ts):
        return jnp.sum(jax.vmap(ex.expect(inner))(ts))

    ts = jnp.array([0.5, 1.0, -2.0])
    plan = ex.explain(outer, ts)
    assert plan.certificate.kind == "unbiased"
    g = ex.grad(outer)(jax.random.PRNGKey(0), ts)
    assert jnp.allclose(g, 1.0)  # pathwise: d/dt E[z] = 1 exactly


def test_per_site_variance_points_at_the_noisy_site():
    @ex.expectation
    def objective(theta):
        z = ex.sample(dist.Normal(theta["mu"], 1.0), name="smooth")  # reparam: low variance
        b = ex.sample(dist.Bernoulli(logits=theta["l"]), estimator=ex.reinforce, name="noisy")
        return (z - 1.0) ** 2 + 50.0 * b

    # d/dmu: 2(z - 1), variance 4; d/dl: 50 b (b - p) (Rao-Blackwellized), variance
    # p (1 - p) (50 (1 - p))^2 ~ 141 at p = sigmoid(0.1). The two add up to the total.
    theta = {"mu": jnp.float32(0.2), "l": jnp.float32(0.1)}
    plan = ex.explain(objective, theta, variance=True, key=jax.random.PRNGKey(0))
    p = float(jax.nn.sigmoid(0.1))
    assert abs(plan.site("smooth").variance - 4.0) < 1.0
    assert abs(plan.site("noisy").variance - p * (1 - p) * (50 * (1 - p)) ** 2) < 0.25 * 141
    assert abs(plan.site("noisy").variance + plan.site("smooth").variance - plan.total_variance) < 0.25 * plan.total_variance
    assert "grad variance" in str(plan) and "total gradient variance" in str(plan)


def test_per_site_variance_reaches_sites_in_nested_expectations():
    """d/dθ of E[mean over 4 draws of z²] + E[w²] with z ~ N(θ, 1), w ~ N(θ, 2) (pathwise):
    mean(2 z_k) + 2w, whose variance is 4/4 from the nested site and 4·4 from the outer one;
    a site in a loop body has no variance of its own to measure (n/a)."""

    @ex.expectation
    def objective(theta):
        inner = ex.expect(lambda: ex.sample(dist.Normal(theta, 1.0), name="z") ** 2, n=4, name="inner")()
        w = ex.sample(dist.Normal(theta, 2.0), name="w")
        looped = jax.lax.scan(lambda c, _: (c + ex.sample(dist.Normal(theta, 1.0), name="s"), None), 0.0, None,
                              length=2)[0]
        return inner + w**2 + 0.0 * looped

    plan = ex.explain(objective, jnp.float32(0.3), variance=True, key=jax.random.PRNGKey(4), samples=(64, 32))
    for name, exact in (("inner/z", 1.0), ("w", 16.0)):
        site = plan.site(name)
        assert abs(site.variance - exact) < 5 * site.variance_se, (name, site.variance, site.variance_se)
    assert plan.site("s").variance is None and "n/a" in str(plan)
