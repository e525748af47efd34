"""``fit``: train the parameters of a program with an optax optimizer, in one call.

``fit`` is a solver (:class:`Step`) whose state is ``(params, opt_state, grads, value,
track, ...)`` (with ``average_from=``, the running mean of the iterates too:
``solvers/_fit_average``) and whose step is one optimizer update, run by the same device driver
(``solvers/_driver``) and host runner (``solvers/_runner``) as ``ex.solve`` -- the way
optimistix runs an optax optimizer as a minimiser. Each chunk of ``chunk`` steps is one call
of the driver's compiled ``advance(carry, until)``, whose carry holds the parameters, the
optimizer state and the key, so the host sees the device once per chunk (to update the
progress bar, the running objective and the stopping rule: the per-chunk hook), never once
per step. ``until`` is an argument of the compiled loop, so a last, shorter chunk runs the
same compiled code.

Sharp edges:

- The objective is **minimized**. For an objective to maximize (an ELBO), pass
  ``maximize=True``; the history is then reported in the objective's own sign.
- The compiled loop is remembered for the last 8 combinations of objective, optimizer,
  ``argnums``, ``chunk`` and ``maximize``, compared by identity as ``jax.jit`` compares
  functions: a second :func:`fit` with the *same* objects (a resumed run, another
  initialization, other data of the same shapes) compiles nothing, but ``optax.adam(1e-2)``
  written twice is two optimizers and compiles twice. Keep the optimizer in a variable.
  The cache holds references to those objects (and their compiled code) until evicted.
- A non-finite objective, gradient or updated parameter stops the run: the step is not
  applied, the result holds the last finite parameters, and a ``RuntimeWarning`` names the
  step. The loop stops on the device at that step.
- The running objective (progress bar, ``FitResult.averages``, early stopping) is a mean of
  recent single-sample estimates, so it is noisy; choose ``EarlyStop.min_delta`` above that
  noise, or raise ``window``.
- Buffers are not donated: the ``params`` passed in stay valid, at the cost of holding two
  copies of the parameters and optimizer state during a chunk.
"""

from __future__ import annotations

import collections
import numbers
import warnings
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._errors import ArgumentError, ProgramError
from ..runtime import _progress
from ..runtime import _sharding
from ..transforms._compositional import Tracker
from ..transforms._estimate import Expectation
from ..transforms._grad import value_and_grad
from . import _driver, _runner
from . import _fit_average as _average
from . import _fit_options as _options
from ._base import Solver
from ._fit_result import EarlyStop, FitProgress, FitResult, NonFiniteError
from ._solution import RESULTS

# 2: the run identified by its program, optimizer, start, ... (_identity). The saved state is
# _Saved below, whatever the loop carries.
_CHECKPOINT_FORMAT = "estimax-fit/2"


class FitState(NamedTuple):
    """The state of :class:`Step`: the parameters and optimizer state, the last step's
    gradient and estimate (``value``, in the objective's own sign), the tracking estimator's
    state (``estimax.tracking``; ``()`` without), the step's diagnostics (per tracked
    ``ex.log_expect``, the first two moments of its importance weights) and the mean of the
    iterates (``average_from=``: ``solvers/_fit_average``; ``()`` without)."""

    params: Any
    opt_state: Any
    grads: Any
    value: jax.Array
    track: Any
    diagnostics: Any
    average: Any = ()


class _State(NamedTuple):
    """What a checkpoint of a fit holds (format ``estimax-fit/2``): ``status`` 0, or 1 + the
    index of the part that went non-finite (objective, gradient, updated parameters)."""

    params: Any
    opt_state: Any
    key: Any
    step: jax.Array
    status: jax.Array
    track: Any = ()


class _Averaged(NamedTuple):
    """A checkpoint of a fit with ``average_from=``: :class:`_State`'s fields and the mean of
    the iterates (a fit without averaging saves :class:`_State`, as before averaging existed)."""

    params: Any
    opt_state: Any
    key: Any
    step: jax.Array
    status: jax.Array
    track: Any
    average: _average.Averaging


