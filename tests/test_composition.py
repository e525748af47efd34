"""The composition matrix: eager, jit, vmap over keys, grad of estimate, no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import estimax as ex
from problems import Compiles as _Compiles
from estimax.testing import assert_unbiased

@ex.expectation
def objective(theta, x):
    z = ex.sample(dist.Normal(theta["mu"], jnp.exp(theta["log_s"])), name="z")
    b = ex.sample(dist.Bernoulli(logits=theta["l"]), estimator=ex.mvd, name="b")
    return jax.lax.cond(b > 0, lambda: (z - x) ** 2, lambda: jnp.abs(z))


THETA = {"mu": jnp.float32(0.3), "log_s": jnp.float32(-0.2), "l": jnp.float32(0.5)}
X = jnp.float32(1.0)
KEY = jax.random.PRNGKey(3)


def test_eager_and_jit_agree():
    eager = objective.estimate(KEY, THETA, X)
    jitted = jax.jit(objective.estimate)(KEY, THETA, X)
    np.testing.assert_allclose(eager, jitted, rtol=1e-6)
    g1 = ex.grad(objective)(KEY, THETA, X)
    g2 = jax.jit(ex.grad(objective))(KEY, THETA, X)
    for k in THETA:
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-5)


def test_grad_of_estimate_is_the_estimator():
    """jax.grad applied to .estimate is correct: it is exactly ex.grad's estimate."""
    g1 = ex.grad(objective)(KEY, THETA, X)
    g2 = jax.grad(objective.estimate, argnums=1)(KEY, THETA, X)
    v, g3 = ex.value_and_grad(objective)(KEY, THETA, X)
    for k in THETA:
        np.testing.assert_allclose(g1[k], g2[k], rtol=1e-5)
        np.testing.assert_allclose(g1[k], g3[k], rtol=1e-5)
    np.testing.assert_allclose(v, objective.estimate(KEY, THETA, X), rtol=1e-6)


def test_vmap_over_keys_matches_a_loop():
    keys = jax.random.split(KEY, 4)
    batched = jax.vmap(ex.grad(objective), in_axes=(0, None, None))(keys, THETA, X)
    for i, k in enumerate(keys):
        single = ex.grad(objective)(k, THETA, X)
        for name in THETA:
            np.testing.assert_allclose(batched[name][i], single[name], rtol=1e-5, atol=1e-6)
    values = jax.vmap(objective.estimate, in_axes=(0, None, None))(keys, THETA, X)
    assert values.shape == (4,)


def test_vmap_of_grad_over_data():
    xs = jnp.array([0.0, 1.0, 2.0])
    g = jax.vmap(ex.grad(objective), in_axes=(None, None, 0))(KEY, THETA, xs)
    assert g["mu"].shape == (3,)
    np.testing.assert_allclose(g["mu"][1], ex.grad(objective)(KEY, THETA, X)["mu"], rtol=1e-5)


def test_typed_keys_work():
    key = jax.random.key(0)
    assert np.isfinite(objective.estimate(key, THETA, X))
    assert np.isfinite(ex.grad(objective)(key, THETA, X)["mu"])


def test_no_recompilation_on_second_call():
    g = ex.grad(objective)
    g(KEY, THETA, X)
    objective.estimate(KEY, THETA, X)
    other = jax.tree.map(lambda v: v + 0.1, THETA)
    with _Compiles() as same_shapes:
        g(jax.random.PRNGKey(9), other, X + 1.0)
        objective.estimate(jax.random.PRNGKey(11), other, X)
    assert same_shapes.n == 0
    with _Compiles() as new_type:  # the counter sees compilations: a new argument type compiles
        g(KEY, jax.tree.map(lambda v: v.astype(jnp.bfloat16), THETA), X)
    assert new_type.n >= 1


def test_tuple_argnums():
    @ex.expectation
    def f(a, b):
        z = ex.sample(dist.Normal(a, 1.0), name="z")
        return z * b

    ga, gb = ex.grad(f, argnums=(0, 1))(KEY, 0.5, 2.0)
    assert np.isfinite(ga) and np.isfinite(gb)
    np.testing.assert_allclose(ga, 2.0, rtol=1e-6)  # d/da E[z b] = b, exactly (pathwise)


def test_pytree_valued_estimates_and_value_and_grad_of_their_reduction():
    @ex.expectation
    def vec(mu):
        z = ex.sample(dist.Normal(mu, 1.0), name="z")
        return {"first": z, "second": z**2}

    mu = jnp.array([0.5, -1.0, 2.0])
    out = vec.estimate(KEY, mu)
    assert out["first"].shape == (3,) and out["second"].shape == (3,)
    assert_unbiased(vec.estimate, {"first": mu, "second": mu**2 + 1}, args=(mu,), seed="pytree-estimate", n=4000)
    with pytest.raises(ex.ProgramError, match="single scalar"):
        ex.value_and_grad(vec)(KEY, mu)
    total = ex.expectation(lambda mu: jnp.sum(vec(mu)["second"]))  # E = Σ(mu² + 1)
    v, g = ex.value_and_grad(total)(KEY, mu)
    np.testing.assert_array_equal(g, ex.grad(total)(KEY, mu))
    np.testing.assert_array_equal(v, total.estimate(KEY, mu))
    assert_unbiased(lambda k, m: ex.value_and_grad(total)(k, m), (jnp.sum(mu**2 + 1), 2 * mu), args=(mu,),
                    seed="pytree-value-and-grad", n=4000)


@pytest.mark.parametrize("strategy", [ex.reparam, ex.reinforce, ex.mvd])
def test_second_call_same_values(strategy):
    @ex.expectation
    def f(mu):
        return ex.sample(dist.Normal(mu, 1.0), estimator=strategy, name="z") ** 2

    a = ex.grad(f)(KEY, 0.2)
    b = ex.grad(f)(KEY, 0.2)
    np.testing.assert_array_equal(a, b)
