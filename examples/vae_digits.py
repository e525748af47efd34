"""A variational autoencoder on the 8x8 digits, trained by maximizing the ELBO with estimax.

The data are scikit-learn's 1797 handwritten digits (8x8 images, pixel values 0..16),
binarized at ``pixel > 7``: 64 binary pixels per image, nothing downloaded. The model:

    z   ~ Normal(0, I_10)                               (latent code, 10 dimensions)
    x_j ~ Bernoulli(sigmoid(decoder(z)_j))   j = 1..64  (pixels)

with an MLP decoder (10 -> 128 -> 64). The variational posterior (the guide) is amortized:

    q(z | x) = Normal(mu(x), sigma(x))                  (MLP encoder 64 -> 128 -> 2 x 10)

Decoder and encoder are fitted together by maximizing the evidence lower bound

    ELBO(x) = E_q[log p(x, z) - log q(z | x)]  <=  log p(x).

The model is an ordinary NumPyro model and the guide an estimax program; the objective
``ex.objectives.elbo(model, guide)`` is itself a program, which we wrap in one more program
that draws a random minibatch of 64 digits per step. ``ex.fit`` runs Adam on it.

Run:

    python examples/vae_digits.py                   # 10000 steps
    python examples/vae_digits.py --quick           # smoke test (300 steps)
    python examples/vae_digits.py --steps 20000 --out results/
"""

from __future__ import annotations

import argparse
import os
import time

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

LATENT = 10  # dimensions of z
HIDDEN = 128  # hidden units of both MLPs
BATCH = 64  # digits per minibatch


# ------------------------------------------------------------------------------------------
# 1. Data: the 1797 digits shipped with scikit-learn, binarized.
# ------------------------------------------------------------------------------------------
def load_binary_digits() -> jax.Array:
    """``(1797, 64)`` float32 array of 0/1 pixels (``pixel > 7`` on the 0..16 scale)."""
    images = load_digits().data  # (1797, 64), values 0..16
    return jnp.asarray(images > 7, jnp.float32)


# ------------------------------------------------------------------------------------------
# 2. Networks: two-layer MLPs in plain jax.numpy. Parameters are nested dicts of arrays,
#    so they are pytrees that optax (and estimax's gradients) handle directly.
# ------------------------------------------------------------------------------------------
def init_linear(rng: np.random.Generator, n_in: int, n_out: int) -> dict:
    """A dense layer with LeCun-normal weights and zero biases."""
    w = rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)
    return {"w": jnp.asarray(w, jnp.float32), "b": jnp.zeros(n_out, jnp.float32)}


def init_mlp(rng: np.random.Generator, sizes) -> list:
    return [init_linear(rng, a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]


def mlp(layers, x):
    """``tanh`` hidden layers, linear output."""
    for layer in layers[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    last = layers[-1]
    return x @ last["w"] + last["b"]


def init_params(seed: int) -> dict:
    """Initial weights, drawn with NumPy from `seed`: a one-off, so there is nothing to gain
    from compiling it (on XLA:CPU, compiling a random draw costs about a second per shape)."""
    rng = np.random.default_rng(seed)
    return {
        # encoder: 64 pixels -> hidden -> (mean, log standard deviation) of q(z | x)
        "enc": init_mlp(rng, [64, HIDDEN, 2 * LATENT]),
        # decoder: z -> hidden -> 64 pixel logits
        "dec": init_mlp(rng, [LATENT, HIDDEN, 64]),
    }


def encode(params, x):
    """The parameters of q(z | x): ``(loc, log_scale)``, each ``(batch, LATENT)``."""
    out = mlp(params["enc"], x)
    return out[..., :LATENT], out[..., LATENT:]


def decode(params, z):
    """Pixel logits of p(x | z), ``(batch, 64)``."""
    return mlp(params["dec"], z)


# ------------------------------------------------------------------------------------------
# 3. Model and guide.
#
# The model is plain NumPyro: `numpyro.sample` for the latent, `obs=` for the pixels. The
# guide is an estimax program: its `ex.sample` site carries the same name as the model's
# latent ("z"), which is how the objective pairs them up. Normal has a reparameterized
# sampler (z = loc + scale * eps), which estimax uses by default -- the pathwise gradient.
# ------------------------------------------------------------------------------------------
def model(params, x):
    with numpyro.plate("digits", x.shape[0]):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([LATENT]).to_event(1))
        numpyro.sample("x", dist.Bernoulli(logits=decode(params, z)).to_event(1), obs=x)


def guide(params, x):
    loc, log_scale = encode(params, x)
    return ex.sample(dist.Normal(loc, jnp.exp(log_scale)).to_event(1), name="z")


# The ELBO of a batch of digits: E_q[log p(x, z) - log q(z | x)], summed over the batch.
# It is an @ex.expectation program of (params, x); estimax compiles its gradient estimator.
elbo = ex.objectives.elbo(model, guide)


def make_minibatch_objective(n_data: int, batch: int = BATCH):
    """The per-digit ELBO of a random minibatch: an unbiased estimate of the mean ELBO over
    the whole data set (doubly stochastic: random digits *and* random z).

    `ex.fit` calls the objective with the same arguments at every step and hands the
    program a fresh key each time, so the minibatch is drawn inside the program, as one
    more random choice (`batch` indices, uniform with replacement). Its distribution does
    not depend on the parameters, so it contributes no gradient term of its own: `explain`
    lists it with strategy `none` (no parameters: no gradient).
    """

    @ex.expectation
    def minibatch_elbo(params, data):
        idx = ex.sample(dist.DiscreteUniform(0, n_data - 1).expand([batch]), name="minibatch")
        return elbo(params, data[idx]) / batch  # nats per digit

    return minibatch_elbo


# ------------------------------------------------------------------------------------------
# Evaluation and plotting helpers.
# ------------------------------------------------------------------------------------------
def mean_estimate(objective, params, data, key, n_estimates: int = 16) -> tuple[float, float]:
    """An objective on all digits, per digit: the mean of `n_estimates` independent
    estimates (`.estimate` is the jitted unbiased estimator) and its standard error.

    The estimates are taken one at a time: each covers all 1797 digits already, and a loop
    reuses one compiled estimator where `jax.vmap` over keys would compile a larger one."""
    keys = jax.random.split(key, n_estimates)
    values = np.array([float(objective.estimate(k, params, data)) for k in keys]) / data.shape[0]
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(n_estimates))


