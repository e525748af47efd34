"""``fit``: train the parameters of a program with an optax optimizer, in one call.

The loop is fused: each chunk of ``chunk`` steps runs inside one jitted ``lax.scan`` whose
carry holds the parameters, the optimizer state and the key, so the host sees the device
once per chunk (to update the progress bar, the running objective and the stopping rule),
never once per step. The chunk function is compiled once: a last partial chunk runs through
the same compiled scan, with the steps past the end skipped (``lax.cond``, so they cost no
gradient evaluations).

Sharp edges:

- The objective is **minimized**. For an objective to maximize (an ELBO), pass
  ``maximize=True``; the history is then reported in the objective's own sign.
- The compiled chunk function is remembered for the last 8 combinations of objective,
  optimizer, ``argnums``, ``chunk`` and ``maximize``, compared by identity as ``jax.jit``
  compares functions: a second :func:`fit` with the *same* objects (a resumed run, another
  initialization, other data of the same shapes) compiles nothing, but ``optax.adam(1e-2)``
  written twice is two optimizers and compiles twice. Keep the optimizer in a variable.
  The cache holds references to those objects (and their compiled code) until evicted.
- A non-finite objective, gradient or updated parameter stops the run: the step is not
  applied, the result holds the last finite parameters, and a ``RuntimeWarning`` names the
  step. The rest of the chunk in which it happened is skipped on the device.
- The running objective (progress bar, ``FitResult.averages``, early stopping) is a mean of
  recent single-sample estimates, so it is noisy; choose ``EarlyStop.min_delta`` above that
  noise, or raise ``window``.
- Buffers are not donated: the ``params`` passed in stay valid, at the cost of holding two
  copies of the parameters and optimizer state during a chunk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import numbers
import sys
import time
import warnings
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._errors import ProgramError
from ..dsl._program import key_problem
from ..transforms._estimate import Expectation
from ..transforms._grad import value_and_grad
from . import _checkpoint as _ckpt
from . import _identity
from . import _sharding
from . import _jax_compat as compat
from . import _progress

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
            raise ValueError(f"EarlyStop: patience must be an integer >= 1 (a number of chunks); got {p!r}.")
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not (np.isfinite(d) and d >= 0):
            raise ValueError(f"EarlyStop: min_delta must be a finite number >= 0; got {d!r}.")


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

    def __repr__(self) -> str:
        last = f", final average={self.averages[-1]:.6g}" if len(self.averages) else ""
        return (
            f"FitResult(steps_run={self.steps_run}, stopped_early={self.stopped_early}, "
            f"reason={self.reason!r}{last})"
        )


class NonFiniteError(ProgramError, FloatingPointError):
    """``fit(..., throw=True)`` hit a non-finite objective, gradient or update; ``.result``
    holds the :class:`FitResult` (the parameters before that step)."""

    def __init__(self, message: str, result: FitResult):
        super().__init__(message)
        self.result = result


def _locate_nonfinite(compiled, state, args, argnums, maximize, optimizer, status) -> tuple[str | None, list[str]]:
    """Replay the failing step on the host (its key is the state's: a failed step does not
    advance it): the parameter leaves whose gradient or update is non-finite, and the
    operation and line that produced the first NaN (Inf), found with ``jax.debug_nans``.
    A gradient is replayed in forward mode along the bad leaves (a JVP of the estimate), so
    that the NaN appears in the estimator pass's own evaluation of the program's lines rather
    than in the transposed (backward) computation, which has no line of the program."""
    vg = compiled.value_and_grad
    _, sub = jax.random.split(state.key)
    full = args[:argnums] + (state.params,) + args[argnums:]
    leaves: list[str] = []
    try:
        (value, grads), _, _ = jax.jit(vg)(sub, state.track, *full)
        if status == _BAD_GRAD:
            tree = grads
        elif status == _BAD_PARAMS:
            grads = jax.tree.map(jnp.negative, grads) if maximize else grads
            updates, _ = optimizer.update(grads, state.opt_state, state.params)
            tree = optax.apply_updates(state.params, updates)
        else:
            tree = None
        if tree is not None:
            flat = jax.tree_util.tree_flatten_with_path(tree)[0]
            leaves = [f"params{jax.tree_util.keystr(path)}" for path, x in flat
                      if compat.is_float_dtype(x.dtype) and not bool(np.all(np.isfinite(_sharding.to_host(x))))]
        values = jax.tree.leaves((value, grads))
        has_nan = any(bool(np.any(np.isnan(_sharding.to_host(x)))) for x in values if compat.is_float_dtype(x.dtype))
    except Exception:  # noqa: BLE001  (a diagnosis, never a second failure)
        return None, leaves
    if status == _BAD_PARAMS:
        return None, leaves  # the optimizer's update, not the program, went bad
    check = jax.debug_nans if has_nan else jax.debug_infs
    replays = []
    if status == _BAD_GRAD and compiled.tracker is None:
        tangent = jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.asarray(f"params{jax.tree_util.keystr(path)}" in leaves, x.dtype) * jnp.ones_like(x)
            if compat.is_float_dtype(x.dtype) else x, state.params)

        def estimate(p):
            return compiled.program.estimate(sub, *(args[:argnums] + (p,) + args[argnums:]))

        replays.append(lambda: jax.jvp(estimate, (state.params,), (tangent,)))
    replays.append(lambda: vg(sub, state.track, *full))
    for replay in replays:
        try:
            with check(True), contextlib.redirect_stdout(io.StringIO()):
                jax.block_until_ready(replay())
        except FloatingPointError as e:
            if getattr(e, "estimax_located", False):
                return str(e).splitlines()[0], leaves
        except Exception:  # noqa: BLE001
            pass
    return None, leaves


# --- the fused loop ------------------------------------------------------------------------

# Status codes carried through the scan (failure inside jit is data).
_OK, _BAD_VALUE, _BAD_GRAD, _BAD_PARAMS = 0, 1, 2, 3
_CHECKPOINT_FORMAT = "estimax-fit/2"  # 2: the run identified by its program, optimizer, start, ... (_identity)
_STATUS_WHAT = {_BAD_VALUE: "objective", _BAD_GRAD: "gradient", _BAD_PARAMS: "updated parameters"}


class _State(NamedTuple):
    params: Any
    opt_state: Any
    key: Any
    step: jax.Array  # int32: steps applied so far
    status: jax.Array  # int32: one of the status codes
    track: Any = ()  # the tracking estimator's state (estimax.tracking), or ()


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if compat.is_float_dtype(x.dtype)]
    return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def _select(pred, on_true, on_false):
    return jax.tree.map(lambda a, b: jax.lax.select(pred, a, b), on_true, on_false)


class _Compiled(NamedTuple):
    program: Expectation
    value_and_grad: Callable  # (key, track, *args) -> ((value, grads), track, diagnostics)
    run_chunk: Callable  # (state, n_active, args) -> (state, (estimates, diagnostics)), jitted
    tracker: Any  # the tracked estimator, or None


def _build(objective, optimizer, argnums: int, chunk: int, maximize: bool, tracking=None, mesh=None,
           report_every=None) -> _Compiled:
    """The program, its estimator and the jitted chunk function: ``chunk`` steps of which the
    first ``n_active`` run (while the state stays finite) and the rest are skipped."""
    program = objective if isinstance(objective, Expectation) else Expectation(objective)
    tracker = None
    if tracking is None:
        plain = value_and_grad(program, argnums=argnums)

        def vg(key, track, *full):
            return plain(key, *full), track, {}
    else:
        from ..transforms._compositional import Tracker

        tracker = Tracker(program, tracking, argnums)
        vg = tracker.value_and_grad
    extra_args = isinstance(optimizer, optax.GradientTransformationExtraArgs)

    def one_step(state: _State, args):
        key, sub = jax.random.split(state.key)
        full = args[:argnums] + (state.params,) + args[argnums:]
        (value, grads), track, diags = vg(sub, state.track, *full)
        loss = -value if maximize else value
        if maximize:
            grads = jax.tree.map(jnp.negative, grads)
        if extra_args:  # e.g. optax.contrib.reduce_on_plateau reads the loss as `value`
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params, value=loss)
        else:
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        status = jnp.where(
            ~jnp.isfinite(value),
            _BAD_VALUE,
            jnp.where(~_all_finite(grads), _BAD_GRAD, jnp.where(~_all_finite(params), _BAD_PARAMS, _OK)),
        ).astype(jnp.int32)
        ok = status == _OK
        new = _State(
            params=_select(ok, params, state.params),
            opt_state=_select(ok, opt_state, state.opt_state),
            key=jax.lax.select(ok, key, state.key),
            step=state.step + ok.astype(jnp.int32),
            status=status,
            track=_select(ok, track, state.track),
        )
        return new, (value, diags)

    def run(state: _State, n_active, args, token):
        # the estimate's type, for the skipped steps (the estimator's trace is cached by jit)
        out = jax.eval_shape(vg, state.key, state.track, *(args[:argnums] + (state.params,) + args[argnums:]))
        (value, _), _, diags = out

        def skip(state: _State, args):
            del args
            nan = lambda s: jnp.full(s.shape, jnp.nan, s.dtype)
            return state, (nan(value), jax.tree.map(nan, diags))

        def body(state, i):
            active = (i < n_active) & (state.status == _OK)
            new, out = jax.lax.cond(active, one_step, skip, state, args)
            _progress.maybe_report(report_every, active & (new.status == _OK), token, new.step, out[0])
            return new, out

        return jax.lax.scan(body, state, jnp.arange(chunk, dtype=jnp.int32))

    jitted = jax.jit(run)
    if mesh is None:
        return _Compiled(program, vg, jitted, tracker)

    def run_on_mesh(state, n_active, args, token):  # traced under the mesh: ex.vmap partitions its lanes
        with compat.set_mesh(mesh):
            return jitted(state, n_active, args, token)

    return _Compiled(program, vg, run_on_mesh, tracker)


_build_cached = functools.lru_cache(maxsize=8)(_build)


def _compiled(objective, optimizer, argnums, chunk, maximize, tracking=None, mesh=None, report_every=None) -> _Compiled:
    """``_build``, remembered for the last few (objective, optimizer, ...) so that a second
    ``fit`` with the same objects (a resumed run, another start, other data of the same
    shapes) reuses the compiled chunk function. Objects that cannot be hashed are not cached."""
    try:
        hash((objective, optimizer, tracking))
    except TypeError:
        return _build(objective, optimizer, argnums, chunk, maximize, tracking, mesh, report_every)
    return _build_cached(objective, optimizer, argnums, chunk, maximize, tracking, mesh, report_every)


# --- progress ------------------------------------------------------------------------------


def _import_tqdm():
    """``tqdm.auto.tqdm`` if tqdm is installed, else ``None`` (tqdm is optional)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


