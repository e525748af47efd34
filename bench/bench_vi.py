"""Variational-inference training benchmark: estimax vs. hand-written JAX vs. NumPyro.

What it measures
----------------
Three models trained on scikit-learn's 1797 8x8 digits (``load_digits()``, binarized at
``pixel > 7``), each written three ways and run in one process:

* ``estimax``      -- a NumPyro model and an estimax guide, the objective from
  ``ex.objectives`` and its gradient from ``ex.value_and_grad``;
* ``hand-written`` -- the same gradient estimator written directly with ``jax.random`` and
  ``jax.value_and_grad`` (reparameterized noise, or a score-function surrogate);
* ``numpyro``      -- a NumPyro model/guide pair (parameters as ``numpyro.param`` sites) whose
  SVI loss is differentiated with ``jax.value_and_grad`` -- what ``SVI.update`` does.

A training step is the same in all three: draw a minibatch of 64 digits (shared code), take
the implementation's (objective, gradient) estimate, and apply one ``optax.adam`` update.
The models:

1. ``vae``: ``z ~ N(0, I_10)``, ``x ~ Bernoulli(decoder(z))`` with MLP encoder and decoder
   (hidden 128, tanh), one reparameterized sample per digit. NumPyro: ``Trace_ELBO``.
2. ``iwae``: the same networks and the per-digit IWELBO with K = 8 particles, standard
   (not DReG) reparameterized gradient. estimax: ``ex.objectives.iwelbo(model, guide, 8)``
   mapped over the digits with ``ex.vmap``; NumPyro: ``RenyiELBO(alpha=0, num_particles=8)``
   (its bound is computed per element of the "digits" plate).
3. ``sbn``: a sigmoid belief net, 16 Bernoulli latents ``h`` per digit and a linear guide
   ``q(h | x)``. estimax: ``estimator=ex.reinforce`` on the guide's site; hand-written: the
   same score-function estimator (``Σ_i grad log p(x_i, h_i) + f_i grad log q(h_i | x_i)``
   with ``f_i`` digit ``i``'s own ELBO term, no baseline); NumPyro: ``TraceGraph_ELBO``,
   which also keeps the downstream cost per element of the "digits" plate. estimax finds
   the per-digit signals itself (Rao-Blackwellization per element of the site's batch axis).
   All three are unbiased, so their means agree; the check prints their variances.

Each version is compiled into one training executable, ``train(params, opt_state, key,
data, n)``: ``n`` steps in a ``lax.fori_loop`` with a traced trip count (a ``while`` loop,
which is also what ``lax.scan`` lowers to). One executable per version serves every
measurement below, which keeps the number of XLA compiles -- seconds each on a CPU --
small. For each model and version the script reports

* ``1/call``: median wall time of a call with ``n = 1``, one training step (objective,
  gradient and Adam update) per call from a Python loop, ``block_until_ready`` after each;
  warm-up calls excluded; the versions take turns in rounds;
* ``50/call``: median wall time per step of calls with ``n = --scan-steps`` (default 50),
  the steps fused on the device; the versions take turns likewise;
* ``compile``: trace + lower + XLA compile of a freshly built training executable
  (``jax.jit(train).trace(...).lower().compile()``), median over ``--compile-repeats``
  builds; ``trace`` is its tracing part, where each framework's Python-level work happens;
* XLA's memory analysis of that executable (``compiled.memory_analysis()``): temporary
  buffers and peak estimate, in MiB;
* the ratios estimax/hand-written and estimax/NumPyro;
* diagnostic rows (full run only): ``estimax ex.fit``, ``ex.fit`` itself (the objective
  with the minibatch drawn inside the program, as in ``examples/``), ``FIT_CHUNKS`` chunks
  of ``--scan-steps`` steps per call, per step; and for the IWAE, ``hand (lane keys)``,
  the hand-written IWAE drawing its noise with ``ex.vmap``'s key layout (see
  ``version_builders``).

Before timing, an agreement check: each version takes one training step from the initial
state with each of ``--check-keys`` keys (the same keys for every version, so the same
minibatches), and its (objective, gradient) estimates are averaged; the averages are
compared coordinate by coordinate, in standard errors, against a Bonferroni threshold
(family-wise false-alarm rate 1e-3). The hand-written VAE and SBN (and the IWAE's
``hand (lane keys)``) draw their noise from the key exactly as estimax does, so for those
the per-key estimates are also compared directly: they agree to float rounding.

Then, training from the same initialization with the same keys: the objective (ELBO per
digit; IWELBO-8 per digit for the IWAE) on all 1797 digits after ``--train-steps`` steps,
estimated by one shared hand-written evaluator (mean of several estimates, the same noise
for every version). And for the SBN, a fixed wall-clock budget (``--budget`` seconds,
compile excluded): estimax with ``ex.reinforce``, with ``ex.reinforce`` and a learned
baseline per digit (``ex.reinforce(baseline=x @ w + c, learn="ascent")``, NVIL-style), and
with ``ex.mvd``, vs. NumPyro ``TraceGraph_ELBO``: the steps each managed and the ELBO reached.

At the end it prints the targets (estimax step within 1.05x of hand-written, compile within
1.5x), as information. The script exits 0 whatever the numbers are.

How to run
----------
    python bench/bench_vi.py              # full run (4-5 minutes on 2 CPU cores)
    python bench/bench_vi.py --quick      # smoke run (1-1.5 minutes, mostly XLA compiles)
    python bench/bench_vi.py --models vae,sbn --loop-reps 2000

Set ``JAX_PLATFORMS=cpu`` to force the CPU. Steps here take a few hundred microseconds to a
few milliseconds, so framework overheads show less than in ``bench_core.py``; other
processes competing for the cores widen the IQR columns.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from jax.scipy.special import logsumexp
from numpyro.infer import RenyiELBO, Trace_ELBO, TraceGraph_ELBO
from scipy.stats import norm
from sklearn.datasets import load_digits

import estimax as ex

# Targets (information only; the script exits 0 whether or not they are met).
STEP_TARGET = 1.05  # estimax step time / hand-written step time
COMPILE_TARGET = 1.5  # estimax compile time / hand-written compile time

LATENT = 10  # VAE/IWAE latent dimensions
HIDDEN = 128  # hidden units of both MLPs
BATCH = 64  # digits per minibatch
K = 8  # IWAE particles
SBN_LATENTS = 16  # binary latents of the SBN
FIT_CHUNKS = 4  # chunks per ex.fit call in its diagnostic row
LR = {"vae": 1e-3, "iwae": 1e-3, "sbn": 3e-3}  # Adam step sizes

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
sg = jax.lax.stop_gradient


# ============================================================================================
# Data, networks, initial parameters
# ============================================================================================
def load_binary_digits():
    """``(1797, 64)`` float32 array of 0/1 pixels (``pixel > 7`` on the 0..16 scale)."""
    return jnp.asarray(load_digits().data > 7, jnp.float32)


def _init_linear(rng, n_in, n_out):
    w = rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)
    return {"w": jnp.asarray(w, jnp.float32), "b": jnp.zeros(n_out, jnp.float32)}


def init_vae_params(seed=0):
    rng = np.random.default_rng(seed)
    mlp_init = lambda sizes: [_init_linear(rng, a, b) for a, b in zip(sizes[:-1], sizes[1:])]  # noqa: E731
    return {"enc": mlp_init([64, HIDDEN, 2 * LATENT]), "dec": mlp_init([LATENT, HIDDEN, 64])}


def init_sbn_params(data, seed=0):
    rng = np.random.default_rng(seed)
    mean = np.clip(np.asarray(data).mean(axis=0), 0.01, 0.99)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    W, V = 0.1 * rng.normal(size=(SBN_LATENTS, 64)), 0.1 * rng.normal(size=(64, SBN_LATENTS))
    return {
        # Prior logits of the latents: small, but not exactly 0. At logits == 0 exactly, the
        # gradient of NumPyro's Bernoulli(logits).log_prob(h) is h instead of h - 1/2 (the
        # subgradients of max(l, 0) and |l| it uses are both taken as 0 there), so estimax and
        # NumPyro, which use that log_prob, would differ from the hand-written version there.
        "a": f32(0.01 * rng.normal(size=SBN_LATENTS)),
        "W": f32(W),  # latents -> pixel logits
        "c": f32(np.log(mean / (1 - mean))),  # pixel biases
        "V": f32(V),  # guide: pixels -> latent logits
        "d": f32(np.zeros(SBN_LATENTS)),
    }


def mlp(layers, x):
    for layer in layers[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]


def encode(enc, x):
    out = mlp(enc, x)
    return out[..., :LATENT], out[..., LATENT:]


# Log densities shared by the hand-written estimators and the evaluator.
def normal_logpdf(x, loc, scale):
    return -0.5 * jnp.square((x - loc) / scale) - jnp.log(scale) - _HALF_LOG_2PI


def bernoulli_logpmf(x, logits):
    return x * logits - jax.nn.softplus(logits)


# ============================================================================================
# estimax: NumPyro models, estimax guides, objectives from ex.objectives
# ============================================================================================
def vae_model(params, x):
    with numpyro.plate("digits", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([LATENT]).to_event(1))
        numpyro.sample("x", dist.Bernoulli(logits=mlp(params["dec"], z)).to_event(1), obs=x)


def vae_guide(params, x):
    loc, log_scale = encode(params["enc"], x)
    return ex.sample(dist.Normal(loc, jnp.exp(log_scale)).to_event(1), name="z")


def sbn_model(params, x):
    with numpyro.plate("digits", x.shape[0]):
        h = numpyro.sample("h", dist.Bernoulli(logits=params["a"]).expand([SBN_LATENTS]).to_event(1))
        logits = h.astype(jnp.float32) @ params["W"] + params["c"]
        numpyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def make_sbn_guide(estimator):
    def sbn_guide(params, x):
        q = dist.Bernoulli(logits=x @ params["V"] + params["d"]).to_event(1)
        return ex.sample(q, estimator=estimator, name="h")

    return sbn_guide


def sbn_guide_learned_baseline(params, x):
    """The SBN guide with a learned control variate per digit (NVIL-style): a linear function
    of the digit's pixels, parameters ``params["bl"]`` used by nothing else."""
    q = dist.Bernoulli(logits=x @ params["V"] + params["d"]).to_event(1)
    b = x @ params["bl"]["w"] + params["bl"]["c"]  # one baseline per digit
    return ex.sample(q, estimator=ex.reinforce(baseline=b, learn="ascent"), name="h")


