"""A sigmoid belief net on the 8x8 digits: gradient estimators for discrete latents, side by side.

The model (Neal 1992), one layer of 16 binary latents above the 64 binarized pixels:

    h_k ~ Bernoulli(sigmoid(a_k))                      k = 1..16   (binary latents)
    x_j ~ Bernoulli(sigmoid(c_j + sum_k h_k W_kj))     j = 1..64   (pixels)

and an amortized guide with a linear map of the pixels to the latents' logits:

    q(h_k | x) = Bernoulli(sigmoid(d_k + sum_j x_j V_jk)).

Everything is fitted by maximizing the ELBO = E_q[log p(x, h) - log q(h | x)]. The latents
are discrete, so there is no reparameterization: the guide's site needs an estimator that
works without a derivative through the sample. We train the same model four times, from
the same start and with the same keys, changing only the strategy of the guide's site:

- ``ex.reinforce``: the score function, ``(f - 0) * grad log q(h | x)``;
- ``ex.reinforce(baseline=b)``: the same with a baseline ``b``, an exponential moving average
  of recent objective values. ``b`` changes during training, so it is state that we carry
  ourselves, next to the parameters and the optimizer state, in a hand-written step;
- ``ex.reinforce(baseline=b_psi(x), learn="ascent")``: a *learned* control variate per digit
  (as in NVIL), a linear function of the digit's pixels with its own parameters ``psi``.
  estimax gives ``psi`` the gradient of the baseline's loss ``(f_i - b_psi(x_i))^2`` (signed
  for the ascent we run) and the model and guide their unchanged gradient, so ``ex.fit``
  trains all of it: no state of our own;
- ``ex.mvd``: the measure-valued derivative: for each of the site's coordinates it
  evaluates the rest of the program with that latent set to 1 and to 0.

(``ex.enum`` is not an option: the site is the 16 latents of each of the 64 digits of a
minibatch, one random choice with a joint support of 2^(16 * 64) = 2^1024 values. Even for a
single digit, enumerating 2^16 = 65536 values per step would exceed estimax's 4096-value
limit for enumeration.)

Run:

    python examples/sigmoid_belief_net.py            # 5000 steps per estimator
    python examples/sigmoid_belief_net.py --quick    # smoke test (50 steps, no variance table)
    python examples/sigmoid_belief_net.py --steps 20000 --out results/
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from sklearn.datasets import load_digits

import estimax as ex

matplotlib.use("Agg")  # write image files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

LATENTS = 16  # binary latents per digit
BATCH = 64  # digits per minibatch
EMA_DECAY = 0.9  # decay of the moving-average baseline


# ------------------------------------------------------------------------------------------
# 1. Data: the 1797 digits shipped with scikit-learn, binarized at pixel > 7 (of 0..16).
# ------------------------------------------------------------------------------------------
def load_binary_digits() -> jax.Array:
    return jnp.asarray(load_digits().data > 7, jnp.float32)


def init_params(data, seed: int) -> dict:
    """Small random weights (drawn with NumPy: a one-off, nothing to compile); the pixel
    biases start at the logits of the pixels' mean values, a standard head start."""
    rng = np.random.default_rng(seed)
    mean = np.clip(np.asarray(data).mean(axis=0), 0.01, 0.99)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return {
        # model p(h, x)
        "a": f32(np.zeros(LATENTS)),  # prior logits of the latents
        "W": f32(0.1 * rng.normal(size=(LATENTS, 64))),  # latents -> pixel logits
        "c": f32(np.log(mean / (1 - mean))),  # pixel biases
        # guide q(h | x)
        "V": f32(0.1 * rng.normal(size=(64, LATENTS))),  # pixels -> latent logits
        "d": f32(np.zeros(LATENTS)),
    }