def smooth(values, window: int):
    window = max(1, min(window, len(values)))
    return np.arange(window - 1, len(values)), np.convolve(values, np.ones(window) / window, mode="valid")


def reconstruct(params, x):
    """Pixel probabilities of the decoder at the encoder's mean code."""
    loc, _ = encode(params, x)
    return jax.nn.sigmoid(decode(params, loc))


def montage(rows, gap: int = 1):
    """One image of 8x8 digits: ``rows`` is a list of ``(n, 64)`` arrays, one per row."""
    n = rows[0].shape[0]
    out = np.ones((len(rows) * (8 + gap) - gap, n * (8 + gap) - gap)) * 0.5
    for r, row in enumerate(rows):
        for i in range(n):
            out[r * (8 + gap) : r * (8 + gap) + 8, i * (8 + gap) : i * (8 + gap) + 8] = row[i].reshape(8, 8)
    return out


def plot(history, final_elbo, params, data, path):
    fig, (ax, ax_img) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [1.6, 1]})
    steps = np.arange(len(history))
    ax.plot(steps, history, color="C0", alpha=0.25, lw=0.6, label="minibatch estimate")
    xs, ys = smooth(history, max(10, len(history) // 50))
    ax.plot(xs, ys, color="C0", lw=2, label="moving average")
    ax.axhline(final_elbo, color="k", ls="--", lw=1, label=f"final, all digits: {final_elbo:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO per digit (nats)")
    ax.set_title("VAE on 8x8 digits: ELBO during training")
    low = np.percentile(history, 2)
    ax.set_ylim(low, max(history.max(), final_elbo) + 1)
    ax.legend(loc="lower right")

    # Ten digits, each above the decoder's pixel probabilities at the digit's mean code.
    shown = np.asarray(data[:10])
    recon = np.asarray(reconstruct(params, shown))
    rows = [shown[:5], recon[:5], shown[5:], recon[5:]]
    ax_img.imshow(montage(rows), cmap="gray_r", vmin=0, vmax=1)
    ax_img.set_xticks([])
    ax_img.set_yticks([3.5 + 9 * r for r in range(4)], ["data", "reconstruction"] * 2)
    ax_img.set_title("digits and their reconstructions")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# 4. Training.
# ------------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10_000, help="optimization steps (default: 10000)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 300 steps")
    parser.add_argument("--out", default="out", help="directory for vae_digits.png (default: out/)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam step size (default: 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization and the estimator")
    args = parser.parse_args(argv)
    steps = 300 if args.quick else args.steps
    if steps < 1:
        parser.error("--steps must be at least 1")

    data = load_binary_digits()
    fit_key, eval_key = jax.random.split(jax.random.PRNGKey(args.seed))
    params = init_params(args.seed)
    objective = make_minibatch_objective(data.shape[0])

    # The estimator plan: one site for the minibatch, one for the (vector) latent z.
    print(ex.explain(objective, params, data))
    print()

    # ex.fit runs the steps in compiled chunks (one lax.scan each); step i draws its own key
    # from `fit_key`, which picks that step's minibatch and its z. The callback prints
    # progress between chunks.
    chunk = 100 if steps >= 1000 else 50
    print_every = max(chunk, (steps // 10) // chunk * chunk)
    start = time.perf_counter()

    def report(progress: ex.FitProgress):
        if progress.step % print_every == 0 or progress.step == steps:
            elapsed = time.perf_counter() - start
            step, average = progress.step, progress.average
            print(f"step {step:6d}  ELBO/digit (last {chunk} steps) {average:9.3f}  [{elapsed:5.1f}s]")

    result = ex.fit(
        objective,
        params,
        data,
        optimizer=optax.adam(args.lr),
        steps=steps,
        key=fit_key,
        maximize=True,
        chunk=chunk,
        callback=report,
        progress=False,
    )
    elapsed = time.perf_counter() - start

    # --------------------------------------------------------------------------------------
    # 5. Results: the ELBO of all 1797 digits under the trained networks.
    # --------------------------------------------------------------------------------------
    final, se = mean_estimate(elbo, result.params, data, eval_key)
    initial, _ = mean_estimate(elbo, params, data, eval_key)
    print()
    print(f"{result.reason} in {elapsed:.1f}s (including compilation)")
    print(f"ELBO per digit on all {data.shape[0]} digits (mean of 16 estimates):")
    print(f"  at initialization: {initial:9.3f}")
    print(f"  after training:    {final:9.3f} +- {se:.3f} (standard error)")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "vae_digits.png")
    plot(result.history, final, result.params, data, path)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
