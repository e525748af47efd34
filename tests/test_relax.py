"""Relaxation strategies: Gumbel-softmax (Concrete) and straight-through.

Both are certified ``biased`` for the discrete objective. What *is* exact, and tested here
with tolerances from the Monte Carlo standard error on keys derived from the inputs:

- Gumbel-softmax's estimate and gradient are unbiased for the *relaxed* objective. For a
  Bernoulli (and a two-category Categorical, which reduces to it) that objective is a 1-D
  integral against the logistic density, computed by quadrature; for three categories the
  reference is a high-sample Monte Carlo mean of the pathwise gradient written in plain JAX.
- Straight-through's values are exact samples (so its estimate is unbiased for the discrete
  objective) and its gradient has mean ``E[f'(hard) ∂y/∂θ]``, again a 1-D integral for a
  Bernoulli.

Quadrature, with ``σ`` the logistic function (whose derivative ``σ'`` is also the logistic
density) and ``z = l + ℓ``, ``ℓ ~ Logistic``, ``y = σ(z/τ)``, substituting ``u = z/τ``:

    d/dl E[f(y)]         = ∫ f'(σ(u)) σ'(u) σ'(τu − l) du
    d/dl, straight-through: ∫ f'(1[u > 0]) σ'(u) σ'(τu − l) du

Both integrands decay like ``σ'(u)``, so ``u ∈ [−40, 40]`` suffices at any temperature.
"""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import estimax as ex
from estimax.testing import assert_unbiased, key_from, mean_and_se
from estimax.transforms.estimators import _relax
from estimax.transforms.estimators._relax import GumbelSoftmax, StraightThrough, gumbel_softmax, straight_through

N = 20_000
KEY = jax.random.PRNGKey(7)
STRATEGIES = {"gumbel_softmax": gumbel_softmax, "straight_through": straight_through}


# --- exact references ---------------------------------------------------------------------
U = np.linspace(-40.0, 40.0, 80_001)  # a node at 0, where straight-through's integrand jumps


def _sig(u):
    return 1.0 / (1.0 + np.exp(-u))


def _dsig(u):
    s = _sig(u)
    return s * (1.0 - s)


def relaxed_grad(l, tau, fprime):
    """d/dl E[f(σ((l + ℓ)/τ))], ℓ ~ Logistic: the Gumbel-softmax gradient's mean."""
    return np.trapezoid(fprime(_sig(U)) * _dsig(U) * _dsig(tau * U - l), U)


def straight_through_grad(l, tau, fprime):
    """The mean of the straight-through gradient: d/dl-surrogate E[f'(1[z > 0]) ∂y/∂l]."""
    neg, pos = U[U <= 0], U[U >= 0]
    return np.trapezoid(fprime(0.0) * _dsig(neg) * _dsig(tau * neg - l), neg) + np.trapezoid(
        fprime(1.0) * _dsig(pos) * _dsig(tau * pos - l), pos
    )


def relaxed_value(l, tau, f):
    """E[f(σ((l + ℓ)/τ))] = ∫ f(σ(s/τ)) σ'(s − l) ds."""
    s = np.linspace(l - 40.0, l + 40.0, 400_001)
    return np.trapezoid(f(_sig(s / tau)) * _dsig(s - l), s)


def f_bern(y):
    return (y - 0.3) ** 2 + 0.5 * y**3


def fprime_bern(y):
    return 2.0 * (y - 0.3) + 1.5 * y**2


def discrete_grad(l):
    """d/dl E_p[f(x)] for x ~ Bernoulli(σ(l)): (f(1) − f(0)) σ'(l)."""
    return (f_bern(1.0) - f_bern(0.0)) * _dsig(l)


def bernoulli(param, theta):
    return dist.Bernoulli(logits=theta) if param == "logits" else dist.Bernoulli(probs=theta)


def to_theta(param, l):
    """The parameter value for logit ``l``, and dl/dθ (the chain rule for probs)."""
    if param == "logits":
        return np.float32(l), 1.0
    p = _sig(l)
    return np.float32(p), 1.0 / (p * (1.0 - p))


_programs = {}


def bernoulli_program(strategy, param):
    """``E[f(b)]`` for one Bernoulli site; one compiled estimator per case."""
    k = ("bern", strategy, param)
    if k not in _programs:

        @ex.expectation
        def objective(theta):
            b = ex.sample(bernoulli(param, theta), estimator=strategy, name="b")
            return f_bern(b)

        _programs[k] = (objective, ex.grad(objective))
    return _programs[k]