class Step(Solver):
    """One optax update on a stochastic estimate of the objective's gradient. The problem it
    steps on is the tuple of the objective's data arguments; ``params`` go in at ``argnums``."""

    name = "optax"

    def __init__(self, vg: Callable, optimizer, argnums: int, maximize: bool, averaging: bool = False):
        self.vg, self.optimizer, self.argnums, self.maximize = vg, optimizer, argnums, maximize
        self.averaging = averaging
        self.extra_args = isinstance(optimizer, optax.GradientTransformationExtraArgs)

    def _full(self, args, params):
        return args[:self.argnums] + (params,) + args[self.argnums:]

    def init(self, problem, params, opt_state, track, average_from, key) -> FitState:
        (value, grads), _, diags = jax.eval_shape(self.vg, key, track, *self._full(problem, params))
        zeros = lambda s: jnp.zeros(s.shape, s.dtype)  # noqa: E731
        average = _average.init(params, average_from) if self.averaging else ()
        return FitState(params, opt_state, jax.tree.map(zeros, grads), zeros(value), track, jax.tree.map(zeros, diags),
                        average)

    def start(self, problem, start: tuple, key):
        return self.init(problem, *start, key), key  # no key drawn: step i uses the run's i-th split

    def step(self, problem, state: FitState, key) -> FitState:
        (value, grads), track, diags = self.vg(key, state.track, *self._full(problem, state.params))
        loss = -value if self.maximize else value
        if self.maximize:
            grads = jax.tree.map(jnp.negative, grads)
        if self.extra_args:  # e.g. optax.contrib.reduce_on_plateau reads the loss as `value`
            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params, value=loss)
        else:
            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        average = _average.update(state.average, params) if self.averaging else ()
        return FitState(params, opt_state, grads, value, track, diags, average)

    def terminate(self, problem, state, tol):
        del problem, state, tol  # the budget (steps) and the host's rules end a fit
        return jnp.bool_(False), jnp.int32(RESULTS.successful)

    def checked(self, state: FitState) -> dict:
        return {"objective": state.value, "gradient": state.grads, "updated parameters": state.params}

    def record(self, state: FitState) -> dict:
        return {"value": state.value, "diagnostics": state.diagnostics}

    def report(self, state: FitState) -> tuple:
        return (state.value,)


class _Loop(NamedTuple):
    program: Expectation
    value_and_grad: Callable  # (key, track, *args) -> ((value, grads), track, diagnostics)
    compiled: _runner.Compiled
    tracker: Any  # the tracked estimator, or None


def _build(objective, optimizer, argnums: int, chunk: int, maximize: bool, tracking, mesh, report_every,
           averaging) -> _Loop:
    program = objective if isinstance(objective, Expectation) else Expectation(objective)
    tracker = None
    if tracking is None:
        plain = value_and_grad(program, argnums=argnums)

        def vg(key, track, *full):
            return plain(key, *full), track, {}
    else:
        tracker = Tracker(program, tracking, argnums)
        vg = tracker.value_and_grad
    step = Step(vg, optimizer, argnums, maximize, averaging)
    compiled = _runner.Compiled(step, lambda data: data, tol=0.0, length=chunk + 1, report_every=report_every,
                                mesh=mesh)
    return _Loop(program, vg, compiled, tracker)


_CACHE: "collections.OrderedDict[tuple, _Loop]" = collections.OrderedDict()


