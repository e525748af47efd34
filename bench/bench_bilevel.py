"""Bilevel benchmark: ridge-regression hypergradients by ``ex.argmin`` vs jaxopt and optimistix.

What it measures
----------------
The hypergradient ``d/d lam val_loss(w*(lam))`` of ridge regression with log-penalties, where

    w*(lam)  = argmin_w  0.5 * mean((X w - y)^2) + 0.5 * sum(exp(lam) * w^2)     (train data)
    val_loss = 0.5 * mean((X_val w* - y_val)^2)                                   (validation data)

and ``lam`` is a scalar (one penalty) or a vector of length d (a penalty per feature). float64
throughout, in one process. Each method is a function ``hyper(lam, X, y, X_val, y_val)``
returning ``jax.grad`` of the validation loss with respect to ``lam``, jitted and compiled
before it is timed:

* **estimax (Newton)**: ``ex.argmin(ridge, zeros(d), lam, X, y)`` with its defaults: inner
  solver ``ex.solvers.Newton()`` (dense Newton up to 64 variables, Newton-CG above), inner tolerance
  ``||grad||_inf <= 1e-10``, implicit differentiation with ``linear_solver="auto"`` (a dense
  solve up to 64 unknowns, conjugate gradients above: dense on diabetes, CG on the synthetic
  problem). This is the row the targets are about;
* **estimax (Newton-CG)**: the same with ``solver=ex.solvers.Newton(linear_solver="cg")``
  (matrix-free Newton-CG);
* **estimax (L-BFGS)**: the same with ``solver=ex.solvers.LBFGS()`` (optax L-BFGS);
* **jaxopt LBFGS** (anchor): ``jaxopt.LBFGS(fun=ridge, tol=1e-10, maxiter=1000,
  implicit_diff=True).run(zeros(d), lam, X, y).params``, with jaxopt's default implicit-diff
  linear solve (conjugate gradients on the normal equations, ``jax.scipy`` CG's default
  tolerance 1e-5);
* **optimistix BFGS** (anchor): ``optx.minimise(fn, optx.BFGS(rtol=1e-10, atol=1e-10),
  zeros(d), args=(lam, X, y), adjoint=optx.ImplicitAdjoint(), max_steps=1000).value``
  (``throw`` left at its default, True).

The data are arguments of the jitted function, not constants it closes over. Closed-over
arrays are embedded in the program as constants, and XLA then constant-folds products of them
at compile time (it spent 3 s folding ``X^T X`` of the synthetic problem into a closed-form
function that way), which would blur both the compile and the per-call times.

Problems
--------
1. **diabetes**: scikit-learn's ``load_diabetes`` (442 x 10). Features and target are
   standardized (mean 0, standard deviation 1, over all 442 rows), then split by the fixed
   permutation ``np.random.default_rng(0).permutation(442)``: the first 294 (= 2/3) rows train,
   the other 148 validate.
2. **synthetic**: ``rng = np.random.default_rng(1)``; ``X = rng.standard_normal((3000, 200))``;
   ``w_true = 0.5 * rng.standard_normal(200) / sqrt(200)``; ``y = X @ w_true + 0.5 *
   rng.standard_normal(3000)``, drawn in that order. Rows 0-1999 train (n = 2000), rows
   2000-2999 validate. The signal ``X w_true`` has variance 0.25, the noise's. With
   unit-variance entries of ``w_true`` the signal is so strong that the validation loss keeps
   decreasing as ``lam -> -inf`` (no regularization is best, and the outer problem has no
   minimizer); at this signal-to-noise ratio it has one, near ``lam = -3.4``.

Penalties: scalar ``lam = -2``; per feature ``lam = linspace(-3, -1, d)``.

Reported
--------
Section 1, per problem x penalty x method:

* **rel.err**: ``max|g - g_exact| / max|g_exact|``. ``g_exact`` is the analytic formula in
  NumPy (``A = X^T X / n + diag(exp(lam))``, ``w = A^{-1} X^T y / n``, ``u = A^{-1} X_val^T
  (X_val w - y_val) / n_val``, ``g_i = -u_i exp(lam_i) w_i``, summed for a scalar ``lam``). The
  script checks it against ``jax.grad`` of the closed form through ``jnp.linalg.solve`` and
  prints their agreement;
* **ms/call**: the median wall time of one call of the compiled function, with
  ``block_until_ready`` after each call, and its interquartile range. The methods take turns
  in rounds (``--rounds``; 100 on diabetes, 30 on the synthetic problem), after two untimed
  calls each;
* **compile s**: the first ``jax.jit(hyper).lower(lam, *data).compile()``, timed once, and
  **trace s**, its tracing part (``jax.jit(hyper).trace(...)``; the frameworks' Python-level
  work happens there). Every method is first traced and lowered on a tiny problem, untimed,
  so that first-use costs (imports, Python-level caches) are not charged to the first case;
* the time ratios of each row to jaxopt's and to optimistix's, and the targets for estimax's
  default (information only): rel.err <= 1e-8 (diabetes) / 1e-6 (synthetic), ms/call <=
  jaxopt's, compile <= optimistix's.

Section 2, the outer loop, scalar penalty: ``lam*`` from the closed form (a grid of 801 points
on [-25, 15], then Newton on the closed-form function until the step is below 1e-12), and

    ex.solve(lambda lam, *data: val_loss(ex.argmin(ridge, zeros(d), lam, X, y)), 0.0, *data,
             solver=ex.solvers.Newton(), tol=1e-10)

Each Newton iteration of ``ex.solve`` takes the outer objective's gradient and Hessian, here
through the implicit function (second order). Reported: the iterates ``lam_k``, their distance
to ``lam*``, the first ``k`` with ``|lam_k - lam*| < 1e-4``, and the **hypergradients** it
took, counted as ``k + 1``: the gradient at the start plus one per iteration, the gradient at
the accepted point. Not counted: the Hessian of each iteration (one Hessian-vector product
here, since ``lam`` is a scalar), the gradient at the current point that the Newton step
recomputes while linearizing, and any line-search backtracks (the ``step`` column shows
whether a step was a full Newton step). Targets (information): <= 7 (diabetes), <= 17
(synthetic).

``ex.solve`` returns only the final point; its ``history`` holds the outer value and the KKT
residual ``|F'(lam_k)|`` of every iterate. Rerunning it with ``max_steps=k`` for every k would
compile the whole loop again each time (7-16 s per compile on 2 CPU cores), so the iterates
are recovered from the history instead: ``lam_k`` is the root of ``F'(lam) = +-kkt_k`` (F the
closed-form outer objective; a grid, then Brent's method) at which F equals ``value_k``. Near
``lam*`` two roots match, one on each side at the same distance from it to first order (the
values differ by rounding only); the one nearer the full closed-form Newton step from
``lam_{k-1}`` is taken. The distance to ``lam*`` is right either way. The default run then
checks this once per problem: it reruns ``ex.solve`` with ``max_steps = k`` for the k found,
unless that is the final iterate (known), and for k - 1 when the recovered ``lam_{k-1}`` is
within 2e-4 of ``lam*`` (a close call) or k is the final iterate, and prints the rerun's
iterate next to the recovered one. ``--quick`` and ``--no-rerun`` skip the reruns.

Section 3, LV-HBA on the coupled-constraint toy of its paper (n = 100; see ``section_lvhba``):
``ex.solve_bilevel`` with the defaults and with the paper script's update, ``--lvhba-steps``
iterations (10000; 3000 with ``--quick``); the relative errors in ``x`` and ``y`` against the
closed-form optimistic solution (target 1e-3), the time and the step sizes.

How to read the output
----------------------
The per-call times are milliseconds (diabetes) to tens of milliseconds (synthetic). On a
busy 2-core machine they swing by 10-30% between runs; compare ratios from the same run and
rerun before reading anything into a ratio near 1. Compile times are single measurements of
seconds each and swing more. The per-feature case has d hyperparameters but the same cost per
hypergradient as the scalar one: the implicit derivative is one linear solve either way.

jaxopt's errors are set by its implicit-diff linear solve (CG on the normal equations at
tolerance 1e-5), not by its inner solve: L-BFGS converges (18-19 iterations to a gradient norm
of 5e-11 on the synthetic problem), and with ``implicit_diff_solve=partial(solve_normal_cg,
tol=1e-12)`` its rel.err there was 1e-10 (scalar) and 3e-10 (per feature) when this was
written, against 1e-6 and 8e-6 with the default.

estimax's default is dense Newton, and on the synthetic problem (d = 200) it forms the
200 x 200 Hessian from 200 Hessian-vector products (``2 * 2000 * 200 * 200`` flops, about
17 ms on the test machine) even though one Newton step then solves the quadratic; that is
most of its per-call time there. Newton-CG never forms the Hessian: it took 6 inexact Newton
steps there, whose conjugate-gradient iterations take one Hessian-vector product each, and
its row is about twice as fast.

BLAS is limited to one thread (``OPENBLAS_NUM_THREADS=1`` and ``MKL_NUM_THREADS=1`` unless
already set), before NumPy is imported, as in ``bench_constrained.py``: on 2 cores OpenBLAS's
threads and XLA's compete. The script exits 0 whatever the numbers are.

How to run
----------
    python bench/bench_bilevel.py            # both problems and penalties, reruns (2.5-3.5 min, 2 busy CPUs)
    python bench/bench_bilevel.py --quick    # diabetes only, 20 rounds, no reruns (~1 min)
    python bench/bench_bilevel.py --problems synthetic --rounds 50

Set ``JAX_PLATFORMS=cpu`` to force the CPU.
"""