# ------------------------------------------------------------------------------------------
# 2. Model, guide and objective.
#
# The model is plain NumPyro. Its data arguments are those of the objective, `(x, b)`: the
# baseline `b` is only used by the guide, but model and guide are called with the same
# arguments, so the model accepts (and ignores) it.
# ------------------------------------------------------------------------------------------
def model(params, x, b):
    del b  # the guide's business
    with numpyro.plate("digits", x.shape[0]):
        h = numpyro.sample("h", dist.Bernoulli(logits=params["a"]).expand([LATENTS]).to_event(1))
        # Bernoulli values are integers; a float matmul is much faster on XLA:CPU.
        logits = h.astype(jnp.float32) @ params["W"] + params["c"]
        numpyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def make_guide(strategy: str):
    """The guide q(h | x) with the gradient strategy of its one site, `h`.

    `h` is a single random choice: the (64, 16) latents of the whole minibatch, 64
    independent elements along its leading batch axis. The ELBO sums per-digit terms, and
    estimax's Rao-Blackwellization sees that each digit's terms depend on that digit's
    latents only: REINFORCE multiplies each digit's score by that digit's terms, not by the
    whole minibatch's (``ex.explain`` lists the sites Rao-Blackwellized per element). A
    baseline for the whole site (the moving average) keeps the whole-minibatch signal;
    a baseline per digit (the learned one) gets the per-digit one. MVD works per
    coordinate: it flips one latent at a time and the terms of the other digits cancel in
    the difference.
    """

    def guide(params, x, b):
        logits = x @ params["V"] + params["d"]
        q = dist.Bernoulli(logits=logits).to_event(1)
        if strategy == "reinforce":
            estimator = ex.reinforce
        elif strategy == "reinforce+baseline":
            estimator = ex.reinforce(baseline=b)  # b is a traced argument: state, not a constant
        elif strategy == "reinforce+learned":
            # one baseline per digit (a vector over the site's leading batch axis), used by
            # nothing else: psi gets the baseline's loss gradient
            psi = params["baseline"]
            estimator = ex.reinforce(baseline=x @ psi["w"] + psi["c"], learn="ascent")
        else:
            estimator = ex.mvd
        # (ex.enum would sum over the site's joint support: 2^(16 * 64) values for a
        # minibatch, 2^16 even for one digit -- far beyond enumeration's 4096-value limit.)
        return ex.sample(q, estimator=estimator, name="h")

    return guide


def make_objective(strategy: str, n_data: int):
    """The per-digit ELBO of a random minibatch (drawn inside the program, as one more
    random choice whose distribution has no parameters, hence no gradient term)."""
    batch_elbo = ex.objectives.elbo(model, make_guide(strategy))

    @ex.expectation
    def minibatch_elbo(params, data, b):
        idx = ex.sample(dist.DiscreteUniform(0, n_data - 1).expand([BATCH]), name="minibatch")
        return batch_elbo(params, data[idx], b) / BATCH

    minibatch_elbo.name = f"elbo[{strategy}]"
    return minibatch_elbo


# ------------------------------------------------------------------------------------------
# 3. A training loop with explicit state, for the moving-average baseline.
#
# ex.fit carries (params, optimizer state, key); the baseline is one more piece of state,
# so we write the step ourselves: one estimate of (ELBO, gradient) at the current baseline,
# an Adam step, and the baseline's update from that step's estimate. The baseline of a step
# never depends on that step's own draws, so each gradient estimate stays unbiased.
# Steps run in chunks of a compiled lax.scan, as in ex.fit.
# ------------------------------------------------------------------------------------------
class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    baseline: jax.Array  # scalar: moving average of the objective
    key: jax.Array


