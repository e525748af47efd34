"""Each error a user will hit names the site (or argument) and the fix."""

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
import pytest

import estimax as ex

KEY = jax.random.PRNGKey(0)


def test_reparam_on_bernoulli():
    @ex.expectation
    def f(l):
        return ex.sample(dist.Bernoulli(logits=l), estimator=ex.reparam, name="coin") * 1.0

    with pytest.raises(ex.StrategyError, match=r"site 'coin'.*ex\.reparam.*Bernoulli.*ex\.reinforce"):
        f.estimate(KEY, 0.0)


def test_enum_on_continuous_support():
    @ex.expectation
    def f(mu):
        return ex.sample(dist.Normal(mu, 1.0), estimator=ex.enum, name="height")

    with pytest.raises(ex.StrategyError, match=r"site 'height'.*finite support.*continuous"):
        ex.grad(f)(KEY, 0.0)


def test_enum_on_infinite_support():
    @ex.expectation
    def f(r):
        return ex.sample(dist.Poisson(r), estimator=ex.enum, name="count") * 1.0

    with pytest.raises(ex.StrategyError, match=r"site 'count'.*infinite"):
        f.estimate(KEY, 1.0)


def test_enum_on_too_large_joint_support():
    @ex.expectation
    def f(l):
        return jnp.sum(ex.sample(dist.Bernoulli(logits=l), estimator=ex.enum, name="bits") * 1.0)

    with pytest.raises(ex.StrategyError, match=r"site 'bits'.*65536 joint values.*ex\.mvd"):
        ex.grad(f)(KEY, jnp.zeros(16))
    with pytest.raises(ex.StrategyError, match=r"site 'bits'.*2\^200 joint values"):
        ex.explain(f, jnp.zeros(200))


def test_mvd_on_unsupported_family():
    @ex.expectation
    def f(a):
        return ex.sample(dist.Gamma(a, 1.0), estimator=ex.mvd, name="g")

    with pytest.raises(ex.StrategyError, match=r"site 'g'.*ex\.mvd.*Gamma"):
        f.estimate(KEY, 1.0)


def test_non_scalar_program_to_grad():
    @ex.expectation
    def vector_valued(mu):
        return ex.sample(dist.Normal(mu, 1.0), name="z")

    with pytest.raises(ex.ProgramError, match=r"'vector_valued' returns f(loat)?32\[3\].*scalar.*jnp\.sum"):
        ex.grad(vector_valued)(KEY, jnp.zeros(3))


def test_grad_of_the_raw_program_fails_loudly():
    @ex.expectation
    def f(mu):
        return ex.sample(dist.Normal(mu, 1.0), name="z") ** 2

    with pytest.raises(ex.EstimaxError, match=r"'z'.*ex\.grad"):
        jax.grad(f)(0.5)


def test_sampling_with_no_key():
    @ex.expectation
    def f(mu):
        return ex.sample(dist.Normal(mu, 1.0), name="z")

    with pytest.raises(ex.NoKeyError, match=r"'z'.*no random key.*estimate\(key"):
        f(0.5)
    with pytest.raises(ex.NoKeyError, match=r"'z'"):
        jax.jit(f)(0.5)


def test_key_forgotten():
    @ex.expectation
    def f(mu):
        return ex.sample(dist.Normal(mu, 1.0), name="z")

    with pytest.raises(ex.ProgramError, match=r"first argument must be a PRNG key"):
        f.estimate(0.5)
    with pytest.raises(ex.ProgramError, match=r"first argument must be a PRNG key") as e:
        ex.grad(f)({"mu": 0.5}, 0.3)
    # the function the user called, and a call that is valid
    assert str(e.value).startswith("ex.grad(f)(key, ...):") and str(e.value).endswith("ex.grad(f)(key, *args).")
    with pytest.raises(ex.ProgramError, match=r"first argument.*: ex\.value_and_grad\(f\)\(key, \*args\)\."):
        ex.value_and_grad(f)(0.5, 0.3)


def test_duplicate_site_names():
    @ex.expectation
    def f(mu):
        a = ex.sample(dist.Normal(mu, 1.0), name="z")
        b = ex.sample(dist.Normal(mu, 2.0), name="z")
        return a + b

    with pytest.raises(ex.ProgramError, match=r"two random choices are named 'z'"):
        f.estimate(KEY, 0.0)


def test_same_name_in_exclusive_cond_branches_is_allowed():
    @ex.expectation
    def f(mu, flag):
        return jax.lax.cond(
            flag > 0,
            lambda: ex.sample(dist.Normal(mu, 1.0), name="z"),
            lambda: ex.sample(dist.Normal(-mu, 1.0), name="z"),
        )

    assert jnp.isfinite(ex.grad(f)(KEY, 0.0, 1.0))


def test_not_a_distribution():
    @ex.expectation
    def f(mu):
        return ex.sample(dist.Normal, name="z")

    with pytest.raises(ex.ArgumentError, match=r"site 'z'.*Distribution.*dist\.Normal\(0\.0, 1\.0\)"):
        f.estimate(KEY, 0.0)


def test_not_a_strategy():
    @ex.expectation
    def f(mu):
        return ex.sample(dist.Normal(mu, 1.0), estimator="reparam", name="z")

    with pytest.raises(ex.StrategyError, match=r"site 'z'.*estimax strategy"):
        f.estimate(KEY, 0.0)


def test_integer_valued_program():
    @ex.expectation
    def f(l):
        return ex.sample(dist.Bernoulli(logits=l), name="b")

    with pytest.raises(ex.ProgramError, match=r"int32.*floating point"):
        f.estimate(KEY, 0.0)


def test_argnums_out_of_range():
    @ex.expectation
    def f(mu):
        return ex.sample(dist.Normal(mu, 1.0), name="z")

    with pytest.raises(ex.ProgramError, match=r"argnums=1.*1 argument"):
        ex.grad(f, argnums=1)(KEY, 0.0)


def test_reinforce_baseline_type():
    with pytest.raises(ex.StrategyError, match=r"baseline"):
        ex.reinforce(baseline="zero")
