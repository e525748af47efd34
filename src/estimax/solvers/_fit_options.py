"""The options of ``ex.fit`` checked and resolved: parameters as strong float arrays, the
stopping rule, the certificate (``require=``), the tracking method, the data to shard, and
what identifies a run in its checkpoint; the importance weights' effective sample size,
watched between chunks; and the replay of a step that went non-finite."""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._errors import ArgumentError, ProgramError
from ..runtime import _checkpoint as _ckpt
from ..runtime import _identity
from ..runtime import _jax_compat as compat
from ..runtime import _sharding
from ..transforms._certify import compositions, require_certificate
from ..transforms._compositional import SCGD, Tracker, Tracking
from ..transforms._estimate import Expectation, as_program
from ..transforms._explain import Plan, explain
from . import _runner
from ._fit_result import EarlyStop


def strong_float_params(params):
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


def as_early_stop(early_stop) -> EarlyStop | None:
    if early_stop is None or isinstance(early_stop, EarlyStop):
        return early_stop
    if isinstance(early_stop, Mapping):
        fields = {f.name for f in dataclasses.fields(EarlyStop)}
        unknown = sorted(set(early_stop) - fields)
        if unknown:
            raise ArgumentError(
                f"fit: early_stop has unknown field(s) {unknown}; the fields are {sorted(fields)}, "
                "e.g. early_stop=dict(patience=5, min_delta=1e-3)."
            )
        return EarlyStop(**early_stop)
    raise ArgumentError(
        f"fit: early_stop must be None, an EarlyStop or a dict of its fields; got "
        f"{type(early_stop).__name__}. Write e.g. early_stop=EarlyStop(patience=5, min_delta=1e-3)."
    )


def require(objective, tracking, full, argnums, require):
    """``fit(require=...)``: the certificate of what will run, checked before compiling."""
    program = as_program(objective, "fit")
    plan = explain(program, *full, argnums=argnums)
    if tracking is not None:
        cert = Tracker(program, tracking, argnums).certificate(*full)
        plan = Plan(plan.program, plan.sites, cert)
    require_certificate(plan, require, f"fit({program.name})")


def run_identity(program, optimizer, full, start, key, args, argnums, maximize, tracking, early_stop,
                 window, average_from=None) -> tuple[dict, dict]:
    """What identifies a run in its checkpoint (``runtime/_identity``): the staged program,
    the optimizer's hyperparameters, the starting point, the key, the data (as the loop sees
    them: with several processes, the global arrays) and the options that change the result
    (``average_from`` only when given: a run without averaging has the identity it had before
    averaging existed); and, to say how the optimizers differ, the numbers found in the
    optimizer."""
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
            "tracking": readable(tracking),
            # the stopping rule decides where a run ends (its window too)
            "early_stop": None if early_stop is None else
            {"patience": early_stop.patience, "min_delta": float(early_stop.min_delta), "window": int(window)},
        },
    }
    if average_from is not None:  # the step after which iterates are averaged (a resolved fraction)
        identity["options"]["average_from"] = int(average_from)
    return identity, {"optimizer": numbers_}


def readable(value) -> str | None:
    """A dataclass of numbers as its text (``SCGD(beta=0.1)``), else a stable digest."""
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and all(
            isinstance(getattr(value, f.name), (bool, int, float, str, type(None))) for f in dataclasses.fields(value)):
        return repr(value)
    return f"{type(value).__name__} {_identity.describe(value)[:16]}"


def shard_positions(shard_data, n_args: int, mesh) -> frozenset:
    """``shard_data`` checked: positions among the data arguments, with ``devices=``."""
    if isinstance(shard_data, numbers.Integral) and not isinstance(shard_data, bool):
        shard_data = (shard_data,)
    try:
        positions = tuple(shard_data)
    except TypeError:
        positions = None
    if positions is None or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in positions):
        raise ArgumentError(f"fit: shard_data must be positions of data arguments (integers); got {shard_data!r}.")
    bad = [i for i in positions if not 0 <= i < n_args]
    if bad:
        raise ArgumentError(f"fit: shard_data={positions} names argument(s) {bad}, but the objective has {n_args} data "
                           f"argument(s) (positions 0 to {n_args - 1}).")
    if positions and mesh is None:
        raise ArgumentError("fit: shard_data= splits data over devices; give devices= as well (a count or a mesh).")
    return frozenset(int(i) for i in positions)


