"""Core overhead benchmark: estimax vs. hand-written JAX vs. NumPyro.

What it measures
----------------
The same gradient estimator of the same objective, written three ways, run in one process:

* ``estimax``      -- the objective as an ``@ex.expectation`` program, differentiated with
  ``ex.grad``;
* ``hand-written`` -- the estimator written directly with ``jax.random`` and ``jax.grad``
  (reparameterized noise, or a score-function surrogate with ``stop_gradient``);
* ``numpyro``      -- a NumPyro model/guide pair whose ELBO loss is differentiated with
  ``jax.grad`` (what one SVI step does, without the optimizer).

Cases:

1. ``gaussian-reparam``: an ELBO-like objective with a Gaussian latent, batch 64, latent 10.
   ``p: z ~ N(0, I), x ~ N(z W, I)`` with a fixed 10x10 ``W``; guide
   ``q: z ~ N(mu, exp(log_s))`` with ``mu, log_s`` of shape (64, 10); the objective is
   ``-(log p(x, z) - log q(z))`` with one reparameterized sample. NumPyro: ``Trace_ELBO``.
2. ``bernoulli16-reinforce``: ``b ~ Bernoulli(logits=theta)``, ``theta`` of shape (16,), one
   vector site with ``estimator=ex.reinforce``; the objective is
   ``f(b, theta) = sum(w (b - t)^2) + b'Ab/16 + 0.05 |theta|^2``. The estimator is
   ``grad_theta f(b, theta) + f(b, theta) grad_theta log p(b)`` with one sample (no baseline).
   NumPyro: ``TraceGraph_ELBO`` (see ``numpyro_bernoulli`` for why not ``Trace_ELBO``).
   A fourth, diagnostic version, ``hand (int32 b)``, is the hand-written estimator with ``b``
   of dtype int32 -- the dtype of a NumPyro Bernoulli sample, hence of the estimax site's
   value -- to separate that dtype's cost on XLA:CPU from estimax's own overhead.

All three versions of a case draw one sample per step and compute the same estimator; the
only intended difference is the framework. estimax and hand-written programs share the
log-density helpers below, NumPyro uses its own distributions (which is the point of
measuring it).

For every case the script reports

* ``step``: median wall time of one call of the jitted gradient function (each call followed
  by ``block_until_ready``; warm-up calls excluded; the three versions are interleaved in
  rounds so that drift in machine speed hits them alike);
* ``compile``: trace + lower + XLA compile time of a freshly built jitted gradient function
  (``jax.jit(...).trace(...).lower().compile()``), median over a few fresh builds; the
  ``trace`` column is the tracing part of it (median over 3x as many fresh builds), where a
  framework's Python-level work happens;
* ratios estimax/hand-written and estimax/NumPyro for both.

Before timing, a correctness check: each version's gradient is averaged over many keys
(2000 by default) and compared, coordinate by coordinate, with the exact gradient (both
objectives have closed-form expectations) and with the other versions, in standard errors.
The largest |z| over all coordinates is compared with a Bonferroni threshold (family-wise
false-alarm rate 1e-3), so a "FAIL" is very unlikely to be bad luck.

At the end the script prints the targets (estimax step within 1.05x of hand-written, compile
within 1.5x) and whether they are met. The script exits 0 either way: the numbers are
information, not a test.

How to run
----------
    python bench/bench_core.py              # full run (a minute or two on 2 CPU cores)
    python bench/bench_core.py --quick      # smoke run: few repetitions, small check
    python bench/bench_core.py --reps 5000  # more timed steps per version and case

Timings are of whatever backend JAX picks (CPU unless an accelerator is installed); set
``JAX_PLATFORMS=cpu`` to force the CPU. The problems are small (a step takes well under a
millisecond on a CPU), so per-step overheads of a framework show up clearly in the ratios.
Other processes competing for the cores widen the IQR column; the interleaving keeps the
ratios comparable, but read them with the IQR in mind.
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
from jax.scipy.special import ndtri
from numpyro.infer import Trace_ELBO, TraceGraph_ELBO

import estimax as ex

# Targets (information only; the script exits 0 whether or not they are met).
STEP_TARGET = 1.05  # estimax step time / hand-written step time
COMPILE_TARGET = 1.5  # estimax compile time / hand-written compile time

# ============================================================================================
# Shared log densities (used by the estimax and the hand-written programs alike)
# ============================================================================================
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def normal_logpdf(x, loc, scale):
    """Elementwise log N(x; loc, scale)."""
    return -0.5 * jnp.square((x - loc) / scale) - jnp.log(scale) - _HALF_LOG_2PI


def bernoulli_logits_logpmf(b, logits):
    """Elementwise log Bernoulli(b; logits) = b*logits - softplus(logits)."""
    return b * logits - jax.nn.softplus(logits)


# ============================================================================================
# Case 1: Gaussian latent, reparameterization, batch 64, latent 10
# ============================================================================================
N_BATCH, D_LATENT = 64, 10


def gaussian_data():
    """Fixed data and initial guide parameters (seeded)."""
    k_w, k_z, k_x, k_mu, k_s = jax.random.split(jax.random.PRNGKey(20240601), 5)
    W = jax.random.normal(k_w, (D_LATENT, D_LATENT)) / math.sqrt(D_LATENT)
    z_true = jax.random.normal(k_z, (N_BATCH, D_LATENT))
    x = z_true @ W + jax.random.normal(k_x, (N_BATCH, D_LATENT))
    params = {
        "mu": 0.1 * jax.random.normal(k_mu, (N_BATCH, D_LATENT)),
        "log_s": -1.0 + 0.1 * jax.random.normal(k_s, (N_BATCH, D_LATENT)),
    }
    return params, (x, W)


def gaussian_neg_elbo_terms(z, params, x, W):
    """-(log p(x, z) - log q(z)) at a given z (shared by estimax and hand-written)."""
    s = jnp.exp(params["log_s"])
    log_p = jnp.sum(normal_logpdf(z, 0.0, 1.0)) + jnp.sum(normal_logpdf(x, z @ W, 1.0))
    log_q = jnp.sum(normal_logpdf(z, params["mu"], s))
    return -(log_p - log_q)


# --- estimax ---------------------------------------------------------------------------------
@ex.expectation
def gaussian_objective(params, x, W):
    z = ex.sample(dist.Normal(params["mu"], jnp.exp(params["log_s"])), name="z")  # reparam
    return gaussian_neg_elbo_terms(z, params, x, W)


def estimax_gaussian():
    return ex.grad(gaussian_objective, argnums=0)


# --- hand-written ----------------------------------------------------------------------------
def hand_gaussian():
    def grad_step(key, params, x, W):
        eps = jax.random.normal(key, params["mu"].shape)

        def loss(p):
            z = p["mu"] + jnp.exp(p["log_s"]) * eps
            return gaussian_neg_elbo_terms(z, p, x, W)

        return jax.grad(loss)(params)

    return jax.jit(grad_step)


# --- NumPyro ---------------------------------------------------------------------------------
def _np_gaussian_model(x, W):
    z = numpyro.sample("z", dist.Normal(jnp.zeros((N_BATCH, D_LATENT)), 1.0).to_event(2))
    numpyro.sample("x", dist.Normal(z @ W, 1.0).to_event(2), obs=x)


def _np_gaussian_guide(x, W):
    mu = numpyro.param("mu", jnp.zeros((N_BATCH, D_LATENT)))
    log_s = numpyro.param("log_s", jnp.zeros((N_BATCH, D_LATENT)))
    numpyro.sample("z", dist.Normal(mu, jnp.exp(log_s)).to_event(2))


def numpyro_gaussian():
    elbo = Trace_ELBO(num_particles=1)

    def grad_step(key, params, x, W):
        # The parameters enter through `param_map` (as in SVI.update); Trace_ELBO's loss is
        # -(log p(x, z) - log q(z)) at one reparameterized z ~ q.
        return jax.grad(lambda p: elbo.loss(key, p, _np_gaussian_model, _np_gaussian_guide, x, W))(params)

    return jax.jit(grad_step)


# --- exact expected gradient -----------------------------------------------------------------
def gaussian_exact_grad(params, x, W):
    """Gradient of the closed-form E_q[-(log p(x, z) - log q(z))]."""

    def expected_loss(p):
        mu, s = p["mu"], jnp.exp(p["log_s"])
        e_log_prior = jnp.sum(-_HALF_LOG_2PI - 0.5 * (mu**2 + s**2))
        e_log_lik = jnp.sum(-_HALF_LOG_2PI - 0.5 * (x - mu @ W) ** 2) - 0.5 * jnp.sum(s**2 @ W**2)
        entropy = jnp.sum(_HALF_LOG_2PI + 0.5 + p["log_s"])
        return -(e_log_prior + e_log_lik + entropy)

    return jax.grad(expected_loss)(params)


# ============================================================================================
# Case 2: 16 Bernoulli latents as one vector site, REINFORCE
# ============================================================================================
N_BERN = 16
THETA_L2 = 0.05


def bernoulli_data():
    k_t, k_w, k_a, k_th = jax.random.split(jax.random.PRNGKey(7), 4)
    target = jax.random.bernoulli(k_t, 0.5, (N_BERN,)).astype(jnp.float32)
    w = jax.random.uniform(k_w, (N_BERN,), minval=0.5, maxval=2.0)
    A = jax.random.normal(k_a, (N_BERN, N_BERN))
    A = 0.5 * (A + A.T)
    theta = 0.5 * jax.random.normal(k_th, (N_BERN,))
    return theta, (target, w, A)


def bernoulli_f(b, theta, target, w, A):
    """The (nonlinear in b) objective; also depends on theta directly through a small L2 term."""
    return jnp.sum(w * (b - target) ** 2) + b @ A @ b / N_BERN + THETA_L2 * jnp.sum(theta**2)


# --- estimax ---------------------------------------------------------------------------------
@ex.expectation
def bernoulli_objective(theta, target, w, A):
    b = ex.sample(dist.Bernoulli(logits=theta), estimator=ex.reinforce, name="b")
    return bernoulli_f(b, theta, target, w, A)


def estimax_bernoulli():
    return ex.grad(bernoulli_objective, argnums=0)


# --- hand-written ----------------------------------------------------------------------------
def hand_bernoulli(sample_dtype=None):
    """The score-function estimator written directly; ``b`` is a float array by default.

    ``sample_dtype=jnp.int32`` gives ``b`` the dtype a NumPyro Bernoulli sample has (and so
    the value of an estimax Bernoulli site): the diagnostic row "hand (int32 b)".
    """

    def grad_step(key, theta, target, w, A):
        bits = jax.random.bernoulli(key, jax.nn.sigmoid(theta))
        b = jax.lax.stop_gradient(bits.astype(sample_dtype or theta.dtype))

        def surrogate(th):
            fval = bernoulli_f(b, th, target, w, A)
            log_p = jnp.sum(bernoulli_logits_logpmf(b, th))
            # gradient: grad f(b, th) + f(b, th) * grad log p(b; th)
            return fval + jax.lax.stop_gradient(fval) * log_p

        return jax.grad(surrogate)(theta)

    return jax.jit(grad_step)


# --- NumPyro ---------------------------------------------------------------------------------
# NumPyro has no "expectation of f" API; E_q[f(b, theta)] is written as an ELBO whose model
# term cancels the guide term: the model samples b from the same Bernoulli(logits=theta) with
# theta behind stop_gradient (value log p(b) = log q(b), no pathwise gradient), and adds
# `factor(-f)`. So -ELBO = f(b, theta) at every sample.
#
# Trace_ELBO is NOT usable here: it has no score-function term for non-reparameterizable guide
# sites (its docstring says it supports reparameterized samplers only) and would silently
# return the biased gradient grad_theta f(b, theta). TraceGraph_ELBO adds, per non-reparam
# site, the surrogate log q(b) * stop_gradient(downstream cost), where the downstream cost is
# log p(b) - f - log q(b) = -f; its guide log q term is stop-gradient'ed. The resulting
# gradient is grad f + f grad log q(b), the same estimator as the other two (no baseline).
def _np_bernoulli_model(target, w, A):
    theta = numpyro.param("theta", jnp.zeros(N_BERN))
    b = numpyro.sample("b", dist.Bernoulli(logits=jax.lax.stop_gradient(theta)).to_event(1))
    numpyro.factor("f", -bernoulli_f(b, theta, target, w, A))


def _np_bernoulli_guide(target, w, A):
    theta = numpyro.param("theta", jnp.zeros(N_BERN))
    numpyro.sample("b", dist.Bernoulli(logits=theta).to_event(1))


def numpyro_bernoulli():
    elbo = TraceGraph_ELBO(num_particles=1)

    def grad_step(key, theta, target, w, A):
        def loss(th):
            return elbo.loss(key, {"theta": th}, _np_bernoulli_model, _np_bernoulli_guide, target, w, A)

        return jax.grad(loss)(theta)

    return jax.jit(grad_step)


# --- exact expected gradient -----------------------------------------------------------------
def bernoulli_exact_grad(theta, target, w, A):
    """Gradient of the closed-form E[f(b, theta)] with b_i ~ Bernoulli(sigmoid(theta_i))."""

    def expected_f(th):
        p = jax.nn.sigmoid(th)
        e_sq = p * (1.0 - target) ** 2 + (1.0 - p) * target**2
        e_quad = p @ A @ p + jnp.sum(jnp.diag(A) * (p - p**2))  # E[b_i b_j] = p_i p_j, E[b_i^2] = p_i
        return jnp.sum(w * e_sq) + e_quad / N_BERN + THETA_L2 * jnp.sum(th**2)

    return jax.grad(expected_f)(theta)


# ============================================================================================
# The benchmark harness
# ============================================================================================
CASES = [
    {
        "name": "gaussian-reparam (64x10)",
        "data": gaussian_data,
        "exact": gaussian_exact_grad,
        "builders": {"estimax": estimax_gaussian, "hand-written": hand_gaussian, "numpyro": numpyro_gaussian},
    },
    {
        "name": "bernoulli16-reinforce",
        "data": bernoulli_data,
        "exact": bernoulli_exact_grad,
        "builders": {
            "estimax": estimax_bernoulli,
            "hand-written": hand_bernoulli,
            "numpyro": numpyro_bernoulli,
            # Diagnostic: estimax's site value (like NumPyro's sample) is int32, the natural
            # hand-written b is float32, and on XLA:CPU the integer version of the same
            # arithmetic is markedly slower (the sampler gets duplicated into each consumer
            # fusion). This row separates that effect from estimax's own overhead.
            "hand (int32 b)": lambda: hand_bernoulli(jnp.int32),
        },
    },
]


def _flat(tree, lead=()):
    """The leaves of ``tree`` as one float64 array (keeping ``lead`` leading axes)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.asarray(x, np.float64).reshape(*lead, -1) for x in leaves], axis=-1)