from __future__ import annotations

import os

# One BLAS thread unless the caller says otherwise (before NumPy loads its BLAS): on a 2-core
# machine OpenBLAS's threads and XLA's compete.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)  # before anything is traced

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.optimize import brentq  # noqa: E402

PROBLEMS = ("diabetes", "synthetic")
ERR_TARGET = {"diabetes": 1e-8, "synthetic": 1e-6}  # rel.err of estimax's default
HYPERGRAD_TARGET = {"diabetes": 7, "synthetic": 17}  # outer loop: hypergradients to |lam - lam*| < 1e-4
ROUNDS = {"diabetes": (100, 20), "synthetic": (30, 10)}  # timed rounds: (full run, --quick)
LAM_SCALAR = -2.0
LAM_FEATURE = (-3.0, -1.0)  # linspace(-3, -1, d)
LAM_TOL = 1e-4  # outer loop: |lam_k - lam*| that counts as reached
DEFAULT = "estimax (Newton)"
JAXOPT = "jaxopt LBFGS"
OPTX = "optimistix BFGS"


# ============================================================================================
# Problems
# ============================================================================================
def diabetes():
    """scikit-learn's diabetes data, standardized, split 2/3 train by a fixed permutation."""
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    perm = np.random.default_rng(0).permutation(len(y))
    n_train = 2 * len(y) // 3
    tr, va = perm[:n_train], perm[n_train:]
    return X[tr], y[tr], X[va], y[va]


