"""REINFORCE baselines computed in the program: per-lane baselines and learned control variates.

A learned baseline's parameters receive the gradient of ``½ E[(f − b)²]`` (``learn="descent"``)
or its negative (``"ascent"``), where ``f`` is the site's learning signal -- the cost
downstream of it after Rao-Blackwellization -- while the objective's gradient is unchanged.
"""

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
import pytest

import estimax as ex
from estimax.testing import assert_unbiased


def cost(x):
    return 3.0 * (x - 0.3) ** 2


def expected_cost(theta):
    p = jax.nn.sigmoid(theta)
    return p * cost(1.0) + (1 - p) * cost(0.0)


@pytest.mark.parametrize("learn", ["descent", "ascent"])
def test_learned_baseline_gets_its_loss_gradient_and_leaves_the_objective_gradient_unbiased(learn):
    @ex.expectation
    def objective(theta, psi):
        x = ex.sample(dist.Bernoulli(logits=theta), estimator=ex.reinforce(baseline=2.0 * psi, learn=learn), name="x")
        return cost(x) + 1.0  # the constant is not downstream of x: not in x's learning signal

    theta, psi = jnp.asarray(0.4), jnp.asarray(0.7)
    signal = expected_cost(theta)
    sign = 1.0 if learn == "descent" else -1.0
    exact = (jax.grad(expected_cost)(theta), sign * 2.0 * (2.0 * psi - signal))  # d/dψ ½E[(f − 2ψ)²]
    assert_unbiased(ex.grad(objective, argnums=(0, 1)), exact, args=(theta, psi), seed=("learned", learn), n=20_000)
    assert "reinforce(baseline=<learned, " + learn + ">)" in str(ex.explain(objective, theta, psi))


def test_per_lane_baselines_inside_vmap():
    @ex.expectation
    def objective(theta, psi):
        def lane(t, b):
            x = ex.sample(dist.Bernoulli(logits=t), estimator=ex.reinforce(baseline=b, learn="descent"), name="x")
            return cost(x)

        return jnp.sum(ex.vmap(lane)(theta, psi))

    theta, psi = jnp.array([0.2, -0.5, 1.0]), jnp.array([0.5, 1.0, 2.0])
    total = lambda t: jnp.sum(expected_cost(t))  # noqa: E731
    # one site with three lanes; the value sums the lanes' costs, so each lane's learning
    # signal is its own cost (Rao-Blackwellized per element) and its baseline learns that
    exact = (jax.grad(total)(theta), psi - expected_cost(theta))
    assert_unbiased(ex.grad(objective, argnums=(0, 1)), exact, args=(theta, psi), seed="per-lane", n=20_000)

    @ex.expectation
    def fixed(theta, b):  # a per-lane baseline that is not learned: the gradient is unchanged
        return jnp.sum(ex.vmap(lambda t, bi: cost(ex.sample(dist.Bernoulli(logits=t), estimator=ex.reinforce(baseline=bi), name="x")))(theta, b))

    assert_unbiased(ex.grad(fixed), jax.grad(total)(theta), args=(theta, psi), seed="per-lane-fixed", n=20_000)


def test_learned_baseline_inside_a_loop_body():
    @ex.expectation
    def objective(theta, psi):
        def body(carry, t):
            x = ex.sample(dist.Bernoulli(logits=t), estimator=ex.reinforce(baseline=psi, learn="descent"), name="x")
            return carry + cost(x), None

        return jax.lax.scan(body, 0.0, theta)[0]

    theta, psi = jnp.array([0.2, -0.5, 1.0]), jnp.asarray(0.7)
    total = jnp.sum(expected_cost(theta))
    exact = (jax.grad(lambda t: jnp.sum(expected_cost(t)))(theta), 3 * (psi - total))  # no RB inside loops
    assert_unbiased(ex.grad(objective, argnums=(0, 1)), exact, args=(theta, psi), seed="scan-learned", n=20_000)


def test_learned_baseline_mistakes():
    with pytest.raises(ex.StrategyError, match="learn=.*'descent'"):
        ex.reinforce(baseline=0.5, learn="down")
    with pytest.raises(ex.StrategyError, match="needs a baseline computed in the program"):
        ex.reinforce(baseline=0.5, learn="descent")


def test_vector_baseline_per_element_of_a_batched_site():
    @ex.expectation
    def objective(theta, psi):
        x = ex.sample(dist.Bernoulli(logits=theta), estimator=ex.reinforce(baseline=psi, learn="descent"), name="x")
        return jnp.sum(cost(x)) + 1.0

    theta, psi = jnp.array([0.2, -0.5, 1.0, 0.4]), jnp.array([0.5, 1.0, 2.0, 0.0])
    total = lambda t: jnp.sum(expected_cost(t))  # noqa: E731
    # per-element signals: element b's baseline learns E[cost(x_b)]
    exact = (jax.grad(total)(theta), psi - expected_cost(theta))
    assert_unbiased(ex.grad(objective, argnums=(0, 1)), exact, args=(theta, psi), seed="vector-b", n=20_000)

    @ex.expectation
    def mixed(theta, psi):  # the elements' costs contracted together: one whole signal
        x = ex.sample(dist.Bernoulli(logits=theta), estimator=ex.reinforce(baseline=psi, learn="descent"), name="x")
        return jnp.dot(cost(x), jnp.ones(4))

    exact = (jax.grad(total)(theta), psi - total(theta))
    assert_unbiased(ex.grad(mixed, argnums=(0, 1)), exact, args=(theta, psi), seed="vector-b-mixed", n=20_000)

    with pytest.raises(ex.StrategyError, match=r"site 'x'.*batch shape is \(4,\).*shape \(3,\)"):
        objective.estimate(jax.random.PRNGKey(0), theta, jnp.zeros(3))
