"""Rate-constrained classification: a constraint in expectation, solved stochastically.

A linear classifier of scikit-learn's breast-cancer data (569 tumours, 30 standardized
features; label 1 = malignant) minimizes the logistic loss subject to a bound on its
*smoothed false-negative rate* -- the mean of ``sigmoid(-margin)`` over the malignant cases,
a differentiable stand-in for the fraction of them it misses:

    minimize    E_batch[ log(1 + exp(-y xᵀa)) ]           over the weights x
    subject to  E_batch+[ sigmoid(-xᵀa) ] <= 0.02            (malignant cases only)

Both sides are expectations over random minibatches (``ex.sample`` of data indices), so
the problem is one for ``StochasticLagrangian``: gradient descent-ascent on the augmented
Lagrangian with unbiased gradient estimates (the constraint's value and its Jacobian come
from independent minibatches). The same problem on the full data is deterministic, and
``AugmentedLagrangian`` solves it to a KKT residual of 1e-8: the reference the stochastic
run is measured against.

Prints the objective and the constraint over the steps, both solutions and their distance;
writes ``constrained_classification.png`` (objective and constraint violation per step).

    python examples/constrained_classification.py [--steps 4000] [--batch 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import os

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_breast_cancer  # noqa: E402

import estimax as ex  # noqa: E402

RATE = 0.02  # the bound on the smoothed false-negative rate (unconstrained: 0.048)


def data():
    features, labels = load_breast_cancer(return_X_y=True)
    features = (features - features.mean(0)) / features.std(0)
    malignant = (labels == 0).astype(np.float64)  # scikit-learn codes malignant as 0
    a = jnp.asarray(np.c_[features, np.ones(len(features))])  # with an intercept
    y = jnp.asarray(2.0 * malignant - 1.0)
    return a, y, jnp.asarray(np.flatnonzero(malignant))


def loss(x, a, y):
    return jnp.mean(jnp.logaddexp(0.0, -y * (a @ x)))


def missed(x, a_pos):
    return jnp.mean(jax.nn.sigmoid(-(a_pos @ x)))


@ex.expectation
def full_batch(x, a, y, positives):
    ex.subject_to(le=missed(x, a[positives]) - RATE, name="false_negatives")
    return loss(x, a, y) + 1e-3 * jnp.sum(x**2)


def minibatch(batch: int):
    @ex.expectation
    def program(x, a, y, positives):
        n, n_pos = a.shape[0], positives.shape[0]
        i = ex.sample(dist.Categorical(logits=jnp.zeros(n)).expand([batch]), name="batch")
        j = ex.sample(dist.Categorical(logits=jnp.zeros(n_pos)).expand([batch]), name="positive_batch")
        ex.subject_to(le=missed(x, a[positives[j]]) - RATE, name="false_negatives")
        return loss(x, a[i], y[i]) + 1e-3 * jnp.sum(x**2)

    return program


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default=os.path.join("out", "constrained_classification"))
    args = parser.parse_args(argv)
    a, y, positives = data()
    x0 = jnp.zeros(a.shape[1])

    exact = ex.solve(full_batch, x0, a, y, positives, solver=ex.solvers.AugmentedLagrangian(), tol=1e-8)
    print(f"full data, AugmentedLagrangian: {exact}")
    print(f"  loss {float(loss(exact.params, a, y)):.5f}, smoothed FNR {float(missed(exact.params, a[positives])):.5f} "
          f"(bound {RATE}), multiplier {float(exact.multipliers['false_negatives']):.4f}")

    solver = ex.solvers.StochasticLagrangian(optimizer=optax.adam(optax.cosine_decay_schedule(0.05, args.steps, 0.01)),
                                             dual_lr=1.0, rho=10.0)
    sol = ex.solve(minibatch(args.batch), x0, a, y, positives, solver=solver, max_steps=args.steps,
                   key=jax.random.PRNGKey(0))
    x = sol.params
    print(f"minibatches of {args.batch}, StochasticLagrangian, {sol.steps} steps: {sol.result.name}")
    print(f"  loss {float(loss(x, a, y)):.5f}, smoothed FNR {float(missed(x, a[positives])):.5f}, multiplier "
          f"{float(sol.multipliers['false_negatives']):.4f}")
    gap = float(jnp.linalg.norm(x - exact.params) / jnp.linalg.norm(exact.params))
    print(f"  relative distance to the full-data solution: {gap:.3g}")
    print("objective and constraint (moving averages) along the run:")
    for k in np.unique(np.linspace(0, sol.steps, 9).astype(int)):
        print(f"  step {k:5d}: objective {sol.history['value'][k]:.5f}, violation {sol.history['infeasibility'][k]:.5f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    os.makedirs(args.out, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(sol.history["value"], label="stochastic (moving average)")
    left.axhline(exact.value, color="k", ls="--", label="full-data optimum")
    left.set_xlabel("step"), left.set_ylabel("objective"), left.legend()
    right.semilogy(np.maximum(sol.history["infeasibility"], 1e-6))
    right.set_xlabel("step"), right.set_ylabel("constraint violation (moving average)")
    fig.tight_layout()
    path = os.path.join(args.out, "constrained_classification.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
