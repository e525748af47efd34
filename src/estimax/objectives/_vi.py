"""Variational objectives as programs.

A *model* is a NumPyro model function ``model(params, *data)`` (latent sites sampled with
``numpyro.sample``, observed ones with ``obs=``), or a :class:`LogJoint` wrapping a plain
``log_joint(latents, params, *data)``. A *guide* is an estimax program
``guide(params, *data)`` whose ``ex.sample`` sites are named like the model's latents, each
with its own gradient strategy. Every objective below is an ``@ex.expectation`` program of
``(params, *data)``, written with ``ex.trace`` and ``ex.vmap`` exactly as a user would write
their own -- see :func:`log_weight`.

All are lower bounds on ``log p(x)`` to *maximize*, except :func:`cubo` (an upper bound).
Their estimators are unbiased for the objective as stated (an IWELBO is ``E[log mean w]``),
which ``ex.explain`` certifies per site.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from .._errors import ArgumentError, ProgramError
from ..dsl._model import LogJoint, model_log_density
from ..dsl._primitives import sample_p, stage, vmap
from ..transforms._estimate import Expectation
from ..transforms._trace import trace
from ..transforms.estimators._defaults import resolve
from ..transforms.estimators._reparam import Reparam
from ._marginal import Approximate


def guide_draw(guide, params, data, *, stop_params: bool | str = False):
    """``(z, log q)`` for one draw ``z ~ q`` of a guide program (``stop_params`` as in
    :func:`estimax.trace`), or of an approximate distribution (``ex.marginal``,
    ``ex.normalize``), whose ``log q`` is then an estimate with an unbiased reciprocal (so
    the objectives below stay bounds)."""
    if isinstance(guide, Approximate):
        if stop_params is True:
            raise ProgramError(
                f"sticking the landing needs the guide's exact density; {guide!r} only has an "
                "estimate of it. Use gradient='standard'."
            )
        return guide.draw(params, *data)
    tr = trace(guide, stop_params=stop_params)(params, *data)
    return tr.sites, tr.log_prob


def _require_exact_density(guide, what):
    if isinstance(guide, Approximate):
        raise ProgramError(
            f"{what} evaluates the guide's density at draws made without its gradient, which "
            f"needs an exact density; {guide!r} only has an estimate of it. Use elbo, iwelbo "
            "(gradient='standard'), renyi or cubo with it."
        )


def log_weight(model, guide, params, *data, stl: bool = False):
    """``log p(x, z) − log q(z)`` at one draw ``z ~ q``: the building block of every objective.

    ``stl=True`` evaluates ``log q`` with its parameters stopped ("sticking the landing").
    ``guide`` may be an approximate distribution (``ex.marginal``, ``ex.normalize``): then
    ``log q`` is its estimate, and ``E[log_weight]`` is a lower bound on the ELBO of the
    guide's exact density.
    """
    sites, log_q = guide_draw(guide, params, data, stop_params=stl)
    return model_log_density(model, sites, params, data) - log_q


def _particles(model, guide, k: int, params, data, stl=False):
    one = lambda: log_weight(model, guide, params, *data, stl=stl)
    return one()[None] if k == 1 else vmap(one, axis_size=k)()


def _check_k(k, what):
    if not isinstance(k, int) or k < 1:
        raise ArgumentError(f"{what}: the number of particles must be a positive integer; got {k!r}.")


def _check_gradient(gradient, allowed, what):
    if gradient not in allowed:
        raise ArgumentError(f"{what}: gradient={gradient!r}; expected one of {allowed}.")


def elbo(model, guide, *, particles: int = 1, gradient: str = "standard") -> Expectation:
    """``ELBO = E_q[log p(x, z) − log q(z)]`` (mean over ``particles`` independent draws).

    ``gradient``:

    - ``"standard"``: each guide site's own strategy;
    - ``"stl"``: sticking the landing -- ``log q``'s score term (zero in expectation) is
      dropped, so the gradient estimate has zero variance when ``q`` is the posterior;
    - ``"loo"``: for non-reparameterized guides with ``particles >= 2``: a score-function
      gradient where particle ``k``'s learning signal ``f_k`` gets the mean of the other
      particles' signals as its baseline (leave-one-out; Kool et al. 2019).

    All are unbiased.
    """
    _check_k(particles, "ex.objectives.elbo")
    _check_gradient(gradient, ("standard", "stl", "loo"), "ex.objectives.elbo")
    if gradient == "stl":
        _require_exact_density(guide, "ex.objectives.elbo(gradient='stl')")
    if gradient == "loo":
        if particles < 2:
            raise ArgumentError("ex.objectives.elbo(gradient='loo') needs particles >= 2.")
        _require_exact_density(guide, "ex.objectives.elbo(gradient='loo')")

        def loo_objective(params, *data):
            log_p, log_q = _scored_particles(model, guide, particles, params, data)
            f = log_p - log_q
            baseline = (jnp.sum(f) - f) / (particles - 1)
            return jnp.mean(f) + _score_surrogate((f - baseline) / particles, log_q)

        return Expectation(loo_objective, name="elbo[loo]")

    # The ELBO's −log q(z) term: for sites not reparameterized, the derivative of log q in
    # its parameters at the drawn value is zero in expectation; dropping it (as NumPyro's
    # Trace_ELBO/TraceGraph_ELBO do) removes its noise. (Not for the IWELBO: weighted by
    # the normalized weights, that term is not zero in expectation.)
    stop = True if gradient == "stl" else "non-reparam"

    def one(params, data):
        sites, log_q = guide_draw(guide, params, data, stop_params=stop)
        return model_log_density(model, sites, params, data) - log_q

    def elbo_objective(params, *data):
        if particles == 1:  # a plain sum of log densities: REINFORCE terms get Rao-Blackwellized per site
            return one(params, data)
        return jnp.mean(vmap(lambda: one(params, data), axis_size=particles)())

    return Expectation(elbo_objective, name="elbo" if gradient == "standard" else "elbo[stl]")


def iwelbo(model, guide, k: int, *, gradient: str = "standard") -> Expectation:
    """``IWELBO_K = E[log (1/K) Σ_k w_k]``, ``w_k = p(x, z_k)/q(z_k)``, ``z_k ~ q`` i.i.d.

    Increases with ``K`` towards ``log p(x)`` (Burda et al. 2016). ``data`` is *one*
    observation: on a minibatch of i.i.d. points the weights multiply over the points, which
    is the IWELBO of the batch as a whole. The per-point IWAE objective
    ``Σ_i log (1/K) Σ_k w_ik`` maps the objective over points instead, e.g.
    ``jnp.sum(ex.vmap(lambda xi: iwelbo_program(params, xi))(x))`` inside a program
    (see ``examples/iwae_digits.py``). ``gradient``:

    - ``"standard"``: the estimator pass's gradient of the program;
    - ``"dreg"``: doubly reparameterized (Tucker et al. 2019): for the guide's parameters
      ``Σ_k w̃_k² ∂log w_k/∂z_k ∂z_k/∂φ``, for the model's ``Σ_k w̃_k ∇_θ log p(x, z_k)``.
      Unbiased, with a signal-to-noise ratio that does not vanish as ``K`` grows. Needs every
      guide site reparameterized.
    """
    _check_k(k, "ex.objectives.iwelbo")
    # (No "stl" here: with K > 1 the dropped score term is not zero in expectation, so the
    # STL gradient is biased for the IWELBO; DReG is its unbiased counterpart.)
    _check_gradient(gradient, ("standard", "dreg"), "ex.objectives.iwelbo")
    if gradient == "dreg":
        _require_exact_density(guide, "ex.objectives.iwelbo(gradient='dreg')")
        return _iwelbo_dreg(model, guide, k)

    def iwelbo_objective(params, *data):
        return logsumexp(_particles(model, guide, k, params, data)) - math.log(k)

    return Expectation(iwelbo_objective, name=f"iwelbo{k}")


def _iwelbo_dreg(model, guide, k):
    sg = jax.lax.stop_gradient

    def particle(params, data):
        tr = trace(guide, stop_params=True)(params, *data)
        log_q_stopped = tr.log_prob
        log_w = model_log_density(model, tr.sites, params, data) - log_q_stopped
        log_p_at_stopped_z = model_log_density(model, jax.tree.map(sg, tr.sites), params, data)
        log_w_through_z = model_log_density(model, tr.sites, jax.tree.map(sg, params), data) - log_q_stopped
        return jnp.stack([log_w, log_p_at_stopped_z, log_w_through_z])

    def dreg_objective(params, *data):
        _require_reparam(guide, params, data)
        parts = vmap(lambda: particle(params, data), axis_size=k)()  # (k, 3)
        log_w, log_p_stopped_z, log_w_z = parts[:, 0], parts[:, 1], parts[:, 2]
        value = logsumexp(log_w) - math.log(k)
        w = sg(jax.nn.softmax(log_w))
        surrogate = jnp.sum(w * log_p_stopped_z) + jnp.sum(w**2 * log_w_z)
        return sg(value) + surrogate - sg(surrogate)

    return Expectation(dreg_objective, name=f"iwelbo{k}[dreg]")


def _require_reparam(guide, params, data):
    closed, _, _ = stage(getattr(guide, "fn", guide), (params, *data), "the DReG guide", fresh_names=True, float_outputs=False)
    for eqn in closed.jaxpr.eqns:
        if eqn.primitive is sample_p:
            strategy, _ = resolve(eqn.params["spec"], [v.aval for v in eqn.invars])
            if not isinstance(strategy, Reparam):
                raise ProgramError(
                    f"ex.objectives.iwelbo(gradient='dreg'): guide site {eqn.params['spec'].name!r} "
                    f"uses {strategy!r}; DReG needs every guide site reparameterized. Use "
                    "gradient='standard' (or VIMCO-style baselines) for discrete guides."
                )


def _scored_particles(model, guide, k, params, data):
    """``(log p(x, z_k), log q(z_k))`` for ``k`` draws ``z_k ~ q`` made with the parameters
    stopped: the draws carry no gradient (no pathwise term, no score term from the pass);
    both densities are differentiable in the parameters at the drawn values."""
    sg = jax.lax.stop_gradient

    def particle():
        z = jax.tree.map(sg, trace(guide)(sg(params), *data).sites)
        log_p = model_log_density(model, z, params, data)
        log_q = trace(guide, values=z)(params, *data).log_prob
        return jnp.stack([log_p, log_q])

    parts = particle()[None] if k == 1 else vmap(particle, axis_size=k)()
    return parts[:, 0], parts[:, 1]


def _score_surrogate(signals, log_q):
    """``Σ_k signal_k (log q_k − sg log q_k)``: value 0, gradient ``Σ_k signal_k ∇log q_k``."""
    sg = jax.lax.stop_gradient
    return jnp.sum(sg(signals) * (log_q - sg(log_q)))


def vimco(model, guide, k: int) -> Expectation:
    """IWELBO_K with VIMCO's per-particle baselines (Mnih & Rezende 2016), for guides whose
    sites are not reparameterized (discrete latents).

    ``∇ IWELBO = Σ_k (L − L_{−k}) ∇log q(z_k) + Σ_k w̃_k ∇log w_k``, where ``L_{−k}``
    replaces ``w_k`` by the geometric mean of the other weights: it does not depend on
    ``z_k``, so each particle's score gets a baseline that cancels most of the noise.
    Unbiased. Needs ``k >= 2``.
    """
    if not isinstance(k, int) or k < 2:
        raise ArgumentError(f"ex.objectives.vimco: needs at least 2 particles; got {k!r}.")
    _require_exact_density(guide, "ex.objectives.vimco")

    def vimco_objective(params, *data):
        log_p, log_q = _scored_particles(model, guide, k, params, data)
        log_w = log_p - log_q
        value = logsumexp(log_w) - math.log(k)
        # L_{-k}: w_k replaced by exp(mean_{j != k} log w_j)
        others_mean = (jnp.sum(log_w) - log_w) / (k - 1)
        replaced = log_w[None, :] + jnp.diag(others_mean - log_w)  # row k: log w with entry k swapped
        loo = logsumexp(replaced, axis=1) - math.log(k)
        return value + _score_surrogate(value - loo, log_q)

    return Expectation(vimco_objective, name=f"vimco{k}")


def rws(model, guide, k: int) -> tuple[Expectation, Expectation]:
    """Reweighted wake-sleep (Bornschein & Bengio 2015; Le et al. 2019): ``(wake_model, wake_guide)``.

    With ``z_k ~ q`` (drawn with the guide's parameters stopped: no gradient flows through
    the sampling, so discrete guides need no score function) and self-normalized weights
    ``w̄_k ∝ p(x, z_k)/q(z_k)``:

    - ``wake_model``: value ``log (1/K) Σ w_k`` (an estimate of ``log p(x)``), gradient
      ``Σ_k w̄_k ∇ log p(x, z_k)`` -- the model update;
    - ``wake_guide``: value and gradient of ``Σ_k w̄_k log q(z_k)`` -- the guide update, a
      self-normalized importance sampling (SNIS) estimate of ``∇ E_{p(z|x)}[log q(z)]``,
      i.e. of minus the forward KL's gradient.

    Both are *maximized*. Self-normalization makes both gradients consistent (bias O(1/K)),
    not unbiased, and ``explain`` says so.
    """
    _check_k(k, "ex.objectives.rws")
    _require_exact_density(guide, "ex.objectives.rws")
    sg = jax.lax.stop_gradient
    why = "self-normalized importance weights: the gradient is consistent as K grows, biased for finite K"

    def weights(params, data):
        log_p, log_q = _scored_particles(model, guide, k, params, data)
        return log_p, log_q, sg(jax.nn.softmax(log_p - log_q))

    def wake_model(params, *data):
        log_p, log_q, w = weights(params, data)
        value = logsumexp(log_p - sg(log_q)) - math.log(k)
        surrogate = jnp.sum(w * log_p)
        return sg(value) + surrogate - sg(surrogate)

    def wake_guide(params, *data):
        _, log_q, w = weights(params, data)
        return jnp.sum(w * log_q)

    return (
        Expectation(wake_model, name=f"rws{k}.wake_model", certificate=("consistent", why)),
        Expectation(wake_guide, name=f"rws{k}.wake_guide", certificate=("consistent", why)),
    )


def snis_forward_kl(model, guide, k: int) -> Expectation:
    """``Σ_k w̄_k log q(z_k)`` with SNIS weights: maximize it to minimize ``KL(p(z|x) ‖ q)``
    (the guide update of :func:`rws`). Consistent, not unbiased."""
    return rws(model, guide, k)[1]


def renyi(model, guide, alpha: float, k: int = 1) -> Expectation:
    """The variational Rényi bound ``VR_α = E[1/(1−α) log (1/K) Σ_k w_k^{1−α}]`` (Li & Turner 2016).

    ``α = 0`` is the IWELBO, ``α → 1`` the ELBO (``alpha=1`` gives :func:`elbo`).
    """
    _check_k(k, "ex.objectives.renyi")
    alpha = float(alpha)
    if alpha == 1.0:
        return elbo(model, guide, particles=k)

    def renyi_objective(params, *data):
        lw = _particles(model, guide, k, params, data)
        return (logsumexp((1.0 - alpha) * lw) - math.log(k)) / (1.0 - alpha)

    return Expectation(renyi_objective, name=f"renyi(alpha={alpha:g}, k={k})")


def cubo(model, guide, n: float = 2.0, k: int = 1) -> Expectation:
    """The χ upper bound ``CUBO_n = (1/n) log E_q[w^n]`` estimated as ``(1/n) log (1/K) Σ w_k^n``
    (Dieng et al. 2017). An *upper* bound on ``log p(x)``: minimize it. The plug-in ``log`` of
    a mean makes the estimate biased for CUBO itself (consistent as ``K`` grows); minimizing
    the unbiased ``E[w^n]`` instead is the usual remedy, available as
    ``ex.expectation(lambda p, *x: jnp.exp(n * log_weight(...)))``.
    """
    _check_k(k, "ex.objectives.cubo")
    n = float(n)

    def cubo_objective(params, *data):
        lw = _particles(model, guide, k, params, data)
        return (logsumexp(n * lw) - math.log(k)) / n

    return Expectation(cubo_objective, name=f"cubo(n={n:g}, k={k})")