def check_agreement(case, params, data, n_keys, fns):
    """Per-coordinate z-scores of the mean gradients against the exact one and each other."""
    exact = _flat(case["exact"](params, *data))
    keys = jax.random.split(jax.random.PRNGKey(12345), n_keys)
    stats = {}
    for m, fn in fns.items():
        # lax.map over keys (not vmap), so each key runs exactly the function that is timed.
        grads = jax.jit(lambda ks, fn=fn: jax.lax.map(lambda k: fn(k, params, *data), ks))(keys)
        g = _flat(grads, lead=(n_keys,))
        stats[m] = (g.mean(0), g.std(0, ddof=1) / math.sqrt(n_keys))
    n_coord = exact.size
    # Bonferroni: family-wise false-alarm probability 1e-3 over the coordinates.
    threshold = float(ndtri(1.0 - 0.5e-3 / n_coord))
    tiny = 1e-12 + 1e-9 * np.abs(exact)
    rel = lambda d: float(np.linalg.norm(d) / np.linalg.norm(exact))  # noqa: E731
    rows = []
    for m, (mean, se) in stats.items():
        z = np.abs(mean - exact) / np.sqrt(se**2 + tiny**2)
        rows.append((f"{m} vs exact", float(z.max()), rel(mean - exact)))
    pairs = [("estimax", m) for m in stats if m != "estimax"] + [("hand-written", "numpyro")]
    for a, b in pairs:
        (ma, sa), (mb, sb) = stats[a], stats[b]
        z = np.abs(ma - mb) / np.sqrt(sa**2 + sb**2 + tiny**2)
        rows.append((f"{a} vs {b}", float(z.max()), rel(ma - mb)))
    return rows, threshold, n_coord