def synthetic(n=2000, n_val=1000, d=200):
    """Gaussian design, a random linear signal of variance 0.25 and noise of standard deviation
    0.5 (see the module doc for why the signal is that weak)."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((n + n_val, d))
    w_true = 0.5 * rng.standard_normal(d) / np.sqrt(d)
    y = X @ w_true + 0.5 * rng.standard_normal(n + n_val)
    return X[:n], y[:n], X[n:], y[n:]


def load_problem(name):
    X, y, Xv, yv = diabetes() if name == "diabetes" else synthetic()
    return tuple(jnp.asarray(a, jnp.float64) for a in (X, y, Xv, yv))


# ============================================================================================
# The bilevel problem: inner and outer objectives, closed form
# ============================================================================================
def ridge(w, lam, X, y):
    """The inner objective; ``lam`` a scalar or one log-penalty per feature."""
    return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.sum(jnp.exp(lam) * w**2)


def val_loss(w, Xv, yv):
    return 0.5 * jnp.mean((Xv @ w - yv) ** 2)


def closed_form_w(lam, X, y):
    n, d = X.shape
    A = X.T @ X / n + jnp.diag(jnp.broadcast_to(jnp.exp(lam), (d,)))
    return jnp.linalg.solve(A, X.T @ y / n)


def closed_form_outer(lam, X, y, Xv, yv):
    """F(lam): the validation loss at the exact inner solution."""
    return val_loss(closed_form_w(lam, X, y), Xv, yv)


def analytic_hypergradient(lam, X, y, Xv, yv):
    """dF/dlam in NumPy: dw/dlam_i = -A^{-1} e_i exp(lam_i) w_i, so g_i = -u_i exp(lam_i) w_i
    with u = A^{-1} grad val_loss(w) (A symmetric)."""
    X, y, Xv, yv = (np.asarray(a) for a in (X, y, Xv, yv))
    lam = np.asarray(lam, float)
    n, d = X.shape
    e = np.broadcast_to(np.exp(lam), (d,))
    A = X.T @ X / n + np.diag(e)
    w = np.linalg.solve(A, X.T @ y / n)
    u = np.linalg.solve(A, Xv.T @ (Xv @ w - yv) / len(yv))
    g = -u * e * w
    return g.sum() if lam.ndim == 0 else g


# ============================================================================================
# The methods: hyper(lam, X, y, Xv, yv) -> d val_loss(w*(lam)) / d lam
# ============================================================================================
def make_methods(ex, jaxopt, optx) -> dict:
    """Fresh functions (so that nothing JAX caches per function is shared between cases)."""

    def estimax_with(solver):
        def outer(lam, X, y, Xv, yv):
            kw = {} if solver is None else dict(solver=solver)
            w = ex.argmin(ridge, jnp.zeros(X.shape[1], X.dtype), lam, X, y, **kw)
            return val_loss(w, Xv, yv)

        return outer

    def jaxopt_outer(lam, X, y, Xv, yv):
        solver = jaxopt.LBFGS(fun=ridge, tol=1e-10, maxiter=1000, implicit_diff=True)
        w = solver.run(jnp.zeros(X.shape[1], X.dtype), lam, X, y).params
        return val_loss(w, Xv, yv)

    def optx_outer(lam, X, y, Xv, yv):
        sol = optx.minimise(lambda w, a: ridge(w, *a), optx.BFGS(rtol=1e-10, atol=1e-10),
                            jnp.zeros(X.shape[1], X.dtype), args=(lam, X, y),
                            adjoint=optx.ImplicitAdjoint(), max_steps=1000)
        return val_loss(sol.value, Xv, yv)

    outers = {
        DEFAULT: estimax_with(None),
        "estimax (Newton-CG)": estimax_with(ex.solvers.Newton(linear_solver="cg")),
        "estimax (L-BFGS)": estimax_with(ex.solvers.LBFGS()),
        JAXOPT: jaxopt_outer,
        OPTX: optx_outer,
    }
    return {name: jax.grad(f) for name, f in outers.items()}


def warm_up(ex, jaxopt, optx):
    """Each method traced and lowered once on a tiny problem, so that first-use costs (imports,
    Python-level caches) are not charged to the first case. XLA's own first-use cost is paid by
    the tiny function ``main`` compiles first; compiling the tiny problems too would add seconds
    each and nothing more."""
    rng = np.random.default_rng(123)
    data = tuple(jnp.asarray(a) for a in (rng.standard_normal((8, 3)), rng.standard_normal(8),
                                           rng.standard_normal((4, 3)), rng.standard_normal(4)))
    for name, hyper in make_methods(ex, jaxopt, optx).items():
        try:
            jax.jit(hyper).trace(jnp.asarray(0.0), *data).lower()
        except Exception as e:  # the case itself will report it
            print(f"(warm-up of {name} failed: {type(e).__name__})")


# ============================================================================================
# Helpers
# ============================================================================================
def fmt_e(v):
    return "nan" if v is None or not np.isfinite(v) else f"{v:.1e}"


def fmt_ratio(a, b):
    return "n/a" if not (np.isfinite(a) and np.isfinite(b)) or b <= 0 else f"{a / b:.2f}x"


def fmt_ms(s):
    return "nan" if not np.isfinite(s) else f"{s * 1e3:.2f}"


def rel_err(g, ref):
    g, ref = np.atleast_1d(np.asarray(g, float)), np.atleast_1d(np.asarray(ref, float))
    return float(np.max(np.abs(g - ref)) / np.max(np.abs(ref)))


def time_rounds(calls: dict, rounds: int) -> dict:
    """Per-call wall times, the calls taking turns (the first one rotating) in ``rounds`` rounds,
    after two untimed calls each."""
    for f in calls.values():
        for _ in range(2):
            jax.block_until_ready(f())
    names = list(calls)
    times = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            jax.block_until_ready(calls[k]())
            times[k].append(time.perf_counter() - t0)
    return times


# ============================================================================================
# 1. hypergradients
# ============================================================================================
def section_hypergradients(args, ex, jaxopt, optx, name, data) -> list:
    X, y, Xv, yv = data
    n, d = X.shape
    rounds = args.rounds or ROUNDS[name][1 if args.quick else 0]
    summary = []
    for penalty, lam in (("scalar", jnp.asarray(LAM_SCALAR)),
                         ("per-feature", jnp.linspace(*LAM_FEATURE, d))):
        desc = (f"lam = {LAM_SCALAR:g}" if penalty == "scalar" else
                f"lam = linspace({LAM_FEATURE[0]:g}, {LAM_FEATURE[1]:g}, {d})")
        print(f"\n=== 1. hypergradient: {name} ({n} train / {len(yv)} val x {d}), {penalty} penalty, "
              f"{desc} ===")
        exact = analytic_hypergradient(lam, *data)
        by_jax = jax.jit(jax.grad(closed_form_outer))(lam, *data)
        print(f"exact: analytic formula vs jax.grad through the closed-form solve: max rel. diff "
              f"{fmt_e(rel_err(by_jax, exact))}; max|g_exact| = {np.max(np.abs(exact)):.3e}")
        res, compiled = {}, {}
        for m, hyper in make_methods(ex, jaxopt, optx).items():
            try:
                jitted = jax.jit(hyper)
                t0 = time.perf_counter()
                traced = jitted.trace(lam, *data)
                t1 = time.perf_counter()
                c = traced.lower().compile()
                t2 = time.perf_counter()
                g = jax.block_until_ready(c(lam, *data))
                compiled[m] = c
                res[m] = dict(err=rel_err(g, exact), compile=t2 - t0, trace=t1 - t0)
            except Exception as e:
                res[m] = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                if args.verbose:
                    traceback.print_exc()
        times = time_rounds({m: (lambda c=c: c(lam, *data)) for m, c in compiled.items()}, rounds)
        for m, ts in times.items():
            q1, med, q3 = np.percentile(ts, [25, 50, 75])
            res[m].update(time=med, q1=q1, q3=q3)
        ref_j = res.get(JAXOPT, {}).get("time", float("nan"))
        ref_o = res.get(OPTX, {}).get("time", float("nan"))
        fmt = "{:<22} {:>9} {:>9} {:>15} {:>10} {:>8} {:>9} {:>9}"
        print(f"({rounds} timed rounds; IQR in ms)")
        print(fmt.format("method", "rel.err", "ms/call", "IQR", "compile s", "trace s", "t/jaxopt", "t/optx"))
        for m, r in res.items():
            if "error" in r:
                print(fmt.format(m, "ERR", "", "", "", "", "", "") + "  " + r["error"])
                continue
            iqr = f"{r['q1'] * 1e3:.2f}-{r['q3'] * 1e3:.2f}"
            print(fmt.format(m, fmt_e(r["err"]), fmt_ms(r["time"]), iqr,
                             f"{r['compile']:.2f}", f"{r['trace']:.2f}", fmt_ratio(r["time"], ref_j),
                             fmt_ratio(r["time"], ref_o)))
        e = res.get(DEFAULT, {})
        if "error" in e or not e:
            print(f"targets: {DEFAULT} failed")
        else:
            tj = res.get(JAXOPT, {})
            to = res.get(OPTX, {})
            ok_err = e["err"] <= ERR_TARGET[name]
            ok_t = "time" in tj and e["time"] <= tj["time"]
            ok_c = "compile" in to and e["compile"] <= to["compile"]
            print(f"targets ({DEFAULT}): rel.err {fmt_e(e['err'])} <= {ERR_TARGET[name]:g}: "
                  f"{'met' if ok_err else 'NOT met'}; ms/call {fmt_ms(e['time'])} <= jaxopt "
                  f"{fmt_ms(tj.get('time', float('nan')))}: {'met' if ok_t else 'NOT met'}; compile "
                  f"{e['compile']:.2f} s <= optimistix {to.get('compile', float('nan')):.2f} s: "
                  f"{'met' if ok_c else 'NOT met'}")
        summary.append((name, penalty, res))
    return summary


def print_summary(summary):
    """estimax's default against the anchors, over all cases."""
    print("\n=== summary: estimax (Newton) against the anchors ===")
    fmt = "{:<11} {:<12} {:>9} {:>10} {:>10} {:>12} {:>12}"
    print(fmt.format("problem", "penalty", "rel.err", "t/jaxopt", "t/optx", "comp/jaxopt", "comp/optx"))
    for name, penalty, res in summary:
        e, j, o = res.get(DEFAULT, {}), res.get(JAXOPT, {}), res.get(OPTX, {})
        if "error" in e or "time" not in e:
            print(fmt.format(name, penalty, "ERR", "", "", "", ""))
            continue
        nan = float("nan")
        print(fmt.format(name, penalty, fmt_e(e["err"]), fmt_ratio(e["time"], j.get("time", nan)),
                         fmt_ratio(e["time"], o.get("time", nan)),
                         fmt_ratio(e["compile"], j.get("compile", nan)),
                         fmt_ratio(e["compile"], o.get("compile", nan))))


