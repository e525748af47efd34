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

    d/dl E[f(y)]                   = ∫ f'(σ(u)) σ'(u) σ'(τu − l) du
    straight-through gradient mean = ∫ f'(1[u > 0]) σ'(u) σ'(τu − l) du

Both integrands decay like ``σ'(u)``, so ``u ∈ [−40, 40]`` suffices at any temperature.

Compilation dominates the cost of these tests, so each program holds several sites (their
parameters are separate arguments, so their gradients are separate estimates).
"""

import doctest
import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import estimax as ex
from estimax.testing import assert_unbiased, key_from, mean_and_se
from estimax.transforms.estimators import _relax
from estimax.transforms.estimators._relax import (
    GumbelSoftmax,
    StraightThrough,
    gumbel_softmax,
    straight_through,
)

N = 20_000
KEY = jax.random.PRNGKey(7)
STRATEGIES = {"gumbel_softmax": gumbel_softmax, "straight_through": straight_through}


# --- exact references ---------------------------------------------------------------------
U = np.linspace(-40.0, 40.0, 80_001)  # a node at 0, where straight-through's integrand jumps


def _trapezoid(y, x):  # np.trapezoid needs NumPy >= 2
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


def _sig(u):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(u)))  # no overflow at large |u|


def _dsig(u):
    s = _sig(u)
    return s * (1.0 - s)


def relaxed_grad(l, tau):
    """d/dl E[f(σ((l + ℓ)/τ))], ℓ ~ Logistic: the Gumbel-softmax gradient's mean."""
    return _trapezoid(fprime(_sig(U)) * _dsig(U) * _dsig(tau * U - l), U)


def straight_through_grad(l, tau):
    """The mean of the straight-through gradient, E[f'(1[z > 0]) ∂σ(z/τ)/∂l]."""
    neg, pos = U[U <= 0], U[U >= 0]
    return _trapezoid(fprime(0.0) * _dsig(neg) * _dsig(tau * neg - l), neg) + _trapezoid(
        fprime(1.0) * _dsig(pos) * _dsig(tau * pos - l), pos
    )


def relaxed_value(l, tau):
    """E[f(σ((l + ℓ)/τ))] = ∫ f(σ(s/τ)) σ'(s − l) ds."""
    s = np.linspace(l - 40.0, l + 40.0, 400_001)
    return _trapezoid(f(_sig(s / tau)) * _dsig(s - l), s)


def f(y):
    return (y - 0.3) ** 2 + 0.5 * y**3


def fprime(y):
    return 2.0 * (y - 0.3) + 1.5 * y**2


def discrete_grad(l):
    """d/dl E_p[f(x)] for x ~ Bernoulli(σ(l)): (f(1) − f(0)) σ'(l)."""
    return (f(1.0) - f(0.0)) * _dsig(l)


W = jnp.array([1.0, -2.0, 0.5])


def f_cat(y):
    return (y @ W - 0.4) ** 2


# Bernoulli cases: logits, one per coordinate of a vector site (coordinates are independent).
LS = np.array([0.7, -1.2, 0.1])
PS = _sig(LS)


def per_coordinate(fn, tau):
    return np.array([fn(float(l), tau) for l in LS])


# --- (a) values -----------------------------------------------------------------------------
CL = jnp.array([[0.2, -1.0, 0.5, 0.0], [1.5, 0.1, -0.3, 0.2]])
SHAPES = {
    "cat_logits": (100, 2, 4), "cat_probs": (100, 2, 4),
    "bern_logits": (100, 3), "bern_probs": (100, 3),
}


@ex.expectation
def values(cl, cp, bl, bp):
    """100 draws of each site (by ``.expand``), for both strategies."""
    out = {}
    for s in (gumbel_softmax(temperature=0.5), straight_through):
        sites = {
            "cat_logits": dist.Categorical(logits=cl).expand((100, 2)),
            "cat_probs": dist.Categorical(probs=cp).expand((100, 2)),
            "bern_logits": dist.Bernoulli(logits=bl).expand((100, 3)),
            "bern_probs": dist.Bernoulli(probs=bp).expand((100, 3)).to_event(1),
        }
        out[s.name] = {k: ex.sample(d, estimator=s, name=f"{s.name}_{k}") for k, d in sites.items()}
    return out