def estimax_learned_version():
    vg = ex.value_and_grad(ex.objectives.elbo(sbn_model, sbn_guide_learned_baseline), argnums=0)

    def value_and_loss_grad(key, params, x):
        value, grads = vg(key, params, x)
        return value, jax.tree.map(jnp.negative, grads)

    return value_and_loss_grad


def estimax_objective(kind, sbn_estimator=None):
    """A fresh ``@ex.expectation`` program of ``(params, x)``: the batch's objective (sum)."""
    if kind == "vae":
        return ex.objectives.elbo(vae_model, vae_guide)
    if kind == "iwae":
        bound = ex.objectives.iwelbo(vae_model, vae_guide, K)

        @ex.expectation
        def iwae_objective(params, x):
            # the IWELBO of each digit separately (a batch of one), summed over the digits
            return jnp.sum(ex.vmap(lambda xi: bound(params, xi[None]))(x))

        return iwae_objective
    return ex.objectives.elbo(sbn_model, make_sbn_guide(sbn_estimator or ex.reinforce))


def estimax_version(kind, sbn_estimator=None):
    """``(key, params, x) -> (objective, gradient of the loss = -objective)``."""
    vg = ex.value_and_grad(estimax_objective(kind, sbn_estimator), argnums=0)

    def value_and_loss_grad(key, params, x):
        value, grads = vg(key, params, x)
        return value, jax.tree.map(jnp.negative, grads)  # optax minimizes; we maximize

    return value_and_loss_grad


