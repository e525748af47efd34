"""Sites inside ``ex.vmap`` lanes whose distribution parameters are not mapped by the lanes.

``ex.vmap`` gives every lane its own draw by passing each site a mapped lane index, so a
site whose parameters are shared by all lanes still gets a level of its own: one mapped
only through that index, with every parameter unmapped. Enumeration (the default for a
small discrete site: a Bernoulli or Categorical guide's particles) and measure-valued
derivatives evaluate the distribution over such levels; these tests hold them to closed
forms -- enumeration exactly, the sampling estimators within 5 standard errors, with enough
draws that a wrong sign or a dropped term would fail.

Each program is compiled once: what varies within a test is passed as an argument.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.scipy.special import logsumexp

import estimax as ex
from estimax.testing import assert_unbiased

KEY = jax.random.PRNGKey(0)
N = 20000


def assert_exact(actual, expected):
    """Enumeration is exact: equal to the closed form up to float32 rounding."""
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6), actual, expected)


def assert_sampled(estimator, exact, *, args, seed, resolution):
    """``estimator`` is unbiased for ``exact`` (5 standard errors over ``N`` draws), and the
    test can tell: 5 standard errors are below ``resolution``, chosen smaller than the term
    a wrong sign or a dropped term would change."""
    report = assert_unbiased(estimator, exact, args=args, seed=seed, n=N)
    for se in jax.tree.leaves(report.se):
        assert np.all(5 * np.asarray(se) < resolution), (report.se, resolution)
    return report


def strategies(objective, *args):
    return {s.name: s.strategy.name for s in ex.explain(objective, *args).sites}


# --- one site, parameters shared by all lanes -----------------------------------------------
#
# S = Σ_i b_i over 3 lanes, b_i ~ Bernoulli(p) i.i.d.; the program is a·S + c·S², so
# (a, c) = (1, 0) is the linear signal and (0, 1) the square:
#   E[S] = 3p,                 d/dp = 3
#   E[S²] = 3p(1−p) + 9p²,     d/dp = 3 − 6p + 18p

P = 0.3
SIGNALS = [(1.0, 0.0), (0.0, 1.0)]


def signal_exact(p, a, c):
    return a * 3 * p + c * (3 * p * (1 - p) + 9 * p**2)


def shared_lanes(strategy):
    @ex.expectation
    def program(p, a, c):
        b = ex.vmap(lambda: ex.sample(dist.Bernoulli(probs=p), estimator=strategy, name="b"), axis_size=3)()
        assert b.shape == (3,)
        s = jnp.sum(b * 1.0)
        return a * s + c * s**2

    return program


@pytest.mark.parametrize("strategy", [None, ex.enum], ids=["default", "enum"])
def test_enumeration_over_lanes_sharing_their_parameters_is_exact(strategy):
    program = shared_lanes(strategy)
    assert strategies(program, P, 1.0, 0.0) == {"b": "enum"}
    value_and_grad = jax.jit(ex.value_and_grad(program))
    for a, c in SIGNALS:
        assert_exact(value_and_grad(KEY, P, a, c), jax.value_and_grad(signal_exact)(P, a, c))


@pytest.mark.parametrize("strategy", [ex.mvd, ex.reinforce], ids=["mvd", "reinforce"])
def test_sampled_gradients_over_lanes_sharing_their_parameters_are_unbiased(strategy):
    grad = ex.grad(shared_lanes(strategy))
    for a, c in SIGNALS:
        exact = jax.grad(signal_exact)(P, a, c)
        assert_sampled(grad, exact, args=(P, a, c), seed=("shared", strategy.name, a, c), resolution=1.0)


# --- multi-sample objectives with a discrete guide ------------------------------------------
#
# The guide's site sits inside the objective's ``ex.vmap`` over K particles, with the
# parameters shared by the particles. With K particles of S values each the exact objective
# is a sum over the S**K joint values, written out here. (VIMCO draws its particles with
# the parameters stopped and differentiates log q at the draws itself, so there the guide's
# strategy only draws -- or enumerates the draws, which makes its estimate exact as well.)

Y = jnp.float32(0.7)


def coin_model(params, y):
    b = numpyro.sample("b", dist.Bernoulli(0.4))
    numpyro.sample("y", dist.Normal(2.0 * b - 1.0, 1.0), obs=y)


def coin_log_joint(z, y):
    return jnp.log(jnp.where(z == 1, 0.4, 0.6)) + dist.Normal(2.0 * z - 1.0, 1.0).log_prob(y)


def coin_guide(strategy):
    def guide(params, y):
        return ex.sample(dist.Bernoulli(logits=params["l"]), estimator=strategy, name="b") * 1.0

    return guide


def coin_log_q(params, z):
    return z * params["l"] - jax.nn.softplus(params["l"])


DIE_PRIOR = jnp.array([0.2, 0.5, 0.3])


def die_model(params, y):
    z = numpyro.sample("z", dist.Categorical(probs=DIE_PRIOR))
    numpyro.sample("y", dist.Normal(z - 1.0, 1.0), obs=y)


def die_log_joint(z, y):
    return jnp.log(DIE_PRIOR[z]) + dist.Normal(z - 1.0, 1.0).log_prob(y)


def die_guide(strategy):
    def guide(params, y):
        return ex.sample(dist.Categorical(logits=params["c"]), estimator=strategy, name="z")

    return guide


def die_log_q(params, z):
    return jax.nn.log_softmax(params["c"])[z]


CASES = {
    # name: (model, guide factory, log q(z), log p(z, y), support, K, params)
    "bernoulli": (coin_model, coin_guide, coin_log_q, coin_log_joint, (0, 1), 3, {"l": jnp.float32(0.3)}),
    "categorical": (
        die_model, die_guide, die_log_q, die_log_joint, (0, 1, 2), 2, {"c": jnp.array([0.4, -0.3, 0.1])}
    ),
}


@functools.cache
def exact_iwelbo(case):
    """``(IWELBO_K, ∇IWELBO_K)`` at ``(params, y)``, where ``IWELBO_K`` is
    ``Σ_{z_1..z_K} Π_k q(z_k) · (log Σ_k w_k − log K)`` over every joint value of the K
    particles (compiled once per case)."""
    _, _, log_q, log_joint, support, k, _ = CASES[case]
    joint = jnp.array(list(itertools.product(support, repeat=k)))  # (S**K, K)

    def objective(params, y):
        lq = jax.vmap(jax.vmap(lambda z: log_q(params, z)))(joint)
        lp = jax.vmap(jax.vmap(lambda z: log_joint(z, y)))(joint)
        return jnp.sum(jnp.exp(jnp.sum(lq, axis=1)) * (logsumexp(lp - lq, axis=1) - math.log(k)))

    return jax.jit(jax.value_and_grad(objective))


OBJECTIVES = {"iwelbo": ex.objectives.iwelbo, "vimco": ex.objectives.vimco}


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_particle_objectives_with_a_discrete_guide_enumerate_exactly_by_default(case, objective):
    model, guide, _, _, _, k, params = CASES[case]
    program = OBJECTIVES[objective](model, guide(None), k)
    assert set(strategies(program, params, Y).values()) == {"enum"}
    v, g = ex.value_and_grad(program)(KEY, params, Y)
    assert_exact((v, g), exact_iwelbo(case)(params, Y))


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_particle_objectives_with_a_discrete_guide_are_unbiased_under_mvd(case, objective):
    model, guide, _, _, _, k, params = CASES[case]
    program = OBJECTIVES[objective](model, guide(ex.mvd), k)
    _, exact = exact_iwelbo(case)(params, Y)
    seed = ("particles", case, objective)
    assert_sampled(ex.grad(program), exact, args=(params, Y), seed=seed, resolution=0.05)


# --- a Categorical with one probability vector for all lanes --------------------------------

THETA = jnp.array([0.5, -0.2, 0.1])


def categorical_lanes(strategy):
    @ex.expectation
    def program(theta):
        probs = jax.nn.softmax(theta)  # one vector, shared by both lanes
        draw = lambda: ex.sample(dist.Categorical(probs=probs), estimator=strategy, name="c")
        c = ex.vmap(draw, axis_size=2)()
        assert c.shape == (2,)
        return (c[0] - c[1]) ** 2 + 1.0 * c[0]

    return program


def categorical_exact(theta):
    """``Σ_{a,b} p_a p_b f(a, b)`` over the 9 joint values of the two lanes."""
    probs = jax.nn.softmax(theta)
    a = jnp.arange(3.0)
    f = (a[:, None] - a[None, :]) ** 2 + a[:, None]  # f[a, b]
    return probs @ f @ probs


def test_categorical_lanes_sharing_a_probability_vector_enumerate_exactly():
    program = categorical_lanes(None)
    assert strategies(program, THETA) == {"c": "enum"}
    assert_exact(ex.value_and_grad(program)(KEY, THETA), jax.value_and_grad(categorical_exact)(THETA))


def test_categorical_lanes_sharing_a_probability_vector_are_unbiased_under_mvd():
    exact = jax.grad(categorical_exact)(THETA)
    grad = ex.grad(categorical_lanes(ex.mvd))
    assert_sampled(grad, exact, args=(THETA,), seed="categorical-mvd", resolution=0.1)


# --- nested lanes: parameters mapped on one level, shared on the other ----------------------
#
# b has shape (outer, inner); each coordinate is Bernoulli(p) for its row's (mapped by the
# outer lanes) or column's (mapped by the inner lanes) p, and f = (Σ w·b)², so
# E[f] = Σ w² p(1 − p) + (Σ w p)².

PS = jnp.array([0.2, 0.5, 0.7])


def nested_shape(mapped):
    return (3, 2) if mapped == "outer" else (2, 3)


def nested_weights(mapped):
    return jnp.arange(1.0, 7.0).reshape(nested_shape(mapped)) / 6.0


def nested_lanes(strategy, mapped):
    def draw(p):
        return ex.sample(dist.Bernoulli(probs=p), estimator=strategy, name="b")

    @ex.expectation
    def program(ps):
        if mapped == "outer":  # p mapped by the outer lanes, shared by the inner ones
            b = ex.vmap(lambda p: ex.vmap(lambda: draw(p), axis_size=2)())(ps)
        else:  # shared by the outer lanes, mapped by the inner ones
            b = ex.vmap(lambda: ex.vmap(draw)(ps), axis_size=2)()
        assert b.shape == nested_shape(mapped)
        return jnp.sum(nested_weights(mapped) * b) ** 2

    return program


def nested_exact(ps, mapped):
    p = jnp.broadcast_to(ps[:, None] if mapped == "outer" else ps[None, :], nested_shape(mapped))
    w = nested_weights(mapped)
    return jnp.sum(w**2 * p * (1 - p)) + jnp.sum(w * p) ** 2


@pytest.mark.parametrize("mapped", ["outer", "inner"])
def test_nested_lanes_mapped_on_one_level_enumerate_exactly(mapped):
    program = nested_lanes(None, mapped)
    assert strategies(program, PS) == {"b": "enum"}  # 2**6 joint values: the default's limit
    assert_exact(ex.value_and_grad(program)(KEY, PS), jax.value_and_grad(nested_exact)(PS, mapped))


@pytest.mark.parametrize("mapped", ["outer", "inner"])
def test_nested_lanes_mapped_on_one_level_are_unbiased_under_mvd(mapped):
    exact = jax.grad(nested_exact)(PS, mapped)
    grad = ex.grad(nested_lanes(ex.mvd, mapped))
    assert_sampled(grad, exact, args=(PS,), seed=("nested", mapped), resolution=0.1)


# --- batched distributions inside shared lanes ----------------------------------------------
#
# Two lanes of a 2-element Bernoulli(p), once expanded (site "e") and once expanded and made
# one event (site "i"): S, the sum of the 8 coordinates, is Binomial(8, p), and
# E[S²] = 8p(1 − p) + 64p².


def batched_lanes(strategy):
    def draw(p):
        d = dist.Bernoulli(probs=p).expand([2])
        expanded = ex.sample(d, estimator=strategy, name="e")
        return expanded + ex.sample(d.to_event(1), estimator=strategy, name="i")

    @ex.expectation
    def program(p):
        b = ex.vmap(lambda: draw(p), axis_size=2)()
        assert b.shape == (2, 2)
        return jnp.sum(b * 1.0) ** 2

    return program


def batched_exact(p):
    return 8 * p * (1 - p) + 64 * p**2


def test_batched_distributions_in_shared_lanes_are_unbiased_under_mvd():
    exact = jax.grad(batched_exact)(P)
    assert_sampled(ex.grad(batched_lanes(ex.mvd)), exact, args=(P,), seed="batched", resolution=1.0)


def _numpyro_enumerates_expanded() -> bool:
    try:  # NumPyro before 0.20 calls a torch-style `.expand` on a JAX array here
        dist.Bernoulli(probs=0.5).expand([2]).enumerate_support()
    except AttributeError:
        return False
    return True


# NumPyro < 0.20 (in the tested range, with JAX 0.6.2) fails in its own enumerate_support
@pytest.mark.skipif(not _numpyro_enumerates_expanded(), reason="this NumPyro cannot enumerate an expanded distribution")
def test_expanded_distribution_in_shared_lanes_enumerates_exactly():
    @ex.expectation
    def program(p):
        draw = lambda: ex.sample(dist.Bernoulli(probs=p).expand([2]), estimator=ex.enum, name="e")
        b = ex.vmap(draw, axis_size=2)()
        assert b.shape == (2, 2)
        return jnp.sum(b * 1.0) ** 2

    exact = lambda p: 4 * p * (1 - p) + 16 * p**2  # S ~ Binomial(4, p)
    assert_exact(ex.value_and_grad(program)(KEY, P), jax.value_and_grad(exact)(P))
