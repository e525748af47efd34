"""An importance-weighted autoencoder (IWAE) on the 8x8 digits: standard vs. DReG gradients.

Same data, model and networks as ``vae_digits.py`` (imported from it), but trained on the
importance-weighted bound of Burda et al. (2016), with K = 8 draws from the encoder:

    IWELBO_K(x) = E[ log (1/K) sum_k p(x, z_k) / q(z_k | x) ],   z_1..z_K ~ q(z | x) i.i.d.

    ELBO(x) = IWELBO_1(x)  <=  IWELBO_8(x)  <=  log p(x).

The bound is the same for both runs; only the gradient estimator differs:

- ``gradient="standard"``: the pathwise gradient of the program. Its signal-to-noise ratio
  for the *encoder* decays like 1/sqrt(K) as K grows (Rainforth et al. 2018).
- ``gradient="dreg"``: doubly reparameterized (Tucker et al. 2019): the score terms of the
  encoder's gradient are rewritten as pathwise terms with squared normalized weights.
  Still unbiased, without that decay.

Both runs start from the same weights with the same training key, so they differ only in
the gradient estimator (and in the random draws that follow from it).

Run:

    python examples/iwae_digits.py                  # 10000 steps per run
    python examples/iwae_digits.py --quick          # smoke test (200 steps per run)
    python examples/iwae_digits.py --steps 20000 --out results/
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import numpyro.distributions as dist
import optax

import estimax as ex

# The data, the networks, the model and the guide are those of the VAE example (this
# script's directory is on sys.path when it is run as a script).
from vae_digits import BATCH, elbo, guide, init_params, load_binary_digits, mean_estimate, model, smooth

matplotlib.use("Agg")  # write image files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

K = 8  # importance samples per digit


# ------------------------------------------------------------------------------------------
# 1. The per-digit IWELBO.
#
# `ex.objectives.iwelbo(model, guide, K)` draws K particles of *everything the guide
# samples* and weighs each by the model's joint density of *all the data it is given*.
# Given a batch of 64 digits, a particle is the 64 codes together and its weight is the
# product of 64 per-digit weights: that is the IWELBO of the batch as one observation,
# log (1/K) sum_k prod_i w_ik, a much looser bound than the IWAE's
# sum_i log (1/K) sum_k w_ik (as the batch grows, the best joint particle rarely
# contains the best code of every digit, and the bound falls back towards the ELBO).
#
# For the IWAE we want the bound of each digit separately, so we call the objective once
# per digit with `ex.vmap`, which maps over the digits and gives every lane its own random
# draws (plain `jax.vmap` would too here, since q's parameters depend on the digit, but
# `ex.vmap` does not rely on that). Each lane is the IWELBO of a batch of one digit: the
# plan shows the code as `Normal(lanes=(64, 8), batch=(1,), event=(10,))` (64 digits, 8
# particles each, a batch of one digit per lane).
# ------------------------------------------------------------------------------------------
def per_digit(objective):
    """``objective(params, x)`` of a batch of one digit, mapped over the rows of ``x``:
    returns the sum over the digits of their own bounds."""

    def total(params, x):
        one = lambda xi: objective(params, xi[None])  # a batch of one digit
        return jnp.sum(ex.vmap(one)(x))

    return total


def make_minibatch_objective(objective, n_data: int, batch: int = BATCH):
    """The per-digit mean of `objective` over a random minibatch, drawn inside the program
    (as in ``vae_digits.py``): an unbiased estimate of its mean over all digits."""
    summed = per_digit(objective)

    @ex.expectation
    def minibatch_objective(params, data):
        idx = ex.sample(dist.DiscreteUniform(0, n_data - 1).expand([batch]), name="minibatch")
        return summed(params, data[idx]) / batch

    minibatch_objective.name = f"minibatch_{objective.name}"
    return minibatch_objective


def plot(histories, finals, path):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, history) in enumerate(histories.items()):
        xs, ys = smooth(history, max(10, len(history) // 50))
        ax.plot(np.arange(len(history)), history, color=f"C{i}", alpha=0.15, lw=0.5)
        ax.plot(xs, ys, color=f"C{i}", lw=2, label=f"{name} (moving average)")
        label = f"{name}, final on all digits: {finals[name]:.2f}"
        ax.axhline(finals[name], color=f"C{i}", ls="--", lw=1, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(f"IWELBO-{K} per digit (nats)")
    ax.set_title(f"IWAE (K = {K}) on 8x8 digits: standard vs. DReG gradients")
    low = min(np.percentile(h, 2) for h in histories.values())
    high = max(max(h.max() for h in histories.values()), *finals.values())
    ax.set_ylim(low, high + 1)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# 2. Training: one ex.fit run per gradient estimator.
# ------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10_000, help="steps per run (default: 10000)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 200 steps per run")
    parser.add_argument("--out", default="out", help="directory for iwae_digits.png (default: out/)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam step size (default: 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization and the estimator")
    args = parser.parse_args(argv)
    steps = 200 if args.quick else args.steps
    if steps < 1:
        parser.error("--steps must be at least 1")

    data = load_binary_digits()
    fit_key, eval_key = jax.random.split(jax.random.PRNGKey(args.seed))
    params = init_params(args.seed)
    optimizer = optax.adam(args.lr)
    chunk = 100 if steps >= 1000 else 50
    print_every = max(chunk, (steps // 10) // chunk * chunk)

    # The same bound, two gradient estimators.
    bounds = {
        "standard": ex.objectives.iwelbo(model, guide, K),
        "dreg": ex.objectives.iwelbo(model, guide, K, gradient="dreg"),
    }
    # For the evaluation on all digits: IWELBO-8 and ELBO, each per digit.
    evaluate = {
        f"IWELBO-{K}": ex.expectation(per_digit(bounds["standard"]), name=f"iwelbo{K}_per_digit"),
        "ELBO": elbo,  # linear in the data: the batch form is already the sum of per-digit ELBOs
    }

    histories, results, timings = {}, {}, {}
    for name, bound in bounds.items():
        objective = make_minibatch_objective(bound, data.shape[0])
        print(f"=== gradient={name!r} ===")
        print(ex.explain(objective, params, data))
        start = time.perf_counter()

        def report(progress: ex.FitProgress, start=start):
            if progress.step % print_every == 0 or progress.step == steps:
                elapsed = time.perf_counter() - start
                average = progress.average
                step = progress.step
                print(f"step {step:6d}  IWELBO-{K}/digit (last {chunk}) {average:9.3f}  [{elapsed:5.1f}s]")

        # Same initial parameters, same key: the same minibatches in both runs.
        result = ex.fit(
            objective,
            params,
            data,
            optimizer=optimizer,
            steps=steps,
            key=fit_key,
            maximize=True,
            chunk=chunk,
            callback=report,
            progress=False,
        )
        timings[name] = time.perf_counter() - start
        histories[name], results[name] = result.history, result
        print(f"{result.reason} in {timings[name]:.1f}s (including compilation)\n")

    # --------------------------------------------------------------------------------------
    # 3. Results on all 1797 digits: the mean of 16 estimates of each bound, per digit.
    # --------------------------------------------------------------------------------------
    print(f"bounds per digit on all {data.shape[0]} digits (mean of 16 estimates, +- standard error):")
    print(f"{'gradient':>10}  {f'IWELBO-{K}':>18}  {'ELBO':>18}  {'time':>7}")
    finals = {}
    for name, result in results.items():
        columns = []
        for label, objective in evaluate.items():
            mean, se = mean_estimate(objective, result.params, data, eval_key)
            columns.append(f"{mean:9.3f} +- {se:5.3f}")
            if label.startswith("IWELBO"):
                finals[name] = mean
        print(f"{name:>10}  {columns[0]:>18}  {columns[1]:>18}  {timings[name]:6.1f}s")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "iwae_digits.png")
    plot(histories, finals, path)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