# --- (a) values -----------------------------------------------------------------------------
def _value_program(d_fn, strategy):
    @ex.expectation
    def values(theta):
        return ex.sample(d_fn(theta), estimator=strategy, name="x")

    return values


@pytest.mark.parametrize("param", ["logits", "probs"])
def test_categorical_values(param):
    theta = jnp.array([[0.2, -1.0, 0.5, 0.0], [1.5, 0.1, -0.3, 0.2]])
    if param == "probs":
        theta = jax.nn.softmax(theta, axis=-1)
    make = lambda t: dist.Categorical(**{param: t})
    keys = jax.random.split(key_from("values", param), 200)
    soft = jax.vmap(_value_program(make, gumbel_softmax(temperature=0.5)).estimate, (0, None))(keys, theta)
    hard = jax.vmap(_value_program(make, straight_through).estimate, (0, None))(keys, theta)
    for v in (soft, hard):
        assert v.shape == (200, 2, 4) and v.dtype == jnp.float32
    assert np.all((soft >= 0) & (soft <= 1)) and float(jnp.mean((soft > 0) & (soft < 1))) > 0.9
    np.testing.assert_allclose(jnp.sum(soft, -1), 1.0, rtol=1e-5)
    assert np.all((hard == 0) | (hard == 1)) and np.all(jnp.sum(hard, -1) == 1)
    # the relaxed values are not one-hot, and both strategies draw every category
    assert float(jnp.max(soft)) < 1.0 and float(jnp.min(jnp.max(soft, -1))) < 0.9
    assert np.all(jnp.sum(hard, 0) > 0)


@pytest.mark.parametrize("param", ["logits", "probs"])
def test_bernoulli_values(param):
    theta, _ = to_theta(param, 0.4)
    keys = jax.random.split(key_from("bern-values", param), 200)
    make = lambda t: bernoulli(param, t).expand((3,))
    soft = jax.vmap(_value_program(make, gumbel_softmax).estimate, (0, None))(keys, theta)
    hard = jax.vmap(_value_program(make, straight_through).estimate, (0, None))(keys, theta)
    for v in (soft, hard):
        assert v.shape == (200, 3) and v.dtype == jnp.float32
    assert np.all((soft > 0) & (soft < 1)) and not np.all((soft == 0) | (soft == 1))
    assert np.all((hard == 0) | (hard == 1)) and 0 < float(jnp.mean(hard)) < 1


def test_value_types_are_traced_with_the_relaxed_type():
    seen = {}

    @ex.expectation
    def objective(l):
        c = ex.sample(dist.Categorical(logits=l).expand((2, 5)).to_event(1), estimator=gumbel_softmax, name="c")
        b = ex.sample(dist.Bernoulli(logits=l[0]), estimator=straight_through, name="b")
        seen["c"], seen["b"] = (c.shape, c.dtype), (b.shape, b.dtype)
        return jnp.sum(c) + b

    ex.explain(objective, jnp.zeros(3))
    assert seen == {"c": ((2, 5, 3), jnp.float32), "b": ((), jnp.float32)}
    assert gumbel_softmax.value_struct(dist.Categorical(logits=jnp.zeros((4, 3)))) == jax.ShapeDtypeStruct((4, 3), jnp.float32)
    assert straight_through.value_struct(dist.Bernoulli(probs=0.3)) == jax.ShapeDtypeStruct((), jnp.float32)


def test_straight_through_values_are_exact_samples():
    """One-hot values from the Gumbel-max trick: their mean is the category probabilities."""
    probs = jnp.array([0.1, 0.6, 0.3])
    program = _value_program(lambda t: dist.Categorical(probs=t), straight_through(temperature=0.3))
    assert_unbiased(program.estimate, probs, args=(probs,), seed="st-exact-samples", n=N)


