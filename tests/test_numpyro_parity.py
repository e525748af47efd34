"""estimax's ELBO against NumPyro's TraceGraph_ELBO on a model with discrete latents.

The model has three independent Bernoulli latents ``b_i`` and one Normal observation per
latent, ``y_i ~ N(w_i b_i, 1)``; the guide has its own logits and uses REINFORCE. It is
written three ways, with the same joint distribution: one vector site ``b`` (an event of
three), three scalar sites ``b0, b1, b2``, and one site whose three elements form a plate. With 2^3 joint values the ELBO and its gradient are exact by
enumeration, so both libraries' estimators are compared with the exact value and with
each other, each within 5 standard errors (the estimates' own).

With separate scalar sites, or a plate, each latent has its own additive cost terms, so both
libraries Rao-Blackwellize the score terms (each latent's score multiplies only the terms
that depend on it); the last test compares the gradients' variances there.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import TraceGraph_ELBO

import estimax as ex
from estimax.testing import assert_unbiased, key_from

Y = jnp.array([0.9, 1.7, -0.3])
# l: the guide's logits; a: the model's prior logits; w: the effect of each latent on its
# observation. No logit is exactly 0, where NumPyro's Bernoulli(logits).log_prob has a wrong
# derivative (see test_objectives.py). Every coordinate of the exact gradient is at least five
# standard errors of the estimates (checked below), so a sign error in any would be caught.
PARAMS = {
    "l": jnp.array([-1.0, -0.7, 1.1]),
    "a": jnp.array([0.3, -0.5, 0.2]),
    "w": jnp.array([1.5, -1.0, 2.0]),
}
N = 20000  # estimates per statistical comparison


# --- one vector site -------------------------------------------------------------------------


def vector_model(params, y):
    b = numpyro.sample("b", dist.Bernoulli(logits=params["a"]).to_event(1))
    numpyro.sample("y", dist.Normal(params["w"] * b, 1.0).to_event(1), obs=y)


def vector_guide(params, y):
    del y
    return ex.sample(dist.Bernoulli(logits=params["l"]).to_event(1), estimator=ex.reinforce, name="b") * 1.0


def vector_np_guide(params, y):
    del y
    numpyro.sample("b", dist.Bernoulli(logits=params["l"]).to_event(1))


# --- three scalar sites, each with its own cost terms ----------------------------------------


def scalar_model(params, y):
    for i in range(3):
        b = numpyro.sample(f"b{i}", dist.Bernoulli(logits=params["a"][i]))
        numpyro.sample(f"y{i}", dist.Normal(params["w"][i] * b, 1.0), obs=y[i])


def scalar_guide(params, y):
    del y
    sites = [dist.Bernoulli(logits=params["l"][i]) for i in range(3)]
    bs = [ex.sample(q, estimator=ex.reinforce, name=f"b{i}") for i, q in enumerate(sites)]
    return jnp.stack(bs) * 1.0


def scalar_np_guide(params, y):
    del y
    for i in range(3):
        numpyro.sample(f"b{i}", dist.Bernoulli(logits=params["l"][i]))


# --- one site whose elements are a plate (per-element Rao-Blackwellization) ------------------


def plate_model(params, y):
    with numpyro.plate("n", 3):
        b = numpyro.sample("b", dist.Bernoulli(logits=params["a"]))
        numpyro.sample("y", dist.Normal(params["w"] * b, 1.0), obs=y)


def plate_guide(params, y):
    del y  # batch shape (3,): three independent elements
    return ex.sample(dist.Bernoulli(logits=params["l"]), estimator=ex.reinforce, name="b") * 1.0


def plate_np_guide(params, y):
    del y
    with numpyro.plate("n", 3):
        numpyro.sample("b", dist.Bernoulli(logits=params["l"]))


LAYOUTS = {
    "vector": (vector_model, vector_guide, vector_np_guide),
    "scalar": (scalar_model, scalar_guide, scalar_np_guide),
    "plate": (plate_model, plate_guide, plate_np_guide),
}


# --- the exact ELBO, by enumeration ----------------------------------------------------------


def _bernoulli_log_pmf(b, logits):
    return b * logits - jax.nn.softplus(logits)


def exact_elbo(params, y):
    """``Σ_b q(b) (log p(y, b) − log q(b))`` over the 8 joint values of ``b``."""
    total = jnp.zeros(())
    for bits in itertools.product((0.0, 1.0), repeat=3):
        b = jnp.array(bits)
        log_q = jnp.sum(_bernoulli_log_pmf(b, params["l"]))
        log_prior = jnp.sum(_bernoulli_log_pmf(b, params["a"]))
        log_p = log_prior + jnp.sum(dist.Normal(params["w"] * b, 1.0).log_prob(y))
        total = total + jnp.exp(log_q) * (log_p - log_q)
    return total


def tracegraph_value(model, np_guide):
    """``(key, params) -> ELBO estimate``: minus NumPyro's TraceGraph_ELBO loss. The
    parameters are a model/guide argument, so ``jax.grad`` of it is NumPyro's estimator."""
    return lambda key, params: -TraceGraph_ELBO().loss(key, {}, model, np_guide, params, Y)