def minibatch_objective(kind, n_data, sbn_estimator=None):
    """The objective with the minibatch drawn inside the program (as in ``examples/``), for
    ``ex.fit``; a sum over the minibatch like the others."""
    inner = estimax_objective(kind, sbn_estimator)

    @ex.expectation
    def minibatch(params, data):
        idx = ex.sample(dist.DiscreteUniform(0, n_data - 1).expand([BATCH]), name="minibatch")
        return inner(params, data[idx])

    return minibatch


# ============================================================================================
# Hand-written JAX: the same estimators, written directly
# ============================================================================================
# estimax splits a program's key once per site and draws the site from the second half, so
# `jax.random.split(key)[1]` below makes the hand-written VAE and SBN draw what estimax
# draws for the same key (checked per key before timing). The IWAE's draws differ (estimax
# derives per-digit keys under ex.vmap); only its expectation is compared.
def hand_version(kind):
    if kind == "vae":

        def vae(key, params, x):
            eps = jax.random.normal(jax.random.split(key)[1], (x.shape[0], LATENT))

            def loss(p):
                loc, log_scale = encode(p["enc"], x)
                scale = jnp.exp(log_scale)
                z = loc + scale * eps
                log_p = jnp.sum(normal_logpdf(z, 0.0, 1.0)) + jnp.sum(bernoulli_logpmf(x, mlp(p["dec"], z)))
                log_q = jnp.sum(normal_logpdf(z, loc, scale))
                return -(log_p - log_q)

            loss_value, grads = jax.value_and_grad(loss)(params)
            return -loss_value, grads

        return vae

    if kind in ("iwae", "iwae-lanes"):

        def iwae(key, params, x):
            if kind == "iwae":  # one draw for the whole batch, as one would write it
                eps = jax.random.normal(key, (x.shape[0], K, LATENT))
            else:  # diagnostic: the key layout of ex.vmap -- a key per digit, split per particle
                keys = jax.random.split(jax.random.split(key)[1], x.shape[0])
                def per_digit(kd):
                    return jax.vmap(lambda kp: jax.random.normal(kp, (1, LATENT)))(jax.random.split(kd, K))

                eps = jax.vmap(per_digit)(keys)[:, :, 0]

            def loss(p):
                loc, log_scale = encode(p["enc"], x)
                loc, scale = loc[:, None], jnp.exp(log_scale)[:, None]
                z = loc + scale * eps  # (batch, K, latent)
                log_w = (
                    jnp.sum(normal_logpdf(z, 0.0, 1.0), -1)
                    + jnp.sum(bernoulli_logpmf(x[:, None], mlp(p["dec"], z)), -1)
                    - jnp.sum(normal_logpdf(z, loc, scale), -1)
                )  # (batch, K)
                return -jnp.sum(logsumexp(log_w, axis=1) - math.log(K))

            loss_value, grads = jax.value_and_grad(loss)(params)
            return -loss_value, grads

        return iwae

    def sbn(key, params, x):
        logits_q = x @ params["V"] + params["d"]
        h = sg(jax.random.bernoulli(jax.random.split(key)[1], jax.nn.sigmoid(logits_q)).astype(x.dtype))

        def loss(p):
            # per digit: log q(h_i | x_i), log p(x_i, h_i)
            log_q = jnp.sum(bernoulli_logpmf(h, x @ p["V"] + p["d"]), axis=1)
            log_p = jnp.sum(bernoulli_logpmf(h, p["a"]), axis=1) + jnp.sum(bernoulli_logpmf(x, h @ p["W"] + p["c"]), axis=1)
            f = log_p - sg(log_q)  # (the direct derivative of log q, zero in expectation, dropped)
            # gradient: sum_i grad log p(x_i, h_i) + f_i grad log q(h_i | x_i)   (per-digit
            # score function, no baseline)
            return -(jnp.sum(f) + jnp.sum(sg(f) * (log_q - sg(log_q)))), jnp.sum(log_p - log_q)

        (_, value), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, grads

    return sbn