# ============================================================================================
# 2. outer loop
# ============================================================================================
class ClosedForm:
    """F(lam) (scalar lam) and its first two derivatives from the closed form, as floats."""

    def __init__(self, data):
        self.data = data
        f = closed_form_outer
        self._f = jax.jit(f)
        self._df = jax.jit(jax.grad(f))
        self._d2f = jax.jit(jax.grad(jax.grad(f)))
        self._fv = jax.jit(jax.vmap(f, in_axes=(0, None, None, None, None)))
        self._dfv = jax.jit(jax.vmap(jax.grad(f), in_axes=(0, None, None, None, None)))

    def f(self, lam):
        return float(self._f(jnp.asarray(lam, jnp.float64), *self.data))

    def df(self, lam):
        return float(self._df(jnp.asarray(lam, jnp.float64), *self.data))

    def d2f(self, lam):
        return float(self._d2f(jnp.asarray(lam, jnp.float64), *self.data))

    def on_grid(self, grid, derivative=False):
        fn = self._dfv if derivative else self._fv
        return np.asarray(fn(jnp.asarray(grid), *self.data))


def lam_star(cf: ClosedForm):
    """The minimizer of F: the best point of a grid on [-25, 15], then Newton to a step < 1e-12."""
    grid = np.linspace(-25.0, 15.0, 801)
    values = cf.on_grid(grid)
    i = int(np.argmin(values))
    if i in (0, len(grid) - 1):
        return float(grid[i]), False  # no interior minimum on the grid
    lam = float(grid[i])
    for _ in range(50):
        step = cf.df(lam) / cf.d2f(lam)
        lam -= step
        if abs(step) < 1e-12:
            break
    return lam, cf.d2f(lam) > 0 and abs(lam - grid[i]) < 0.1