def draws(name):
    args = (CL, jax.nn.softmax(CL, axis=-1), jnp.float32(0.4), jnp.array([0.2, 0.5, 0.9]))
    return values.estimate(key_from("values"), *args)[name]


def test_gumbel_softmax_values_are_relaxed():
    out = draws("gumbel_softmax")
    for k, v in out.items():
        assert v.shape == SHAPES[k] and v.dtype == jnp.float32, k
        # in (0, 1) mathematically; float32 may round a value to 0 or 1 now and then
        assert np.all((v >= 0) & (v <= 1)) and float(jnp.mean((v > 0) & (v < 1))) > 0.9, k
    for k in ("cat_logits", "cat_probs"):
        np.testing.assert_allclose(jnp.sum(out[k], -1), 1.0, rtol=1e-5)
        assert float(jnp.min(jnp.max(out[k], -1))) < 0.9  # not one-hot


def test_straight_through_values_are_hard():
    out = draws("straight_through")
    for k, v in out.items():
        assert v.shape == SHAPES[k] and v.dtype == jnp.float32, k
        assert np.all((v == 0) | (v == 1)), k
        assert np.all(jnp.sum(v, 0) > 0) and np.all(jnp.sum(v, 0) < 100), k  # both values occur
    for k in ("cat_logits", "cat_probs"):
        assert np.all(jnp.sum(out[k], -1) == 1)


def test_value_types_are_traced_with_the_relaxed_type():
    seen = {}

    @ex.expectation
    def objective(l):
        d = dist.Categorical(logits=l).expand((2, 5)).to_event(1)
        c = ex.sample(d, estimator=gumbel_softmax, name="c")
        b = ex.sample(dist.Bernoulli(logits=l[0]), estimator=straight_through, name="b")
        seen["c"], seen["b"] = (c.shape, c.dtype), (b.shape, b.dtype)
        return jnp.sum(c) + b

    ex.explain(objective, jnp.zeros(3))
    assert seen == {"c": ((2, 5, 3), jnp.float32), "b": ((), jnp.float32)}
    struct = gumbel_softmax.value_struct(dist.Categorical(logits=jnp.zeros((4, 3))))
    assert struct == jax.ShapeDtypeStruct((4, 3), jnp.float32)
    assert straight_through.value_struct(dist.Bernoulli(probs=0.3)) == jax.ShapeDtypeStruct((), jnp.float32)


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
    assert g.describe() == "gumbel_softmax(temperature=0.25)"
    assert straight_through(temperature=np.float32(0.5)).temperature == 0.5
    assert isinstance(straight_through(temperature=2), StraightThrough)
    assert GumbelSoftmax.certificate == StraightThrough.certificate == "biased"
    assert not gumbel_softmax.needs_continuation and not straight_through.needs_continuation


