"""``ex.marginal`` / ``ex.normalize`` and the hierarchical objectives (HVI, IWHVI, DIWHVI).

The guide is a Gaussian hierarchy ``u ~ N(a, su²)``, ``z ~ N(u, sz²)``, so ``q(z)``,
``q(u | z)`` and the HVI bound ``ELBO(q) − E_q KL(q(u|z) ‖ r(u|z))`` are closed forms.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax.scipy.stats import norm

import estimax as ex
from estimax.testing import assert_unbiased, key_from, mean_and_se
from problems import X, log_evidence, model

P = {k: jnp.asarray(v) for k, v in dict(a=0.9, log_su=-0.5, log_sz=-0.8, c=0.3, d=0.5, log_sr=-0.7).items()}


def joint(p, x):
    del x
    u = ex.sample(dist.Normal(p["a"], jnp.exp(p["log_su"])), name="u")
    return ex.sample(dist.Normal(u, jnp.exp(p["log_sz"])), name="z")


def reverse(kept, p, x):
    del x
    return ex.sample(dist.Normal(p["c"] * kept["z"] + p["d"], jnp.exp(p["log_sr"])), name="u")


def marginal_var(p):
    return jnp.exp(2 * p["log_su"]) + jnp.exp(2 * p["log_sz"])


def exact_elbo(p, x):
    """ELBO of the exact marginal ``q(z) = N(a, su² + sz²)``."""
    a, v = p["a"], marginal_var(p)
    c = -0.5 * math.log(2 * math.pi)
    expected_log_joint = c - 0.5 * (a**2 + v) + jnp.sum(c - 0.5 * ((x - a) ** 2 + v))
    return expected_log_joint + 0.5 * jnp.log(2 * math.pi * math.e * v)


def posterior_u(p):
    """``q(u | z) = N(k·z + m, s²)``: ``(k, m, s²)``."""
    su2, sz2 = jnp.exp(2 * p["log_su"]), jnp.exp(2 * p["log_sz"])
    prec = 1 / su2 + 1 / sz2
    return 1 / (sz2 * prec), p["a"] / (su2 * prec), 1 / prec


def exact_hvi(p, x):
    k, m, s2 = posterior_u(p)
    sr2 = jnp.exp(2 * p["log_sr"])
    alpha, beta = k - p["c"], m - p["d"]
    mean_sq = alpha**2 * marginal_var(p) + (alpha * p["a"] + beta) ** 2
    kl = 0.5 * jnp.log(sr2 / s2) + (s2 + mean_sq) / (2 * sr2) - 0.5
    return exact_elbo(p, x) - kl


def exact_reverse(p):
    """Reverse-model parameters equal to the exact ``q(u | z)``."""
    k, m, s2 = posterior_u(p)
    return {**p, "c": k, "d": m, "log_sr": 0.5 * jnp.log(s2)}


def estimates(objective, n, seed):
    return mean_and_se(objective.estimate, key_from(seed), n, args=(P, X))


# --- the hierarchical objectives against closed forms --------------------------------------
def test_hvi_value_and_gradient_are_unbiased_for_the_closed_form():
    hvi = ex.objectives.hvi(model, joint, keep="z", proposal=reverse)
    assert_unbiased(hvi.estimate, exact_hvi(P, X), args=(P, X), seed=("hvi-value",), n=20_000)
    assert_unbiased(ex.grad(hvi), jax.grad(exact_hvi)(P, X), args=(P, X), seed=("hvi-grad",), n=20_000)


def test_bounds_are_ordered_hvi_iwhvi_elbo_and_diwhvi_below_log_evidence():
    n = 20_000
    hvi_m, hvi_se = estimates(ex.objectives.hvi(model, joint, keep="z", proposal=reverse), n, "o-hvi")
    rows = {}
    for m in (1, 8):
        rows[m] = estimates(ex.objectives.iwhvi(model, joint, keep="z", proposal=reverse, m=m), n, ("o-iw", m))
    elbo_q = float(exact_elbo(P, X))
    # HVI <= IWHVI(1) <= IWHVI(8) <= ELBO(q): each step checked to 5 combined SEs
    chain = [(hvi_m, hvi_se), rows[1], rows[8], (elbo_q, 0.0)]
    for (lo, lo_se), (hi, hi_se) in zip(chain, chain[1:]):
        assert float(lo) <= float(hi) + 5 * math.hypot(float(lo_se), float(hi_se)), (lo, hi)
    # with this reverse model the gaps are large: IWHVI(8) recovers most of ELBO(q) - HVI
    assert float(rows[8][0]) - float(hvi_m) > 0.5 * (elbo_q - float(exact_hvi(P, X)))
    d_m, d_se = estimates(ex.objectives.diwhvi(model, joint, keep="z", proposal=reverse, n=4, m=4), n, "o-diw")
    iw4_m, iw4_se = estimates(ex.objectives.iwhvi(model, joint, keep="z", proposal=reverse, m=4), n, "o-iw4")
    assert float(iw4_m) <= float(d_m) + 5 * math.hypot(float(iw4_se), float(d_se))
    assert float(d_m) <= float(log_evidence(X)) + 5 * float(d_se)


@pytest.mark.parametrize("m", [0, 3])
def test_exact_reverse_model_gives_the_exact_marginal_density(m):
    p = exact_reverse(P)
    q = ex.marginal(joint, keep="z", proposal=reverse, particles=m)

    @ex.expectation
    def error(p, x):
        z, log_q = q.draw(p, x)
        return log_q - norm.logpdf(z["z"], p["a"], jnp.sqrt(marginal_var(p)))

    errs = jax.vmap(lambda k: error.estimate(k, p, X))(jax.random.split(key_from("exact-rev", m), 64))
    np.testing.assert_allclose(np.asarray(errs), 0.0, atol=2e-5)


# --- the density estimates are what they claim ---------------------------------------------
def _reciprocal_program(q):
    """``E[g(z) / q̂(z)] = ∫ g = 1`` for the standard normal density ``g``."""

    @ex.expectation
    def program(p, x):
        z, log_q = q.draw(p, x)
        return jnp.exp(norm.logpdf(z["z"]) - log_q)

    return program


def _target(values, p, x):
    del p, x
    return norm.logpdf(values["z"], 1.0, 0.7) + 3.0  # unnormalized


def _proposal(p, x):
    del x
    return ex.sample(dist.Normal(p["a"], 2.0), name="z")


@pytest.mark.parametrize(
    "q",
    [
        ex.marginal(joint, keep="z", proposal=reverse, particles=0),
        ex.marginal(joint, keep="z", proposal=reverse, particles=3),
        ex.normalize(ex.objectives.LogJoint(_target), _proposal, particles=1),
        ex.normalize(ex.objectives.LogJoint(_target), _proposal, particles=4),
    ],
    ids=["marginal-m0", "marginal-m3", "normalize-k1", "normalize-k4"],
)
def test_draw_gives_an_unbiased_reciprocal_density(q):
    program = _reciprocal_program(q)
    assert_unbiased(program.estimate, 1.0, args=(P, X), seed=("reciprocal", repr(q)), n=40_000)


@pytest.mark.parametrize("m", [1, 4])
def test_marginal_log_density_is_an_unbiased_density_estimate(m):
    q = ex.marginal(joint, keep="z", proposal=reverse, particles=m)
    z0 = jnp.asarray(1.3)

    @ex.expectation
    def density(p, x):
        return jnp.exp(q.log_density({"z": z0}, p, x))

    exact = norm.pdf(z0, P["a"], jnp.sqrt(marginal_var(P)))
    assert_unbiased(density.estimate, exact, args=(P, X), seed=("density", m), n=40_000)


def test_normalize_log_density_integrates_to_one_and_is_the_proposal_for_one_particle():
    q4 = ex.normalize(ex.objectives.LogJoint(_target), _proposal, particles=4)

    @ex.expectation
    def mass(p, x):  # E_{z ~ h}[q̂(z) / h(z)] = ∫ q_SIR = 1
        z = ex.sample(dist.Normal(0.5, 2.5), name="probe")
        return jnp.exp(q4.log_density({"z": z}, p, x) - norm.logpdf(z, 0.5, 2.5))

    assert_unbiased(mass.estimate, 1.0, args=(P, X), seed=("sir-mass",), n=40_000)

    q1 = ex.normalize(ex.objectives.LogJoint(_target), _proposal, particles=1)

    @ex.expectation
    def one(p, x):
        return q1.log_density({"z": jnp.asarray(0.4)}, p, x)

    got = one.estimate(key_from("sir-1"), P, X)
    np.testing.assert_allclose(got, norm.logpdf(0.4, P["a"], 2.0), rtol=1e-5)


def test_elbo_of_normalized_guide_is_the_iwelbo_draw_for_draw():
    guide = lambda p, x: ex.sample(dist.Normal(p["a"], 1.0), name="z")  # noqa: E731
    sir = ex.objectives.elbo(model, ex.normalize(model, guide, particles=4))
    iw = ex.objectives.iwelbo(model, guide, 4)
    for i in range(3):
        k = key_from("sir-iw", i)
        np.testing.assert_allclose(sir.estimate(k, P, X), iw.estimate(k, P, X), rtol=1e-5)
        np.testing.assert_allclose(ex.grad(sir)(k, P, X)["a"], ex.grad(iw)(k, P, X)["a"], rtol=1e-4)
    plan = ex.explain(sir, P, X)
    assert [s.name for s in plan.sites] == ["normalize/z", "normalize/index"]
    assert plan.certificate.kind == "unbiased"


def test_explain_lists_the_reverse_model_draws():
    plan = ex.explain(ex.objectives.iwhvi(model, joint, keep="z", proposal=reverse, m=3), P, X)
    assert [s.name for s in plan.sites] == ["u", "z", "marginal/u"]
    assert "lanes=(3,)" in plan.sites[2].distribution


# --- mistakes ------------------------------------------------------------------------------
def _first_line(excinfo):
    return str(excinfo.value).splitlines()[0]


def test_marginal_errors_name_the_mistake():
    with pytest.raises(ex.ProgramError, match=r"no top-level sites named \['w'\]"):
        ex.objectives.hvi(model, joint, keep="w", proposal=reverse).estimate(key_from(0), P, X)
    with pytest.raises(ex.ProgramError, match="nothing to marginalize"):
        ex.objectives.hvi(model, joint, keep=("u", "z"), proposal=reverse).estimate(key_from(0), P, X)

    def wrong(kept, p, x):
        return ex.sample(dist.Normal(0.0, 1.0), name="v")

    with pytest.raises(ex.ProgramError, match=r"exactly the joint program's auxiliary sites \['u'\]"):
        ex.objectives.iwhvi(model, joint, keep="z", proposal=wrong, m=2).estimate(key_from(0), P, X)
    with pytest.raises(ex.ArgumentError, match="particles must be an integer >= 0"):
        ex.marginal(joint, keep="z", proposal=reverse, particles=-1)
    with pytest.raises(ex.ArgumentError, match="particles must be an integer >= 1"):
        ex.normalize(model, _proposal, particles=0)
    q = ex.marginal(joint, keep="z", proposal=reverse)
    for build in (
        lambda: ex.objectives.elbo(model, q, gradient="stl"),
        lambda: ex.objectives.iwelbo(model, q, 4, gradient="dreg"),
        lambda: ex.objectives.vimco(model, q, 4),
        lambda: ex.objectives.rws(model, q, 4),
    ):
        with pytest.raises(ex.ProgramError, match="only has an estimate of it"):
            build()