# ============================================================================================
# NumPyro: model/guide pairs with numpyro.param sites, differentiated SVI losses
# ============================================================================================
def numpyro_version(kind, init):
    if kind in ("vae", "iwae"):

        def model(x):
            dec = numpyro.param("dec", init["dec"])
            with numpyro.plate("digits", x.shape[0]):
                z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([LATENT]).to_event(1))
                numpyro.sample("x", dist.Bernoulli(logits=mlp(dec, z)).to_event(1), obs=x)

        def guide(x):
            enc = numpyro.param("enc", init["enc"])
            loc, log_scale = encode(enc, x)
            with numpyro.plate("digits", x.shape[0]):
                numpyro.sample("z", dist.Normal(loc, jnp.exp(log_scale)).to_event(1))

        elbo = Trace_ELBO() if kind == "vae" else RenyiELBO(alpha=0.0, num_particles=K)
    else:

        def model(x):
            a, W, c = (numpyro.param(n, init[n]) for n in ("a", "W", "c"))
            with numpyro.plate("digits", x.shape[0]):
                h = numpyro.sample("h", dist.Bernoulli(logits=a).expand([SBN_LATENTS]).to_event(1))
                numpyro.sample("x", dist.Bernoulli(logits=h.astype(jnp.float32) @ W + c).to_event(1), obs=x)

        def guide(x):
            V, d = numpyro.param("V", init["V"]), numpyro.param("d", init["d"])
            with numpyro.plate("digits", x.shape[0]):
                numpyro.sample("h", dist.Bernoulli(logits=x @ V + d).to_event(1))

        # Trace_ELBO has no score-function term for the Bernoulli guide site.
        elbo = TraceGraph_ELBO()

    def value_and_loss_grad(key, params, x):
        # The parameters enter through param_map, as in SVI.update; the loss is -objective.
        loss_value, grads = jax.value_and_grad(lambda p: elbo.loss(key, p, model, guide, x))(params)
        return -loss_value, grads

    return value_and_loss_grad


# ============================================================================================
# Training (shared): minibatch, estimate, Adam update; n steps per call in one executable
# ============================================================================================
def make_step(value_and_loss_grad, optimizer):
    def step(params, opt_state, key, data):
        k_batch, k_est = jax.random.split(key)
        idx = jax.random.randint(k_batch, (BATCH,), 0, data.shape[0])
        value, grads = value_and_loss_grad(k_est, params, data[idx])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value, grads

    return step


def make_train(value_and_loss_grad, optimizer, max_steps):
    """``train(params, opt_state, key, data, n)``: ``n <= max_steps`` training steps fused in
    one loop (``lax.fori_loop`` with a traced trip count, i.e. a ``while`` loop, as
    ``lax.scan`` lowers to), one executable for any ``n``. Returns the new state, the
    per-step objective estimates (first ``n`` of ``max_steps`` entries) and the last step's
    loss gradient (taken at that step's input parameters)."""
    step = make_step(value_and_loss_grad, optimizer)

    def train(params, opt_state, key, data, n):
        def body(i, carry):
            params, opt_state, key, values, _ = carry
            key, sub = jax.random.split(key)
            params, opt_state, value, grads = step(params, opt_state, sub, data)
            return params, opt_state, key, values.at[i].set(value), grads

        values = jnp.zeros(max_steps, jnp.result_type(float))
        grads = jax.tree.map(jnp.zeros_like, params)
        return jax.lax.fori_loop(0, n, body, (params, opt_state, key, values, grads))

    return train


DIAGNOSTIC = "hand (lane keys)"


def version_builders(kind, init, diagnostic=False):
    """Fresh ``(key, params, x) -> (objective, loss gradient)`` functions, one per version.

    ``diagnostic``: for the IWAE, a fourth version, the hand-written estimator drawing its
    noise with the key layout of ``ex.vmap`` (a key per digit, split into a key per
    particle, one ``(1, 10)`` draw each) instead of one ``(64, 8, 10)`` draw. It draws
    exactly estimax's numbers for the same key, and separates the cost of that key layout
    from the rest of estimax's overhead."""
    builders = {
        "estimax": lambda: estimax_version(kind),
        "hand-written": lambda: hand_version(kind),
        "numpyro": lambda: numpyro_version(kind, init),
    }
    if diagnostic and kind == "iwae":
        builders[DIAGNOSTIC] = lambda: hand_version("iwae-lanes")
    return builders