def test_docstring_examples_run():
    result = doctest.testmod(_relax, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


# --- (c) gradients: Bernoulli -------------------------------------------------------------
# One program for every Bernoulli case: its sites have separate parameters (arguments), so
# their gradients are separate estimates; compiling the vectorized estimator once is most
# of these tests' cost. Each vector site has independent coordinates, one case each.
COLD, HOT = 0.05, 2.0
L_SCALAR = 0.7


@ex.expectation
def bernoulli_program(gs5_l, gs5_p, gs10_l, st5_l, st5_p, cold, hot):
    def site(name, d, strategy):
        return jnp.sum(f(ex.sample(d, estimator=strategy, name=name)))

    gs5, gs10 = gumbel_softmax(temperature=0.5), gumbel_softmax(temperature=1.0)
    st5 = straight_through(temperature=0.5)
    return (
        site("gs5_l", dist.Bernoulli(logits=gs5_l), gs5)
        + site("gs5_p", dist.Bernoulli(probs=gs5_p), gs5)
        + site("gs10_l", dist.Bernoulli(logits=gs10_l), gs10)
        + site("st5_l", dist.Bernoulli(logits=st5_l), st5)
        + site("st5_p", dist.Bernoulli(probs=st5_p), st5)
        + site("cold", dist.Bernoulli(logits=cold), gumbel_softmax(temperature=COLD))
        + site("hot", dist.Bernoulli(logits=hot), gumbel_softmax(temperature=HOT))
    )


BERN_ESTIMATOR = ex.value_and_grad(bernoulli_program, argnums=tuple(range(7)))
L32, P32 = jnp.asarray(LS, jnp.float32), jnp.asarray(PS, jnp.float32)
BERN_ARGS = (L32, P32, L32, L32, P32, jnp.float32(L_SCALAR), jnp.float32(L_SCALAR))
DLDP = 1.0 / (PS * (1 - PS))  # probs: chain rule through l = log p − log(1 − p)


def bernoulli_exact():
    """(value, gradients) of the relaxed objective for the Gumbel-softmax sites; for the
    straight-through sites the discrete value and the straight-through gradient's mean."""
    gs5, gs10 = per_coordinate(relaxed_grad, 0.5), per_coordinate(relaxed_grad, 1.0)
    st5 = per_coordinate(straight_through_grad, 0.5)
    cold, hot = relaxed_grad(L_SCALAR, COLD), relaxed_grad(L_SCALAR, HOT)
    grads = (gs5, gs5 * DLDP, gs10, st5, st5 * DLDP, cold, hot)
    value = (
        2 * np.sum(per_coordinate(relaxed_value, 0.5))
        + np.sum(per_coordinate(relaxed_value, 1.0))
        + 2 * np.sum(PS * f(1.0) + (1 - PS) * f(0.0))  # straight-through values are exact samples
        + relaxed_value(L_SCALAR, COLD)
        + relaxed_value(L_SCALAR, HOT)
    )
    return value, grads


@functools.cache
def bernoulli_moments():
    return mean_and_se(BERN_ESTIMATOR, key_from("bernoulli"), N, args=BERN_ARGS)


def test_bernoulli_sites_are_unbiased_for_their_relaxed_objectives():
    assert_unbiased(BERN_ESTIMATOR, bernoulli_exact(), args=BERN_ARGS, key=key_from("bernoulli"), n=N)


def test_gumbel_softmax_is_biased_for_the_discrete_gradient():
    """Where the relaxed and the discrete gradients differ by over 10 SE (by quadrature), the
    estimator's mean is over 5 SE from the discrete gradient."""
    (_, grads), (_, ses) = bernoulli_moments()
    _, relaxed = bernoulli_exact()
    discrete = np.array([discrete_grad(l) for l in LS])
    for i, exact in [(0, discrete), (1, discrete * DLDP), (2, discrete)]:  # τ = 0.5, 0.5, 1.0
        far = np.abs(relaxed[i] - exact) > 10 * ses[i]
        assert far.any(), i
        assert np.all(np.abs(grads[i] - exact)[far] > 5 * ses[i][far]), (i, grads[i], exact, ses[i])


def test_low_temperature_approaches_the_discrete_gradient():
    """Deterministic: the relaxed gradient's bias shrinks like τ (quadrature). Statistical:
    the estimator's mean is within 5 SE of the relaxed gradient (test above), so at τ = 0.05
    it is within 5 SE + |bias(0.05)| of the discrete gradient; at τ = 2 it is far from it."""
    exact = discrete_grad(L_SCALAR)
    bias = {tau: abs(relaxed_grad(L_SCALAR, tau) - exact) for tau in (0.1, 0.03, 0.01)}
    assert bias[0.1] > bias[0.03] > bias[0.01]
    for tau, b in bias.items():
        assert b < tau * abs(exact), (tau, b)
    near = abs(relaxed_grad(L_SCALAR, COLD) - exact)
    assert near < 0.1 * abs(exact)
    (_, grads), (_, ses) = bernoulli_moments()
    assert abs(grads[5] - exact) < 5 * ses[5] + near
    assert abs(grads[6] - exact) > 10 * ses[6]


# --- (c) gradients: Categorical -----------------------------------------------------------
M = 1_000_000  # reference draws: the reference's standard error is 1/7 of the test's


def test_categorical_gradients_match_hand_written_pathwise_estimators():
    """Three categories, against the mean of M draws of the same estimators written in plain
    JAX: Gumbel-softmax (logits and probs) by ``jax.grad`` through ``softmax((log p + g)/τ)``,
    straight-through by ``Jᵀ ∇f(hard)`` with ``J = (diag(y) − y yᵀ)/τ``. Two categories,
    against quadrature: ``softmax((l + g)/τ)[1] = σ((l1 − l0 + g1 − g0)/τ)``, ``g1 − g0 ~
    Logistic``. Straight-through's values are exact samples: its value is the discrete one."""
    tau_gs, tau_st, tau_2 = 0.5, 0.7, 0.6
    logits = jnp.array([0.3, -0.6, 0.9])
    probs = jax.nn.softmax(logits)
    two = jnp.array([0.4, -0.5])

    @ex.expectation
    def objective(gl, gp, sl, l2):
        a = ex.sample(dist.Categorical(logits=gl), estimator=gumbel_softmax(temperature=tau_gs), name="a")
        b = ex.sample(dist.Categorical(probs=gp), estimator=gumbel_softmax(temperature=tau_gs), name="b")
        c = ex.sample(dist.Categorical(logits=sl), estimator=straight_through(temperature=tau_st), name="c")
        d = ex.sample(dist.Categorical(logits=l2), estimator=gumbel_softmax(temperature=tau_2), name="d")
        return f_cat(a) + f_cat(b) + f_cat(c) + f(d[1])

    @jax.jit
    def reference(key, logits, probs):
        g = jax.random.gumbel(key, (M, 3))
        relaxed_mean = lambda l: jnp.mean(jax.vmap(f_cat)(jax.nn.softmax((l[None, :] + g) / tau_gs, axis=-1)))
        value, ref_logits = jax.value_and_grad(relaxed_mean)(logits)
        ref_probs = jax.grad(lambda p: relaxed_mean(jnp.log(p)))(probs)
        z = logits[None, :] + g
        y = jax.nn.softmax(z / tau_st, axis=-1)
        v = jax.vmap(jax.grad(f_cat))(jax.nn.one_hot(jnp.argmax(z, -1), 3))
        ref_st = jnp.mean(y * (v - jnp.sum(y * v, -1, keepdims=True)) / tau_st, 0)
        return value, ref_logits, ref_probs, ref_st

    relaxed, ref_logits, ref_probs, ref_st = reference(key_from("categorical-reference"), logits, probs)
    d2 = relaxed_grad(float(two[1] - two[0]), tau_2)
    value = (
        2 * relaxed
        + jnp.sum(probs * jax.vmap(f_cat)(jnp.eye(3)))
        + relaxed_value(float(two[1] - two[0]), tau_2)
    )

    estimator = ex.value_and_grad(objective, argnums=(0, 1, 2, 3))
    exact = (value, (ref_logits, ref_probs, ref_st, np.array([-d2, d2])))
    assert_unbiased(estimator, exact, args=(logits, probs, logits, two), seed="categorical", n=N, atol=1e-5)


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

    message = rf"site 'latent': ex\.{name} relaxes Bernoulli and Categorical.*{family}"
    with pytest.raises(ex.StrategyError, match=message):
        ex.grad(objective)(KEY, 1.0)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), "0.5", True, None, jnp.array(0.5)])