# --- (b) explain ----------------------------------------------------------------------------
def test_explain_certifies_biased_and_names_the_strategy():
    strategy = gumbel_softmax(temperature=0.5)

    @ex.expectation
    def objective(l, mu):
        c = ex.sample(dist.Categorical(logits=l), estimator=strategy, name="c")
        b = ex.sample(dist.Bernoulli(logits=l[0]), estimator=straight_through, name="b")
        z = ex.sample(dist.Normal(mu, 1.0), name="z")
        return jnp.sum(c * jnp.arange(3.0)) + b * z

    plan = ex.explain(objective, jnp.zeros(3), 0.0)
    assert plan.site("c").strategy == strategy and plan.site("c").certificate == "biased"
    assert plan.site("b").strategy is straight_through and plan.site("z").certificate == "unbiased"
    assert plan.certificate.kind == "biased"
    reasons = "\n".join(plan.certificate.reasons)
    assert "site 'c' uses gumbel_softmax(temperature=0.5) (biased)" in reasons
    assert "site 'b' uses straight_through(temperature=1.0) (biased)" in reasons
    assert "'z'" not in reasons
    assert "gumbel_softmax(temperature=0.5)" in str(plan)


def test_module_instances_and_temperature():
    assert gumbel_softmax.temperature == 1.0 and straight_through.temperature == 1.0
    g = gumbel_softmax(temperature=0.25)
    assert isinstance(g, GumbelSoftmax) and g.temperature == 0.25 and gumbel_softmax.temperature == 1.0
    assert g == GumbelSoftmax(temperature=0.25) and hash(g) == hash(GumbelSoftmax(temperature=0.25))
    assert straight_through(temperature=np.float32(0.5)).temperature == 0.5
    assert isinstance(straight_through(temperature=2), StraightThrough)
    assert GumbelSoftmax.certificate == StraightThrough.certificate == "biased"
    assert not gumbel_softmax.needs_continuation and not straight_through.needs_continuation
    assert g.describe() == "gumbel_softmax(temperature=0.25)"