def recover_iterates(cf: ClosedForm, star: float, lam0: float, history: dict) -> np.ndarray:
    """``lam_k`` from ``ex.solve``'s history (value_k, kkt_k = |F'(lam_k)|): the root of
    F'(lam) = +-kkt_k where F matches value_k; where two do (close to lam*, one on each side,
    at the same distance from it to first order), the one nearer the full closed-form Newton
    step from lam_{k-1}. See the module doc."""
    grid = np.union1d(np.linspace(-25.0, 15.0, 801), [star])
    d_grid = cf.on_grid(grid, derivative=True)
    lams = [lam0]
    for v, g in zip(history["value"][1:], history["kkt"][1:]):
        roots = []
        for target in (g, -g):
            s = d_grid - target
            for i in np.nonzero(s[:-1] * s[1:] <= 0)[0]:
                a, b = grid[i], grid[i + 1]
                if s[i] == 0:
                    roots.append(a)
                elif s[i + 1] != 0:
                    roots.append(brentq(lambda t, c=target: cf.df(t) - c, a, b, xtol=1e-15, rtol=1e-15))
        if not roots:
            lams.append(float("nan"))
            continue
        # the value recorded at the iterate is accurate to rounding; other roots of F' = +-kkt_k
        # (on the flat left end, say) are at other values
        gap = {t: abs(cf.f(t) - v) for t in roots}
        best = min(gap.values())
        matching = [t for t in roots if gap[t] <= best + 1e-10 * max(1.0, abs(v))]
        prev = lams[-1]
        newton = prev - cf.df(prev) / cf.d2f(prev) if np.isfinite(prev) else star
        lams.append(min(matching, key=lambda t: abs(t - newton)))
    return np.asarray(lams)