def test_bad_temperatures_are_refused(bad):
    with pytest.raises(ex.StrategyError, match=r"ex\.gumbel_softmax\(temperature=\.\.\.\)"):
        gumbel_softmax(temperature=bad)
    with pytest.raises(ex.StrategyError, match=r"ex\.straight_through\(temperature=\.\.\.\)"):
        StraightThrough(temperature=bad)


def test_traced_temperature_is_refused():
    with pytest.raises(ex.StrategyError, match="traced"):
        jax.jit(lambda t: gumbel_softmax(temperature=t).temperature)(0.5)


def test_vmap_over_the_category_axis():
    @ex.expectation
    def objective(ls):  # ls: (K=3, B=4), mapped over its last axis: four lanes of 3 categories
        site = lambda l: ex.sample(dist.Categorical(logits=l), estimator=gumbel_softmax, name="c")
        ys = jax.vmap(site, in_axes=1)(ls)
        return jnp.sum(ys * jnp.arange(3.0)[None, :])

    assert ex.explain(objective, jnp.zeros((3, 4))).site("c").distribution == "Categorical(lanes=(4,))"
    g = ex.grad(objective)(KEY, jnp.zeros((3, 4)))
    assert g.shape == (3, 4) and bool(jnp.all(jnp.isfinite(g)))