def test_docstring_examples_run():
    result = doctest.testmod(_relax, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


# --- (c) unbiased for the relaxed objective -------------------------------------------------
@pytest.mark.parametrize("param", ["logits", "probs"])
@pytest.mark.parametrize("l,tau", [(0.7, 0.5), (-1.2, 1.0)])
def test_gumbel_softmax_bernoulli_is_unbiased_for_the_relaxed_objective(param, l, tau):
    theta, dl = to_theta(param, l)
    objective, grad = bernoulli_program(gumbel_softmax(temperature=tau), param)
    exact = relaxed_grad(l, tau, fprime_bern) * dl
    assert_unbiased(grad, exact, args=(theta,), seed=("gs-bern", param, l, tau), n=N)
    assert_unbiased(objective.estimate, relaxed_value(l, tau, f_bern), args=(theta,), seed=("gs-bern-v", param, l, tau), n=N)
    # ... and biased for the discrete objective (here far beyond the standard error)
    with pytest.raises(AssertionError, match="looks biased"):
        assert_unbiased(grad, discrete_grad(l) * dl, args=(theta,), seed=("gs-bern", param, l, tau), n=N)


@pytest.mark.parametrize("param", ["logits", "probs"])
def test_straight_through_bernoulli_gradient_mean(param):
    l, tau = 0.7, 0.5
    theta, dl = to_theta(param, l)
    objective, grad = bernoulli_program(straight_through(temperature=tau), param)
    assert_unbiased(grad, straight_through_grad(l, tau, fprime_bern) * dl, args=(theta,), seed=("st-bern", param), n=N)
    # the forward values are exact samples: the estimate is unbiased for the discrete objective
    p = _sig(l)
    assert_unbiased(objective.estimate, p * f_bern(1.0) + (1 - p) * f_bern(0.0), args=(theta,), seed=("st-bern-v", param), n=N)


def test_two_category_gumbel_softmax_reduces_to_the_binary_concrete():
    """softmax((l + g)/τ)[1] = σ((l1 − l0 + g1 − g0)/τ) and g1 − g0 ~ Logistic."""
    tau = 0.6
    h = lambda s: (s - 0.3) ** 2 + 0.5 * s**3

    @ex.expectation
    def objective(logits):
        y = ex.sample(dist.Categorical(logits=logits), estimator=gumbel_softmax(temperature=tau), name="c")
        return h(y[1])

    logits = jnp.array([0.4, -0.5])
    d = relaxed_grad(float(logits[1] - logits[0]), tau, fprime_bern)
    assert_unbiased(ex.grad(objective), np.array([-d, d]), args=(logits,), seed="gs-k2", n=N)


W = jnp.array([1.0, -2.0, 0.5])


def f_cat(y):
    return (y @ W - 0.4) ** 2


M = 1_000_000  # reference samples: the reference's standard error is 1/7 of the test's


@pytest.mark.parametrize("param", ["logits", "probs"])
def test_gumbel_softmax_categorical_matches_hand_written_pathwise_gradient(param):
    tau = 0.5
    theta = jnp.array([0.3, -0.6, 0.9])
    if param == "probs":
        theta = jax.nn.softmax(theta)
    to_logits = (lambda t: t) if param == "logits" else jnp.log
    g = jax.random.gumbel(key_from("gs-cat-ref", param), (M, 3))
    reference = jax.grad(lambda t: jnp.mean(jax.vmap(f_cat)(jax.nn.softmax((to_logits(t) + g) / tau, axis=-1))))(theta)

    @ex.expectation
    def objective(t):
        y = ex.sample(dist.Categorical(**{param: t}), estimator=gumbel_softmax(temperature=tau), name="c")
        return f_cat(y)

    assert_unbiased(ex.grad(objective), reference, args=(theta,), seed=("gs-cat", param), n=N, atol=1e-5)


def test_straight_through_categorical_matches_hand_written_estimator():
    """Per draw: Jᵀ ∇f(hard) with J = (diag(y) − y yᵀ)/τ the relaxed sample's Jacobian."""
    tau = 0.7
    logits = jnp.array([0.3, -0.6, 0.9])
    z = logits + jax.random.gumbel(key_from("st-cat-ref"), (M, 3))
    y = jax.nn.softmax(z / tau, axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(z, -1), 3)
    v = jax.vmap(jax.grad(f_cat))(hard)
    reference = jnp.mean(y * (v - jnp.sum(y * v, -1, keepdims=True)) / tau, 0)

    @ex.expectation
    def objective(t):
        c = ex.sample(dist.Categorical(logits=t), estimator=straight_through(temperature=tau), name="c")
        return f_cat(c)

    assert_unbiased(ex.grad(objective), reference, args=(logits,), seed="st-cat", n=N, atol=1e-5)


# --- (d) low temperature ------------------------------------------------------------------
def test_low_temperature_approaches_the_discrete_gradient():
    """The relaxed gradient's bias shrinks like τ (quadrature, deterministic); the estimator's
    mean at τ = 0.05 is within 5 SE of it, hence near the discrete gradient, while at τ = 2
    its mean is far from the discrete gradient."""
    l = 0.7
    exact = discrete_grad(l)
    bias = {tau: abs(relaxed_grad(l, tau, fprime_bern) - exact) for tau in (0.1, 0.03, 0.01)}
    assert bias[0.1] > bias[0.03] > bias[0.01] and bias[0.01] < 0.02 * abs(exact)
    for tau in bias:
        assert bias[tau] < 0.15 * tau * 10 * abs(exact)  # O(τ)

    theta, _ = to_theta("logits", l)
    _, grad = bernoulli_program(gumbel_softmax(temperature=0.05), "logits")
    near = abs(relaxed_grad(l, 0.05, fprime_bern) - exact)
    assert near < 0.1 * abs(exact)
    assert_unbiased(grad, exact, args=(theta,), seed="low-tau", n=N, atol=near)

    _, grad_hot = bernoulli_program(gumbel_softmax(temperature=2.0), "logits")
    mean, se = mean_and_se(grad_hot, key_from("high-tau"), N, args=(theta,))
    assert abs(mean - exact) > 10 * se


# --- (e) errors ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize(
    "d,family",
    [
        (dist.Normal(0.0, 1.0), "Normal"),
        (dist.Poisson(2.0), "Poisson"),
        (dist.Binomial(3, probs=0.5), "Binomial"),
        (dist.Bernoulli(logits=0.0).mask(False), "MaskedDistribution"),
    ],
)
def test_unsupported_family_names_the_site(name, d, family):
    @ex.expectation
    def objective(x):
        return jnp.sum(ex.sample(d, estimator=STRATEGIES[name], name="latent")) * x

    with pytest.raises(ex.StrategyError, match=rf"site 'latent': ex\.{name} relaxes Bernoulli and Categorical.*{family}"):
        ex.grad(objective)(KEY, 1.0)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), "0.5", True, None, jnp.array(0.5)])