def make_baseline_trainer(objective, optimizer):
    """``run_chunk(state, data, length) -> (state, estimates)``: ``length`` steps, compiled
    once per distinct ``length``."""
    value_and_grad = ex.value_and_grad(objective, argnums=0)

    def step(state: TrainState, data):
        key, sub = jax.random.split(state.key)  # the same key sequence as ex.fit
        value, grads = value_and_grad(sub, state.params, data, state.baseline)
        grads = jax.tree.map(jnp.negative, grads)  # optax minimizes; we maximize the ELBO
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        baseline = ex.ema_update(state.baseline, value, EMA_DECAY)
        return TrainState(params, opt_state, baseline, key), value

    @functools.partial(jax.jit, static_argnames="length")
    def run_chunk(state: TrainState, data, length: int):
        return jax.lax.scan(lambda s, _: step(s, data), state, None, length=length)

    return run_chunk


def train_with_baseline(objective, params, data, *, baseline, optimizer, steps, key, chunk, report):
    run_chunk = make_baseline_trainer(objective, optimizer)
    state = TrainState(params, optimizer.init(params), jnp.asarray(baseline, jnp.float32), key)
    history = []
    done = 0
    while done < steps:
        n = min(chunk, steps - done)  # a last, shorter chunk compiles once more
        state, values = run_chunk(state, data, n)
        history.append(np.asarray(values))
        done += n
        report(done, float(np.concatenate(history[-2:])[-chunk:].mean()))  # as ex.fit's window
    return state.params, np.concatenate(history), float(state.baseline)


# ------------------------------------------------------------------------------------------
# Evaluation and plotting.
# ------------------------------------------------------------------------------------------
# The ELBO of a batch of digits, for evaluation: the value of an estimate does not depend
# on the gradient strategy, so one program (compiled once) serves all four runs.
elbo = ex.objectives.elbo(model, make_guide("reinforce"))


def mean_elbo(params, data, key, n_estimates: int = 16) -> tuple[float, float]:
    """The ELBO per digit on all digits: mean of `n_estimates` estimates, standard error."""
    keys = jax.random.split(key, n_estimates)
    values = np.array([float(elbo.estimate(k, params, data, 0.0)) for k in keys]) / data.shape[0]
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(n_estimates))


def smooth(values, window: int):
    window = max(1, min(window, len(values)))
    return np.arange(window - 1, len(values)), np.convolve(values, np.ones(window) / window, mode="valid")


