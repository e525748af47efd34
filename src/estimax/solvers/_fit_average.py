"""Polyak-Ruppert averaging of ``ex.fit``'s iterates (``average_from=``).

A constant step size leaves a stochastic-gradient run fluctuating around the optimum, at a
distance set by the step size and the gradient's noise: the last iterate is one draw of that
fluctuation. The mean of the iterates of the run's tail (Polyak-Ruppert "tail" or "suffix"
averaging) keeps the drift and averages the fluctuation away, by about the square root of the
number of averaged iterates over their correlation time.

``fit(..., average_from=k)`` carries the running mean of the parameters after each step
``k + 1, k + 2, ...`` in the compiled loop's state (:class:`Averaging`): an update per step
on the device, no host work, saved and restored with the rest of the state, so a resumed run
holds the same mean, bit for bit, as an uninterrupted one. Before the first averaged step
the "mean" is the current parameters, so it is always a usable point.

Sharp edges:

- The mean is taken of the parameters as the optimizer sees them: averaging ``log_s`` and
  taking ``exp`` afterwards is the geometric mean of the scales, not their mean.
- A fraction (``average_from=0.5``) is a fraction of ``steps``: a run continued with a larger
  ``steps`` averages from another step, so it is another run (its checkpoint is refused,
  naming ``average_from``). Pass a step index to continue a run with the same averaging.
- The running mean is computed in the parameters' dtype (``m + (x - m) / n``): in float32 it
  carries about 1e-7 of relative rounding per step, far below the noise it removes.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import ArgumentError


class Averaging(NamedTuple):
    """The averaging state carried by the fit loop: ``mean``, shaped like the parameters (the
    mean of the parameters after steps ``start + 1 .. steps``; the current parameters while
    ``steps <= start``), ``steps`` taken and ``start`` (``average_from``), both int32."""

    mean: Any
    steps: jax.Array
    start: jax.Array


def resolve(average_from, steps: int) -> int | None:
    """``average_from`` checked and made a step index ``0 <= k < steps`` (``None``: no
    averaging). An integer is the step after which iterates are averaged; a float in
    ``[0, 1)`` a fraction of ``steps`` (rounded to the nearest step)."""
    if average_from is None:
        return None
    where = "fit: average_from"
    if isinstance(average_from, bool) or not isinstance(average_from, numbers.Real):
        raise ArgumentError(f"{where} must be a step index (an integer), a fraction of steps in [0, 1) or None; "
                            f"got {type(average_from).__name__} {average_from!r}.")
    if isinstance(average_from, numbers.Integral):
        if not 0 <= average_from < steps:
            raise ArgumentError(
                f"{where}={average_from} is not a step of this run: the parameters after steps average_from + 1 .. "
                f"steps are averaged, so it must be between 0 and steps - 1 = {steps - 1} (or a fraction of steps "
                f"in [0, 1), e.g. 0.5 for the second half).")
        return int(average_from)
    if not (np.isfinite(average_from) and 0.0 <= average_from < 1.0):
        raise ArgumentError(
            f"{where}={average_from!r} is not a fraction of steps in [0, 1) (0.5: average the second half); "
            f"for a step index pass an integer.")
    return min(int(round(float(average_from) * steps)), steps - 1)


def init(params, start) -> Averaging:
    return Averaging(mean=params, steps=jnp.int32(0), start=jnp.asarray(start, jnp.int32))


def update(state: Averaging, params) -> Averaging:
    """One step: ``params`` (the parameters after it) joins the mean when the step is past ``start``."""
    steps = state.steps + 1
    count = steps - state.start  # iterates averaged, this one included (<= 0: not yet)
    on = count > 0

    def mean(m, x):
        n = jnp.maximum(count, 1).astype(x.dtype)
        return jnp.where(on, m + (x - m) / n, x)

    return Averaging(jax.tree.map(mean, state.mean, params), steps, state.start)


def averaged(state: Averaging) -> int:
    """The number of iterates in the mean (on the host)."""
    return max(0, int(state.steps) - int(state.start))


__all__ = ["Averaging", "averaged", "init", "resolve", "update"]