def _interactive() -> bool:
    """Whether a progress bar is wanted by default: stderr is a terminal, or a Jupyter kernel runs."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):
        pass
    return "ipykernel" in sys.modules


class _LinePrinter:
    """A single-line progress display on stderr, for when tqdm is not installed."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n, self.postfix = total, desc, 0, ""
        self.t0 = time.perf_counter()
        self._width = 0

    def _show(self, end: str = ""):
        rate = self.n / max(time.perf_counter() - self.t0, 1e-9)
        line = f"{self.desc}: {self.n}/{self.total} steps ({rate:.0f} steps/s){self.postfix}"
        pad = " " * max(0, self._width - len(line))
        self._width = len(line)
        sys.stderr.write("\r" + line + pad + end)
        sys.stderr.flush()

    def show(self, step: int, average: float | None = None, estimate: float | None = None):
        self.n = max(self.n, step)
        if average is not None:
            self.postfix = f" objective={average:.5g}"
        elif estimate is not None:
            self.postfix = f" estimate={estimate:.5g}"
        self._show()

    def close(self, note: str | None = None):
        if note:
            self.postfix += f" [{note}]"
        self._show(end="\n")


class _TqdmBar:
    def __init__(self, tqdm, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)

    def show(self, step: int, average: float | None = None, estimate: float | None = None):
        if average is not None:
            self.bar.set_postfix_str(f"objective={average:.5g}", refresh=False)
        elif estimate is not None:
            self.bar.set_postfix_str(f"estimate={estimate:.5g}", refresh=False)
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def close(self, note: str | None = None):
        if note:
            self.bar.set_postfix_str(f"{self.bar.postfix or ''} [{note}]".strip(), refresh=True)
        self.bar.close()


