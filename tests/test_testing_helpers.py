"""The public testing helpers can fail: a biased estimator is caught."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import estimax as ex
from estimax.testing import assert_unbiased, key_from, seed_from
from estimax.testing import strategies as exst


def test_seed_from_is_deterministic_and_input_sensitive():
    assert seed_from("a", 1, {"x": 0.5}) == seed_from("a", 1, {"x": 0.5})
    assert seed_from("a", 1) != seed_from("a", 2)
    assert seed_from(jnp.array([1.0, 2.0])) == seed_from(np.array([1.0, 2.0]))
    assert (key_from("k") == key_from("k")).all()


def test_assert_unbiased_accepts_an_unbiased_estimator():
    est = lambda k, mu: mu + jax.random.normal(k)
    report = assert_unbiased(est, 0.3, args=(jnp.float32(0.3),), seed="ok", n=4000)
    assert report.max_abs_z() < 5


def test_assert_unbiased_catches_a_small_bias():
    # bias 0.05 with SE 1/sqrt(40000) = 0.005: 10 standard errors
    est = lambda k: 0.05 + jax.random.normal(k)
    with pytest.raises(AssertionError, match=r"(?s)looks biased.*z\| = "):
        assert_unbiased(est, 0.0, seed="biased", n=40000)


def test_assert_unbiased_catches_the_plug_in_bias():
    """log of a Monte Carlo mean is biased for log of the mean (Jensen)."""
    est = lambda k: jnp.log(jnp.mean(jnp.exp(jax.random.normal(k, (4,)))))
    with pytest.raises(AssertionError, match="looks biased"):
        assert_unbiased(est, 0.5, seed="jensen", n=20000)


def test_assert_unbiased_needs_a_key_or_seed():
    with pytest.raises(ValueError, match="key= or seed="):
        assert_unbiased(lambda k: 0.0, 0.0)


@given(exst.distributions())
def test_strategies_build_valid_distributions(case):
    family, p = case
    d = exst.build(family, p)
    x = d.sample(jax.random.PRNGKey(0))
    assert np.all(np.isfinite(d.log_prob(x)))


def test_unbiasedness_test_fails_on_a_wrong_strategy():
    """A deliberately wrong estimator (score without the value factor) is rejected."""
    import numpyro.distributions as dist

    @ex.expectation
    def f(l):
        return (ex.sample(dist.Bernoulli(logits=l), estimator=ex.reinforce, name="b") + 0.5) ** 2

    wrong = lambda k, l: ex.grad(f)(k, l) * 0.9
    exact = jax.grad(lambda l: jax.nn.sigmoid(l) * 2.25 + (1 - jax.nn.sigmoid(l)) * 0.25)(0.4)
    assert_unbiased(ex.grad(f), exact, args=(jnp.float32(0.4),), seed="right", n=20000)
    with pytest.raises(AssertionError, match="looks biased"):
        assert_unbiased(wrong, exact, args=(jnp.float32(0.4),), seed="wrong", n=200000)


def test_assert_unbiased_fails_on_non_finite_estimates():
    def nan_estimator(key):
        return jnp.where(jax.random.uniform(key) < 0.01, jnp.nan, 1.0)

    with pytest.raises(AssertionError, match="looks biased"):
        assert_unbiased(nan_estimator, 1.0, seed="nan", n=1000)


def test_exact_may_be_a_function_of_the_arguments():
    def estimator(key, mu):
        return mu + jax.random.normal(key)

    report = assert_unbiased(estimator, lambda mu: mu, args=(1.5,), seed="exact-fn", n=4000)
    assert report.n == 4000 and abs(float(report.exact) - 1.5) < 1e-12
    with pytest.raises(AssertionError, match="mean"):
        assert_unbiased(estimator, lambda mu: mu + 0.5, args=(1.5,), seed="exact-fn", n=4000)


def test_argument_mistakes_are_named_before_any_estimate_is_drawn():
    drawn = []

    def estimator(key, mu):
        drawn.append(1)  # traced once by the shape check; a run would trace the vmapped copy too
        return {"a": mu + jax.random.normal(key, (2,))}

    with pytest.raises(ex.ArgumentError, match="exact must be a number.*got object"):
        assert_unbiased(estimator, object(), args=(1.0,), seed="s")
    with pytest.raises(ex.ArgumentError, match="returns PyTreeDef.*but exact is"):
        assert_unbiased(estimator, 1.0, args=(1.0,), seed="s")
    with pytest.raises(ex.ArgumentError, match=r"exact\['a'\] has shape \(3,\) but the estimates\['a'\] have shape \(2,\)"):
        assert_unbiased(estimator, {"a": np.zeros(3)}, args=(1.0,), seed="s")
    with pytest.raises(ex.ArgumentError, match="n must be an integer >= 2"):
        assert_unbiased(estimator, {"a": 1.0}, args=(1.0,), seed="s", n=1)
    with pytest.raises(ex.ArgumentError, match="estimator must be a function"):
        assert_unbiased(3.0, 1.0, seed="s")
    assert len(drawn) <= 3  # only shape checks traced it; nothing was sampled
