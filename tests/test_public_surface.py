"""Public names that no other module exercises directly: ``ex.register_mvd`` and
``ex.shard_batch`` (with ``ex.device_mesh``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
import pytest

import estimax as ex
from estimax.testing import assert_unbiased
from estimax.transforms.estimators import _mvd


def _exponential_rule(params, tangents, x, key):
    """∂λ E_{Exp(λ)}[f] = (1/λ)(E_{Exp(λ)}[f] − E_{Gamma(2, λ)}[f]): the site's own draw
    against the draw plus an independent Exp(λ) draw (a Gamma(2, λ) draw), per coordinate."""
    rate, rate_dot = params["rate"].reshape(-1), tangents["rate"].reshape(-1)
    extra = jax.random.exponential(key, x.shape, x.dtype) / rate
    c = rate_dot / rate
    return jnp.concatenate([c, -c]), jnp.concatenate([_mvd._replace_each(x, x), _mvd._replace_each(x, x + extra)])


@pytest.fixture
def rules(monkeypatch):
    """The MVD rule table, restored after the test (registration is global)."""
    monkeypatch.setattr(_mvd, "_RULES", dict(_mvd._RULES))


def test_register_mvd_adds_an_unbiased_rule_for_a_new_family(rules):
    @ex.expectation
    def objective(rate):
        x = ex.sample(dist.Exponential(rate).expand([2]), estimator=ex.mvd, name="x")
        return jnp.sum(x**2)  # E = 2 · 2/λ², so ∂λ = −8/λ³

    rate = jnp.float32(1.5)
    with pytest.raises(ex.StrategyError, match="Exponential"):
        ex.grad(objective)(jax.random.PRNGKey(0), rate)
    ex.register_mvd(dist.Exponential, ("rate",), _exponential_rule)
    plan = ex.explain(objective, rate)
    assert plan.site("x").strategy.describe() == "mvd" and plan.certificate.kind == "unbiased"
    assert_unbiased(ex.grad(objective), -8.0 / rate**3, args=(rate,), seed="register-mvd-exponential", n=20000)


def test_a_wrong_registered_rule_is_caught_by_the_statistical_test(rules):
    """The same rule with the Gamma(2, λ) draw replaced by a second Exp(λ) draw is biased."""

    def wrong(params, tangents, x, key):
        weights, alternatives = _exponential_rule(params, tangents, x, key)
        n = x.shape[0]
        fresh = jax.random.exponential(key, x.shape, x.dtype) / params["rate"].reshape(-1)
        return weights, alternatives.at[n:].set(_mvd._replace_each(x, fresh))

    ex.register_mvd(dist.Exponential, ("rate",), wrong)

    @ex.expectation
    def objective(rate):
        return ex.sample(dist.Exponential(rate), estimator=ex.mvd, name="x") ** 2

    with pytest.raises(AssertionError, match="looks biased"):
        assert_unbiased(ex.grad(objective), -4.0 / 1.5**3, args=(jnp.float32(1.5),), seed="wrong-mvd", n=20000)


SHARD = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    import estimax as ex

    mesh = ex.device_mesh(4)
    assert mesh.devices.size == 4
    batch = {"x": np.arange(16.0).reshape(8, 2), "y": np.arange(8), "name": "digits"}
    out = ex.shard_batch(batch, mesh)
    assert out["name"] == "digits"                               # what is not an array passes through
    for name in ("x", "y"):
        shards = sorted(out[name].addressable_shards, key=lambda s: s.index[0].start)
        assert [s.data.shape[0] for s in shards] == [2, 2, 2, 2], name
        assert len({s.device for s in shards}) == 4
        np.testing.assert_array_equal(np.asarray(out[name]), batch[name])
    try:
        ex.shard_batch({"odd": np.zeros((6, 3))}, mesh)
    except ex.EstimaxError as e:
        assert "odd" in str(e) and "multiple of the 4 device(s)" in str(e), str(e)
    else:
        raise AssertionError("a batch of 6 over 4 devices was accepted")
    print("sharded ok")
    """
)


def test_shard_batch_splits_the_leading_axis_over_the_mesh():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", SHARD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "sharded ok" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