# --- (f) loops and vmap -------------------------------------------------------------------
def test_inside_fori_loop_and_under_vmap():
    T, tau = 3, 0.8
    gs, st = gumbel_softmax(temperature=tau), straight_through(temperature=tau)

    @ex.expectation
    def objective(lg, ls, vg, vs, cl):
        def body(t, total):
            a = ex.sample(dist.Bernoulli(logits=lg), estimator=gs, name="loop_gs")
            b = ex.sample(dist.Bernoulli(logits=ls), estimator=st, name="loop_st")
            return total + f(a) + f(b)

        looped = jax.lax.fori_loop(0, T, body, jnp.float32(0.0))
        a = jax.vmap(lambda l: ex.sample(dist.Bernoulli(logits=l), estimator=gs, name="vmap_gs"))(vg)
        b = jax.vmap(lambda l: ex.sample(dist.Bernoulli(logits=l), estimator=st, name="vmap_st"))(vs)
        c = jax.vmap(lambda l: ex.sample(dist.Categorical(logits=l), estimator=st, name="vmap_cat"))(cl)
        return looped + jnp.sum(f(a)) + jnp.sum(f(b)) + jnp.sum(c @ W)

    l, cl = jnp.float32(-0.4), jnp.array([[0.3, -0.6, 0.9], [0.0, 0.0, 0.0]])
    args = (l, l, L32, L32, cl)
    plan = ex.explain(objective, *args)
    assert plan.site("loop_gs").context == plan.site("loop_st").context == "scan body"
    assert plan.site("vmap_gs").distribution == "Bernoulli(lanes=(3,))"
    assert plan.site("vmap_cat").distribution == "Categorical(lanes=(2,))"
    # the straight-through gradient of a linear function of a one-hot: E[Jᵀ W], J the
    # softmax Jacobian; by hand in plain JAX over M draws
    @jax.jit
    def reference(key, cl):
        g = jax.random.gumbel(key, (M, 3))
        y = jax.nn.softmax((cl[:, None, :] + g[None]) / tau, axis=-1)  # (2, M, 3)
        return jnp.mean(y * (W[None, None, :] - (y @ W)[..., None]) / tau, 1)

    ref_cat = reference(key_from("vmap-reference"), cl)
    exact = (
        T * relaxed_grad(-0.4, tau),
        T * straight_through_grad(-0.4, tau),
        per_coordinate(relaxed_grad, tau),
        per_coordinate(straight_through_grad, tau),
        ref_cat,
    )
    grad = ex.grad(objective, argnums=(0, 1, 2, 3, 4))
    assert_unbiased(grad, exact, args=args, seed="loops-vmap", n=N, atol=1e-5)


# --- (g) jit and friends ------------------------------------------------------------------
def test_jit_and_value_and_grad():
    gs, st = gumbel_softmax(temperature=0.5), straight_through(temperature=0.5)

    @ex.expectation
    def objective(theta):
        a = ex.sample(dist.Categorical(logits=theta["l"]), estimator=gs, name="a")
        d = ex.sample(dist.Bernoulli(probs=theta["p"]), estimator=st, name="d")
        return f_cat(a) * (1.0 + d)

    theta = {"l": jnp.array([0.3, -0.6, 0.9]), "p": jnp.float32(0.3)}
    key = key_from("jit")
    g = ex.grad(objective)(key, theta)
    gj = jax.jit(ex.grad(objective))(key, theta)
    v, gv = jax.jit(ex.value_and_grad(objective))(key, theta)
    for k in theta:
        assert np.all(np.isfinite(g[k])) and np.any(g[k] != 0)
        np.testing.assert_allclose(g[k], gj[k], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(g[k], gv[k], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(v, objective.estimate(key, theta), rtol=1e-6)