def time_steps(fns, args_for, reps, chunk):
    """Median per-call time (seconds) of each jitted fn; calls interleaved in rounds."""
    times = {m: [] for m in fns}
    order = list(fns)
    keys = list(jax.random.split(jax.random.PRNGKey(99), 16))
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        r = 0
        while min(len(t) for t in times.values()) < reps:
            order = order[1:] + order[:1]  # rotate who goes first
            for m in order:
                fn, args = fns[m], args_for[m]
                n = min(chunk, reps - len(times[m]))
                for i in range(n):
                    key = keys[(r + i) % len(keys)]
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(key, *args))
                    times[m].append(time.perf_counter() - t0)
            r += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    return {m: statistics.median(t) for m, t in times.items()}, {
        m: (np.percentile(t, 25), np.percentile(t, 75)) for m, t in times.items()
    }


def time_compile(builders, args, repeats):
    """Median seconds of (trace + lower + compile, trace alone) of freshly built jitted fns.

    Tracing is cheap next to XLA's compile, so it gets more (trace-only) repetitions.
    """
    total = {m: [] for m in builders}
    trace = {m: [] for m in builders}
    order = list(builders)
    for i in range(3 * repeats):
        order = order[1:] + order[:1]
        for m in order:
            fn = builders[m]()  # a new jitted function: nothing cached from earlier builds
            t0 = time.perf_counter()
            traced = fn.trace(*args)
            t1 = time.perf_counter()
            trace[m].append(t1 - t0)
            if i < repeats:
                traced.lower().compile()
                total[m].append(time.perf_counter() - t0)
    return {m: (statistics.median(total[m]), statistics.median(trace[m])) for m in builders}