# ============================================================================================
# Shared evaluator: the objective per digit on all digits (hand-written, same noise for all)
# ============================================================================================
def make_evaluator(kind, n_data):
    """``evaluate(params, data, n) -> (mean, standard error)`` of ``n`` estimates of the
    objective per digit on all digits. The noise is drawn once with NumPy (seeded), so every
    version is evaluated with the same draws and no sampler is compiled."""
    n_particles = K if kind == "iwae" else 1

    @jax.jit
    def one_estimate(noise, params, data):
        if kind == "sbn":
            logits_q = data @ params["V"] + params["d"]
            h = (noise < jax.nn.sigmoid(logits_q)).astype(data.dtype)  # noise: uniform
            log_w = (
                jnp.sum(bernoulli_logpmf(h, params["a"]), -1)
                + jnp.sum(bernoulli_logpmf(data, h @ params["W"] + params["c"]), -1)
                - jnp.sum(bernoulli_logpmf(h, logits_q), -1)
            )
            return jnp.mean(log_w)
        loc, log_scale = encode(params["enc"], data)
        loc, scale = loc[:, None], jnp.exp(log_scale)[:, None]
        z = loc + scale * noise  # noise: standard normal, (digits, particles, latent)
        log_w = (
            jnp.sum(normal_logpdf(z, 0.0, 1.0), -1)
            + jnp.sum(bernoulli_logpmf(data[:, None], mlp(params["dec"], z)), -1)
            - jnp.sum(normal_logpdf(z, loc, scale), -1)
        )
        return jnp.mean(logsumexp(log_w, axis=1) - math.log(n_particles))

    noises = []

    def evaluate(params, data, n_estimates):
        rng = np.random.default_rng(2024)
        while len(noises) < n_estimates:
            if kind == "sbn":
                noises.append(jnp.asarray(rng.uniform(size=(n_data, SBN_LATENTS)), jnp.float32))
            else:
                noises.append(jnp.asarray(rng.normal(size=(n_data, n_particles, LATENT)), jnp.float32))
        v = np.array([float(one_estimate(noises[i], params, data)) for i in range(n_estimates)])
        se = float(v.std(ddof=1) / math.sqrt(n_estimates)) if n_estimates > 1 else float("nan")
        return float(v.mean()), se

    return evaluate


# ============================================================================================
# The harness
# ============================================================================================
def _flat(tree, lead=()):
    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.asarray(x, np.float64).reshape(*lead, -1) for x in leaves], axis=-1)


def check_agreement(samples):
    """z-scores of the mean (objective, gradient) of each version against the others.

    ``samples[m]``: ``(n_keys, n_coord)``, version ``m``'s estimates for the same keys."""
    n_keys, n_coord = next(iter(samples.values())).shape
    threshold = float(norm.isf(0.5e-3 / n_coord))  # two-sided Bonferroni, family-wise 1e-3
    stats = {m: (g.mean(0), g.std(0, ddof=1) / math.sqrt(n_keys)) for m, g in samples.items()}
    names = list(samples)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            (ma, sa), (mb, sb) = stats[a], stats[b]
            tiny = 1e-12 + 1e-9 * np.abs(ma)
            z = np.abs(ma - mb) / np.sqrt(sa**2 + sb**2 + tiny**2)
            rel = np.linalg.norm(ma - mb) / (np.linalg.norm(0.5 * (ma + mb)) + 1e-30)
            rows.append((f"{a} vs {b}", float(z.max()), float(rel)))
    variances = {m: float(g.var(0, ddof=1).sum()) for m, g in samples.items()}
    return rows, threshold, n_coord, variances


def memory_of(compiled):
    """``(temp MiB, peak MiB)`` from XLA's memory analysis, or ``None`` if unavailable."""
    try:
        ma = compiled.memory_analysis()
        temp = ma.temp_size_in_bytes
        peak = getattr(ma, "peak_memory_in_bytes", 0) or (
            ma.argument_size_in_bytes + ma.output_size_in_bytes + temp - ma.alias_size_in_bytes
        )
        return temp / 2**20, peak / 2**20
    except Exception:  # noqa: BLE001 -- not every backend implements it
        return None


def compile_train(builder, optimizer, max_steps, args):
    """A fresh training executable: ``(compiled, trace + lower + compile s, trace s, memory)``."""
    fn = jax.jit(make_train(builder(), optimizer, max_steps))  # new function: nothing cached
    t0 = time.perf_counter()
    traced = fn.trace(*args)
    t1 = time.perf_counter()
    compiled = traced.lower().compile()
    return compiled, time.perf_counter() - t0, t1 - t0, memory_of(compiled)


class Runner:
    """One version's executable and its own training state (params, opt_state, key)."""

    def __init__(self, train, init, opt0, key, data):
        self.train, self.data = train, data
        self.state = (init, opt0, key)

    def __call__(self, n):
        p, o, k = self.state
        p, o, k, values, _ = self.train(p, o, k, self.data, np.int32(n))
        self.state = (p, o, k)
        return values


def time_interleaved(calls, reps, per_round):
    """Seconds per call of each zero-argument callable (blocked on its result); the
    versions take turns in rounds of ``per_round`` calls, the first one rotating."""
    times = {m: [] for m in calls}
    order = list(calls)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while min(len(t) for t in times.values()) < reps:
            order = order[1:] + order[:1]
            for m in order:
                for _ in range(min(per_round, reps - len(times[m]))):
                    t0 = time.perf_counter()
                    jax.block_until_ready(calls[m]())
                    times[m].append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def summarize(ts, per=1):
    ts = np.asarray(ts) / per
    return float(np.median(ts)), float(np.percentile(ts, 25)), float(np.percentile(ts, 75))