def test_bad_temperatures_are_refused(bad):
    with pytest.raises(ex.StrategyError, match=r"temperature"):
        gumbel_softmax(temperature=bad)
    with pytest.raises(ex.StrategyError, match=r"ex\.straight_through\(temperature"):
        StraightThrough(temperature=bad)


def test_traced_temperature_is_refused():
    with pytest.raises(ex.StrategyError, match="traced"):
        jax.jit(lambda t: gumbel_softmax(temperature=t).temperature)(0.5)


def test_vmap_over_the_category_axis_is_refused_with_the_site_name():
    @ex.expectation
    def objective(ls):  # ls: (K=3, B=4), mapped over its last axis
        ys = jax.vmap(lambda l: ex.sample(dist.Categorical(logits=l), estimator=gumbel_softmax, name="c"), in_axes=1)(ls)
        return jnp.sum(ys)

    with pytest.raises(ex.UnsupportedError, match=r"site 'c'.*category \(last\) axis"):
        ex.grad(objective)(KEY, jnp.zeros((3, 4)))


# --- (f) loops and vmap -------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_inside_fori_loop(name):
    T, l, tau = 3, -0.4, 0.8
    strategy = STRATEGIES[name](temperature=tau)

    @ex.expectation
    def walk(l):
        def body(t, total):
            b = ex.sample(dist.Bernoulli(logits=l), estimator=strategy, name="b")
            return total + f_bern(b)

        return jax.lax.fori_loop(0, T, body, jnp.float32(0.0))

    assert ex.explain(walk, jnp.float32(l)).site("b").context == "scan body"
    per_step = relaxed_grad if name == "gumbel_softmax" else straight_through_grad
    assert_unbiased(ex.grad(walk), T * per_step(l, tau, fprime_bern), args=(jnp.float32(l),), seed=("fori", name), n=N)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_vmapped_site(name):
    tau = 0.5
    strategy = STRATEGIES[name](temperature=tau)
    ls = jnp.array([0.7, -1.2, 0.1])

    @ex.expectation
    def objective(ls):
        bs = jax.vmap(lambda l: ex.sample(dist.Bernoulli(logits=l), estimator=strategy, name="b"))(ls)
        return jnp.sum(f_bern(bs))

    per = relaxed_grad if name == "gumbel_softmax" else straight_through_grad
    exact = np.array([per(float(l), tau, fprime_bern) for l in ls])
    assert ex.explain(objective, ls).site("b").distribution == "Bernoulli(batch=(3,))"
    assert_unbiased(ex.grad(objective), exact, args=(ls,), seed=("vmap", name), n=N)


def test_vmapped_categorical_site_values():
    @ex.expectation
    def objective(ls):
        ys = jax.vmap(lambda l: ex.sample(dist.Categorical(logits=l), estimator=straight_through, name="c"))(ls)
        return ys

    ys = objective.estimate(KEY, jnp.zeros((4, 3)))
    assert ys.shape == (4, 3) and np.all(jnp.sum(ys, -1) == 1)


# --- (g) jit and friends ------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_jit_and_vmap_of_grad(name):
    strategy = STRATEGIES[name](temperature=0.5)

    @ex.expectation
    def objective(theta):
        c = ex.sample(dist.Categorical(logits=theta["l"]), estimator=strategy, name="c")
        b = ex.sample(dist.Bernoulli(probs=theta["p"]), estimator=strategy, name="b")
        return f_cat(c) * (1.0 + b)

    theta = {"l": jnp.array([0.3, -0.6, 0.9]), "p": jnp.float32(0.3)}
    g = ex.grad(objective)(KEY, theta)
    gj = jax.jit(ex.grad(objective))(KEY, theta)
    v, gv = ex.value_and_grad(objective)(KEY, theta)
    for k in theta:
        assert np.all(np.isfinite(g[k]))
        np.testing.assert_allclose(g[k], gj[k], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(g[k], gv[k], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(v, jax.jit(objective.estimate)(KEY, theta), rtol=1e-6)
    keys = jax.random.split(KEY, 3)
    batched = jax.vmap(ex.grad(objective), (0, None))(keys, theta)
    np.testing.assert_allclose(batched["l"][1], ex.grad(objective)(keys[1], theta)["l"], rtol=1e-5, atol=1e-7)