class _NoBar:
    def show(self, step: int, average: float | None = None, estimate: float | None = None):
        del step, average, estimate

    def close(self, note: str | None = None):
        del note


class _Calls:
    """``progress=`` a function: called as ``progress(step, value)`` (the running objective
    after a chunk, or a step's estimate with ``progress_every``)."""

    def __init__(self, fn):
        self.fn = fn

    def show(self, step: int, average: float | None = None, estimate: float | None = None):
        self.fn(step, average if average is not None else estimate)

    def close(self, note: str | None = None):
        del note


def _make_progress(progress, total: int, desc: str):
    if callable(progress):
        return _Calls(progress)
    if progress is None:
        progress = _interactive()
    if not progress:
        return _NoBar()
    tqdm = _import_tqdm()
    if tqdm is None:
        return _LinePrinter(total, desc)
    return _TqdmBar(tqdm, total, desc)


# --- argument checks -----------------------------------------------------------------------


_MAX_STEPS = 2**31 - 1  # the step counter carried through the compiled loop is an int32


def _positive_int(value, name: str, what: str, limit: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"fit: {name} must be an integer >= 1 ({what}); got {value!r}.")
    if value < 1:
        raise ValueError(f"fit: {name} must be >= 1 ({what}); got {name}={value}.")
    if limit is not None and value > limit:
        raise ValueError(
            f"fit: {name}={value} is too large: the compiled loop counts steps in 32-bit integers, so {name} "
            f"must be at most 2**31 - 1 = {limit}" + (
                " (and a chunk keeps one estimate per step on the device: chunks of 100 to 10000 steps are "
                "typical)." if name == "chunk" else "."))
    return int(value)


def _check_key(key):
    got = key_problem(key)
    if got is not None:
        raise ProgramError(
            f"fit: key must be a single PRNG key (jax.random.key(0) or jax.random.PRNGKey(0)); got {got}."
        )