def run_case(case, args):
    params, data = case["data"]()
    key0 = jax.random.PRNGKey(0)
    fns = {m: build() for m, build in case["builders"].items()}
    full_args = (key0, params, *data)

    # Warm-up (compile) and a sanity check that every version returns theta's structure.
    ref_struct = jax.tree_util.tree_structure(params)
    for m, fn in fns.items():
        out = jax.block_until_ready(fn(*full_args))
        if jax.tree_util.tree_structure(out) != ref_struct:
            print(f"  WARNING: {m} returned a gradient of structure {jax.tree_util.tree_structure(out)}")

    print(f"\n=== {case['name']} ===")
    rows, threshold, n_coord = check_agreement(case, params, data, args.check_keys, fns)
    print(f"agreement check: {args.check_keys} keys, {n_coord} coordinates, "
          f"pass if max |z| < {threshold:.2f} (Bonferroni, family-wise alpha 1e-3)")
    ok_all = True
    for label, zmax, rel in rows:
        ok = zmax < threshold
        ok_all &= ok
        verdict = "ok" if ok else "FAIL"
        print(f"  {label:<32} max|z| = {zmax:5.2f}   |diff of means| / |exact| = {rel:.3f}   {verdict}")

    # Warm up again right before timing (caches, allocator), then time.
    for fn in fns.values():
        for _ in range(min(20, args.reps)):
            jax.block_until_ready(fn(*full_args))
    chunk = max(1, min(100, args.reps // 10))
    step, iqr = time_steps(fns, {m: (params, *data) for m in fns}, args.reps, chunk)
    comp = time_compile(case["builders"], full_args, args.compile_repeats)
    return {"step": step, "iqr": iqr, "compile": comp, "check_ok": ok_all}


def fmt_ratio(a, b):
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="few repetitions (smoke run)")
    add("--reps", type=int, help="timed steps per version and case (default 3000; 100 with --quick)")
    add("--check-keys", type=int, help="keys in the agreement check (default 2000; 400 with --quick)")
    add("--compile-repeats", type=int, help="fresh builds timed per version (default 3; 1 with --quick)")
    args = parser.parse_args(argv)
    args.reps = args.reps or (100 if args.quick else 3000)
    args.check_keys = args.check_keys or (400 if args.quick else 2000)
    args.compile_repeats = args.compile_repeats or (1 if args.quick else 3)

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    load = " | load avg %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    print(f"estimax {ex.__version__} | jax {jax.__version__} | numpyro {numpyro.__version__} | "
          f"python {platform.python_version()} | device {dev.platform}:{getattr(dev, 'device_kind', '')} | "
          f"{os.cpu_count()} CPUs{load}")
    print(f"reps {args.reps}, check keys {args.check_keys}, compile repeats {args.compile_repeats}")

    # One throwaway compile so that JAX's own first-use costs are not charged to any version.
    jax.jit(lambda a: jnp.sin(a) @ a).lower(jnp.ones((4, 4))).compile()

    results = {case["name"]: run_case(case, args) for case in CASES}

    # --- the table ------------------------------------------------------------------------
    print("\n=== timings (median) ===")
    cols = ("case", "version", "step (us)", "IQR (us)", "compile (ms)", "trace (ms)")
    header = "{:<26} {:<15} {:>10} {:>15} {:>13} {:>11}".format(*cols)
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        for m in r["step"]:
            lo, hi = r["iqr"][m]
            tot, tr = r["compile"][m]
            iqr = f"{lo * 1e6:.1f}-{hi * 1e6:.1f}"
            step_us = r["step"][m] * 1e6
            print(f"{name:<26} {m:<15} {step_us:10.1f} {iqr:>15} {tot * 1e3:13.1f} {tr * 1e3:11.1f}")
    print()
    cols = ("case", "step est/hand", "step est/npyro", "compile est/hand", "compile est/npyro")
    header = "{:<26} {:>14} {:>15} {:>17} {:>18}".format(*cols)
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        s, c = r["step"], {m: v[0] for m, v in r["compile"].items()}
        ratios = [fmt_ratio(d["estimax"], d[m]) for d in (s, c) for m in ("hand-written", "numpyro")]
        print("{:<26} {:>14} {:>15} {:>17} {:>18}".format(name, *ratios))

    # --- targets (information only) -------------------------------------------------------
    print(f"\n=== targets: estimax step <= {STEP_TARGET}x hand-written, "
          f"compile <= {COMPILE_TARGET}x hand-written ===")
    for name, r in results.items():
        s_ratio = r["step"]["estimax"] / r["step"]["hand-written"]
        c_ratio = r["compile"]["estimax"][0] / r["compile"]["hand-written"][0]
        s_met = "met" if s_ratio <= STEP_TARGET else "NOT met"
        c_met = "met" if c_ratio <= COMPILE_TARGET else "NOT met"
        print(f"{name:<26} step {s_ratio:.2f}x: {s_met:<8} compile {c_ratio:.2f}x: {c_met:<8} "
              f"agreement check: {'ok' if r['check_ok'] else 'FAILED'}")
    for name, r in results.items():
        for m in r["step"]:
            if m not in ("estimax", "hand-written", "numpyro"):
                s_ratio = r["step"]["estimax"] / r["step"][m]
                c_ratio = r["compile"]["estimax"][0] / r["compile"][m][0]
                print(f"(diagnostic) {name}: estimax / {m}: step {s_ratio:.2f}x, compile {c_ratio:.2f}x")
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f} s")
    failed = [name for name, r in results.items() if not r["check_ok"]]
    if failed:  # a timing of estimators that do not agree means nothing: fail the run
        print(f"agreement check FAILED for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
