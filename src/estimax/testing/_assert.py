"""Statistical assertions with tolerances from the Monte Carlo standard error."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import ArgumentError


def seed_from(*inputs: Any) -> int:
    """A 31-bit seed determined by ``inputs`` (their ``repr``), stable across runs."""
    text = repr(tuple(_plain(x) for x in inputs)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little") & 0x7FFFFFFF


def key_from(*inputs: Any):
    """``jax.random.PRNGKey(seed_from(*inputs))``."""
    return jax.random.PRNGKey(seed_from(*inputs))


def _plain(x):
    if isinstance(x, dict):
        return tuple(sorted((k, _plain(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_plain(v) for v in x)
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return tuple(np.round(np.asarray(x, dtype=np.float64).ravel(), 12).tolist())
    if isinstance(x, float):
        return round(x, 12)
    return x if isinstance(x, (int, str, bool, type(None))) else repr(x)


def mean_and_se(estimator: Callable, key, n: int, *, args: tuple = (), batch_size: int | None = None):
    """Per-leaf mean and standard error of ``n`` estimates ``estimator(key_i, *args)``.

    ``estimator`` maps a key (and ``args``) to a pytree of arrays; it is vectorized over
    keys with ``jax.vmap`` (in chunks of ``batch_size`` keys when given, to bound memory)
    and compiled once per ``estimator`` object: pass varying inputs as ``args`` rather than
    closing over them, so repeated calls reuse the compiled code.
    """
    if n < 2:
        raise ArgumentError(f"mean_and_se needs n >= 2 estimates; got n={n}.")
    keys = jax.random.split(key, n)
    fn = _vectorized(estimator, len(args))
    if batch_size is None or batch_size >= n:
        samples = fn(keys, *args)
    else:
        parts = [fn(keys[i : i + batch_size], *args) for i in range(0, n, batch_size)]
        samples = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
    samples = jax.tree.map(lambda s: np.asarray(s, dtype=np.float64), samples)
    mean = jax.tree.map(lambda s: s.mean(0), samples)
    se = jax.tree.map(lambda s: s.std(0, ddof=1) / np.sqrt(n), samples)
    return mean, se


_VECTORIZED: dict[tuple[int, int], tuple[Callable, Callable]] = {}


def _vectorized(estimator, nargs: int):
    """``jit(vmap(estimator))`` over keys, cached per estimator so repeated calls compile once."""
    hit = _VECTORIZED.get((id(estimator), nargs))
    if hit is None or hit[0] is not estimator:
        fn = jax.jit(jax.vmap(estimator, in_axes=(0,) + (None,) * nargs))
        hit = _VECTORIZED[id(estimator), nargs] = (estimator, fn)
    return hit[1]


@dataclasses.dataclass(frozen=True)
class UnbiasedReport:
    """What :func:`assert_unbiased` measured (per leaf, flattened)."""

    mean: Any
    se: Any
    exact: Any
    z: Any  # (mean - exact) / se, per entry
    n: int

    def max_abs_z(self) -> float:
        leaves = [np.abs(np.asarray(v)) for v in jax.tree.leaves(self.z)]
        return float(max((v.max() for v in leaves if v.size), default=0.0))


def assert_unbiased(
    estimator: Callable,
    exact: Any,
    *,
    args: tuple = (),
    key=None,
    seed: Any = None,
    n: int = 10_000,
    sigmas: float = 5.0,
    atol: float = 1e-6,
    rtol: float = 1e-5,
    batch_size: int | None = None,
) -> UnbiasedReport:
    """Assert that ``estimator`` is unbiased for ``exact``: ``|mean − exact| ≤ sigmas·SE``.

    **Arguments:**

    - ``estimator``: ``(key, *args) -> pytree`` of estimates (the structure of ``exact``).
    - ``args``: further arguments to ``estimator`` (not vectorized).
    - ``exact``: the exact value (closed form, enumeration, quadrature): a number, an array
      or a pytree of them, or a function ``exact(*args)`` that returns one.
    - ``key`` or ``seed``: the key, or inputs to derive it from (:func:`key_from`); one is
      required, so failures reproduce.
    - ``n``: number of estimates; ``sigmas``: the tolerance in standard errors.
    - ``atol``/``rtol``: a floor for the floating-point error of the mean (these matter only
      where the estimator has (near) zero variance, e.g. exact enumeration).

    Returns an :class:`UnbiasedReport`; raises ``AssertionError`` listing the worst entries.
    Mistakes in the arguments (an ``exact`` of another structure or shape than the
    estimates, no key) raise :class:`~estimax.ArgumentError` before any estimate is drawn.
    """
    args = tuple(args)
    if not callable(estimator):
        raise ArgumentError(f"assert_unbiased: estimator must be a function (key, *args) -> estimates; got "
                            f"{type(estimator).__name__}.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ArgumentError(f"assert_unbiased: n must be an integer >= 2 (the number of estimates); got {n!r}.")
    if not (isinstance(sigmas, (int, float)) and sigmas > 0):
        raise ArgumentError(f"assert_unbiased: sigmas must be a positive number; got {sigmas!r}.")
    if key is None:
        if seed is None:
            raise ArgumentError("assert_unbiased needs key= or seed= (inputs to derive the key from).")
        key = key_from(seed)
    exact = _exact_values(exact(*args) if callable(exact) else exact)
    _check_like(jax.eval_shape(estimator, key, *args), exact)  # traced, not run: nothing is drawn yet
    mean, se = mean_and_se(estimator, key, n, args=args, batch_size=batch_size)
    tol = jax.tree.map(lambda s, e: sigmas * s + atol + rtol * np.abs(e), se, exact)
    z = jax.tree.map(lambda m, e, s: (m - e) / np.maximum(s, 1e-300), mean, exact, se)
    report = UnbiasedReport(mean=mean, se=se, exact=exact, z=z, n=n)
    bad = []
    for path, m in jax.tree_util.tree_flatten_with_path(mean)[0]:
        e = _at(exact, path)
        t = _at(tol, path)
        s = _at(se, path)
        m_, e_, t_, s_ = (np.atleast_1d(a).ravel() for a in (m, e, t, s))
        for i in np.nonzero(~(np.abs(m_ - e_) <= t_))[0]:  # NaN/inf anywhere is a failure too
            bad.append(
                f"{jax.tree_util.keystr(path)}[{i}]: mean {m_[i]:.6g} vs exact {e_[i]:.6g} "
                f"(SE {s_[i]:.3g}, |z| = {abs(m_[i] - e_[i]) / max(s_[i], 1e-300):.2f})"
            )
    if bad:
        raise AssertionError(
            f"estimator looks biased: {len(bad)} entr{'y' if len(bad) == 1 else 'ies'} beyond "
            f"{sigmas} standard errors over n={n}:\n  " + "\n  ".join(bad[:20])
        )
    return report


def _exact_values(exact):
    """``exact`` as float64 NumPy arrays, or an :class:`ArgumentError` naming what it is."""
    try:
        return jax.tree.map(lambda e: np.asarray(e, np.float64), exact)
    except (TypeError, ValueError):
        leaves = [type(e).__name__ for e in jax.tree.leaves(exact)]
        raise ArgumentError(
            "assert_unbiased: exact must be a number, an array or a pytree of them (or a function "
            f"exact(*args) returning one); got {type(exact).__name__}"
            + (f" with leaves of type {sorted(set(leaves))}" if leaves and leaves != [type(exact).__name__] else "")
            + ".") from None


def _check_like(estimates, exact) -> None:
    """Raise when ``exact`` cannot be compared entry by entry with the estimates."""
    if jax.tree.structure(estimates) != jax.tree.structure(exact):
        raise ArgumentError(
            f"assert_unbiased: the estimator returns {jax.tree.structure(estimates)} but exact is "
            f"{jax.tree.structure(exact)}; give exact the estimates' structure.")
    for (path, e), x in zip(jax.tree_util.tree_flatten_with_path(estimates)[0], jax.tree.leaves(exact)):
        try:
            np.broadcast_shapes(np.shape(x), e.shape)
        except ValueError:
            raise ArgumentError(
                f"assert_unbiased: exact{jax.tree_util.keystr(path)} has shape {np.shape(x)} but the "
                f"estimates{jax.tree_util.keystr(path)} have shape {e.shape}.") from None
        if np.broadcast_shapes(np.shape(x), e.shape) != e.shape:
            raise ArgumentError(
                f"assert_unbiased: exact{jax.tree_util.keystr(path)} has shape {np.shape(x)}, larger than "
                f"the estimates' {e.shape}.")


def _at(tree, path):
    for k in path:
        tree = tree[k.key if hasattr(k, "key") else k.idx]
    return tree