def resolve_tracking(objective, tracking, full, tracking_state):
    """The tracking method for ``tracking=`` (``"auto"``: SCGD where the program has a
    nonlinear function of an expectation, else none)."""
    if isinstance(tracking, str):
        if tracking != "auto":
            raise ArgumentError(f'fit: tracking must be "auto", None or a method from estimax.tracking; got {tracking!r}.')
        program = objective if isinstance(objective, Expectation) else Expectation(objective)
        closed, _, _ = program.stage(full)
        tracking = SCGD() if compositions(closed.jaxpr)[1] else None
    elif tracking is not None and not isinstance(tracking, Tracking):
        raise ArgumentError(
            "fit: tracking must be \"auto\", None or a method from estimax.tracking (SCGD(beta), "
            f"SOX(beta), MSVR(beta)); got {type(tracking).__name__} {tracking!r}."
        )
    if tracking_state is not None and tracking is None:
        raise ArgumentError("fit: tracking_state= was given, but the run tracks nothing (tracking=None, or a "
                           "program with no nonlinear function of an expectation).")
    return tracking


def watch_ess(program_name: str, diagnostics: dict, applied: int, before: int, now: int, ess: dict, warned: set,
              min_ess: float) -> None:
    """After a chunk of ``applied`` steps: record each tracked ``ex.log_expect``'s effective
    sample size (a fraction of the draws, pooled over the chunk) in ``ess``, and warn once per
    expectation when it is below ``min_ess`` two chunks in a row (not the lag of a fast first
    move)."""
    for name, (m1, m2) in diagnostics.items():
        m1, m2 = (np.asarray(x).astype(np.float64)[1:applied + 1] for x in (m1, m2))
        frac = float(np.mean(m1) ** 2 / np.mean(m2)) if np.mean(m2) > 0 else float("nan")
        history_ess = ess.setdefault(name, [])
        history_ess.append(frac)
        low = [not f >= min_ess for f in history_ess[-2:]]
        if len(low) == 2 and all(low) and name not in warned:
            warned.add(name)
            warnings.warn(
                f"fit({program_name}): the importance weights of ex.log_expect({name!r}) have an "
                f"effective sample size of {frac:.2%} of the draws over steps {before}-{now}: a few "
                "draws dominate, so its estimates and the gradient have exploding variance. Use a "
                "proposal that covers the model's mass (wider, or closer to the model) or more draws (n=).",
                RuntimeWarning,
                stacklevel=5,  # here, fit's per-chunk hook, the runner, fit, the caller
            )


def locate_nonfinite(loop, carry, args, argnums, maximize, optimizer, bad: str) -> tuple[str | None, list[str], Any]:
    """Replay the failing step on the host (its key is the carry's: a failed step does not
    advance it): the parameter leaves whose gradient or update is non-finite, and the
    operation and line that produced the first NaN (Inf), found with ``jax.debug_nans``.
    A gradient is replayed in forward mode along the bad leaves (a JVP of the estimate), so
    that the NaN appears in the estimator pass's own evaluation of the program's lines rather
    than in the transposed (backward) computation, which has no line of the program. Also
    returns the step's estimate of the objective (NaN when the replay fails)."""
    vg, state = loop.value_and_grad, carry.state
    _, sub = jax.random.split(carry.key)
    full = args[:argnums] + (state.params,) + args[argnums:]
    leaves: list[str] = []
    estimate_ = np.nan
    try:
        (value, grads), _, _ = jax.jit(vg)(sub, state.track, *full)
        estimate_ = _sharding.to_host(value)
        if bad == "gradient":
            tree = grads
        elif bad == "updated parameters":
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
        return None, leaves, estimate_
    if bad == "updated parameters":
        return None, leaves, estimate_  # the optimizer's update, not the program, went bad
    replays = []
    if bad == "gradient" and loop.tracker is None:
        tangent = jax.tree_util.tree_map_with_path(
            lambda path, x: jnp.asarray(f"params{jax.tree_util.keystr(path)}" in leaves, x.dtype) * jnp.ones_like(x)
            if compat.is_float_dtype(x.dtype) else x, state.params)

        def estimate(p):
            return loop.program.estimate(sub, *(args[:argnums] + (p,) + args[argnums:]))

        replays.append(lambda: jax.jvp(estimate, (state.params,), (tangent,)))
    replays.append(lambda: vg(sub, state.track, *full))
    return _runner.locate(replays, checks=(jax.debug_nans if has_nan else jax.debug_infs,)), leaves, estimate_


__all__ = ["as_early_stop", "locate_nonfinite", "readable", "require", "resolve_tracking", "run_identity", "shard_positions",
           "strong_float_params", "watch_ess"]