def _loop(objective, optimizer, argnums, chunk, maximize, tracking=None, mesh=None, report_every=None,
          averaging=False) -> _Loop:
    """``_build``, remembered for the last 8 (objective, optimizer, ...) so that a second
    ``fit`` with the same objects (a resumed run, another start, other data of the same
    shapes) reuses the compiled loop. Objects that cannot be hashed are not cached."""
    key = (objective, optimizer, argnums, chunk, maximize, tracking, mesh, report_every, averaging)
    return _runner.cached(_CACHE, 8, key, lambda: _build(*key))


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
    average_from: int | float | None = None,
) -> FitResult:
    """Minimize the expected value of a program over ``params`` with an optax optimizer.

    Each step draws a fresh key, takes the estimator's ``(value, gradient)`` estimate of
    ``E[objective(...)]`` (:func:`estimax.value_and_grad`) and applies one optimizer
    update: a solver whose step is one optimizer update, run by the driver and host runner
    that run ``ex.solve`` (``estimax.solvers._driver``, ``_runner``). Steps run fused in
    chunks of ``chunk``, each chunk one compiled loop; between chunks the host updates the
    progress bar, the running objective, the stopping rule and ``callback``. The loop is
    compiled once, for every chunk length (a last, shorter one included); a later call with
    the same ``objective`` and ``optimizer`` objects (e.g. to continue a run) reuses it too.

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
        chunk: steps fused in one compiled loop (``>= 1``). Larger chunks mean fewer
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
            logs). Uses tqdm when installed, else a single line on stderr. ``True`` with
            stderr not a terminal (a log, a pipe): a plain line every 10 seconds and one at
            the end, never a carriage return. A resumed run's bar starts at its step; a run
            with no step left shows none. A function is called as ``progress(step, value)``
            instead (e.g. to log).
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
        average_from: Polyak-Ruppert averaging: ``FitResult.averaged_params`` is the mean of
            the parameters after each step from ``average_from + 1`` to the last, kept by the
            compiled loop (no host work per step) and checkpointed with the run. An integer
            ``0 <= k < steps`` is a step; a float in ``[0, 1)`` a fraction of ``steps``
            (``0.5``: the second half). A constant step size leaves the last iterate
            fluctuating around the optimum; the tail's mean averages that noise away. It is
            part of the run's identity: a checkpoint is not resumed with other averaging (nor,
            for a fraction, with another ``steps``). Default ``None``: no averaging.

    Returns:
        A :class:`FitResult`: ``params``, ``opt_state``, ``key``, ``history`` (per-step
        estimates), ``averages``, ``steps_run``, ``stopped_early``, ``reason`` and, with
        ``average_from``, ``averaged_params``.

    Raises:
        estimax.ArgumentError: an option is wrong: ``steps``, ``chunk`` or ``window`` is not
            a positive integer, ``optimizer`` is not an optax ``GradientTransformation``,
            ``callback`` is not callable, ``key``, ``argnums``, ``progress``, ``checkpoint``,
            ``early_stop``, ``tracking``, ``shard_data`` or ``average_from`` is wrong (worded
            as :func:`estimax.solve` words the same mistakes).
        estimax.ProgramError: ``objective`` is not a program, a ``params`` leaf is not
            floating point, or the objective does not return a scalar.

    Example:
        A Gaussian mean under a ``N(0, 1)`` prior: the optimal ``q(z) = N(m, s)`` is the
        posterior, ``m = sum(x) / (n + 1)`` and ``s = 1 / sqrt(n + 1)``.

        >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, optax
        >>> import estimax as ex
        >>> from estimax.solvers._fit import EarlyStop, fit
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
    where = "fit"
    if not callable(objective):
        raise ProgramError(
            f"fit: objective must be a program (an @ex.expectation function) or a function; "
            f"got {type(objective).__name__}."
        )
    if not isinstance(optimizer, optax.GradientTransformation):
        hint = " (call it: optax.adam(1e-2), not optax.adam)" if callable(optimizer) else ""
        raise ArgumentError(
            f"fit: optimizer must be an optax GradientTransformation such as optax.adam(1e-2); "
            f"got {type(optimizer).__name__}{hint}."
        )
    steps = _runner.positive_int(where, "steps", steps, "the number of optimizer steps", _runner.MAX_STEPS)
    chunk = _runner.positive_int(where, "chunk", chunk, "the number of steps fused in one compiled loop",
                                 _runner.MAX_STEPS)
    window = chunk if window is None else _runner.positive_int(where, "window", window, "the steps in the running average")
    if progress_every is not None:
        progress_every = _runner.positive_int(where, "progress_every", progress_every,
                                              "the steps between progress reports")
    _runner.check_progress(where, progress)
    if isinstance(argnums, bool) or not isinstance(argnums, numbers.Integral):
        raise ArgumentError(
            f"fit: argnums must be one integer, the position of params among the objective's "
            f"arguments; got {argnums!r}. To optimize several groups, pass them as one pytree "
            "(a dict or tuple) in params."
        )
    if not 0 <= argnums <= len(args):
        raise ArgumentError(
            f"fit: argnums={argnums} is out of range: the objective is called with params and "
            f"{len(args)} other argument(s), so argnums must be between 0 and {len(args)}."
        )
    argnums = int(argnums)
    if callback is not None and not callable(callback):
        raise ArgumentError(f"fit: callback must be callable or None; got {type(callback).__name__}.")
    early_stop = _options.as_early_stop(early_stop)
    checkpoint = _runner.as_checkpoint(where, checkpoint)
    mesh = None if devices is None else _sharding.device_mesh(devices)
    shard_data = _options.shard_positions(shard_data, len(args), mesh)
    _runner.check_key(where, key)
    average_from = _average.resolve(average_from, steps)
    params = _options.strong_float_params(params)
    if opt_state is None:
        opt_state = optimizer.init(params)

    # --- trace the estimator once, outside the loop: its errors surface here --------------
    full = args[:argnums] + (params,) + args[argnums:]
    tracking = _options.resolve_tracking(objective, tracking, full, tracking_state)
    if require is not None:
        _options.require(objective, tracking, full, argnums, require)
    loop = _loop(objective, optimizer, argnums, chunk, bool(maximize), tracking, mesh, progress_every,
                 average_from is not None)
    program, vg, compiled, tracker = loop
    track = () if tracker is None else tracker.init(*full) if tracking_state is None else tracking_state
    (value_struct, _), _, _ = jax.eval_shape(vg, key, track, *full)
    start = (params, opt_state, track)  # what the run starts from (part of a checkpoint's identity)
    point = (*start, () if average_from is None else jnp.int32(average_from))
    if mesh is not None:  # parameters and state replicated, the chosen data split by batch
        point, key = _sharding.replicate((point, key), mesh)
        args = tuple(_sharding.shard_batch(a, mesh, what=f"fit: data argument {i}") if i in shard_data
                     else _sharding.replicate(a, mesh) for i, a in enumerate(args))
    carry = compiled.start(point, key, args)
    ess: dict[str, list[float]] = {}
    warned: set = set()

    # --- the host loop: one device round-trip per chunk -----------------------------------
    history = np.empty(steps, dtype=np.dtype(value_struct.dtype))
    averages: list[float] = []
    average_steps: list[int] = []
    sign = -1.0 if maximize else 1.0  # improvement means sign * average going down
    counters = {"best": np.inf, "waited": 0}
    ckpt = None
    if checkpoint is not None:
        identity, about = _options.run_identity(program, optimizer, full, start, key, args, argnums, maximize, tracking,
                                                early_stop, window, average_from)
        ckpt = _runner.open_checkpoint(checkpoint, _CHECKPOINT_FORMAT, identity, about)
        restored = _runner.restore(ckpt, _saved(carry), "fit", "steps", steps, lambda s: int(s.step))
        if restored is not None:
            saved, host, extra = restored
            done = int(saved.step)
            carry = carry._replace(
                state=carry.state._replace(params=saved.params, opt_state=saved.opt_state, track=saved.track,
                                           average=saved.average if isinstance(saved, _Averaged) else ()),
                key=saved.key, steps=saved.step)
            status = int(saved.status)
            if status:
                carry = carry._replace(done=jnp.bool_(True), result=jnp.int32(RESULTS.nonfinite),
                                       bad_field=jnp.int32(status - 1))
            ckpt.resuming(done)
            history[:done] = host["history"]
            averages, average_steps = list(host["averages"]), [int(i) for i in host["average_steps"]]
            counters = {"best": float(extra["best"]), "waited": int(extra["waited"])}
            ess, warned = {k: list(v) for k, v in extra["ess"].items()}, set(extra["warned"])
    every = (checkpoint.every or 1000) if checkpoint is not None else steps

    def save(c):
        done = int(c.steps)
        ckpt.save(done, _saved(c), host={"history": history[:done], "averages": np.asarray(averages, np.float64),
                                         "average_steps": np.asarray(average_steps, np.int64)},
                  extra={"best": float(counters["best"]), "waited": counters["waited"], "ess": ess,
                         "warned": sorted(warned)})

    end = {"result": RESULTS.successful, "reason": f"completed {steps} steps", "note": None}

    def after_chunk(c, before: int) -> bool:
        """The per-chunk hook: history, running objective, ESS warnings, progress, the
        non-finite stop, the callback and the stopping rule. True stops the run."""
        recorded = jax.tree.map(_sharding.to_host, c.history)  # the one host sync per chunk
        now = int(_sharding.to_host(c.steps))
        applied = now - before
        estimates = np.asarray(recorded["value"])[1:]
        if applied:
            _options.watch_ess(program.name, recorded["diagnostics"], applied, before, now, ess, warned, min_ess)
        history[before:now] = estimates[:applied]
        average = None
        if now > 0 and applied > 0:
            average = float(np.mean(history[max(0, now - window) : now]))
            averages.append(average)
            average_steps.append(now)
        if not (progress_every and isinstance(bar, _progress.Calls)):  # a function hears the k-th steps only
            bar.show(now, average)
        if int(_sharding.to_host(c.result)) == RESULTS.nonfinite:
            return True
        if callback is not None:
            info = FitProgress(now, c.state.params, c.state.opt_state, average, estimates[:applied], c.key)
            if callback(info):
                if now < steps:
                    end.update(result=RESULTS.stopped_by_callback, reason=f"stopped by callback after {now} steps",
                               note="stopped by callback")
                return True
        if early_stop is not None and average is not None and now < steps:
            score = sign * average
            if score < counters["best"] - early_stop.min_delta:
                counters.update(best=score, waited=0)
            else:
                counters["waited"] += 1
            if counters["waited"] >= early_stop.patience:
                end.update(result=RESULTS.plateau, note=f"plateau after {now} steps", reason=(
                    f"plateau: the running objective did not improve by more than "
                    f"{early_stop.min_delta:g} for {early_stop.patience} chunk(s); stopped after "
                    f"{now} steps at {average:.6g}"))
                return True
        return False

    def on_interrupt(done: int) -> None:
        end["note"] = f"interrupted after {done} steps"

    done = int(carry.steps)
    # a resumed run's bar starts at its step; one with no step left to run shows none
    shown = progress if callable(progress) or (done < steps and not bool(carry.done)) else False
    bar = _progress.make_display(shown, steps, f"fit {program.name}", initial=done)
    if done:
        bar.show(done, averages[-1] if averages else None)
    # with progress_every, the compiled loop itself reports every k steps (host callbacks)
    receiving = _progress.receiving(
        (lambda step, value: bar.show(step, estimate=value))
        if progress_every and not isinstance(bar, _progress.NoDisplay) else None)
    token = receiving.__enter__()
    nonfinite_step = nonfinite_where = None
    try:
        carry = _runner.drive(
            compiled, carry, args, max_steps=steps, base=lambda d: d, after_chunk=after_chunk, ckpt=ckpt, save=save,
            until=lambda d: d + min(chunk, steps - d, every - d % every), save_now=lambda d: d % every == 0,
            on_interrupt=on_interrupt, token=token)
        done = int(carry.steps)
        if int(_sharding.to_host(carry.result)) == RESULTS.nonfinite:
            what = _driver.bad_part(compiled.solver, jax.device_get(carry))
            nonfinite_step = done
            # the failed step is not in the history (the driver keeps iterates only): its
            # estimate comes from the replay, with the same key and parameters
            nonfinite_where, leaves, bad = _options.locate_nonfinite(loop, carry, args, argnums, maximize, optimizer,
                                                                     what)
            end.update(result=RESULTS.nonfinite, note=f"stopped: non-finite {what} at step {done}", reason=(
                f"non-finite {what} at step {done} (objective estimate {bad})"
                + (f" in {', '.join(leaves)}" if leaves else "")
                + (f", first produced by {nonfinite_where}" if nonfinite_where else "")
                + "; the result holds the parameters before that step"))
            if not throw:
                warnings.warn(f"fit({program.name}): {end['reason']}.", RuntimeWarning, stacklevel=2)
    finally:
        receiving.__exit__(None, None, None)
        bar.close(end["note"])
        if ckpt is not None:
            ckpt.close()

    mean = carry.state.average
    result = FitResult(
        params=carry.state.params,
        opt_state=carry.state.opt_state,
        key=carry.key,
        history=history[:done].copy(),
        averages=np.asarray(averages, dtype=np.float64),
        average_steps=np.asarray(average_steps, dtype=np.int64),
        steps_run=done,
        stopped_early=end["result"] != RESULTS.successful,
        reason=end["reason"],
        nonfinite_step=nonfinite_step,
        nonfinite_where=nonfinite_where,
        tracking=tracking,
        tracking_state=None if tracker is None else carry.state.track,
        ess={k: np.asarray(v) for k, v in ess.items()},
        result=end["result"],
        averaged_params=mean.mean if average_from is not None else None,
        averaged_steps=_average.averaged(mean) if average_from is not None else 0,
    )
    if throw and nonfinite_step is not None:
        raise NonFiniteError(f"fit({program.name}): {end['reason']}.", result)
    return result


def _saved(carry) -> _State | _Averaged:
    """The checkpointed state of a fit's carry (``estimax-fit/2``)."""
    status = jnp.where(carry.result == RESULTS.nonfinite, carry.bad_field + 1, 0).astype(jnp.int32)
    state = _State(carry.state.params, carry.state.opt_state, carry.key, carry.steps, status, carry.state.track)
    return _Averaged(*state, carry.state.average) if isinstance(carry.state.average, _average.Averaging) else state


__all__ = ["EarlyStop", "FitProgress", "FitResult", "FitState", "NonFiniteError", "Step", "fit"]