def section_outer(args, ex, name, data):
    print(f"\n=== 2. outer loop: {name}, scalar penalty, ex.solve(Newton, tol=1e-10) from lam0 = 0 ===")
    cf = ClosedForm(data)
    star, interior = lam_star(cf)
    if not interior:
        print(f"the closed-form outer objective has no interior minimum on [-25, 15] (best at {star:g}): "
              "skipped")
        return None
    print(f"lam* = {star:.12f} (closed form; F(lam*) = {cf.f(star):.12f}, F''(lam*) = {cf.d2f(star):.4e})")

    def program(lam, X, y, Xv, yv):
        return val_loss(ex.argmin(ridge, jnp.zeros(X.shape[1], X.dtype), lam, X, y), Xv, yv)

    solver = ex.solvers.Newton()
    lam0 = jnp.asarray(0.0, jnp.float64)
    try:
        sol = ex.solve(program, lam0, *data, solver=solver, tol=1e-10)
    except Exception as e:
        print(f"ex.solve failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        if args.verbose:
            traceback.print_exc()
        return None
    lam_final = float(sol.params)
    print(f"ex.solve: lam = {lam_final:.12f}, |lam - lam*| = {fmt_e(abs(lam_final - star))}, "
          f"{sol.steps} steps, success {sol.success} ({sol.message}); compile "
          f"{sol.stats['compile_s']:.2f} s, loop {sol.stats['solve_s'] * 1e3:.1f} ms")
    hist = {k: np.asarray(v) for k, v in sol.history.items()}
    lams = recover_iterates(cf, star, float(lam0), hist)
    lams[-1] = lam_final  # the end is known
    dist = np.abs(lams - star)
    fmt = "{:>3} {:>17} {:>13} {:>11} {:>11} {:>8}"
    print("iterates (lam_k recovered from the history, see the script's doc; step: lam_{k+1} - lam_k over "
          "the closed-form Newton step -F'/F'' at lam_k)")
    print(fmt.format("k", "lam_k", "|lam_k - lam*|", "value", "|F'| (kkt)", "step"))
    for k in range(len(lams)):
        step = ""
        if k + 1 < len(lams):
            newton = -cf.df(lams[k]) / cf.d2f(lams[k])
            step = f"{(lams[k + 1] - lams[k]) / newton:.3f}" if newton != 0 else "-"
        print(fmt.format(k, f"{lams[k]:.12f}", fmt_e(dist[k]), f"{hist['value'][k]:.9f}",
                         fmt_e(hist["kkt"][k]), step))
    hits = np.nonzero(dist < LAM_TOL)[0]
    k_hit = int(hits[0]) if len(hits) else None
    if k_hit is not None and not args.quick and not args.no_rerun:
        # lam_0 and the final iterate are known; check the first iterate within LAM_TOL, and the
        # one before it when that is a close call or the first one is the final iterate
        ks = [k_hit] if 0 < k_hit < sol.steps else []
        if k_hit >= 2 and (dist[k_hit - 1] < 2 * LAM_TOL or not ks):
            ks.insert(0, k_hit - 1)
        for k in ks:
            t0 = time.perf_counter()
            rerun = ex.solve(program, lam0, *data, solver=solver, tol=1e-10, max_steps=k)
            lk = float(rerun.params)
            print(f"rerun with max_steps={k}: lam_{k} = {lk:.12f} (recovered {lams[k]:.12f}, diff "
                  f"{fmt_e(abs(lk - lams[k]))}), |lam_{k} - lam*| = {fmt_e(abs(lk - star))} "
                  f"({time.perf_counter() - t0:.1f} s with its compile)")
            if k == k_hit and abs(lk - star) >= LAM_TOL:
                print(f"  the rerun disagrees with the recovered iterate: k = {k} is not reached")
            if k == k_hit - 1 and abs(lk - star) < LAM_TOL:
                print(f"  the rerun disagrees with the recovered iterate: already reached at k = {k}")
    target = HYPERGRAD_TARGET[name]
    if k_hit is None:
        print(f"|lam_k - lam*| < {LAM_TOL:g} never reached in {sol.steps} steps; target <= {target}: NOT met")
        return dict(name=name, k=None)
    used = k_hit + 1
    print(f"first k with |lam_k - lam*| < {LAM_TOL:g}: k = {k_hit}, i.e. {used} hypergradients (k + 1); "
          f"target <= {target}: {'met' if used <= target else 'NOT met'}")
    return dict(name=name, k=k_hit)


# ============================================================================================
# 3. LV-HBA on the coupled-constraint toy
# ============================================================================================
TOY_N = 100


def section_lvhba(ex, steps: int):
    """The LV-HBA paper's toy (n = 100): ``min ½‖x - y₂‖² + ½‖y₁ - 1‖²`` over ``y`` in the
    solutions of ``min_y ½‖y₁‖² - xᵀy₁ + 1ᵀy₂`` s.t. ``1ᵀx + 1ᵀy = 0``, whose optimistic
    solution is ``x = -0.3``, ``y₁ = 0.7``, ``y₂ = -0.4``. ``ex.solve_bilevel`` with LV-HBA's
    defaults, and with the paper script's update (simultaneous saddle steps, its step sizes and
    penalty), from ``x = y = 10``. First derivatives only (the test suite checks that no
    second derivative of the lower objective is taken)."""
    n = TOY_N

    def upper(x, y):
        return 0.5 * jnp.sum((x - y[n:]) ** 2) + 0.5 * jnp.sum((y[:n] - 1.0) ** 2)

    def lower(y, x):
        ex.subject_to(eq=jnp.sum(x) + jnp.sum(y), name="coupled")
        return 0.5 * jnp.sum(y[:n] ** 2) - x @ y[:n] + jnp.sum(y[n:])

    x_star = np.full(n, -0.3)
    y_star = np.concatenate([np.full(n, 0.7), np.full(n, -0.4)])
    print(f"\n=== 3. LV-HBA: the coupled-constraint toy (n = {n}), {steps} iterations from x = y = 10 ===")
    print("target: relative error <= 1e-3 in x and y (the optimistic solution in closed form)")
    rows = [("LV-HBA (defaults)", ex.solvers.LVHBA()),
            ("paper script's update", ex.solvers.LVHBA(inner="simultaneous", eta=0.01, alpha=0.008, beta=0.02,
                                                       c0=0.025, p=0.3))]
    for label, solver in rows:
        sol = ex.solve_bilevel(upper, lower, jnp.full(n, 10.0), jnp.full(2 * n, 10.0), solver=solver, max_steps=steps)
        x, y = (np.asarray(a) for a in sol.params)
        ex_, ey = (np.linalg.norm(x - x_star) / np.linalg.norm(x_star), np.linalg.norm(y - y_star) / np.linalg.norm(y_star))
        met = "met" if max(ex_, ey) <= 1e-3 else "NOT met"
        print(f"{label:<24} rel.err x {ex_:.1e}, y {ey:.1e} ({met}); {sol.stats['solve_s']:.2f} s for {sol.steps} "
              f"iterations, compile {sol.stats['compile_s']:.1f} s; steps alpha {sol.stats['alpha']:.3g}, "
              f"eta {sol.stats['eta']:.3g}; final penalty {sol.stats['penalty']:.3g}")


# ============================================================================================
# main
# ============================================================================================
def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: diabetes only, 20 timed rounds, no ex.solve reruns")
    parser.add_argument("--problems", help=f"comma-separated problems (default {','.join(PROBLEMS)}; "
                                           "diabetes with --quick)")
    parser.add_argument("--rounds", type=int, help="timed rounds per case (default 100 on diabetes, 30 on "
                                                   "synthetic; 20 and 10 with --quick)")
    parser.add_argument("--no-rerun", action="store_true",
                        help="outer loop: do not check the recovered iterates by rerunning ex.solve")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    parser.add_argument("--lvhba-steps", type=int, default=10000, help="LV-HBA iterations on the toy (default "
                                                                       "10000; 3000 with --quick)")
    args = parser.parse_args(argv)
    chosen = args.problems or ("diabetes" if args.quick else ",".join(PROBLEMS))
    problems = [p.strip() for p in chosen.split(",") if p.strip()]
    unknown = sorted(set(problems) - set(PROBLEMS))
    if unknown:
        parser.error(f"--problems: unknown {unknown}; choose from {PROBLEMS}")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)

    import jaxopt
    import optimistix as optx

    import estimax as ex

    t_start = time.perf_counter()
    dev = jax.devices()[0]
    load = " | load avg %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    print(f"estimax {ex.__version__} | jax {jax.__version__} | jaxopt {_version('jaxopt')} | optimistix "
          f"{_version('optimistix')} | lineax {_version('lineax')} | python {platform.python_version()} | "
          f"device {dev.platform}:{getattr(dev, 'device_kind', '')} | {os.cpu_count()} CPUs{load}")
    print(f"float64; ridge regression, log-penalties; problems: {', '.join(problems)}")
    jax.block_until_ready(jax.jit(lambda a: jnp.sin(a) @ a)(jnp.ones((4, 4))))  # JAX's first-use costs
    t0 = time.perf_counter()
    warm_up(ex, jaxopt, optx)
    print(f"(warm-up on a tiny problem: {time.perf_counter() - t0:.1f} s)")
    datasets = {name: load_problem(name) for name in problems}
    summary = []
    for name in problems:
        summary += section_hypergradients(args, ex, jaxopt, optx, name, datasets[name])
    print_summary(summary)
    outer = [section_outer(args, ex, name, datasets[name]) for name in problems]
    print("\n=== summary: outer loop (hypergradients to |lam - lam*| < 1e-4, counted as k + 1) ===")
    for r, name in zip(outer, problems):
        if r is None:
            print(f"{name}: not run")
        else:
            used = None if r["k"] is None else r["k"] + 1
            print(f"{name}: {'not reached' if used is None else used} (target <= {HYPERGRAD_TARGET[name]}: "
                  f"{'met' if used is not None and used <= HYPERGRAD_TARGET[name] else 'NOT met'})")
    section_lvhba(ex, 3000 if args.quick else args.lvhba_steps)
    load = " (load avg now %.1f)" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f} s{load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