def _assert_same_means(mean_a, se_a, mean_b, se_b, what):
    for name in mean_a:
        diff = np.abs(np.asarray(mean_a[name]) - np.asarray(mean_b[name]))
        tol = 5 * np.hypot(se_a[name], se_b[name])
        assert np.all(diff < tol), (what, name, mean_a[name], mean_b[name], tol / 5)


# --- (a) the objective's value ---------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_elbo_value_matches_tracegraph_elbo_and_the_exact_elbo(layout):
    model, guide, np_guide = LAYOUTS[layout]
    objective = ex.objectives.elbo(model, guide)
    plan = ex.explain(objective, PARAMS, Y)
    assert {s.strategy.describe() for s in plan.sites} == {"reinforce"}
    assert plan.certificate.kind == "unbiased"
    exact = exact_elbo(PARAMS, Y)
    ours = assert_unbiased(
        objective.estimate, exact, args=(PARAMS, Y), seed=("tg-value-ours", layout, PARAMS), n=N
    )
    theirs = assert_unbiased(
        tracegraph_value(model, np_guide),
        exact,
        args=(PARAMS,),
        seed=("tg-value-theirs", layout, PARAMS),
        n=N,
    )
    assert abs(ours.mean - theirs.mean) < 5 * math.hypot(ours.se, theirs.se), (ours.mean, theirs.mean)


# --- (b) the gradient --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_elbo_gradient_matches_tracegraph_elbo_and_the_exact_gradient(layout):
    model, guide, np_guide = LAYOUTS[layout]
    exact = jax.grad(exact_elbo)(PARAMS, Y)
    ours = assert_unbiased(
        ex.grad(ex.objectives.elbo(model, guide)),
        exact,
        args=(PARAMS, Y),
        seed=("tg-grad-ours", layout, PARAMS),
        n=N,
    )
    theirs = assert_unbiased(
        jax.grad(tracegraph_value(model, np_guide), argnums=1),
        exact,
        args=(PARAMS,),
        seed=("tg-grad-theirs", layout, PARAMS),
        n=N,
    )
    _assert_same_means(ours.mean, ours.se, theirs.mean, theirs.se, "estimax vs TraceGraph_ELBO")
    for name in exact:  # the test's power: a flipped sign (a bias of 2|g|) would be >= 10 SE
        assert np.all(5 * ours.se[name] < np.abs(exact[name])), (name, ours.se[name], exact[name])


# --- (c) variance, where Rao-Blackwellization applies ---------------------------------------


def _variance_and_se(samples):
    """Per-coordinate sample variance of ``samples`` (``(n, d)``) and its standard error,
    ``sqrt((m4 − s⁴) / n)`` with ``m4`` the sample fourth central moment."""
    n = samples.shape[0]
    centered = samples - samples.mean(0)
    var = np.sum(centered**2, 0) / (n - 1)
    m4 = np.mean(centered**4, 0)
    return var, np.sqrt(np.maximum(m4 - var**2, 0.0) / n)


def _flat_samples(fn, key, *args):
    out = jax.jit(jax.vmap(fn, in_axes=(0,) + (None,) * len(args)))(jax.random.split(key, N), *args)
    return np.concatenate([np.asarray(out[k], np.float64).reshape(N, -1) for k in sorted(out)], axis=1)


@pytest.mark.parametrize("layout", ["scalar", "plate"])
def test_reinforce_gradient_variance_is_no_larger_than_tracegraph_elbo(layout):
    """Per coordinate, one-sided: ``var_estimax − var_numpyro < 5 SE`` of the difference of the
    two sample variances (independent keys; the SE from each sample's fourth moment). With
    separate sites, and with one site whose elements form a plate, both libraries give each
    latent only its own cost terms."""
    model, guide, np_guide = LAYOUTS[layout]
    ours_fn = ex.grad(ex.objectives.elbo(model, guide))
    ours = _flat_samples(ours_fn, key_from("tg-var-ours", layout, PARAMS), PARAMS, Y)
    theirs = _flat_samples(
        jax.grad(tracegraph_value(model, np_guide), argnums=1), key_from("tg-var-theirs", layout, PARAMS), PARAMS
    )
    var_ours, se_ours = _variance_and_se(ours)
    var_theirs, se_theirs = _variance_and_se(theirs)
    names = [f"{k}[{i}]" for k in sorted(PARAMS) for i in range(PARAMS[k].shape[0])]
    excess = var_ours - var_theirs
    tol = 5 * np.hypot(se_ours, se_theirs)
    bad = [
        f"{n}: var {vo:.4g} (estimax) vs {vt:.4g} (TraceGraph_ELBO), excess {e:.3g} > {t:.3g}"
        for n, vo, vt, e, t in zip(names, var_ours, var_theirs, excess, tol, strict=True)
        if e >= t
    ]
    assert not bad, "estimax's gradient variance is larger:\n  " + "\n  ".join(bad)
