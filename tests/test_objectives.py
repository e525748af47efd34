"""Variational objectives on a conjugate Gaussian model, against closed forms and NumPyro."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import estimax as ex
from estimax.testing import assert_unbiased, key_from, mean_and_se

from problems import X, guide, log_evidence, model

N = X.shape[0]


def exact_elbo(params, x):
    m, s2 = params["m"], jnp.exp(2 * params["log_s"])
    c = -0.5 * math.log(2 * math.pi)
    prior = c - 0.5 * (m**2 + s2)
    lik = jnp.sum(c - 0.5 * ((x - m) ** 2 + s2))
    entropy = 0.5 * jnp.log(2 * math.pi * math.e * s2)
    return prior + lik + entropy


POSTERIOR = {"m": jnp.sum(X) / (N + 1), "log_s": -0.5 * jnp.log(N + 1.0)}
POOR = {"m": jnp.float32(-0.5), "log_s": jnp.float32(0.4)}


def test_elbo_value_and_gradient_are_unbiased():
    objective = ex.objectives.elbo(model, guide)
    plan = ex.explain(objective, POOR, X)
    assert [s.name for s in plan.sites] == ["z"] and plan.certificate.kind == "unbiased"
    assert_unbiased(objective.estimate, exact_elbo(POOR, X), args=(POOR, X), seed="elbo-value", n=20000)
    assert_unbiased(ex.grad(objective), jax.grad(exact_elbo)(POOR, X), args=(POOR, X), seed="elbo-grad", n=20000)


@pytest.mark.parametrize(
    "objective",
    [
        ex.objectives.elbo(model, guide),
        ex.objectives.elbo(model, guide, particles=3),
        ex.objectives.iwelbo(model, guide, 5),
        ex.objectives.renyi(model, guide, 0.5, 4),
        ex.objectives.cubo(model, guide, 2.0, 4),
    ],
    ids=["elbo", "elbo3", "iwelbo5", "renyi0.5", "cubo2"],
)
def test_exact_posterior_guide_gives_the_log_evidence(objective):
    """With q = p(z | x) every weight is p(x): each bound equals log p(x) with zero variance."""
    values = jax.vmap(objective.estimate, (0, None, None))(jax.random.split(key_from("exact-q"), 64), POSTERIOR, X)
    np.testing.assert_allclose(values, log_evidence(X), rtol=2e-5)


def test_iwelbo_increases_with_k_towards_the_log_evidence():
    means, ses = [], []
    for k in (1, 4, 16, 64):
        m, se = mean_and_se(ex.objectives.iwelbo(model, guide, k).estimate, key_from("iwelbo", k), 4000, args=(POOR, X))
        means.append(float(m))
        ses.append(float(se))
    for (a, sa), (b, sb) in zip(zip(means, ses), zip(means[1:], ses[1:])):
        assert b - a > 3 * math.hypot(sa, sb), (means, ses)
    assert means[-1] < float(log_evidence(X)) + 5 * ses[-1]
    assert float(exact_elbo(POOR, X)) == pytest.approx(means[0], abs=5 * ses[0])


def test_renyi_alpha_zero_is_the_iwelbo():
    key = jax.random.PRNGKey(3)
    a = ex.objectives.renyi(model, guide, 0.0, 6).estimate(key, POOR, X)
    b = ex.objectives.iwelbo(model, guide, 6).estimate(key, POOR, X)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert ex.objectives.renyi(model, guide, 1.0).name == "elbo"


def test_elbo_matches_numpyro_trace_elbo():
    from numpyro.infer import Trace_ELBO

    def np_guide(params, x):
        numpyro.sample("z", dist.Normal(params["m"], jnp.exp(params["log_s"])))

    loss = jax.jit(lambda k: Trace_ELBO().loss(k, {}, model, np_guide, POOR, X))
    ours_mean, ours_se = mean_and_se(ex.objectives.elbo(model, guide).estimate, key_from("np-ours"), 20000, args=(POOR, X))
    theirs = jax.vmap(loss)(jax.random.split(key_from("np-theirs"), 20000))
    theirs_mean, theirs_se = -float(jnp.mean(theirs)), float(jnp.std(theirs)) / math.sqrt(20000)
    assert abs(float(ours_mean) - theirs_mean) < 5 * math.hypot(float(ours_se), theirs_se)


def test_log_joint_model_and_missing_latent_error():
    lj = ex.objectives.LogJoint(
        lambda z, params, x: dist.Normal(0.0, 1.0).log_prob(z["z"]) + jnp.sum(dist.Normal(z["z"], 1.0).log_prob(x))
    )
    key = jax.random.PRNGKey(0)
    a = ex.objectives.elbo(lj, guide).estimate(key, POOR, X)
    b = ex.objectives.elbo(model, guide).estimate(key, POOR, X)
    np.testing.assert_allclose(a, b, rtol=1e-5)

    def wrong_guide(params, x):
        return ex.sample(dist.Normal(params["m"], 1.0), name="not_z")

    with pytest.raises(ex.ProgramError, match=r"latent site 'z'.*not_z"):
        ex.objectives.elbo(model, wrong_guide).estimate(key, POOR, X)


def test_vmap_draws_independently_per_lane():
    @ex.expectation
    def spread(mu):
        zs = ex.vmap(lambda: ex.sample(dist.Normal(mu, 1.0), name="z"), axis_size=5)()
        return jnp.var(zs) * 5 / 4  # unbiased sample variance: E = 1

    assert_unbiased(spread.estimate, 1.0, args=(jnp.float32(0.3),), seed="ex-vmap", n=20000)


def test_stl_elbo_is_unbiased_and_exact_at_the_posterior():
    stl = ex.objectives.elbo(model, guide, gradient="stl")
    assert_unbiased(ex.grad(stl), jax.grad(exact_elbo)(POOR, X), args=(POOR, X), seed="stl", n=20000)
    keys = jax.random.split(key_from("stl-landing"), 256)
    g_stl = jax.vmap(ex.grad(stl), (0, None, None))(keys, POSTERIOR, X)
    g_std = jax.vmap(ex.grad(ex.objectives.elbo(model, guide)), (0, None, None))(keys, POSTERIOR, X)
    for name in POSTERIOR:  # sticking the landing: zero variance at the optimum
        assert float(jnp.max(jnp.abs(g_stl[name]))) < 1e-4
        assert float(jnp.std(g_std[name])) > 0.1


def test_dreg_matches_iwelbo_gradient_with_lower_variance():
    k = 8
    plain = ex.objectives.iwelbo(model, guide, k)
    dreg = ex.objectives.iwelbo(model, guide, k, gradient="dreg")
    key = jax.random.PRNGKey(5)
    np.testing.assert_allclose(dreg.estimate(key, POOR, X), plain.estimate(key, POOR, X), rtol=1e-6)
    m_p, se_p = mean_and_se(ex.grad(plain), key_from("dreg-plain"), 20000, args=(POOR, X))
    m_d, se_d = mean_and_se(ex.grad(dreg), key_from("dreg"), 20000, args=(POOR, X))
    for name in POOR:
        assert abs(m_p[name] - m_d[name]) < 5 * math.hypot(se_p[name], se_d[name]), name
        assert se_d[name] < se_p[name], (name, se_d[name], se_p[name])


def test_dreg_refuses_a_non_reparameterized_guide():
    def coin_guide(params, x):
        return ex.sample(dist.Bernoulli(logits=params["m"]), name="z") * 1.0

    with pytest.raises(ex.ProgramError, match=r"guide site 'z'.*reparameterized"):
        ex.objectives.iwelbo(model, coin_guide, 4, gradient="dreg").estimate(jax.random.PRNGKey(0), POOR, X)


def test_rws_is_certified_consistent_and_exact_at_the_posterior():
    wake_model, wake_guide = ex.objectives.rws(model, guide, 16)
    for program in (wake_model, wake_guide):
        plan = ex.explain(program, POOR, X)
        assert plan.certificate.kind == "consistent"
        assert any("self-normalized" in r for r in plan.certificate.reasons)
    # at q = p(z|x) the weights are uniform: the guide gradient E_p[∇ log q] = 0 exactly
    assert_unbiased(ex.grad(wake_guide), {"m": 0.0, "log_s": 0.0}, args=(POSTERIOR, X), seed="rws-post", n=4000)
    # and the model value is log p(x) with zero variance
    np.testing.assert_allclose(wake_model.estimate(jax.random.PRNGKey(0), POSTERIOR, X), log_evidence(X), rtol=2e-5)


def test_rws_guide_gradient_approaches_the_forward_kl_gradient():
    """SNIS bias is O(1/K): with K = 512 it is far below the Monte Carlo error here."""
    _, wake_guide = ex.objectives.rws(model, guide, 512)

    def cross_entropy(params):  # E_{p(z|x)}[log q(z)], closed form
        mu, var = POSTERIOR["m"], jnp.exp(2 * POSTERIOR["log_s"])
        s2 = jnp.exp(2 * params["log_s"])
        return -0.5 * jnp.log(2 * math.pi * s2) - (var + (mu - params["m"]) ** 2) / (2 * s2)

    near = {"m": POSTERIOR["m"] + 0.3, "log_s": POSTERIOR["log_s"] + 0.2}
    assert_unbiased(ex.grad(wake_guide), jax.grad(cross_entropy)(near), args=(near, X), seed="rws-near", n=2000)


def test_rws_with_a_discrete_guide_uses_no_score_function():
    def coin_model(params, y):
        b = numpyro.sample("b", dist.Bernoulli(0.5))
        numpyro.sample("y", dist.Normal(2.0 * b - 1.0, 1.0), obs=y)

    def coin_guide(params, y):
        return ex.sample(dist.Bernoulli(logits=params["l"]), name="b") * 1.0

    _, wake_guide = ex.objectives.rws(coin_model, coin_guide, 64)
    y = jnp.float32(0.7)
    # p(b = 1 | y) = sigmoid(2y): at that guide the weights are uniform and the gradient
    # E[∇ log q(b)] is 0; a REINFORCE term (had the draw not been stopped) would add
    # E[value · score] != 0.
    at_posterior = {"l": 2.0 * y}
    assert_unbiased(ex.grad(wake_guide), {"l": 0.0}, args=(at_posterior, y), seed="rws-coin", n=4000)


def coin_model(params, y):
    b = numpyro.sample("b", dist.Bernoulli(probs=jnp.full(3, 0.5)).to_event(1))
    numpyro.sample("y", dist.Normal(2.0 * b - 1.0, 1.0).to_event(1), obs=y)


def coin_guide(params, y):
    return ex.sample(dist.Bernoulli(logits=params["l"]).to_event(1), estimator=ex.reinforce, name="b") * 1.0


Y = jnp.array([0.7, -0.4, 1.5])
COIN = {"l": jnp.array([0.3, -0.2, 0.1])}


def test_vimco_matches_the_iwelbo_gradient_with_lower_variance():
    k = 6
    plain = ex.objectives.iwelbo(coin_model, coin_guide, k)
    vim = ex.objectives.vimco(coin_model, coin_guide, k)
    assert ex.explain(vim, COIN, Y).certificate.kind == "unbiased"
    m_p, se_p = mean_and_se(ex.grad(plain), key_from("vimco-plain"), 20000, args=(COIN, Y))
    m_v, se_v = mean_and_se(ex.grad(vim), key_from("vimco"), 20000, args=(COIN, Y))
    assert np.all(np.abs(m_p["l"] - m_v["l"]) < 5 * np.hypot(se_p["l"], se_v["l"]))
    assert np.all(se_v["l"] < 0.5 * se_p["l"]), (se_v["l"], se_p["l"])
    # same value as the IWELBO on the same key (the draws are the same; only the gradient differs)
    for i in range(3):
        key = jax.random.fold_in(jax.random.PRNGKey(2), i)
        assert float(vim.estimate(key, COIN, Y)) == float(plain.estimate(key, COIN, Y))


def test_leave_one_out_elbo_gradient_is_unbiased_with_lower_variance():
    k = 4
    plain = ex.objectives.elbo(coin_model, coin_guide, particles=k)
    loo = ex.objectives.elbo(coin_model, coin_guide, particles=k, gradient="loo")

    def exact(params):  # enumerate the 8 joint values of b
        total = 0.0
        for bits in range(8):
            b = jnp.array([(bits >> i) & 1 for i in range(3)], jnp.float32)
            log_q = jnp.sum(b * params["l"] - jax.nn.softplus(params["l"]))
            log_p = 3 * jnp.log(0.5) + jnp.sum(dist.Normal(2 * b - 1, 1.0).log_prob(Y))
            total = total + jnp.exp(log_q) * (log_p - log_q)
        return total

    r_loo = assert_unbiased(ex.grad(loo), jax.grad(exact)(COIN), args=(COIN, Y), seed="loo", n=20000)
    r_plain = assert_unbiased(ex.grad(plain), jax.grad(exact)(COIN), args=(COIN, Y), seed="loo-plain", n=20000)
    assert np.all(r_loo.se["l"] < 0.7 * r_plain.se["l"]), (r_loo.se["l"], r_plain.se["l"])


def test_iwelbo_matches_numpyro_renyi_elbo_alpha_zero():
    from numpyro.infer import RenyiELBO

    def np_guide(params, x):
        numpyro.sample("z", dist.Normal(params["m"], jnp.exp(params["log_s"])))

    k = 4
    loss = jax.jit(lambda key: RenyiELBO(alpha=0.0, num_particles=k).loss(key, {}, model, np_guide, POOR, X))
    ours_mean, ours_se = mean_and_se(ex.objectives.iwelbo(model, guide, k).estimate, key_from("renyi-ours"), 20000, args=(POOR, X))
    theirs = jax.vmap(loss)(jax.random.split(key_from("renyi-theirs"), 20000))
    theirs_mean, theirs_se = -float(jnp.mean(theirs)), float(jnp.std(theirs)) / math.sqrt(20000)
    assert abs(float(ours_mean) - theirs_mean) < 5 * math.hypot(float(ours_se), theirs_se)


def test_trace_refuses_relaxed_sites():
    def relaxed_guide(params, x):
        return ex.sample(dist.Bernoulli(logits=params["m"]), estimator=ex.gumbel_softmax(temperature=0.5), name="z")

    with pytest.raises(ex.UnsupportedError, match=r"site 'z'.*relaxed value has no density"):
        ex.objectives.elbo(model, relaxed_guide).estimate(jax.random.PRNGKey(0), POOR, X)


def test_model_density_derivative_is_right_at_logits_zero():
    """NumPyro's Bernoulli(logits=0).log_prob has a wrong derivative; the model density is
    evaluated with estimax's corrected form, so this exact (enumerated) gradient matches."""

    def bit_model(params, x):
        h = numpyro.sample("h", dist.Bernoulli(logits=params["prior"]))
        numpyro.sample("x", dist.Normal(2.0 * h - 1.0, 1.0), obs=x)

    def bit_guide(params, x):
        return ex.sample(dist.Bernoulli(logits=params["q"]), estimator=ex.enum, name="h")

    p = {"prior": jnp.float32(0.0), "q": jnp.float32(0.3)}
    g = ex.grad(ex.objectives.elbo(bit_model, bit_guide))(jax.random.PRNGKey(0), p, jnp.float32(0.5))
    np.testing.assert_allclose(g["prior"], jax.nn.sigmoid(0.3) - 0.5, atol=1e-6)  # E_q[h] - sigmoid(0)
