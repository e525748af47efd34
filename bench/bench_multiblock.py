"""Multi-block bilevel benchmark: BSVRB's parallel speedup as more blocks are sampled per step.

What it measures
----------------
Hyperparameter optimization shared by many logistic-regression tasks: the 45 one-vs-one digit
pairs of scikit-learn's digits (8x8 images, pixels scaled to [0, 1], plus an intercept).
Each task (block) ``i`` has its own training and validation images (``--per-block`` of each
pair's images, split in halves; every pair has at least 340 images). One hyperparameter,
a log-penalty ``x``, is shared by all tasks:

    minimize_x  F(x) = (1/45) Σ_i  val_loss_i( y_i*(x) )
    y_i*(x) = argmin_y  train_loss_i(y) + (1/2) (μ₀ + exp(x)) ‖y‖²,   μ₀ = 0.01

with logistic losses (30% of the training labels flipped; the floor ``μ₀`` keeps every inner
problem well conditioned: without it, at the best penalty (about e^-5) stochastic inner steps
converge so slowly that the tracked hypergradient is biased and ``x`` drifts past ``x*``).
The deterministic reference: ``F`` and its gradient exactly, every
task's inner problem solved by ``ex.argmin`` (Newton, implicit differentiation, the 45 tasks
in one ``jax.vmap``), and ``x*`` by ``ex.solve(..., solver=ex.solvers.Newton())`` from the best point of a grid on [-12, 4], to
``|F'| <= 1e-9``; ``F*`` the lower of ``F(x*)`` and the grid's best (with the penalty floor ``MU0``
the best penalty can be the floor alone: ``F`` then decreases toward the grid's end).

Then ``ex.solve_multiblock`` with ``ex.solvers.BSVRB(version=2, blocks=I, batch=B)`` for
``I = 1, 3, 9, 45`` from ``x = 0``, ``y_i = 0``, with the outer step ``lr = lr0 * sqrt(I)``
(``--lr0``; larger batches of blocks average more noise away, so they take larger steps).
Every ``--every`` steps the exact ``F`` is evaluated at the current ``x``. Reported per ``I``:
the first recorded step where ``F(x) - F* <= 1e-3`` (``--target``) and stays there for the
rest of the run (``steps``), the samples processed by then in epochs (one epoch: as many
per-block samples as all tasks' training and validation data hold), the wall time to that
point (compiled loop only; evaluations excluded), the final gap, and the speedup in steps
and in time against ``I = 1``.

    python bench/bench_multiblock.py               # about 2.5 minutes on 2 CPU cores
    python bench/bench_multiblock.py --quick       # I = 1 and 9, 4000 steps

The script exits 0 whatever the numbers are.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import itertools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import estimax as ex  # noqa: E402


FLIP = 0.3  # the fraction of training labels flipped: without noise the pairs are separable and
# the best penalty is essentially zero (x* = -11 when tried), a flat and uninteresting outer problem


MU0 = 0.01  # a floor under the penalty: every inner problem stays well conditioned (strongly convex)


def tasks(per_block: int):
    """The 45 one-vs-one digit pairs: for each, ``per_block`` images (the first of the pair's,
    in a fixed shuffled order), half for training (``FLIP`` of their labels flipped) and half
    for validation; labels ±1."""
    x, y = load_digits(return_X_y=True)
    x = np.c_[x / 16.0, np.ones(len(x))]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    train_a, train_b, val_a, val_b = [], [], [], []
    for i, j in itertools.combinations(range(10), 2):
        keep = np.flatnonzero((y == i) | (y == j))[:per_block]
        if keep.size < per_block:
            raise ValueError(f"pair {i}-{j} has only {keep.size} images; lower --per-block")
        labels = np.where(y[keep] == i, 1.0, -1.0)
        half = per_block // 2
        noisy = labels[:half] * np.where(rng.random(half) < FLIP, -1.0, 1.0)  # flipped training labels
        train_a.append(x[keep[:half]]), train_b.append(noisy)
        val_a.append(x[keep[half:2 * half]]), val_b.append(labels[half:2 * half])
    inner_data = {"a": jnp.asarray(np.stack(train_a)), "b": jnp.asarray(np.stack(train_b))}
    outer_data = {"a": jnp.asarray(np.stack(val_a)), "b": jnp.asarray(np.stack(val_b))}
    return inner_data, outer_data


def logistic(y, batch):
    return jnp.mean(jnp.logaddexp(0.0, -batch["b"] * (batch["a"] @ y)))


def inner(y, x, batch):
    return logistic(y, batch) + 0.5 * (MU0 + jnp.exp(x[0])) * jnp.sum(y**2)


def outer(x, y, batch):
    del x
    return logistic(y, batch)


def exact_objective(inner_data, outer_data, dim):
    """``F(x)``, every task solved exactly (``ex.argmin`` under ``jax.vmap``)."""

    def block(a, b, va, vb, x):
        y, info = ex.argmin(inner, jnp.zeros(dim), x, {"a": a, "b": b}, tol=1e-10, max_steps=200, throw=False,
                            full_output=True)
        return jnp.where(info.result == 0, outer(x, y, {"a": va, "b": vb}), jnp.nan)  # NaN: not solved

    def objective(x):
        return jnp.mean(jax.vmap(lambda a, b, va, vb: block(a, b, va, vb, x))(
            inner_data["a"], inner_data["b"], outer_data["a"], outer_data["b"]))

    return objective


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="I = 1 and 9 only, 4000 steps")
    parser.add_argument("--blocks", default="1,3,9,45", help="the values of I (default 1,3,9,45)")
    parser.add_argument("--steps", type=int, default=20000, help="BSVRB steps per run (default 20000)")
    parser.add_argument("--batch", type=int, default=16, help="samples per sampled block (default 16)")
    parser.add_argument("--lr0", type=float, default=0.1, help="outer step for I = 1 (default 0.1)")
    parser.add_argument("--inner-lr", type=float, default=0.05,
                        help="BSVRB's inner_lr and system_lr (default 0.05)")
    parser.add_argument("--per-block", type=int, default=340, help="images per task (default 340)")
    parser.add_argument("--every", type=int, default=200, help="steps between exact evaluations (default 200)")
    parser.add_argument("--target", type=float, default=1e-3, help="the gap F - F* to reach (default 1e-3)")
    args = parser.parse_args(argv)
    blocks = [1, 9] if args.quick else [int(b) for b in args.blocks.split(",")]
    steps = 4000 if args.quick else args.steps

    print(f"estimax {ex.__version__} | jax {jax.__version__} | {os.cpu_count()} CPUs | float64")
    inner_data, outer_data = tasks(args.per_block)
    m, n_half, dim = inner_data["a"].shape
    print(f"{m} tasks (one-vs-one digit pairs), {n_half} training + {n_half} validation images each, "
          f"{dim} weights; x: one log-penalty shared by all tasks")

    objective = exact_objective(inner_data, outer_data, dim)
    f_exact = jax.jit(objective)
    t0 = time.perf_counter()
    grid = np.linspace(-12.0, 4.0, 65)  # the start of Newton: the best point of a grid
    values = [float(f_exact(jnp.array([g]))) for g in grid]
    start = grid[int(np.argmin(values))]
    ref = ex.solve(objective, jnp.array([start]), solver=ex.solvers.Newton(), tol=1e-9, max_steps=100)
    f_star = min(float(f_exact(ref.params)), min(values))
    if start == grid[0]:
        print(f"(F decreases toward the grid's lower end: its infimum over x >= {grid[0]:g} is the reference; "
              f"F({grid[0]:g}) - F({grid[1]:g}) = {values[0] - values[1]:.1e})")
    print(f"reference: ex.solve(Newton) on the exact F: {ref}; F* = {f_star:.10f}, "
          f"x* = {float(ref.params[0]):.4f} ({time.perf_counter() - t0:.1f} s with compilation); "
          f"F(0) - F* = {float(f_exact(jnp.zeros(1))) - f_star:.4f}")

    epoch = m * 2 * n_half  # samples in all tasks' data
    rows = []
    for i_blocks in blocks:
        solver = ex.solvers.BSVRB(blocks=i_blocks, batch=args.batch, version=2, lr=args.lr0 * np.sqrt(i_blocks),
                                  inner_lr=args.inner_lr, system_lr=args.inner_lr)
        sol = ex.solve_multiblock(outer, inner, jnp.zeros(1), jnp.zeros(dim), outer_data, inner_data, solver=solver,
                                  max_steps=steps, record_every=args.every, evaluate=f_exact, key=jax.random.PRNGKey(0))
        trace = np.array(sol.stats["trace"])
        if np.isnan(trace[:, 1]).any():
            print(f"  (I = {i_blocks}: some exact evaluations failed, at x = {float(sol.params[0][0]):.3g} at the end)")
        gaps = trace[:, 1] - f_star
        above = np.flatnonzero(gaps > args.target)
        first = None if above.size and above[-1] == len(gaps) - 1 else int(trace[above[-1] + 1, 0] if above.size else 0)
        per_step = sol.stats["solve_s"] / steps
        rows.append((i_blocks, first, gaps[-1], per_step))
        samples = None if first is None else first * i_blocks * 2 * args.batch
        print(f"I = {i_blocks:2d}: lr {args.lr0 * np.sqrt(i_blocks):.3g}; "
              + (f"gap <= {args.target:g} from step {first} on ({samples / epoch:.2f} epochs, "
                 f"{first * per_step:.2f} s)" if first is not None else f"gap never stays <= {args.target:g}")
              + f"; final gap {gaps[-1]:.2e}; {1e3 * per_step:.3f} ms/step; compile {sol.stats['compile_s']:.1f} s",
              flush=True)

    base = rows[0]
    print("\nI    steps to target   speedup (steps)   speedup (time)   final gap")
    for i_blocks, first, final, per_step in rows:
        if first is None or base[1] is None:
            print(f"{i_blocks:<4d} {'-' if first is None else first:>15}   {'-':>15}   {'-':>14}   {final:.2e}")
            continue
        print(f"{i_blocks:<4d} {first:>15d}   {base[1] / max(first, 1):>14.2f}x   "
              f"{(base[1] * base[3]) / max(first * per_step, 1e-12):>13.2f}x   {final:.2e}")


if __name__ == "__main__":
    main()