def run_model(kind, data, args):
    print(f"\n=== {kind} ===", flush=True)
    t_model = time.perf_counter()
    init = init_sbn_params(data) if kind == "sbn" else init_vae_params()
    optimizer = optax.adam(LR[kind])
    opt0 = optimizer.init(init)
    builders = version_builders(kind, init, diagnostic=not args.quick)
    S = args.scan_steps
    train_args = (init, opt0, jax.random.PRNGKey(0), data, np.int32(1))

    # --- compile: one executable per version (the one timed below), plus fresh rebuilds ---
    execs, comp, memory = {}, {m: [] for m in builders}, {}
    for i in range(args.compile_repeats):
        names = list(builders)
        for m in names[i % len(names) :] + names[: i % len(names)]:  # rotate who goes first
            compiled, total, trace, mem = compile_train(builders[m], optimizer, S, train_args)
            comp[m].append((total, trace))
            execs.setdefault(m, compiled)
            memory.setdefault(m, mem)
    compile_times = {
        m: (statistics.median(t for t, _ in c), statistics.median(tr for _, tr in c)) for m, c in comp.items()
    }

    # --- agreement: one step from the initial state, same keys for every version ----------
    keys = jax.random.split(jax.random.PRNGKey(12345), args.check_keys)
    samples = {}
    for m, train in execs.items():
        outs = []
        for k in keys:
            _, _, _, values, grads = train(init, opt0, k, data, np.int32(1))
            outs.append(np.concatenate([np.asarray(values[:1], np.float64), _flat(grads)]))
        samples[m] = np.stack(outs)
    rows, threshold, n_coord, variances = check_agreement(samples)
    print(f"agreement check: objective and loss gradient of one step at the initial parameters "
          f"(random minibatch and draws), {args.check_keys} keys, {n_coord} coordinates; "
          f"pass if max |z| < {threshold:.2f} (Bonferroni, family-wise alpha 1e-3)")
    ok_all = True
    for label, zmax, rel in rows:
        ok = zmax < threshold
        ok_all &= ok
        verdict = "ok" if ok else "FAIL"
        print(f"  {label:<33} max|z| = {zmax:6.2f}   |diff of means| / |mean| = {rel:.3g}   {verdict}")
    ref = variances["hand-written"]
    print("  total variance (sum over coordinates) relative to hand-written: "
          + ", ".join(f"{m} {v / ref:.3g}" for m, v in variances.items()))
    if kind == "sbn":
        print("  (REINFORCE's means are noisy at this many keys, hence the large relative "
              "differences)")
    other = {"vae": "hand-written", "sbn": "hand-written", "iwae": DIAGNOSTIC}[kind]
    if other in samples:
        a, b = samples["estimax"], samples[other]
        d = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
        same = d < 1e-4
        ok_all &= same
        verdict = "the same numbers up to float rounding" if same else "DIFFERENT draws or estimator"
        print(f"  same keys, estimax vs {other}: max |diff| / max |value| = {d:.2g} ({verdict})")
    print(f"  [{time.perf_counter() - t_model:.0f} s]", flush=True)

    # --- training from the same start: the objective on all digits after a fixed number of steps
    evaluate = make_evaluator(kind, data.shape[0])
    evals = {}
    for m, train in execs.items():
        run = Runner(train, init, opt0, jax.random.PRNGKey(1), data)
        for done in range(0, args.train_steps, S):
            run(min(S, args.train_steps - done))
        evals[m] = evaluate(jax.block_until_ready(run.state[0]), data, args.eval_estimates)
    init_eval = evaluate(init, data, args.eval_estimates)

    # --- per-step times: (a) one step per call, (b) S steps per call ----------------------
    runners = {m: Runner(train, init, opt0, jax.random.PRNGKey(3), data) for m, train in execs.items()}
    for r in runners.values():
        for _ in range(args.warmup):
            jax.block_until_ready(r(1))
    per_round = max(1, min(50, args.loop_reps // 10))
    loop = time_interleaved({m: (lambda r=r: r(1)) for m, r in runners.items()}, args.loop_reps, per_round)
    calls = {m: (lambda r=r: r(S)) for m, r in runners.items()}
    per_call = {m: S for m in calls}

    fit_first = None
    if not args.quick:
        # Diagnostic: ex.fit itself (the objective with the minibatch drawn in the program),
        # FIT_CHUNKS chunks of S steps per call.
        fit_objective = minibatch_objective(kind, data.shape[0])
        fit_state = {"params": init, "opt_state": opt0, "key": jax.random.PRNGKey(4)}

        def fit_call():
            r = ex.fit(fit_objective, fit_state["params"], data, optimizer=optimizer, steps=FIT_CHUNKS * S,
                       key=fit_state["key"], opt_state=fit_state["opt_state"], maximize=True,
                       chunk=S, progress=False)
            fit_state.update(params=r.params, opt_state=r.opt_state, key=r.key)
            return r.params

        t0 = time.perf_counter()
        fit_call()  # compiles
        fit_first = time.perf_counter() - t0
        calls["estimax ex.fit"], per_call["estimax ex.fit"] = fit_call, FIT_CHUNKS * S
    for c in calls.values():
        jax.block_until_ready(c())  # warm up
    scan = {m: summarize(t, per=per_call[m]) for m, t in time_interleaved(calls, args.scan_reps, 1).items()}
    print(f"  [{time.perf_counter() - t_model:.0f} s]", flush=True)

    return {
        "loop": {m: summarize(t) for m, t in loop.items()},
        "scan": scan,
        "compile": compile_times,
        "memory": memory,
        "evals": evals,
        "init_eval": init_eval,
        "fit_first": fit_first,
        "check_ok": ok_all,
        "execs": execs,
        "optimizer": optimizer,
    }


def sbn_budget(data, args, sbn_result):
    """ELBO reached by each SBN estimator within the same wall-clock budget (compile excluded).
    The REINFORCE and NumPyro executables are those of the SBN run above."""
    init = init_sbn_params(data)
    optimizer = sbn_result["optimizer"]
    opt0 = optimizer.init(init)
    evaluate = make_evaluator("sbn", data.shape[0])
    S = args.scan_steps
    # MVD evaluates the rest of the program twice per latent coordinate (2 x 64 x 16
    # evaluations a step): far slower steps, so fewer steps per call.
    n_mvd = max(1, S // 10)
    mvd, mvd_compile, _, _ = compile_train(lambda: estimax_version("sbn", ex.mvd), optimizer, n_mvd,
                                           (init, opt0, jax.random.PRNGKey(0), data, np.int32(1)))
    # The learned per-digit baseline starts at the initial ELBO per digit (its own parameters
    # then follow the baseline's loss gradient, which estimax adds).
    initial = evaluate(init, data, args.eval_estimates)[0]
    init_bl = {**init, "bl": {"w": jnp.zeros(64, jnp.float32), "c": jnp.asarray(initial, jnp.float32)}}
    opt0_bl = optimizer.init(init_bl)
    learned, learned_compile, _, _ = compile_train(estimax_learned_version, optimizer, S,
                                                   (init_bl, opt0_bl, jax.random.PRNGKey(0), data, np.int32(1)))
    versions = {
        "estimax reinforce": (sbn_result["execs"]["estimax"], S, sbn_result["compile"]["estimax"][0], init, opt0),
        "estimax reinforce+learned baseline": (learned, S, learned_compile, init_bl, opt0_bl),
        "estimax mvd": (mvd, n_mvd, mvd_compile, init, opt0),
        "numpyro TraceGraph": (sbn_result["execs"]["numpyro"], S, sbn_result["compile"]["numpyro"][0], init, opt0),
    }
    out = {}
    for m, (train, n, compile_s, init_m, opt0_m) in versions.items():
        jax.block_until_ready(Runner(train, init_m, opt0_m, jax.random.PRNGKey(2), data)(n))  # warm up
        run = Runner(train, init_m, opt0_m, jax.random.PRNGKey(1), data)
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.budget:
            jax.block_until_ready(run(n))
            done += n
        elapsed = time.perf_counter() - t0
        out[m] = (done, elapsed, compile_s, evaluate(run.state[0], data, args.eval_estimates))
    return out, evaluate(init, data, args.eval_estimates)


def fmt_ratio(a, b):
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def fmt_mem(mem):
    return "n/a" if mem is None else f"{mem[0]:.2f} / {mem[1]:.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="few repetitions (smoke run)")
    add("--models", default="vae,iwae,sbn", help="comma-separated subset of vae,iwae,sbn")
    add("--loop-reps", type=int, help="timed single-step calls per version (default 600; 60 with --quick)")
    add("--scan-steps", type=int, help="steps per fused call (default 50; 10 with --quick)")
    add("--scan-reps", type=int, help="timed fused calls per version (default 20; 3 with --quick)")
    add("--check-keys", type=int, help="keys in the agreement check (default 400; 100 with --quick)")
    add("--compile-repeats", type=int, help="builds compiled per version (default 2; 1 with --quick)")
    add("--train-steps", type=int, help="steps before the evaluation (default 500; 30 with --quick)")
    add("--eval-estimates", type=int, help="estimates in the evaluation (default 16; 4 with --quick)")
    add("--budget", type=float, help="SBN wall-clock budget per estimator, s (default 20; 2 with --quick)")
    args = parser.parse_args(argv)
    defaults = dict(loop_reps=(60, 600), scan_steps=(10, 50), scan_reps=(3, 20), check_keys=(100, 400),
                    compile_repeats=(1, 2), train_steps=(30, 500), eval_estimates=(4, 16), budget=(2.0, 20.0))
    for name, (quick_value, full_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick_value if args.quick else full_value)
    args.warmup = 5 if args.quick else 20
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - {"vae", "iwae", "sbn"}
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}")

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    load = " | load avg %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    print(f"estimax {ex.__version__} | jax {jax.__version__} | numpyro {numpyro.__version__} | "
          f"optax {optax.__version__} | python {platform.python_version()} | "
          f"device {dev.platform}:{getattr(dev, 'device_kind', '')} | {os.cpu_count()} CPUs{load}")
    print(f"single-step calls {args.loop_reps}, fused {args.scan_reps} calls x {args.scan_steps} steps, "
          f"check keys {args.check_keys}, compile repeats {args.compile_repeats}, "
          f"train steps {args.train_steps}, SBN budget {args.budget:g} s")

    data = load_binary_digits()
    jax.jit(lambda a: jnp.sin(a) @ a).lower(jnp.ones((4, 4))).compile()  # JAX's first-use costs

    results = {kind: run_model(kind, data, args) for kind in models}
    budget = sbn_budget(data, args, results["sbn"]) if "sbn" in models else None

    # --- tables -----------------------------------------------------------------------------
    S = args.scan_steps
    print("\n=== per-step time, ms: median and IQR; compile, s ===")
    print(f"(1 step per call from a Python loop; {S} steps per call; compile = trace + lower + XLA "
          f"compile of the training executable, median of {args.compile_repeats}; trace = its tracing part)")
    cols = ("model", "version", "1/call", "IQR", f"{S}/call", "IQR", "compile", "trace")
    fmt = "{:<6} {:<15} {:>8} {:>15} {:>8} {:>15} {:>8} {:>6}"
    header = fmt.format(*cols)
    print(header)
    print("-" * len(header))
    ms = lambda s: f"{s * 1e3:.3f}"  # noqa: E731
    for kind, r in results.items():
        for m in r["scan"]:
            sc = r["scan"][m]
            if m in r["loop"]:
                lp, (tot, tr) = r["loop"][m], r["compile"][m]
                cells = (ms(lp[0]), f"{ms(lp[1])}-{ms(lp[2])}", ms(sc[0]), f"{ms(sc[1])}-{ms(sc[2])}",
                         f"{tot:.2f}", f"{tr:.2f}")
            else:
                cells = ("-", "-", ms(sc[0]), f"{ms(sc[1])}-{ms(sc[2])}", f"({r['fit_first']:.2f})", "-")
            print(fmt.format(kind, m, *cells))
    if any(r["fit_first"] is not None for r in results.values()):
        print(f"(estimax ex.fit: ex.fit(steps={FIT_CHUNKS * S}, chunk={S}) per call, per step, the minibatch "
              "drawn in the program; its compile column is its first call, compile included)")

    print("\n=== XLA memory analysis of the training executable (MiB: temp / peak) ===")
    for kind, r in results.items():
        print(f"{kind:<6} " + "   ".join(f"{m}: {fmt_mem(r['memory'][m])}" for m in r["memory"]))

    print("\n=== ratios estimax / other ===")
    cols = ("model", "1/call /hand", "/numpyro", f"{S}/call /hand", "/numpyro", "compile /hand", "/numpyro",
            "temp /hand", "/numpyro")
    fmt = "{:<6} {:>12} {:>9} {:>14} {:>9} {:>13} {:>9} {:>10} {:>9}"
    header = fmt.format(*cols)
    print(header)
    print("-" * len(header))
    for kind, r in results.items():
        cells = []
        for table in ("loop", "scan"):
            for other in ("hand-written", "numpyro"):
                cells.append(fmt_ratio(r[table]["estimax"][0], r[table][other][0]))
        for other in ("hand-written", "numpyro"):
            cells.append(fmt_ratio(r["compile"]["estimax"][0], r["compile"][other][0]))
        for other in ("hand-written", "numpyro"):
            a, b = r["memory"]["estimax"], r["memory"][other]
            cells.append("n/a" if a is None or b is None else fmt_ratio(a[0], b[0]))
        print(fmt.format(kind, *cells))

    for kind, r in results.items():
        if DIAGNOSTIC in r["loop"]:
            print(f"(diagnostic) {kind}: estimax / {DIAGNOSTIC}: "
                  f"1/call {fmt_ratio(r['loop']['estimax'][0], r['loop'][DIAGNOSTIC][0])}, "
                  f"{S}/call {fmt_ratio(r['scan']['estimax'][0], r['scan'][DIAGNOSTIC][0])}, "
                  f"compile {fmt_ratio(r['compile']['estimax'][0], r['compile'][DIAGNOSTIC][0])}")

    print(f"\n=== objective per digit on all {data.shape[0]} digits after {args.train_steps} steps "
          f"(same start and keys; mean of {args.eval_estimates} estimates +- s.e.) ===")
    label = {"vae": "ELBO", "iwae": f"IWELBO-{K}", "sbn": "ELBO"}
    fmt = "{:<6} {:<9} {:>17} {:>17} {:>17} {:>17}"
    print(fmt.format("model", "objective", "initial", "estimax", "hand-written", "numpyro"))
    pm = lambda e: f"{e[0]:.3f} +- {e[1]:.3f}"  # noqa: E731
    for kind, r in results.items():
        trained = (pm(r["evals"][m]) for m in ("estimax", "hand-written", "numpyro"))
        print(fmt.format(kind, label[kind], pm(r["init_eval"]), *trained))

    if budget is not None:
        out, init_eval = budget
        print(f"\n=== SBN: ELBO per digit on all digits within {args.budget:g} s of training "
              f"(compile excluded; initial {pm(init_eval)}) ===")
        fmt = "{:<35} {:>7} {:>9} {:>10} {:>12} {:>17}"
        print(fmt.format("estimator", "steps", "time (s)", "ms / step", "compile (s)", "ELBO per digit"))
        for m, (done, elapsed, comp, ev) in out.items():
            print(fmt.format(m, done, f"{elapsed:.1f}", f"{elapsed / done * 1e3:.2f}", f"{comp:.2f}", pm(ev)))

    print(f"\n=== targets: estimax step <= {STEP_TARGET}x hand-written, "
          f"compile <= {COMPILE_TARGET}x hand-written (information) ===")
    met = lambda v, t: "met" if v <= t else "NOT met"  # noqa: E731
    for kind, r in results.items():
        s_loop = r["loop"]["estimax"][0] / r["loop"]["hand-written"][0]
        s_scan = r["scan"]["estimax"][0] / r["scan"]["hand-written"][0]
        c = r["compile"]["estimax"][0] / r["compile"]["hand-written"][0]
        print(f"{kind:<6} 1/call {s_loop:.2f}x: {met(s_loop, STEP_TARGET):<8} {S}/call {s_scan:.2f}x: "
              f"{met(s_scan, STEP_TARGET):<8} compile {c:.2f}x: {met(c, COMPILE_TARGET):<8} "
              f"agreement check: {'ok' if r['check_ok'] else 'FAILED'}")
    load = " (load avg now %.1f)" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f} s{load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