def plot(histories, finals, path):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, history) in enumerate(histories.items()):
        xs, ys = smooth(history, max(10, len(history) // 50))
        ax.plot(np.arange(len(history)), history, color=f"C{i}", alpha=0.12, lw=0.5)
        ax.plot(xs, ys, color=f"C{i}", lw=2, label=f"{name}: final {finals[name]:.2f} on all digits")
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO per digit (nats)")
    ax.set_title("Sigmoid belief net (16 binary latents) on 8x8 digits")
    low = min(np.percentile(h, 5) for h in histories.values())
    high = max(max(h.max() for h in histories.values()), *finals.values())
    ax.set_ylim(low - 0.4 * (high - low), high + 1)  # room for the legend below the curves
    ax.legend(loc="lower right", title="guide-site estimator (moving averages)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# 4. Main: per-site gradient variance at the start, then the four training runs.
# ------------------------------------------------------------------------------------------
STRATEGIES = ("reinforce", "reinforce+baseline", "reinforce+learned", "mvd")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5000, help="steps per estimator (default: 5000)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 50 steps each, no variance")
    parser.add_argument("--no-variance", action="store_true", help="print the plans without variances")
    parser.add_argument("--out", default="out", help="directory for sigmoid_belief_net.png (default: out/)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam step size (default: 3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization and the estimator")
    args = parser.parse_args(argv)
    steps = 50 if args.quick else args.steps
    measure_variance = not (args.quick or args.no_variance)
    if steps < 1:
        parser.error("--steps must be at least 1")

    data = load_binary_digits()
    params = init_params(data, args.seed)
    fit_key, var_key, eval_key = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    objectives = {s: make_objective(s, data.shape[0]) for s in STRATEGIES}
    optimizer = optax.adam(args.lr)
    chunk = 100 if steps >= 1000 else 25
    print_every = max(chunk, (steps // 10) // chunk * chunk)

    # The baseline run starts its moving average at one estimate of the ELBO per digit (on
    # all digits) at the initial parameters.
    b0 = float(elbo.estimate(jax.random.fold_in(eval_key, 1), params, data, 0.0)) / data.shape[0]

    # Where does the gradient noise come from at the initial parameters? For each site,
    # explain(variance=True) measures E[Var(gradient | the other sites' draws)], summed
    # over the gradient's coordinates (the REINFORCE-with-baseline variant at b0).
    # It runs all (outer x inner) gradient estimates at once: MVD's estimates re-evaluate
    # the program 2048 times each (~85 MB per estimate here), so it gets fewer draws than
    # the default (32 x 16), which would need ~43 GB. Measuring also compiles one batched
    # gradient program per site (tens of seconds on a small CPU): --quick skips it.
    samples = {"reinforce": (32, 16), "reinforce+baseline": (32, 16), "reinforce+learned": (32, 16), "mvd": (8, 4)}
    # The learned baseline's parameters: a linear function of the pixels, starting at b0.
    initial = {name: params for name in STRATEGIES}
    # (each digit's learning signal is its own ELBO term, divided by the batch size)
    initial["reinforce+learned"] = {**params, "baseline": {"w": jnp.zeros(64, jnp.float32), "c": jnp.asarray(b0 / BATCH, jnp.float32)}}
    for name, objective in objectives.items():
        b = b0 if name == "reinforce+baseline" else 0.0
        if measure_variance:
            print(f"[variance from {samples[name][0]} x {samples[name][1]} gradient estimates]")
            print(ex.explain(objective, initial[name], data, b, variance=True, key=var_key, samples=samples[name]))
        else:
            print(ex.explain(objective, initial[name], data, b))
        print()
    if not measure_variance:
        print("(gradient variance not measured: run without --quick / --no-variance to see it)\n")

    histories, results, timings = {}, {}, {}
    for name, objective in objectives.items():
        print(f"=== {name} ===")
        start = time.perf_counter()

        def report(step, recent, start=start):
            if step % print_every == 0 or step == steps:
                elapsed = time.perf_counter() - start
                print(f"step {step:6d}  ELBO/digit (last {chunk} steps) {recent:9.3f}  [{elapsed:5.1f}s]")

        if name == "reinforce+baseline":
            params_out, history, b_final = train_with_baseline(
                objective, params, data, baseline=b0, optimizer=optimizer, steps=steps, key=fit_key,
                chunk=chunk, report=report,
            )
            print(f"final baseline: {b_final:.3f}")
        else:
            # No state beyond (params, optimizer state, key): ex.fit runs it. The baseline
            # argument is unused by these guides; pass 0.
            result = ex.fit(
                objective,
                initial[name],
                data,
                0.0,
                optimizer=optimizer,
                steps=steps,
                key=fit_key,
                maximize=True,
                chunk=chunk,
                callback=lambda progress: report(progress.step, progress.average),
                progress=False,
            )
            params_out, history = result.params, result.history
        timings[name] = time.perf_counter() - start
        histories[name], results[name] = history, params_out
        print(f"{steps} steps in {timings[name]:.1f}s (including compilation)\n")

    # ------------------------------------------------------------------------------------------
    # 5. Results: the ELBO of all 1797 digits under each run's parameters.
    # ------------------------------------------------------------------------------------------
    print(f"ELBO per digit on all {data.shape[0]} digits (mean of 16 estimates, +- standard error):")
    finals = {}
    for name, p in results.items():
        mean, se = mean_elbo(p, data, eval_key)
        finals[name] = mean
        print(f"  {name:>20}: {mean:9.3f} +- {se:.3f}   ({timings[name]:.1f}s)")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sigmoid_belief_net.png")
    plot(histories, finals, path)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
