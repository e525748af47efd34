"""The problems of ``bench_constrained.py``, as plain JAX functions.

A :class:`Case` is one constrained problem, written once and handed to every solver:

    minimize f(x)  subject to  eq(x) = 0,  le(x) <= 0,  lower <= x <= upper

with ``x`` a flat float64 vector. ``f`` returns a scalar, ``eq`` and ``le`` a vector (or are
``None``), ``bounds`` is ``None`` or a ``(lower, upper)`` pair of vectors. The benchmark
turns the bounds into ``le`` rows for the solvers that take no bounds, and passes them to
scipy natively.

Nothing here is traced or compiled at import; the functions need ``jax_enable_x64`` on
before they are called (``bench_constrained.py`` sets it first thing).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
import types
from typing import Callable

import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUTEST_CSV = os.path.join(REPO, "bench", "reference", "cutest_equality.csv")  # vendored: facts, see its README


@dataclasses.dataclass
class Case:
    name: str
    x0: np.ndarray
    f: Callable
    eq: Callable | None = None
    le: Callable | None = None
    bounds: tuple | None = None
    f_ref: float = float("nan")
    x_ref: np.ndarray | None = None  # the exact solution, where one is known
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.x0.size)

    def m_eq(self) -> int:
        return 0 if self.eq is None else int(np.size(self.eq(jnp.asarray(self.x0))))

    def m_le(self) -> int:
        return 0 if self.le is None else int(np.size(self.le(jnp.asarray(self.x0))))

    def le_with_bounds(self) -> Callable | None:
        """``le`` with the finite bounds appended as rows ``lower - x <= 0``, ``x - upper <= 0``."""
        if self.bounds is None:
            return self.le
        lower, upper = (np.asarray(b, float) for b in self.bounds)
        lo, hi = np.flatnonzero(np.isfinite(lower)), np.flatnonzero(np.isfinite(upper))
        le = self.le

        def rows(x):
            parts = [] if le is None else [jnp.ravel(le(x))]
            parts += [lower[lo] - x[lo], x[hi] - upper[hi]]
            return jnp.concatenate(parts)

        return rows


# ============================================================================================
# 1. CUTEst equality problems (sif2jax)
# ============================================================================================
def read_cutest_reference(path: str | None = None) -> list[dict]:
    """The rows of ``cutest_equality.csv`` (default :data:`CUTEST_CSV`): problem, n, m,
    reference_f and the two scipy iteration counts, with numbers converted."""
    path = CUTEST_CSV if path is None else path
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"the CUTEst reference table is missing: expected {path} (bench/reference/ in the "
            "repository). Run the other sections with --sections."
        )
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        out.append(dict(problem=r["problem"], n=int(r["n"]), m=int(r["m"]),
                        reference_f=float(r["reference_f"]),
                        ref_trust_constr=int(r["trust_constr_iters_to_kkt_1e-6"]),
                        ref_slsqp=int(r["slsqp_iters_to_kkt_1e-6"])))
    return out


_SLOW_MODULE = "sif2jax.cutest._constrained_minimisation.cleuven7"


def import_sif2jax():
    """``sif2jax.cutest``, imported without its one very slow module.

    Importing ``sif2jax`` imports and instantiates every problem it has. One of them,
    CLEUVEN7 (a 360-variable QP, not an equality problem), builds its constraint matrix at
    import time with one JAX ``.at[].add`` call per nonzero: about 3 minutes on 2 CPU cores
    with sif2jax 0.0.8, against about 20 s for all the others together. Unless sif2jax is
    already imported, an empty stand-in takes that module's place (its problem is then
    unusable in this process); every other problem is the package's own.
    """
    if "sif2jax.cutest" not in sys.modules and _SLOW_MODULE not in sys.modules:
        stand_in = types.ModuleType(_SLOW_MODULE)

        class CLEUVEN7:  # noqa: N801  (the stand-in for the class of that name)
            """Stand-in (see ``constrained_cases.import_sif2jax``): not usable."""

        stand_in.CLEUVEN7 = CLEUVEN7
        sys.modules[_SLOW_MODULE] = stand_in
    import sif2jax.cutest

    return sif2jax.cutest


def cutest_case(row: dict) -> Case:
    """The sif2jax problem ``row["problem"]`` from its standard starting point ``y0``."""
    prob = import_sif2jax().get_problem(row["problem"])
    if prob is None:
        raise KeyError(f"sif2jax has no problem named {row['problem']!r}")
    args = prob.args
    y0 = np.asarray(prob.y0, dtype=np.float64)
    if y0.ndim != 1:
        raise ValueError(f"{row['problem']}: y0 has shape {y0.shape}; the benchmark expects a flat vector")

    def f(x):
        return jnp.asarray(prob.objective(x, args), jnp.float64).reshape(())

    def eq(x):
        out = prob.constraint(x)[0]
        return jnp.ravel(jnp.asarray(out, jnp.float64))

    if prob.constraint(jnp.asarray(y0))[1] is not None:
        raise ValueError(f"{row['problem']} has inequality constraints: not an equality problem")
    if getattr(prob, "bounds", None) is not None:
        raise ValueError(f"{row['problem']} has bounds: not an equality problem")
    stored = prob.expected_objective_value
    stored = None if stored is None else float(np.asarray(stored))
    return Case(row["problem"], y0, f, eq=eq, f_ref=row["reference_f"],
                info=dict(stored_f=stored, ref_trust_constr=row["ref_trust_constr"],
                          ref_slsqp=row["ref_slsqp"]))


# ============================================================================================
# 2. Logistic regression on the breast-cancer data with equality constraints
# ============================================================================================
LOGREG_M = 10  # rows of A


def logreg_case() -> Case:
    """Mean logistic loss of a linear classifier without intercept on scikit-learn's
    breast-cancer data (569 x 30, features standardized, labels +-1), subject to
    ``A x = b`` and ``||x||^2 = 1``.

    ``rng = np.random.default_rng(0)``; ``A = rng.standard_normal((10, 30))``; then a
    feasible point ``x_feas = v / ||v||`` with ``v = rng.standard_normal(30)`` and
    ``b = A x_feas``, so both constraints hold at ``x_feas`` and the feasible set is not
    empty. Start: ``x0 = (1, ..., 1) / sqrt(30)`` (unit norm, ``A x0 != b``).
    """
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    X = np.asarray(data.data, np.float64)
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    y = np.where(np.asarray(data.target) == 1, 1.0, -1.0)
    d = X.shape[1]
    rng = np.random.default_rng(0)
    A = rng.standard_normal((LOGREG_M, d))
    v = rng.standard_normal(d)
    x_feas = v / np.linalg.norm(v)
    b = A @ x_feas
    Xj, yj, Aj, bj = (jnp.asarray(a) for a in (X, y, A, b))

    def f(x):
        return jnp.mean(jnp.logaddexp(0.0, -yj * (Xj @ x)))

    def eq(x):
        return jnp.concatenate([Aj @ x - bj, jnp.reshape(x @ x - 1.0, (1,))])

    x0 = np.full(d, 1.0 / np.sqrt(d))
    return Case("logreg", x0, f, eq=eq, info=dict(samples=X.shape[0], x_feas=x_feas))


# ============================================================================================
# 3. Hock-Schittkowski 71
# ============================================================================================
HS71_F = 17.0140173


def hs71_case() -> Case:
    """min x1 x4 (x1 + x2 + x3) + x3  s.t.  x1 x2 x3 x4 >= 25,  sum xi^2 = 40,  1 <= xi <= 5,
    from x0 = (1, 5, 5, 1); f* = 17.0140173 (Hock and Schittkowski's table)."""

    def f(x):
        return x[0] * x[3] * (x[0] + x[1] + x[2]) + x[2]

    def eq(x):
        return jnp.reshape(jnp.sum(x**2) - 40.0, (1,))

    def le(x):
        return jnp.reshape(25.0 - jnp.prod(x), (1,))

    return Case("HS71", np.array([1.0, 5.0, 5.0, 1.0]), f, eq=eq, le=le,
                bounds=(np.full(4, 1.0), np.full(4, 5.0)), f_ref=HS71_F)


# ============================================================================================
# 4. 1-D Poisson control
# ============================================================================================
PDE_ALPHA = 1e-2


def pde_grid(n: int) -> tuple[np.ndarray, float]:
    h = 1.0 / (n + 1)
    return h * np.arange(1, n + 1), h


def pde_exact(n: int, alpha: float = PDE_ALPHA) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(y*, u*, y_d)``: the discrete optimum in closed form and the target that makes it so.

    The discrete problem (``K`` the n x n finite-difference ``-d^2/dt^2`` with zero boundary
    values, ``h = 1/(n+1)``):

        min  h/2 ||y - y_d||^2 + alpha h/2 ||u||^2   s.t.   K y - u = 0.

    Its KKT conditions, with multiplier ``p`` for ``K y - u = 0``, are
    ``h (y - y_d) + K p = 0``, ``alpha h u - p = 0``, ``K y = u``; eliminating ``p`` and ``u``:
    ``y_d = y + alpha K K y``. So for any chosen ``y*`` the target
    ``y_d = y* + alpha K (K y*)`` makes ``(y*, u* = K y*)`` the exact discrete optimum (the
    objective is strictly convex on the constraint set, so it is the only one). Here
    ``y*(t) = sin(pi t) + 0.5 sin(3 pi t)`` at the grid points.
    """
    t, h = pde_grid(n)
    y_star = np.sin(np.pi * t) + 0.5 * np.sin(3 * np.pi * t)
    u_star = pde_apply_k(y_star, h)
    y_d = y_star + alpha * pde_apply_k(u_star, h)
    return y_star, u_star, y_d


def pde_apply_k(v, h):
    """``K v``: ``(2 v_i - v_{i-1} - v_{i+1}) / h^2`` with ``v_0 = v_{n+1} = 0`` (NumPy or JAX)."""
    xp = np if isinstance(v, np.ndarray) else jnp
    padded = xp.concatenate([xp.zeros(1), v, xp.zeros(1)])
    return (2 * padded[1:-1] - padded[:-2] - padded[2:]) / h**2


def pde_case(n: int, alpha: float = PDE_ALPHA) -> Case:
    """The Poisson control problem on ``n`` interior points; ``x = (y, u)`` of size ``2n``,
    started at zero. ``x_ref`` is the closed-form optimum (:func:`pde_exact`)."""
    _, h = pde_grid(n)
    y_star, u_star, y_d = pde_exact(n, alpha)
    y_dj = jnp.asarray(y_d)

    def f(x):
        y, u = x[:n], x[n:]
        return 0.5 * h * jnp.sum((y - y_dj) ** 2) + 0.5 * alpha * h * jnp.sum(u**2)

    def eq(x):
        y, u = x[:n], x[n:]
        return pde_apply_k(y, h) - u

    x_ref = np.concatenate([y_star, u_star])
    f_ref = 0.5 * h * np.sum((y_star - y_d) ** 2) + 0.5 * alpha * h * np.sum(u_star**2)
    return Case(f"PDE n={n}", np.zeros(2 * n), f, eq=eq, f_ref=float(f_ref), x_ref=x_ref,
                info=dict(alpha=alpha, h=h, grid=n))


def pde_dense_solution(n: int, alpha: float = PDE_ALPHA) -> np.ndarray:
    """The same optimum from a dense direct solve of the (linear) KKT system, as a check of
    the closed form: ``[[H, C^T], [C, 0]] [x; p] = [h y_d; 0; 0]`` with ``H = h diag(1, alpha)``
    and ``C = [K, -I]``."""
    _, h = pde_grid(n)
    _, _, y_d = pde_exact(n, alpha)
    K = (2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)) / h**2
    H = h * np.diag(np.concatenate([np.ones(n), np.full(n, alpha)]))
    C = np.hstack([K, -np.eye(n)])
    kkt = np.block([[H, C.T], [C, np.zeros((n, n))]])
    rhs = np.concatenate([h * y_d, np.zeros(n), np.zeros(n)])
    return np.linalg.solve(kkt, rhs)[: 2 * n]
