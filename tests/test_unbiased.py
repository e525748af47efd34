"""Unbiasedness of every strategy on every family it supports, against closed forms.

For parameters drawn by hypothesis, the mean of N gradient estimates lies within 5 standard
errors of the exact gradient (``jax.grad`` of the closed-form expectation). Keys are derived
from the inputs, so a failure reproduces from the printed example.
"""

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import estimax as ex
from estimax.testing import assert_unbiased
from estimax.testing import strategies as exst

W3 = jnp.array([0.7, -1.3, 2.1])


def f_and_exact(family):
    """A test function of the site's value and its exact expectation as a function of params."""
    if family == "Normal":
        f = lambda x: x**2 + jnp.sin(x)
        exact = lambda p: p["loc"] ** 2 + p["scale"] ** 2 + jnp.sin(p["loc"]) * jnp.exp(-p["scale"] ** 2 / 2)
    elif family == "Exponential":
        f = lambda x: x**2 + jnp.exp(-x)
        exact = lambda p: 2 / p["rate"] ** 2 + p["rate"] / (p["rate"] + 1)
    elif family == "Gamma":
        f = lambda x: x**2 + jnp.exp(-x)
        exact = lambda p: (
            p["concentration"] * (p["concentration"] + 1) / p["rate"] ** 2
            + (p["rate"] / (p["rate"] + 1)) ** p["concentration"]
        )
    elif family == "Beta":
        f = lambda x: x**2
        exact = lambda p: (
            p["concentration1"] * (p["concentration1"] + 1)
            / ((p["concentration1"] + p["concentration0"]) * (p["concentration1"] + p["concentration0"] + 1))
        )
    elif family == "Dirichlet":
        f = lambda x: jnp.sum(W3 * x**2)
        exact = lambda p: jnp.sum(
            W3 * p["concentration"] * (p["concentration"] + 1)
            / (jnp.sum(p["concentration"]) * (jnp.sum(p["concentration"]) + 1))
        )
    elif family == "Bernoulli":
        f = lambda b: (b + 0.5) ** 2
        exact = lambda p: jax.nn.sigmoid(p["logits"]) * 2.25 + (1 - jax.nn.sigmoid(p["logits"])) * 0.25
    elif family == "Categorical":
        f = lambda c: W3[c] ** 2 + W3[c]
        exact = lambda p: jnp.sum(jax.nn.softmax(p["logits"]) * (W3**2 + W3))
    elif family == "Poisson":
        f = lambda x: x**2 + 1.0 / (x + 1.0)
        exact = lambda p: p["rate"] + p["rate"] ** 2 + (1 - jnp.exp(-p["rate"])) / p["rate"]
    else:  # pragma: no cover
        raise ValueError(family)
    return f, exact


SUPPORTED = {
    "reparam": ["Normal", "Exponential", "Gamma", "Beta", "Dirichlet"],
    "reinforce": ["Normal", "Exponential", "Gamma", "Beta", "Dirichlet", "Bernoulli", "Categorical", "Poisson"],
    "enum": ["Bernoulli", "Categorical"],
    "mvd": ["Normal", "Bernoulli", "Categorical", "Poisson"],
}
CASES = [(s, fam) for s, fams in SUPPORTED.items() for fam in fams]
STRATEGIES = {"reparam": ex.reparam, "reinforce": ex.reinforce, "enum": ex.enum, "mvd": ex.mvd}

_programs = {}


def program_for(strategy_name, family):
    """One compiled gradient estimator per case, reused across hypothesis examples."""
    if (strategy_name, family) not in _programs:
        f, _ = f_and_exact(family)

        @ex.expectation
        def objective(p):
            x = ex.sample(exst.build(family, p), estimator=STRATEGIES[strategy_name], name="x")
            return f(x)

        _programs[strategy_name, family] = jax.jit(ex.grad(objective))
    return _programs[strategy_name, family]


@pytest.mark.parametrize("strategy_name,family", CASES, ids=[f"{s}-{f}" for s, f in CASES])
@given(data=st.data())
def test_gradient_unbiased(strategy_name, family, data):
    p = data.draw(exst.params(family), label="params")
    _, exact = f_and_exact(family)
    p = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
    grad_est = program_for(strategy_name, family)
    n = 4000 if strategy_name == "enum" else 20000
    assert_unbiased(grad_est, jax.grad(exact)(p), args=(p,), seed=(strategy_name, family, p), n=n)


@pytest.mark.slow
@pytest.mark.parametrize("strategy_name,family", CASES, ids=[f"{s}-{f}" for s, f in CASES])
@settings(max_examples=10, derandomize=True, deadline=None)
@given(data=st.data())
def test_gradient_unbiased_sweep(strategy_name, family, data):
    """More parameter draws per case (run with -m slow; CI runs it too)."""
    p = data.draw(exst.params(family), label="params")
    _, exact = f_and_exact(family)
    p = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
    assert_unbiased(
        program_for(strategy_name, family), jax.grad(exact)(p), args=(p,), seed=("sweep", strategy_name, family, p), n=20000
    )
