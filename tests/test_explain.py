"""``explain``: the per-site plan and the certificate."""

import re

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
        bits = ex.sample(dist.Bernoulli(logits=jnp.full(10, theta["l"])), name="bits")
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


def test_a_site_whose_distribution_has_no_parameters_needs_no_gradient(monkeypatch):
    """A minibatch index, noise with fixed parameters and a draw that depends on data only:
    no gradient term (``none``); a site downstream of a reparameterized draw needs one."""

    @ex.expectation
    def objective(theta, data):
        i = ex.sample(dist.Categorical(logits=jnp.zeros(data.shape[0])).expand([8]), name="minibatch")
        eps = ex.sample(dist.Normal(0.0, 1.0), name="noise")
        y = ex.sample(dist.Normal(jnp.mean(data), 1.0), name="from_data")
        z = ex.sample(dist.Normal(theta, 1.0), name="z")
        n = ex.sample(dist.Poisson(jnp.exp(z)), name="downstream")
        return theta * jnp.mean(data[i]) + eps + y + (z - theta) + 0.0 * n

    data = jnp.linspace(-1.0, 2.0, 16)
    plan = ex.explain(objective, 2.0, data)
    for name in ("minibatch", "noise", "from_data"):
        site = plan.site(name)
        assert not site.needs_gradient and site.describe_strategy() == "none"
        assert site.reason.startswith("no parameters: no gradient")
    assert plan.site("minibatch").strategy is ex.reinforce  # what the estimator pass runs
    assert plan.site("z").describe_strategy() == "reparam" and plan.site("downstream").needs_gradient
    assert plan.certificate.kind == "unbiased"
    assert re.search(r"^minibatch\s+Categorical\(batch=\(8,\)\)\s+none\s+no parameters: no gradient",
                     str(plan), re.MULTILINE)
    # differentiated with respect to the data too, the draw from the data needs its gradient
    both = ex.explain(objective, 2.0, data, argnums=(0, 1))
    assert both.site("from_data").describe_strategy() == "reparam" and not both.site("minibatch").needs_gradient

    # the estimate carries no term for the index: d/dθ is mean(data[i]) of the drawn i (the
    # value's first term over θ), since (z - θ) has pathwise derivative 0
    @ex.expectation
    def index_only(theta, data):
        i = ex.sample(dist.Categorical(logits=jnp.zeros(data.shape[0])).expand([8]), name="minibatch")
        return theta * jnp.mean(data[i])

    from estimax.transforms.estimators._reinforce import Reinforce  # the pass's REINFORCE step

    scores, forward = [], Reinforce.forward

    def recording(self, ctx):
        out = forward(self, ctx)
        scores.append(out[2])  # the site's score term, or None
        return out

    monkeypatch.setattr(Reinforce, "forward", recording)
    for seed in range(3):
        value, grad = ex.value_and_grad(index_only)(jax.random.PRNGKey(seed), 2.0, data)
        assert jnp.allclose(grad * 2.0, value, rtol=1e-6, atol=1e-7)
    assert scores and all(s is None for s in scores)  # no score term, not even a zero one
    assert ex.explain(index_only, 2.0, data).certificate.kind == "unbiased"


def test_mapped_sites_show_their_lanes_apart_from_their_batch():
    """A site mapped over 4 × 2 lanes, each a batch of one row of 3 coordinates: the lanes,
    then the per-lane batch and event shapes, as written."""

    @ex.expectation
    def objective(theta, x):
        one = lambda xi: ex.sample(dist.Normal(theta * xi[None], 1.0).to_event(1), name="z")
        zs = ex.vmap(lambda xs: ex.vmap(one)(xs))(x)
        return jnp.sum(zs)

    x = jnp.ones((4, 2, 3))
    plan = ex.explain(objective, 1.0, x)
    assert plan.site("z").distribution == "Normal(lanes=(4, 2), batch=(1,), event=(3,))"
