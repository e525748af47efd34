"""Data hyper-cleaning: learn which training labels to trust, by a bilevel program.

Half of the training labels of scikit-learn's digits (8x8 images, 10 classes) are replaced by
a random other class. Each training example ``i`` gets a weight ``sigmoid(s_i)``; the inner
problem fits a multinomial logistic regression to the weighted training loss, and the outer
objective is the loss of that fit on a small clean validation set:

    minimize_s   CE_val( W*(s) )
    W*(s) = argmin_W  (1/n) Σ_i sigmoid(s_i) CE(W; x_i, ỹ_i) + (μ/2) ‖W‖²

``ex.argmin`` returns ``W*(s)``; ``jax.grad`` of the outer objective is the hypergradient by
implicit differentiation (Newton-CG inner solves warm-started from the previous solution,
conjugate gradients for the implicit linear system). Adam updates ``s``.

Reported, on the held-out test set: the accuracy of the weighted fit, against a fit on all
(corrupted) training data and a fit on the clean training examples only (an oracle that knows
which labels are right); and how well ``sigmoid(s_i) < 1/2`` detects the corrupted examples
(precision, recall, F1). Writes ``hyper_cleaning.png`` (outer loss per step, weights of clean
and corrupted examples).

    python examples/hyper_cleaning.py [--steps 150] [--train 1000] [--out DIR]
"""

from __future__ import annotations

import argparse
import os

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import estimax as ex  # noqa: E402

MU = 1e-3  # the inner ridge penalty
CLASSES = 10


def data(n_train: int, n_val: int, seed: int = 0):
    """Standardized digits (with an intercept column), split train / validation / test; half of
    the training labels replaced by a uniformly drawn *other* class."""
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
    x = np.c_[x, np.ones(len(x))]
    tr, va, te = slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None)
    noisy = y[tr].copy()
    corrupted = rng.random(n_train) < 0.5
    noisy[corrupted] = (noisy[corrupted] + rng.integers(1, CLASSES, corrupted.sum())) % CLASSES
    return (jnp.asarray(x[tr]), jnp.asarray(noisy), corrupted, jnp.asarray(x[va]), jnp.asarray(y[va]),
            jnp.asarray(x[te]), jnp.asarray(y[te]), y[tr])


def cross_entropy(w, x, labels):
    logits = x @ w
    return jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]


def weighted_fit(w, weights, x, labels):
    """The inner objective: the weighted training loss and a ridge penalty."""
    return jnp.mean(weights * cross_entropy(w, x, labels)) + 0.5 * MU * jnp.sum(w**2)


INNER = ex.solvers.Newton(linear_solver="cg")


def fit(weights, x, labels, init):
    return ex.argmin(weighted_fit, init, weights, x, labels, solver=INNER, linear_solver="cg", name="fit")


def accuracy(w, x, labels):
    return float(jnp.mean(jnp.argmax(x @ w, axis=1) == labels))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="outer Adam steps (default 150)")
    parser.add_argument("--train", type=int, default=1000, help="training examples (default 1000)")
    parser.add_argument("--val", type=int, default=300, help="clean validation examples (default 300)")
    parser.add_argument("--lr", type=float, default=0.3, help="Adam's learning rate for the weights' logits")
    parser.add_argument("--out", default=os.path.join("out", "hyper_cleaning"),
                        help="where to write hyper_cleaning.png (default: out/hyper_cleaning)")
    args = parser.parse_args(argv)

    x_tr, y_noisy, corrupted, x_va, y_va, x_te, y_te, y_true = data(args.train, args.val)
    dim = (x_tr.shape[1], CLASSES)
    w0 = jnp.zeros(dim)

    def outer(s, init):
        w = fit(jax.nn.sigmoid(s), x_tr, y_noisy, init)
        return jnp.mean(cross_entropy(w, x_va, y_va)), w

    optimizer = optax.adam(args.lr)

    @jax.jit
    def step(s, opt_state, w_prev):
        (loss, w), g = jax.value_and_grad(outer, has_aux=True)(s, w_prev)
        updates, opt_state = optimizer.update(g, opt_state, s)
        return optax.apply_updates(s, updates), opt_state, w, loss

    print(ex.explain(lambda s: outer(s, w0)[0], jnp.zeros(args.train)))
    s = jnp.zeros(args.train)  # every weight 1/2 at the start
    opt_state, w, losses = optimizer.init(s), w0, []
    for k in range(args.steps):
        s, opt_state, w, loss = step(s, opt_state, w)
        losses.append(float(loss))
        if k % max(1, args.steps // 10) == 0 or k == args.steps - 1:
            print(f"step {k:4d}  validation loss {float(loss):.4f}")

    weights = np.asarray(jax.nn.sigmoid(s))
    cleaned = fit(jnp.asarray(weights), x_tr, y_noisy, w)
    everything = fit(jnp.ones(args.train), x_tr, y_noisy, w0)
    clean = jnp.asarray((~corrupted).astype(np.float64))
    oracle = fit(clean, x_tr, y_noisy, w0)  # the clean examples only (their labels are the true ones)
    flagged = weights < 0.5
    tp = int(np.sum(flagged & corrupted))
    precision = tp / max(1, int(flagged.sum()))
    recall = tp / max(1, int(corrupted.sum()))
    f1 = 2 * precision * recall / max(1e-12, precision + recall)
    print(f"\n{int(corrupted.sum())} of {args.train} training labels corrupted; {args.steps} outer steps")
    print(f"test accuracy, hyper-cleaned weights:        {accuracy(cleaned, x_te, y_te):.3f}")
    print(f"test accuracy, all training data (corrupted): {accuracy(everything, x_te, y_te):.3f}")
    print(f"test accuracy, clean training subset only:    {accuracy(oracle, x_te, y_te):.3f}")
    print(f"detecting corrupted labels (weight < 1/2): precision {precision:.3f}, recall {recall:.3f}, F1 {f1:.3f}")
    del y_true

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(losses)
    a.set(xlabel="outer step", ylabel="validation loss", title="outer objective")
    b.hist([weights[~corrupted], weights[corrupted]], bins=30, label=["clean", "corrupted"])
    b.set(xlabel="weight sigmoid(s_i)", ylabel="examples", title="learned weights")
    b.legend()
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    fig.savefig(os.path.join(args.out, "hyper_cleaning.png"), dpi=120)
    print(f"wrote {os.path.join(args.out, 'hyper_cleaning.png')}")


if __name__ == "__main__":
    main()
