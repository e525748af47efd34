"""What ``ex.fit`` takes and returns: :class:`EarlyStop`, :class:`FitProgress` (what a
callback sees), :class:`FitResult`, and :class:`NonFiniteError` (``throw=True``)."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Mapping, NamedTuple

import numpy as np

from .._errors import ArgumentError, ProgramError
from ._solution import RESULTS

# --- public values -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EarlyStop:
    """Stop when the running objective has stopped improving.

    After each chunk, the running objective (the mean of the last ``window`` per-step
    estimates, see :func:`fit`) is compared with the best seen so far. It counts as an
    improvement when it is better by more than ``min_delta`` (lower, or higher with
    ``maximize=True``). The run stops after ``patience`` chunks in a row without one.

    Args:
        patience: chunks in a row without improvement before stopping (``>= 1``).
        min_delta: the smallest change that counts as an improvement (``>= 0``), in the
            objective's units. Single-sample estimates are noisy: set it above the noise of
            the running objective, or the run may go on (or stop) on noise.

    Example:
        >>> EarlyStop(patience=3, min_delta=1e-3)
        EarlyStop(patience=3, min_delta=0.001)
    """

    patience: int = 5
    min_delta: float = 0.0

    def __post_init__(self):
        p, d = self.patience, self.min_delta
        if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 1:
            raise ArgumentError(f"EarlyStop: patience must be an integer >= 1 (a number of chunks); got {p!r}.")
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not (np.isfinite(d) and d >= 0):
            raise ArgumentError(f"EarlyStop: min_delta must be a finite number >= 0; got {d!r}.")


class FitProgress(NamedTuple):
    """What a ``callback`` passed to :func:`fit` receives after each chunk.

    Attributes:
        step: steps run so far.
        params: the parameters after ``step`` steps.
        opt_state: the optimizer state after ``step`` steps.
        average: the running objective (mean of the last ``window`` estimates).
        estimates: the per-step estimates of the objective in this chunk (NumPy).
        key: the key that continues the run from here, as ``FitResult.key`` does at the
            end: with ``params`` and ``opt_state``, what a checkpoint needs to resume the
            run exactly.
    """

    step: int
    params: Any
    opt_state: Any
    average: float
    estimates: np.ndarray
    key: Any = None


@dataclasses.dataclass(frozen=True, repr=False)
class FitResult:
    """The outcome of :func:`fit`.

    Attributes:
        params: the trained parameters (the last finite ones if the run hit a non-finite value).
        opt_state: the optimizer state that goes with ``params`` (pass it back to
            :func:`fit` to continue the run).
        key: the key that continues the run: ``fit(..., key=result.key)`` draws the keys a
            longer run would have drawn.
        history: the per-step estimates of the objective, ``history[i]`` taken at the
            parameters before step ``i``; shape ``(steps_run,)``, in the objective's own sign
            (also with ``maximize=True``). Ready to plot.
        averages: the running objective after each chunk (the mean of the last ``window``
            estimates), one entry per chunk that ran at least one step.
        average_steps: the number of steps run when each entry of ``averages`` was taken.
        steps_run: the number of steps applied to the parameters.
        stopped_early: whether the run ended before ``steps`` steps.
        reason: why the run ended, in words (``"completed 1000 steps"``, or what stopped it).
        nonfinite_step: the index of the step whose objective, gradient or update first
            became non-finite, or ``None``.
        nonfinite_where: the operation and the program's line that produced the first NaN
            (or Inf) of that step, found by replaying it with ``jax.debug_nans``
            (``"invalid value (nan) encountered in log: `log` at model.py:12"``), or ``None``
            when it arose outside the program's own lines (in the backward pass or the
            optimizer) or no step failed.
        tracking: the tracking method used for the program's nonlinear functions of
            expectations (``estimax.tracking``), or ``None`` (plain estimator).
        tracking_state: the tracked estimates after the last step (pass it back with
            ``tracking_state=`` to continue the run), or ``None``.
        ess: for each tracked ``ex.log_expect``, the effective sample size of its importance
            weights as a fraction of the draws, one entry per chunk (``average_steps``): near
            1 when the proposal matches the model, near 0 when a few weights dominate and the
            estimates' variance explodes.
        result: why the run ended, as every loop of estimax says it (``estimax.solvers.RESULTS``):
            ``successful`` (all ``steps`` ran), ``nonfinite``, ``stopped_by_callback`` or
            ``plateau`` (``early_stop``).
        averaged_params: with ``average_from=k``, the mean of the parameters after each step
            ``k + 1, ..., steps_run`` (Polyak-Ruppert averaging of the run's tail), shaped like
            ``params``; ``params`` itself when the run stopped before step ``k + 1``. ``None``
            without ``average_from``.
        averaged_steps: the number of iterates in ``averaged_params`` (``steps_run - k``, or 0).
    """

    params: Any
    opt_state: Any
    key: Any
    history: np.ndarray
    averages: np.ndarray
    average_steps: np.ndarray
    steps_run: int
    stopped_early: bool
    reason: str
    nonfinite_step: int | None = None
    nonfinite_where: str | None = None
    tracking: Any = None
    tracking_state: Any = None
    ess: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    result: RESULTS = RESULTS.successful
    averaged_params: Any = None
    averaged_steps: int = 0

    def __repr__(self) -> str:
        last = f", final average={self.averages[-1]:.6g}" if len(self.averages) else ""
        return (
            f"FitResult(steps_run={self.steps_run}, stopped_early={self.stopped_early}, "
            f"reason={self.reason!r}, tracking={self.tracking!r}{last})"
        )


class NonFiniteError(ProgramError, FloatingPointError):
    """``fit(..., throw=True)`` hit a non-finite objective, gradient or update; ``.result``
    holds the :class:`FitResult` (the parameters before that step)."""

    def __init__(self, message: str, result: FitResult):
        super().__init__(message)
        self.result = result


__all__ = ["EarlyStop", "FitProgress", "FitResult", "NonFiniteError"]
