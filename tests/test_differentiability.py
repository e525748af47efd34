"""Certificates that never lie: the differentiability analysis and the always-valid default.

Each program has a known exact gradient. Programs a pathwise derivative cannot follow
(jumps, integer casts, discrete indices, ``stop_gradient`` on a draw, random trip counts)
must get a valid default and be certified ``biased`` when ``ex.reparam`` is forced; valid
programs (kinks, ``where`` whose branches meet, discrete draws used as indices, custom
derivative rules) must stay ``unbiased`` -- and every program certified ``unbiased`` is
checked against its exact gradient within 5 standard errors.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.scipy.stats import norm

import estimax as ex
from estimax.testing import assert_unbiased
from problems import X, guide, model

M = 0.3


def normal(m, estimator=None, name="z"):
    return ex.sample(dist.Normal(m, 1.0), estimator=estimator, name=name)


def check(program, exact, *, args=(M,), n=20_000, strategy=None, seed=None, argnums=0):
    """``program`` is certified unbiased (and, with ``strategy``, uses it at site 'z') and its
    gradient estimate matches ``exact`` within 5 SE."""
    plan = ex.explain(program, *args, argnums=argnums)
    assert plan.certificate.kind == "unbiased", str(plan)
    if strategy is not None:
        assert plan.site("z").strategy.name == strategy, str(plan)
    assert_unbiased(ex.grad(program, argnums=argnums), np.asarray(exact), args=args, n=n,
                    seed=seed or (program.name, args))
    return plan


def forced_biased(program, fragment, args=(M,)):
    """With ex.reparam chosen in the program, the certificate is ``biased`` naming ``fragment``."""
    plan = ex.explain(program, *args)
    assert plan.certificate.kind == "biased", str(plan)
    assert any(fragment in r for r in plan.certificate.reasons), str(plan)
    with pytest.raises(ex.CertificateError, match="require='unbiased'"):
        ex.grad(program, require="unbiased")(jax.random.PRNGKey(0), *args)
    return plan


# --- A/B: programs a pathwise derivative cannot follow -------------------------------------
def _jump(estimator=None):
    @ex.expectation
    def jump(m):
        return jnp.where(normal(m, estimator) > 0, 1.0, 0.0)  # E = Phi(m)

    return jump


def test_where_jump_default_is_mvd_and_right():
    plan = check(_jump(), norm.pdf(M), strategy="mvd")
    reason = plan.site("z").reason
    assert "reparam would miss the jump at `z > 0`" in reason and "test_differentiability.py" in reason


def test_where_jump_forced_reparam_is_biased_and_reinforce_right():
    forced_biased(_jump(ex.reparam), "misses the jump at `z > 0`")
    check(_jump(ex.reinforce), norm.pdf(M), n=40_000)
    check(_jump(ex.mvd), norm.pdf(M))


def test_cond_jump():
    @ex.expectation
    def cond_jump(m):
        return jax.lax.cond(normal(m) > 0, lambda: 1.0, lambda: 0.0)

    check(cond_jump, norm.pdf(M), strategy="mvd")


def test_floor_and_integer_cast():
    ks = np.arange(-12, 13)

    @ex.expectation
    def floored(m):
        return jnp.floor(normal(m))  # d/dm = sum_k phi(k - m)

    @ex.expectation
    def cast(m):
        return normal(m).astype(jnp.int32).astype(jnp.float32)  # truncation: sum_{k != 0} phi(k - m)

    check(floored, norm.pdf(ks - M).sum(), strategy="mvd")
    check(cast, norm.pdf(ks[ks != 0] - M).sum(), strategy="mvd")

    @ex.expectation
    def forced(m):
        return jnp.floor(normal(m, ex.reparam))

    forced_biased(forced, "the jumps of `floor`")


def test_stop_gradient_on_a_draw():
    @ex.expectation
    def stopped(m):
        return jax.lax.stop_gradient(normal(m)) ** 2  # d/dm E[z^2] = 2m

    check(stopped, 2 * M, strategy="mvd")

    @ex.expectation
    def forced(m):
        return jax.lax.stop_gradient(normal(m, ex.reparam)) ** 2

    forced_biased(forced, "stop_gradient")


def test_gumbel_max_index_defaults_to_reinforce():
    logits = jnp.array([0.2, -0.4, 0.5])
    values = jnp.array([1.0, -2.0, 3.0])

    @ex.expectation
    def gumbel_max(lg):
        g = ex.sample(dist.Gumbel(lg, 1.0), name="z")
        return values[jnp.argmax(g)]  # E = softmax(lg) . values

    exact = jax.grad(lambda lg: jax.nn.softmax(lg) @ values)(logits)
    check(gumbel_max, exact, args=(logits,), n=40_000, strategy="reinforce")


def test_argsort_rank_of_draws():
    values = jnp.array([1.0, 4.0])

    @ex.expectation
    def rank(m):
        z = ex.sample(dist.Normal(m, 1.0).to_event(1), name="z")
        return values[jnp.argsort(z)[0]]  # v0 if z0 < z1: P = Phi((m1 - m0)/sqrt 2)

    m = jnp.array([0.1, 0.5])
    g = norm.pdf((m[1] - m[0]) / math.sqrt(2)) / math.sqrt(2) * (values[0] - values[1])
    check(rank, jnp.array([-g, g]), args=(m,), strategy="mvd")


def test_while_loop_with_random_trip_count():
    @ex.expectation
    def tries(m):
        def body(c):
            n, _ = c
            return n + 1.0, normal(m)

        n, _ = jax.lax.while_loop(lambda c: c[1] <= 0.0, body, (0.0, -1.0))
        return n  # draws until z > 0: E = 1/Phi(m), d/dm = -phi(m)/Phi(m)^2

    check(tries, -norm.pdf(M) / norm.cdf(M) ** 2, n=40_000, strategy="reinforce")


def test_uniform_with_a_moving_support():
    @ex.expectation
    def above(t):
        return jnp.where(ex.sample(dist.Uniform(0.0, t), name="z") > 0.5, 1.0, 0.0)  # 1 - 0.5/t

    check(above, 0.5 / 2.0**2, args=(2.0,), strategy="mvd")

    @ex.expectation
    def score(t):
        return jnp.where(ex.sample(dist.Uniform(0.0, t), estimator=ex.reinforce, name="z") > 0.5, 1.0, 0.0)

    plan = ex.explain(score, 2.0)
    assert plan.certificate.kind == "biased" and any("support of Uniform moves" in r for r in plan.certificate.reasons)


def test_fit_and_grad_require_an_unbiased_certificate():
    import optax

    with pytest.raises(ex.CertificateError, match="misses the jump"):
        ex.fit(_jump(ex.reparam), jnp.float32(M), optimizer=optax.sgd(0.1), steps=5, key=jax.random.PRNGKey(0),
               require="unbiased")
    result = ex.fit(_jump(), jnp.float32(M), optimizer=optax.sgd(0.1), steps=5, key=jax.random.PRNGKey(0),
                    require="unbiased")
    assert result.steps_run == 5
    with pytest.raises(ex.ProgramError, match="require="):
        ex.grad(_jump(), require="exact-ish")(jax.random.PRNGKey(0), M)


# --- arguments that reach a break: no site can repair them -----------------------------------
def test_argument_compared_with_a_draw_is_biased():
    @ex.expectation
    def threshold(t):
        return jnp.where(ex.sample(dist.Normal(0.0, 1.0), name="z") > t, 1.0, 0.0)

    plan = ex.explain(threshold, M)
    assert plan.certificate.kind == "biased"
    (reason,) = plan.certificate.reasons
    assert "differentiated arguments" in reason and "dist.Bernoulli" in reason and "`z > <argument>`" in reason
    # data compared with a draw is not differentiated: nothing is lost
    @ex.expectation
    def data(t, x):
        return t * jnp.where(ex.sample(dist.Normal(0.0, 1.0), name="z") > x, 1.0, 0.0)

    check(data, 1 - norm.cdf(0.7), args=(M, 0.7), strategy="reparam")
    assert ex.explain(data, M, 0.7, argnums=1).certificate.kind == "biased"


def test_counting_uniforms_until_below_p_is_biased():
    @ex.expectation
    def geometric(p):
        def body(c):
            n, _ = c
            return n + 1.0, ex.sample(dist.Uniform(0.0, 1.0), name="u")

        n, _ = jax.lax.while_loop(lambda c: c[1] >= p, body, (0.0, 2.0))
        return n  # E = 1/p; every pathwise estimate is 0

    plan = ex.explain(geometric, 0.4)
    assert plan.certificate.kind == "biased"
    assert any(">= <argument>`" in r and "Bernoulli" in r for r in plan.certificate.reasons), str(plan)


# --- C/D: nested compositions ------------------------------------------------------------------
def test_nonlinear_use_inside_a_nested_expect_is_a_composition():
    def g(s):
        return jnp.exp(ex.sample(dist.Normal(s, 1.0), name="x") - s - 0.5)  # E = 1

    @ex.expectation
    def nested(t):
        return ex.expect(lambda s: jnp.log(ex.expect(g, name="g")(s)), name="outer")(t)

    plan = ex.explain(nested, 0.0)
    assert plan.certificate.kind == "biased"
    assert any("inside ex.expect('outer')" in r and "log" in r for r in plan.certificate.reasons), str(plan)

    @ex.expectation
    def nested_log(t):
        return ex.expect(lambda s: ex.log_expect(lambda: ex.sample(dist.Normal(s, 1.0), name="x"), name="l")(),
                         name="outer")(t)

    assert ex.explain(nested_log, 0.0).certificate.kind == "biased"


def test_integer_cast_of_an_expectation_is_nonlinear():
    @ex.expectation
    def cast(t):
        v = ex.expect(lambda: normal(t), name="m")()
        return v.astype(jnp.int32).astype(jnp.float32)

    plan = ex.explain(cast, 0.0)
    assert plan.certificate.kind == "biased"
    assert any("conversion" in r and "int32" in r for r in plan.certificate.reasons), str(plan)


# --- no over-caution: valid programs stay unbiased and right --------------------------------------
def test_kinks_stay_reparam_and_unbiased():
    @ex.expectation
    def relu(m):
        return jnp.maximum(normal(m), 0.0)  # d/dm = Phi(m)

    @ex.expectation
    def absolute(m):
        return jnp.abs(normal(m))  # 2 Phi(m) - 1

    @ex.expectation
    def clipped(m):
        return jnp.clip(normal(m), -1.0, 1.0)  # Phi(1 - m) - Phi(-1 - m)

    @ex.expectation
    def where_relu(m):
        z = normal(m)
        return jnp.where(z > 0, z, 0.0)  # continuous: the branches meet at 0

    @ex.expectation
    def leaky(m):
        return jax.nn.leaky_relu(normal(m), 0.1)  # 0.1 + 0.9 Phi(m)

    @ex.expectation
    def hinge(m):
        z = normal(m)
        return jnp.where(z > 1.0, (z - 1.0) ** 2, 0.0)  # d/dm = 2 E[(z-1)+]

    check(relu, norm.cdf(M), strategy="reparam")
    check(absolute, 2 * norm.cdf(M) - 1, strategy="reparam")
    check(clipped, norm.cdf(1 - M) - norm.cdf(-1 - M), strategy="reparam")
    check(where_relu, norm.cdf(M), strategy="reparam")
    check(leaky, 0.1 + 0.9 * norm.cdf(M), strategy="reparam")
    a = M - 1.0
    check(hinge, 2 * (a * norm.cdf(a) + norm.pdf(a)), strategy="reparam")


def test_sorted_values_are_continuous():
    @ex.expectation
    def largest(m):
        z = ex.sample(dist.Normal(m, 1.0).expand([2]).to_event(1), name="z")
        return jnp.sort(z)[-1]  # E = m + 1/sqrt(pi)

    check(largest, 1.0, strategy="reparam")


def test_discrete_draws_used_as_indices_and_compared():
    values = jnp.array([1.0, -2.0, 3.0])
    p = jnp.array([0.2, 0.3, 0.5])
    exact = jax.grad(lambda q: jnp.sum(q * values) + jnp.sum(q * (jnp.arange(3) > 0)))(p)
    for estimator, n in ((ex.enum, 2_000), (ex.reinforce, 40_000), (ex.mvd, 20_000)):

        @ex.expectation
        def indexed(q):
            k = ex.sample(dist.Categorical(probs=q), estimator=estimator, name="z")
            return values[k] + jnp.where(k > 0, 1.0, 0.0)

        check(indexed, exact, args=(p,), n=n, strategy=estimator.name, seed=("indexed", estimator.name))


def test_custom_derivative_and_checkpoint_functions_of_a_draw():
    @jax.custom_vjp
    def square(x):
        return x * x

    square.defvjp(lambda x: (x * x, x), lambda x, t: (2 * x * t,))

    @ex.expectation
    def custom(m):
        return square(normal(m))  # 2m

    @ex.expectation
    def remat(m):
        return jax.checkpoint(lambda z: jnp.sin(z) * z)(normal(m))

    check(custom, 2 * M, strategy="reparam")
    eps = np.linspace(-9, 9, 200_001)
    w = norm.pdf(eps) * (eps[1] - eps[0])
    exact = np.sum(np.cos(M + eps) * (M + eps) * w + np.sin(M + eps) * w)
    check(remat, exact, strategy="reparam")


def test_a_site_inside_checkpoint_is_estimated_and_explained():
    @ex.expectation
    def inside(m):
        return jax.checkpoint(lambda m: normal(m) ** 2)(m)

    check(inside, 2 * M, strategy="reparam")


def test_a_site_inside_custom_jvp_is_refused_by_explain_as_by_the_estimator():
    @jax.custom_jvp
    def f(m):
        return ex.sample(dist.Normal(m, 1.0), name="z") ** 2

    f.defjvp(lambda p, t: (f(p[0]), 2 * p[0] * t[0]))
    program = ex.expectation(lambda m: f(m))
    with pytest.raises(ex.UnsupportedError, match="custom_jvp_call") as e1:
        ex.explain(program, M)
    with pytest.raises(ex.UnsupportedError, match="custom_jvp_call") as e2:
        ex.grad(program)(jax.random.PRNGKey(0), M)
    assert str(e1.value) == str(e2.value)


def test_mvd_and_reinforce_through_a_jump_are_unbiased():
    for estimator in (ex.mvd, ex.reinforce):
        plan = ex.explain(_jump(estimator), M)
        assert plan.certificate.kind == "unbiased", str(plan)


def test_library_objectives_keep_their_defaults():
    """Objectives that use stop_gradient on parameters (STL) or write value and derivative
    separately (DReG, RWS) keep reparam and their certificates."""
    x = X[:3]
    params = {"m": jnp.float32(-0.5), "log_s": jnp.float32(0.4)}
    objectives = [
        ex.objectives.elbo(model, guide), ex.objectives.elbo(model, guide, gradient="stl"),
        ex.objectives.iwelbo(model, guide, 4), ex.objectives.iwelbo(model, guide, 4, gradient="dreg"),
        ex.objectives.renyi(model, guide, 0.5, 4), ex.objectives.cubo(model, guide, 2.0, 4),
        *ex.objectives.rws(model, guide, 4),
    ]
    for objective in objectives:
        plan = ex.explain(objective, params, x)
        assert plan.certificate.kind in ("unbiased", "consistent"), str(plan)
        assert all("would miss" not in s.reason for s in plan.sites), str(plan)
        assert not any("pathwise" in r or "differentiated arguments" in r for r in plan.certificate.reasons), str(plan)


# --- the property: whenever the certificate says unbiased, the gradient is right ----------------
#: elementwise steps a random program is built from: (name, function of (z, m))
STEPS = {
    "sin": lambda z: jnp.sin(z),
    "square": lambda z: z * z,
    "bump": lambda z: jnp.exp(-0.5 * z * z),
    "abs": lambda z: jnp.abs(z - 0.25),
    "relu": lambda z: jnp.maximum(z, 0.1),
    "clip": lambda z: jnp.clip(z, -0.5, 0.8),
    "where_meet": lambda z: jnp.where(z > 0.2, z - 0.2, 0.0),
    "where_jump": lambda z: jnp.where(z > 0.2, z, -1.0),
    "floor": lambda z: jnp.floor(2.0 * z),
    "sign": lambda z: jnp.sign(z - 0.1) * 0.5 + z,
    "stop": lambda z: jax.lax.stop_gradient(z) * 2.0,
    "cast": lambda z: (3.0 * z).astype(jnp.int32).astype(z.dtype),
}


def _exact_gradient(fn, m, s):
    """d/dm E[f(m + s eps)] = E[f(m + s eps) eps] / s (the Normal location's score): no
    derivative of ``f`` is taken, so jumps are handled; trapezoid on a fine grid."""
    eps = np.linspace(-9.0, 9.0, 360_001)
    w = norm.pdf(eps) * (eps[1] - eps[0])
    with jax.default_device(jax.devices("cpu")[0]):
        f = np.asarray(fn(jnp.asarray(m + s * eps, jnp.float32)), np.float64)
    return float(np.sum(f * eps * w) / s)


@given(
    steps=st.lists(st.sampled_from(sorted(STEPS)), min_size=1, max_size=3),
    family=st.sampled_from(["normal", "uniform"]),
    forced=st.booleans(),
    m=st.floats(-0.8, 0.8),
)
def test_property_certified_unbiased_means_right(steps, family, forced, m):
    """Random programs over a Normal or Uniform draw: the default is always certified
    unbiased and is right; with ex.reparam forced, whenever the certificate says unbiased it
    is right."""
    s = 0.7

    def fn(z):
        for name in steps:
            z = STEPS[name](z)
        return z

    @ex.expectation
    def program(mu):
        d = dist.Normal(mu, s) if family == "normal" else dist.Uniform(mu - s, mu + s)
        return fn(ex.sample(d, estimator=ex.reparam if forced else None, name="z"))

    plan = ex.explain(program, m)
    if not forced:
        assert plan.certificate.kind == "unbiased", str(plan)
    if plan.certificate.kind != "unbiased":
        assert any(n in ("where_jump", "floor", "sign", "stop", "cast") for n in steps), str(plan)
        return
    if family == "normal":
        exact = _exact_gradient(fn, m, s)
    else:  # d/dm (1/2s) ∫_{m-s}^{m+s} f = (f(m+s) - f(m-s)) / 2s
        ends = np.asarray(fn(jnp.asarray([m + s, m - s], jnp.float32)), np.float64)
        exact = (ends[0] - ends[1]) / (2 * s)
    # the quadrature's own error (jumps resolved to the grid step) is far below the 5 SE
    assert_unbiased(ex.grad(program), np.float64(exact), args=(jnp.float32(m),), n=20_000,
                    seed=("property", tuple(steps), family, forced, m), atol=1e-3)
