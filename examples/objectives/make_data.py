"""Write the data of the example objective files: ``data/<example>.npz``, one array per
``data`` declaration (generated with a fixed seed; nothing is downloaded).

    python examples/objectives/make_data.py              # into examples/objectives/data/
    python examples/objectives/make_data.py --out DIR
"""

from __future__ import annotations

import argparse
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def datasets(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """The arrays of each example that declares data, by the example's name."""
    rng = np.random.default_rng(seed)
    f32 = np.float32

    # gaussian_mean, expect, iwae_bound, resampling: 20 draws around 1.5
    x = rng.normal(1.5, 1.0, size=20).astype(f32)

    # regression: y = X w + noise, 3 features
    X = rng.normal(size=(50, 3)).astype(f32)
    y = (X @ np.array([1.0, -2.0, 0.5]) + rng.normal(0.0, 0.3, size=50)).astype(f32)

    # imports: a smooth curve with Student-t noise
    t = np.linspace(-3.0, 3.0, 40).astype(f32)
    curve = (np.sin(1.5 * t) + 0.3 * t + 0.2 * rng.standard_t(4, size=40)).astype(f32)

    # expressions: points with binary labels
    points = rng.normal(size=30).astype(f32)
    labels = (points + 0.5 * rng.normal(size=30) > 0).astype(np.int32)

    baseline = rng.normal(size=16).astype(f32)

    # hierarchical: x_i ~ Normal(z², 0.5²) with z = ±1.2 (two posterior modes)
    squares = (1.44 + 0.5 * rng.normal(size=10)).astype(f32)

    # robust_regression, tilted_regression: y = 1 + 2 x + noise, with 8 of 60 points shifted up by 6 to 10
    rx = rng.uniform(-2.0, 2.0, size=60).astype(f32)
    ry = 1.0 + 2.0 * rx + rng.normal(0.0, 0.3, size=60)
    ry[np.argsort(rx)[-8:]] += rng.uniform(6.0, 10.0, size=8)  # at the right end: they tilt the line
    ry = ry.astype(f32)

    # portfolio: 250 days of returns of 5 assets, in percent; two of them poor
    drift = np.array([0.25, 0.15, 0.05, -0.05, -0.1])
    vol = np.array([2.0, 1.5, 1.0, 1.2, 1.8])
    returns = (drift + vol * rng.standard_t(5, size=(250, 5)) * np.sqrt(3 / 5)).astype(f32)

    # ridge_tuning: 8 features, the last 4 irrelevant; few training points, many held out
    w_true = np.array([1.5, -1.0, 0.8, 0.5, 0.0, 0.0, 0.0, 0.0])
    Xr, Xr_val = rng.normal(size=(40, 8)), rng.normal(size=(400, 8))
    yr = Xr @ w_true + rng.normal(0.0, 1.0, size=40)
    yr_val = Xr_val @ w_true + rng.normal(0.0, 1.0, size=400)

    return {
        "ridge_tuning": {"X": Xr.astype(f32), "y": yr.astype(f32), "X_val": Xr_val.astype(f32),
                         "y_val": yr_val.astype(f32)},
        "portfolio": {"R": returns},
        "gaussian_mean": {"x": x},
        "resampling": {"x": x},
        "hierarchical": {"x": squares},
        "robust_regression": {"x": rx, "y": ry},
        "tilted_regression": {"x": rx, "y": ry},
        "expect": {"x": x},
        "iwae_bound": {"x": x},
        "regression": {"X": X, "y": y},
        "imports": {"t": t, "y": curve},
        "baseline": {"x": baseline},
        "expressions": {"x": points, "label": labels},
    }


def write(out: str, seed: int = 0) -> dict[str, str]:
    """Write every example's ``.npz`` into ``out``; the paths, by the example's name."""
    os.makedirs(out, exist_ok=True)
    paths = {}
    for name, arrays in datasets(seed).items():
        paths[name] = os.path.join(out, f"{name}.npz")
        np.savez(paths[name], **arrays)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default=os.path.join(HERE, "data"), help="output folder (default: data/ here)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data (default: 0)")
    args = parser.parse_args(argv)
    for name, path in write(args.out, args.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