def _strong_float_params(params):
    """``params`` as JAX arrays with strong dtypes (a scan carry must keep its types); an
    error naming any leaf that is not floating point."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not leaves:
        raise ProgramError("fit: params is an empty pytree; there is nothing to optimize.")
    out = []
    for path, leaf in leaves:
        try:
            arr = jnp.asarray(leaf)
        except TypeError:
            raise ProgramError(
                f"fit: params leaf {jax.tree_util.keystr(path) or '(the root)'} is a "
                f"{type(leaf).__name__}, not an array; params must be a pytree of float arrays."
            ) from None
        if not compat.is_float_dtype(arr.dtype):
            raise ProgramError(
                f"fit: params leaf {jax.tree_util.keystr(path) or '(the root)'} has dtype {arr.dtype}; "
                "fit optimizes floating-point parameters. Pass integer or boolean inputs among "
                "the objective's other arguments (*args), or cast the leaf to float."
            )
        out.append(jnp.array(arr, dtype=arr.dtype))  # an explicit dtype drops weak typing
    return jax.tree_util.tree_unflatten(treedef, out)


def _as_early_stop(early_stop) -> EarlyStop | None:
    if early_stop is None or isinstance(early_stop, EarlyStop):
        return early_stop
    if isinstance(early_stop, Mapping):
        fields = {f.name for f in dataclasses.fields(EarlyStop)}
        unknown = sorted(set(early_stop) - fields)
        if unknown:
            raise ValueError(
                f"fit: early_stop has unknown field(s) {unknown}; the fields are {sorted(fields)}, "
                "e.g. early_stop=dict(patience=5, min_delta=1e-3)."
            )
        return EarlyStop(**early_stop)
    raise TypeError(
        f"fit: early_stop must be None, an EarlyStop or a dict of its fields; got "
        f"{type(early_stop).__name__}. Write e.g. early_stop=EarlyStop(patience=5, min_delta=1e-3)."
    )


# --- fit -----------------------------------------------------------------------------------


def _require(objective, tracking, full, argnums, require):
    """``fit(require=...)``: the certificate of what will run, checked before compiling."""
    # the plan lives a layer up (transforms): imported here, when asked for
    from ..transforms._estimate import as_program as _as_program
    from ..transforms._certify import require_certificate
    from ..transforms._explain import Plan, explain

    program = _as_program(objective, "fit")
    plan = explain(program, *full, argnums=argnums)
    if tracking is not None:
        from ..transforms._compositional import Tracker

        cert = Tracker(program, tracking, argnums).certificate(*full)
        plan = Plan(plan.program, plan.sites, cert)
    require_certificate(plan, require, f"fit({program.name})")


def fit(
    objective: Expectation | Callable,
    params,
    *args,
    optimizer: optax.GradientTransformation,
    steps: int,
    key,
    argnums: int = 0,
    maximize: bool = False,
    chunk: int = 100,
    window: int | None = None,
    opt_state=None,
    early_stop: EarlyStop | Mapping | None = None,
    callback: Callable[[FitProgress], Any] | None = None,
    progress: bool | Callable | None = None,
    progress_every: int | None = None,
    tracking="auto",
    tracking_state=None,
    min_ess: float = 0.05,
    checkpoint=None,
    devices=None,
    shard_data=(),
    throw: bool = False,
    require: str | None = None,
) -> FitResult:
    """Minimize the expected value of a program over ``params`` with an optax optimizer.

    Each step draws a fresh key, takes the estimator's ``(value, gradient)`` estimate of
    ``E[objective(...)]`` (:func:`estimax.value_and_grad`) and applies one optimizer
    update. Steps run fused in chunks of ``chunk``, each chunk one compiled ``lax.scan``;
    between chunks the host updates the progress bar, the running objective, the stopping
    rule and ``callback``. The chunk function is compiled once: a last partial chunk reuses
    it, skipping the steps past ``steps``; a later call with the same ``objective`` and
    ``optimizer`` objects (e.g. to continue a run) reuses it too.

    Args:
        objective: an ``@ex.expectation`` program returning a scalar (a plain function is
            made a program, as :func:`estimax.value_and_grad` does).
        params: the initial parameters, a pytree of floating-point arrays. It is passed to
            the objective as argument number ``argnums``; ``*args`` fill the other positions
            in order (with ``argnums=0``, the objective is called as ``objective(params, *args)``).
        *args: the objective's other arguments (data); not optimized.
        optimizer: an ``optax.GradientTransformation``, e.g. ``optax.adam(1e-2)``. One
            that takes extra arguments (``GradientTransformationExtraArgs``) also receives
            ``value=``, the step's estimate of the minimized objective (so
            ``optax.contrib.reduce_on_plateau`` works, on noisy single-sample values).
        steps: the number of optimizer steps (``>= 1``).
        key: a PRNG key (``jax.random.key(0)`` or ``jax.random.PRNGKey(0)``); step ``i`` uses
            the ``i``-th key split off it, so the result depends on ``key`` alone, not on
            ``chunk``.
        argnums: the position of ``params`` among the objective's arguments (one integer;
            for several parameter groups pass one pytree, e.g. a dict).
        maximize: maximize the objective instead (e.g. an ELBO). The history, averages and
            progress bar still show the objective's own value.
        chunk: steps fused in one compiled scan (``>= 1``). Larger chunks mean fewer
            host round-trips; the progress bar and stopping rules act between chunks. It
            does not change the result: step ``i`` uses the same key for any ``chunk``.
        window: the number of most recent estimates averaged into the running objective
            shown by the progress bar, recorded in ``FitResult.averages`` and used by
            ``early_stop``. Default: ``chunk``.
        opt_state: an optimizer state to resume from (default: ``optimizer.init(params)``).
        early_stop: ``EarlyStop(patience, min_delta)`` (or a dict of those fields) to stop
            when the running objective stops improving. A non-finite objective, gradient
            or update always stops the run (see :class:`FitResult`).
        callback: called as ``callback(FitProgress(...))`` after each chunk, on the host;
            returning a true value stops the run.
        progress: show a progress bar with the running objective. ``None`` (default): on
            when stderr is a terminal (or in a Jupyter kernel), off otherwise (tests, CI,
            logs). Uses tqdm when installed, else a single line on stderr. A function is
            called as ``progress(step, value)`` instead (e.g. to log).
        progress_every: report every ``k`` steps from *inside* the compiled loop, through an
            unordered host callback on those steps only: the device never waits for the host,
            so a long chunk still shows progress at no cost per step. The value reported is
            that step's estimate. Default ``None``: report between chunks (the running
            objective).
        tracking: how to estimate a program that applies a nonlinear function to an
            ``ex.expect``/``ex.log_expect`` (a compositional objective, whose plug-in
            estimator is biased): ``"auto"`` (default) tracks such expectations with
            ``estimax.tracking.SCGD()`` and leaves other programs alone; a method
            (``SCGD(beta)``, ``SOX(beta)``, ``MSVR(beta)``) chooses; ``None`` uses the
            plain (plug-in) estimator.
        tracking_state: the tracked estimates to resume from (``FitResult.tracking_state``).
        min_ess: warn (``RuntimeWarning``) when the importance weights of a tracked
            ``ex.log_expect`` have an effective sample size below this fraction (default 5%) of the
            draws (``FitResult.ess``) over two chunks in a row: the proposal covers the
            model poorly and the gradient's variance is exploding. The fraction pools the
            chunk's draws, each weight taken relative to the tracked value (so a fast move
            of the parameters, which the tracked value lags, lowers it too; hence two
            chunks).
        checkpoint: a folder (or an ``estimax.Checkpoint(folder, every=, keep=, meta=)``):
            the run's whole state -- parameters, optimizer state, PRNG key, step, tracked
            estimates, history and stopping-rule counters -- is saved there (orbax, atomically)
            every ``every`` steps (default 1000; chunks are cut to land on them), when the run
            ends, and when it is interrupted: on SIGINT (Ctrl-C) or SIGTERM the current chunk
            finishes, the state is saved and ``KeyboardInterrupt`` is raised (the signal as
            ``.signum``). Calling ``fit`` again with the same arguments resumes from the
            latest checkpoint and ends where an uninterrupted run ends; ``steps`` may be raised
            to continue a finished run. A folder written by another run -- another staged
            program, optimizer hyperparameters, data, key, starting point or options (the
            identity is the same in every process: ``docs/runtime.md``) -- is refused, naming
            what differs; ``Checkpoint(folder, resume=False)`` starts over. The folder is
            locked while the run goes: a second run on it is refused, naming the process.
        devices: run on several devices (XLA's SPMD partitioning): a device count, ``"all"``
            (every device of every process), a list of devices, a ``jax.sharding.Mesh``, or
            ``None`` (one device, the default). The
            outermost ``ex.vmap`` whose lane count the device count divides (particles,
            per-point latents) is split over the devices; parameters and optimizer state are
            replicated. The result equals the one-device result up to the order of
            floating-point sums (the draws are the same). See ``docs/runtime.md`` for several
            hosts (``jax.distributed``).
        shard_data: positions in ``*args`` (0 is the first data argument) of data whose
            leading axis is a batch to split over the devices (its length a multiple of the
            device count); the other arguments are replicated. With several processes, each
            passes its own part of these batches.
        throw: when a step makes the objective, the gradient or the parameters non-finite,
            raise :class:`NonFiniteError` (its ``.result`` is the :class:`FitResult`) instead
            of returning the result with a ``RuntimeWarning``. Either way the message names
            the step, the parameter leaves that went bad and, where the replay finds it, the
            operation and line of the program that produced the first NaN or Inf.
        require: ``"unbiased"`` or ``"consistent"``: check the estimator's certificate (the
            tracked one where ``tracking`` applies) before anything is compiled, and raise
            :class:`estimax.CertificateError` with its reasons when it is weaker.

    Returns:
        A :class:`FitResult`: ``params``, ``opt_state``, ``key``, ``history`` (per-step
        estimates), ``averages``, ``steps_run``, ``stopped_early`` and ``reason``.

    Raises:
        ValueError: ``steps``, ``chunk`` or ``window`` is not a positive integer.
        TypeError: ``optimizer`` is not an optax ``GradientTransformation``, or
            ``callback`` is not callable.
        estimax.ProgramError: ``objective`` is not a program, ``argnums`` or ``key`` is
            wrong, a ``params`` leaf is not floating point, or the objective does not return
            a scalar.

    Example:
        A Gaussian mean under a ``N(0, 1)`` prior: the optimal ``q(z) = N(m, s)`` is the
        posterior, ``m = sum(x) / (n + 1)`` and ``s = 1 / sqrt(n + 1)``.

        >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, optax
        >>> import estimax as ex
        >>> from estimax.runtime._fit import EarlyStop, fit
        >>> @ex.expectation
        ... def elbo(params, x):
        ...     q = dist.Normal(params["m"], jnp.exp(params["log_s"]))
        ...     z = ex.sample(q, name="z")
        ...     log_p = dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(x).sum()
        ...     return log_p - q.log_prob(z)
        >>> x = jnp.array([1.0, 2.0, 3.0])
        >>> params = {"m": jnp.array(0.0), "log_s": jnp.array(0.0)}
        >>> opt = optax.adam(1e-2)
        >>> result = fit(elbo, params, x, optimizer=opt, steps=3000, key=jax.random.key(0),
        ...              maximize=True)
        >>> result.steps_run, result.history.shape, result.stopped_early
        (3000, (3000,), False)
        >>> bool(abs(result.params["m"] - 1.5) < 0.1)   # sum(x) / (n + 1) = 1.5
        True
        >>> bool(abs(jnp.exp(result.params["log_s"]) - 0.5) < 0.05)   # 1 / sqrt(n + 1)
        True

        To continue a run, pass back its state; with the same objective and optimizer
        objects nothing is compiled again. A stopping rule ends a run early:

        >>> more = fit(elbo, result.params, x, optimizer=opt, steps=5000, key=result.key,
        ...            opt_state=result.opt_state, maximize=True,
        ...            early_stop=EarlyStop(patience=3, min_delta=1e-3))
        >>> more.stopped_early, more.reason[:7]
        (True, 'plateau')
    """
    # --- validate, at the call, naming the argument ---------------------------------------
    if not callable(objective):
        raise ProgramError(
            f"fit: objective must be a program (an @ex.expectation function) or a function; "
            f"got {type(objective).__name__}."
        )
    if not isinstance(optimizer, optax.GradientTransformation):
        hint = " (call it: optax.adam(1e-2), not optax.adam)" if callable(optimizer) else ""
        raise TypeError(
            f"fit: optimizer must be an optax GradientTransformation such as optax.adam(1e-2); "
            f"got {type(optimizer).__name__}{hint}."
        )
    steps = _positive_int(steps, "steps", "the number of optimizer steps", _MAX_STEPS)
    chunk = _positive_int(chunk, "chunk", "the number of steps fused in one compiled scan", _MAX_STEPS)
    window = chunk if window is None else _positive_int(window, "window", "the steps in the running average")
    if progress_every is not None:
        progress_every = _positive_int(progress_every, "progress_every", "the steps between progress reports")
    if progress is not None and not isinstance(progress, bool) and not callable(progress):
        raise TypeError(f"fit: progress must be True, False, None or a function (step, value); "
                        f"got {type(progress).__name__}.")
    if isinstance(argnums, bool) or not isinstance(argnums, numbers.Integral):
        raise ProgramError(
            f"fit: argnums must be one integer, the position of params among the objective's "
            f"arguments; got {argnums!r}. To optimize several groups, pass them as one pytree "
            "(a dict or tuple) in params."
        )
    if not 0 <= argnums <= len(args):
        raise ProgramError(
            f"fit: argnums={argnums} is out of range: the objective is called with params and "
            f"{len(args)} other argument(s), so argnums must be between 0 and {len(args)}."
        )
    argnums = int(argnums)
    if callback is not None and not callable(callback):
        raise TypeError(f"fit: callback must be callable or None; got {type(callback).__name__}.")
    early_stop = _as_early_stop(early_stop)
    checkpoint = _ckpt.as_checkpoint(checkpoint, "fit")
    mesh = None if devices is None else _sharding.device_mesh(devices)
    shard_data = _shard_positions(shard_data, len(args), mesh)
    _check_key(key)
    params = _strong_float_params(params)
    if opt_state is None:
        opt_state = optimizer.init(params)

    # --- trace the estimator once, outside the loop: its errors surface here --------------
    full = args[:argnums] + (params,) + args[argnums:]
    tracking = _resolve_tracking(objective, tracking, full, tracking_state)
    if require is not None:
        _require(objective, tracking, full, argnums, require)
    compiled = _compiled(objective, optimizer, argnums, chunk, bool(maximize), tracking, mesh, progress_every)
    program, vg, run_chunk, tracker = compiled
    track = () if tracker is None else tracker.init(*full) if tracking_state is None else tracking_state
    (value_struct, _), _, _ = jax.eval_shape(vg, key, track, *full)
    state = _State(params, opt_state, key, jnp.int32(0), jnp.int32(_OK), track)
    start = (params, opt_state, track)  # what the run starts from (part of a checkpoint's identity)
    if mesh is not None:  # parameters and state replicated, the chosen data split by batch
        state = _sharding.replicate(state, mesh)
        args = tuple(_sharding.shard_batch(a, mesh, what=f"fit: data argument {i}") if i in shard_data
                     else _sharding.replicate(a, mesh) for i, a in enumerate(args))
    ess: dict[str, list[float]] = {}
    warned: set = set()

    # --- the host loop: one device round-trip per chunk -----------------------------------
    history = np.empty(steps, dtype=np.dtype(value_struct.dtype))
    averages: list[float] = []
    average_steps: list[int] = []
    sign = -1.0 if maximize else 1.0  # improvement means sign * average going down
    best, waited = np.inf, 0
    done = 0
    ckpt = None
    if checkpoint is not None:
        identity, about = _run_identity(program, optimizer, full, start, key, args, argnums, maximize, tracking,
                                        early_stop, window)
        ckpt = _ckpt.Checkpointer(checkpoint.directory, format=_CHECKPOINT_FORMAT, meta=dict(checkpoint.meta or {}),
                                  identity=identity, about=about, keep=checkpoint.keep, info=checkpoint.info,
                                  resume=checkpoint.resume)
        try:
            restored = ckpt.restore(state)
        except BaseException:
            ckpt.close()
            raise
        if restored is not None:
            state, host, extra = restored
            done = int(state.step)
            if done > steps:
                ckpt.close()
                raise ProgramError(
                    f"fit: the checkpoint in {ckpt.directory} holds {done} steps, more than steps={steps}; pass "
                    f"steps={done} or more to continue it, or {_ckpt._words('start_over')}.")
            ckpt.resuming(done)
            history[:done] = host["history"]
            averages, average_steps = list(host["averages"]), [int(i) for i in host["average_steps"]]
            best, waited = float(extra["best"]), int(extra["waited"])
            ess, warned = {k: list(v) for k, v in extra["ess"].items()}, set(extra["warned"])
    every = (checkpoint.every or 1000) if checkpoint is not None else steps

    def save():
        ckpt.save(done, state, host={"history": history[:done], "averages": np.asarray(averages, np.float64),
                                     "average_steps": np.asarray(average_steps, np.int64)},
                  extra={"best": float(best), "waited": waited, "ess": ess, "warned": sorted(warned)})

    stopped_early, reason, nonfinite_step, nonfinite_where = False, f"completed {steps} steps", None, None
    bar = _make_progress(progress, steps, f"fit {program.name}")
    if done:
        bar.show(done, averages[-1] if averages else None)
    # with progress_every, the compiled loop itself reports every k steps (host callbacks)
    receiving = _progress.receiving(
        (lambda step, value: bar.show(step, estimate=value)) if progress_every and not isinstance(bar, _NoBar) else None)
    token = receiving.__enter__()
    note = None
    try:
        with _ckpt.stop_on_signals(ckpt is not None) as received:
            saved_at = done if ckpt is not None and ckpt.latest_step() == done else None
            while done < steps:
                n_active = min(chunk, steps - done, every - done % every)
                state, (estimates, diags) = run_chunk(state, np.int32(n_active), args, token)
                estimates = _sharding.to_host(estimates)  # the one host sync per chunk
                now = int(_sharding.to_host(state.step))
                applied = now - done
                for name, (m1, m2) in diags.items():
                    if applied == 0:
                        continue
                    m1, m2 = (_sharding.to_host(x).astype(np.float64)[:applied] for x in (m1, m2))
                    frac = float(np.mean(m1) ** 2 / np.mean(m2)) if np.mean(m2) > 0 else float("nan")
                    history_ess = ess.setdefault(name, [])
                    history_ess.append(frac)
                    # two chunks in a row: not the lag of a fast first move
                    low = [not f >= min_ess for f in history_ess[-2:]]
                    if len(low) == 2 and all(low) and name not in warned:
                        warned.add(name)
                        warnings.warn(
                            f"fit({program.name}): the importance weights of ex.log_expect({name!r}) have an "
                            f"effective sample size of {frac:.2%} of the draws over steps {done}-{now}: a few "
                            "draws dominate, so its estimates and the gradient have exploding variance. Use a "
                            "proposal that covers the model's mass (wider, or closer to the model) or more draws (n=).",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                history[done:now] = estimates[:applied]
                done = now
                average = None
                if done > 0 and applied > 0:
                    average = float(np.mean(history[max(0, done - window) : done]))
                    averages.append(average)
                    average_steps.append(done)
                if not (progress_every and isinstance(bar, _Calls)):  # a function hears the k-th steps only
                    bar.show(done, average)

                status = int(_sharding.to_host(state.status))
                if status != _OK:
                    nonfinite_step = done
                    bad = estimates[applied]
                    stopped_early = True
                    nonfinite_where, leaves = _locate_nonfinite(compiled, state, args, argnums, maximize, optimizer, status)
                    reason = (
                        f"non-finite {_STATUS_WHAT[status]} at step {done} (objective estimate {bad})"
                        + (f" in {', '.join(leaves)}" if leaves else "")
                        + (f", first produced by {nonfinite_where}" if nonfinite_where else "")
                        + "; the result holds the parameters before that step"
                    )
                    note = f"stopped: non-finite {_STATUS_WHAT[status]} at step {done}"
                    if not throw:
                        warnings.warn(f"fit({program.name}): {reason}.", RuntimeWarning, stacklevel=2)
                    break
                if callback is not None:
                    info = FitProgress(done, state.params, state.opt_state, average, estimates[:applied], state.key)
                    if callback(info):
                        if done < steps:
                            stopped_early = True
                            reason = f"stopped by callback after {done} steps"
                            note = "stopped by callback"
                        break
                if early_stop is not None and average is not None and done < steps:
                    score = sign * average
                    if score < best - early_stop.min_delta:
                        best, waited = score, 0
                    else:
                        waited += 1
                    if waited >= early_stop.patience:
                        stopped_early = True
                        reason = (
                            f"plateau: the running objective did not improve by more than "
                            f"{early_stop.min_delta:g} for {early_stop.patience} chunk(s); stopped after "
                            f"{done} steps at {average:.6g}"
                        )
                        note = f"plateau after {done} steps"
                        break
                if ckpt is not None and done % every == 0:
                    save()
                    saved_at = done
                if received:
                    if ckpt is not None and saved_at != done:
                        save()
                        saved_at = done
                    note = f"interrupted after {done} steps"
                    raise _ckpt.interrupted(received[0])
            if ckpt is not None and saved_at != done:
                save()
                saved_at = done
    finally:
        receiving.__exit__(None, None, None)
        bar.close(note)
        if ckpt is not None:
            ckpt.close()

    result = FitResult(
        params=state.params,
        opt_state=state.opt_state,
        key=state.key,
        history=history[:done].copy(),
        averages=np.asarray(averages, dtype=np.float64),
        average_steps=np.asarray(average_steps, dtype=np.int64),
        steps_run=done,
        stopped_early=stopped_early,
        reason=reason,
        nonfinite_step=nonfinite_step,
        nonfinite_where=nonfinite_where,
        tracking=tracking,
        tracking_state=None if tracker is None else state.track,
        ess={k: np.asarray(v) for k, v in ess.items()},
    )
    if throw and nonfinite_step is not None:
        raise NonFiniteError(f"fit({program.name}): {reason}.", result)
    return result


def _run_identity(program, optimizer, full, start, key, args, argnums, maximize, tracking, early_stop,
                  window) -> tuple[dict, dict]:
    """What identifies a run in its checkpoint (``runtime/_identity``): the staged program,
    the optimizer's hyperparameters, the starting point, the key, the data (as the loop sees
    them: with several processes, the global arrays) and the options that change the result;
    and, to say how the optimizers differ, the numbers found in the optimizer."""
    closed, in_tree, _ = program.stage(full)
    optimizer_digest, numbers_ = _identity.optimizer_identity(optimizer)
    identity = {
        "program": _identity.program_digest(closed, in_tree),
        "optimizer": optimizer_digest,
        "start": _ckpt.digest(start),
        "key": _ckpt.digest(key),
        "data": _ckpt.digest(args),
        "options": {
            "maximize": bool(maximize),
            "argnums": int(argnums),
            "tracking": _readable(tracking),
            # the stopping rule decides where a run ends (its window too)
            "early_stop": None if early_stop is None else
            {"patience": early_stop.patience, "min_delta": float(early_stop.min_delta), "window": int(window)},
        },
    }
    return identity, {"optimizer": numbers_}


def _readable(value) -> str | None:
    """A dataclass of numbers as its text (``SCGD(beta=0.1)``), else a stable digest."""
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and all(
            isinstance(getattr(value, f.name), (bool, int, float, str, type(None))) for f in dataclasses.fields(value)):
        return repr(value)
    return f"{type(value).__name__} {_identity.describe(value)[:16]}"


def _shard_positions(shard_data, n_args: int, mesh) -> frozenset:
    """``shard_data`` checked: positions among the data arguments, with ``devices=``."""
    if isinstance(shard_data, numbers.Integral) and not isinstance(shard_data, bool):
        shard_data = (shard_data,)
    try:
        positions = tuple(shard_data)
    except TypeError:
        positions = None
    if positions is None or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in positions):
        raise ProgramError(f"fit: shard_data must be positions of data arguments (integers); got {shard_data!r}.")
    bad = [i for i in positions if not 0 <= i < n_args]
    if bad:
        raise ProgramError(f"fit: shard_data={positions} names argument(s) {bad}, but the objective has {n_args} data "
                           f"argument(s) (positions 0 to {n_args - 1}).")
    if positions and mesh is None:
        raise ProgramError("fit: shard_data= splits data over devices; give devices= as well (a count or a mesh).")
    return frozenset(int(i) for i in positions)


def _resolve_tracking(objective, tracking, full, tracking_state):
    """The tracking method for ``tracking=`` (``"auto"``: SCGD where the program has a
    nonlinear function of an expectation, else none)."""
    from ..transforms._compositional import SCGD, Tracking

    if isinstance(tracking, str):
        if tracking != "auto":
            raise ProgramError(f'fit: tracking must be "auto", None or a method from estimax.tracking; got {tracking!r}.')
        from ..transforms._certify import compositions

        program = objective if isinstance(objective, Expectation) else Expectation(objective)
        closed, _, _ = program.stage(full)
        tracking = SCGD() if compositions(closed.jaxpr)[1] else None
    elif tracking is not None and not isinstance(tracking, Tracking):
        raise ProgramError(
            "fit: tracking must be \"auto\", None or a method from estimax.tracking (SCGD(beta), "
            f"SOX(beta), MSVR(beta)); got {type(tracking).__name__} {tracking!r}."
        )
    if tracking_state is not None and tracking is None:
        raise ProgramError("fit: tracking_state= was given, but the run tracks nothing (tracking=None, or a "
                           "program with no nonlinear function of an expectation).")
    return tracking


__all__ = ["EarlyStop", "FitProgress", "FitResult", "fit"]
