"""``estimax run``: train a file's parameters with ``estimax.fit`` (or solve a file with
constraints with ``estimax.solve``), checkpointed in the output folder every chunk and on
Ctrl-C, so that the same command resumes; writes the parameters, the history and a plot."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import optax

import estimax as ex
from ..runtime._checkpoint import (
    CheckpointError,
    FolderLock,
    read_record,
    reporting,
    save_npy_atomically,
    save_npz_atomically,
)
from ..runtime._progress import interactive
from ..solvers._fit import _CHECKPOINT_FORMAT
from ._errors import _EXIT_ERROR, _EXIT_OK, _EXIT_SIGNAL, _EXIT_USAGE, _Fail, _Invocation
from ._inputs import _load_program, _read_data
from ._plan import _plan_table, _stage, _summary


# The run's own digests, recorded in its checkpoint (data_sha256, source_sha256): sha256 of the
# bytes. runtime._checkpoint.digest identifies data too, but as another value (32 hex digits of a
# tree walk): using it would refuse, as "other data", every checkpoint written before.
def _digest(*chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c if isinstance(c, bytes) else str(c).encode())
    return h.hexdigest()


def _data_digest(data: dict | None) -> str:
    parts = []
    for name in sorted(data or {}):
        a = np.ascontiguousarray(np.asarray(data[name]))
        parts += [name, str(a.dtype), str(a.shape), a.tobytes()]
    return _digest(*parts)


def _save_npz_atomically(path: str, arrays: dict):
    """Write ``arrays`` to ``path`` in one step (see ``runtime._checkpoint``)."""
    try:
        save_npz_atomically(path, arrays)
    except OSError as e:
        raise _Fail(f"cannot write {path}: {e.strerror or e}") from None


def _save_npy_atomically(path: str, array):
    """Write one array to ``path`` in one step (see ``runtime._checkpoint``)."""
    try:
        save_npy_atomically(path, array)
    except OSError as e:
        raise _Fail(f"cannot write {path}: {e.strerror or e}") from None


_WORDS = dict(start_over="pass --fresh to start over", another_folder="pass --out another folder",
              run_again="run the same command again")  # what checkpoint errors tell the command's user


@contextlib.contextmanager
def _output_folder(out: str):
    """The output folder, created, checked to be writable and locked for this command: a second
    ``estimax run`` on the same folder is refused at once, naming the process that runs there."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise _Fail(f"cannot create the output folder {out}: {e.strerror or e}; pass --out a folder you can write",
                    _EXIT_USAGE) from None
    if not os.path.isdir(out):
        raise _Fail(f"the output folder {out} is a file; pass --out a folder", _EXIT_USAGE)
    lock = FolderLock(out, "output folder")
    with reporting(**_WORDS):
        try:
            lock.acquire()
        except CheckpointError as e:
            unwritable = str(e).startswith("cannot write")
            raise _Fail(str(e), _EXIT_USAGE if unwritable else _EXIT_ERROR) from None
    try:
        yield
    finally:
        lock.release()


def _check_counts(steps: int, chunk: int) -> None:
    """``--steps`` and ``--chunk`` within what the compiled loop counts (32-bit integers)."""
    limit = 2**31 - 1
    for name, value in (("--steps", steps), ("--chunk", chunk)):
        if value > limit:
            raise _Fail(f"{name} {value} is too large: the compiled loop counts steps in 32-bit integers, so {name} "
                        f"must be at most 2**31 - 1 = {limit}", _EXIT_USAGE)


def _checkpoint_record(folder: str) -> dict | None:
    """The record of the latest checkpoint of ``estimax run`` in ``folder``, or ``None``."""
    try:
        return read_record(folder)
    except CheckpointError as e:
        raise _Fail(f"{e}; pass --fresh to start over, or --out another folder") from None


_CHECKED = ("params", "optimizer", "lr", "seed", "data_sha256", "maximize", "average")  # what a resumed run must match


def _check_checkpoint(path: str, record: dict, config: dict) -> None:
    """Refuse, with what differs, a checkpoint written for other parameters, another
    optimizer, learning rate, seed, averaging or data."""
    again = "pass --fresh to start over, or --out another folder"
    got = record.get("format")
    if got != _CHECKPOINT_FORMAT and isinstance(got, str) and got.startswith("estimax-fit/"):
        raise _Fail(f"{path} holds a checkpoint in an older format ({got!r}; this version of estimax writes "
                    f"{_CHECKPOINT_FORMAT!r}), which does not record everything that identifies a run, so it cannot "
                    f"be resumed safely; {again}")
    if got != _CHECKPOINT_FORMAT or "optimizer" not in record:
        raise _Fail(f"{path} is not a checkpoint written by `estimax run`; {again}")
    if record.get("params") != config["params"]:
        old = ", ".join(f"{n}{s}" for n, s in (record.get("params") or {}).items())
        new = ", ".join(f"{n}{s}" for n, s in config["params"].items())
        raise _Fail(
            f"{path} was written for other parameters ({old or 'none'}); "
            f"{os.path.basename(config['file'])} declares {new or 'none'}; {again}"
        )
    differences = [
        f"{what} {record.get(field)!r} (now {config[field]!r})"
        for field, what in (("optimizer", "optimizer"), ("lr", "learning rate"), ("seed", "seed"),
                            ("average", "--average"))
        if record.get(field) != config[field]
    ]
    if differences:
        raise _Fail(f"{path} was written by a run with another {'; '.join(differences)}; {again}")
    tracked = (record.get("info") or {}).get("tracking", "auto")  # not recorded before --tracking: auto
    if tracked != config["tracking"]:
        raise _Fail(f"{path} was written by a run with --tracking {tracked} (now {config['tracking']}); {again}")
    if record.get("data_sha256") != config["data_sha256"]:
        raise _Fail(f"{path} was written by a run on other data; {again}")


# --- run -----------------------------------------------------------------------------------


def _optimizer(name: str, lr: float):
    return {"adam": optax.adam, "sgd": optax.sgd, "rmsprop": optax.rmsprop, "adagrad": optax.adagrad}[name](
        lr
    )


def _tracking_method(name: str, plan, program):
    """The method of ``--tracking NAME`` (``None``: the plug-in): ``auto`` is SCGD where the
    file has a composition, as ``ex.fit``'s default; a method for a file without one is a
    mistake of the command line."""
    if name == "auto":
        return ex.tracking.SCGD() if plan.compositions else None
    if name == "none":
        return None
    if not plan.compositions:
        raise _Fail(f"--tracking {name}: {program.filename} applies no nonlinear function to an expectation, so "
                    "there is nothing to track (its estimator is already the plain one); leave --tracking out",
                    _EXIT_USAGE)
    return {"scgd": ex.tracking.SCGD, "sox": ex.tracking.SOX, "msvr": ex.tracking.MSVR}[name]()


def _format_value(x) -> str:
    a = np.asarray(x)
    if a.ndim == 0:
        return f"{a.item() + 0.0:.6g}"  # + 0.0: a zero prints as 0, never -0
    if a.size <= 8:
        shown = np.round(a, 4) + 0.0  # what prints as 0. is 0., not -0.
        return " ".join(np.array2string(shown, precision=4, separator=", ", suppress_small=True).split())
    summary = f"mean {a.mean():.4g}, std {a.std():.4g}, min {a.min():.4g}, max {a.max():.4g}"
    return f"array of shape {list(a.shape)}: {summary}"


def _plot_history(history, path: str, title: str, maximize: bool) -> bool:
    """Write the loss curve to ``path``; ``False`` when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional dependency
        from matplotlib.figure import Figure
    except ImportError:
        return False
    steps = len(history)
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(steps)
    finite = np.isfinite(history)
    ax.plot(x[finite], history[finite], color="C0", alpha=0.3, lw=0.8, label="estimate (one per step)")
    window = max(1, min(50, steps // 20))
    if steps >= window and window > 1 and finite.all():
        smooth = np.convolve(history, np.ones(window) / window, mode="valid")
        ax.plot(
            np.arange(window - 1, steps), smooth, color="C0", lw=2, label=f"moving average ({window} steps)"
        )
    low, high = np.percentile(history[finite], [2, 100]) if finite.any() else (0.0, 1.0)
    if high > low:
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax.set_xlabel("step")
    ax.set_ylabel(f"objective ({'maximized' if maximize else 'minimized'})")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _train(
    program,
    data,
    dims,
    *,
    steps: int,
    optimizer_name: str,
    lr: float,
    seed: int,
    chunk: int,
    out: str,
    fresh: bool,
    progress: bool | None,
    tracking: str = "auto",
    average: float | None = None,
) -> tuple[int, dict | None]:
    """Train ``program`` with checkpoints in ``out``; ``(exit status, learned params)``: with
    ``average``, the mean of the parameters over that last fraction of the steps."""
    _check_counts(steps, chunk)
    if not program.params:
        raise _Fail(
            f"{program.filename} declares no parameters (`param name: real = ...`): there is nothing to train"
        )
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise _Fail(f"cannot create the output folder {out}: {e.strerror or e}", _EXIT_USAGE) from None
    checkpoint = os.path.join(out, "checkpoint")
    optimizer = _optimizer(optimizer_name, lr)
    params0 = program.init_params(dims)
    data = data if data is not None else {}
    config = {
        "file": os.path.abspath(program.filename),
        "source_sha256": _digest(program.source),
        "data_sha256": _data_digest(data),
        "optimizer": optimizer_name,
        "lr": lr,
        "seed": seed,
        "chunk": chunk,
        "maximize": bool(program.maximize),
        "params": {n: list(np.shape(v)) for n, v in params0.items()},
        "tracking": tracking,
        "average": average,  # the fraction; average_from, the step it gives with --steps
        "average_from": None if average is None else steps - max(1, round(average * steps)),
    }

    plan = _stage(program, params0, program.abstract_data(dims))
    method = _tracking_method(tracking, plan, program)
    print(_plan_table(program, plan, method))

    if fresh and os.path.isfile(checkpoint):  # not a checkpoint folder: --fresh replaces it
        os.unlink(checkpoint)
    record = None
    if not fresh:  # the command's own words for what differs, before estimax.fit checks the rest
        try:
            record = _checkpoint_record(checkpoint)
        except _Fail:
            record = None  # unreadable: estimax.fit says what is damaged and what is intact
    source_changed = False
    if record is not None:
        _check_checkpoint(checkpoint, record, config)
        start = int(record["step"])
        if start > steps:
            raise _Fail(
                f"{checkpoint} already holds {start} steps, more than --steps {steps}; pass "
                f"--steps {start} or more to continue it, or --fresh to start over"
            )
        source_changed = (record.get("info") or {}).get("source_sha256") != config["source_sha256"]
        before = (record.get("info") or {}).get("average_from")
        if average is not None and before != config["average_from"]:
            raise _Fail(f"{checkpoint} averages the parameters after step {before}, and --average {average:g} of "
                        f"--steps {steps} averages after step {config['average_from']}: another run; pass the "
                        "--steps it was written with, --fresh to start over, or --out another folder")

    def resuming(step, saved):  # called by estimax.fit once every check has passed
        del saved
        if step >= steps:
            print(f"{checkpoint} already holds all {steps} steps")
        else:
            print(f"resuming from {checkpoint} at step {step} of {steps}", flush=True)
        if source_changed:
            print(f"note: {program.filename} has changed since the checkpoint was written, but not the program it "
                  "stages (comments or layout): the run resumes")

    status = _EXIT_OK
    # from here on, Ctrl-C (SIGINT) or SIGTERM stops the run after the current chunk, saved
    print(
        f"training: {steps} steps of {optimizer_name}(lr={lr:g}), seed {seed}, chunks of {chunk}; "
        f"checkpoint {checkpoint}",
        flush=True,
    )
    with warnings.catch_warnings(), reporting(**_WORDS, on_resume=resuming):
        # a non-finite value is reported below, from the result
        warnings.filterwarnings("ignore", message=r"fit\(.*\): non-finite", category=RuntimeWarning)
        try:
            result = ex.fit(
                program.objective,
                params0,
                data,
                optimizer=optimizer,
                steps=steps,
                key=jax.random.PRNGKey(seed),
                maximize=program.maximize,
                chunk=chunk,
                progress=progress,
                tracking=method,
                checkpoint=ex.Checkpoint(checkpoint, every=chunk, meta={k: config[k] for k in _CHECKED}, info=config,
                                         resume=not fresh),
                average_from=config["average_from"],
            )
        except KeyboardInterrupt as stop:
            record = _checkpoint_record(checkpoint)
            at = int(record["step"]) if record else 0
            print(
                f"interrupted at step {at} of {steps}; {checkpoint} holds the run: run the same command to resume it",
                file=sys.stderr,
            )
            return _EXIT_SIGNAL.get(getattr(stop, "signum", signal.SIGINT), 130), None
        except ex.CheckpointError as e:
            if source_changed and {"program", "start"} & set(e.differences):
                raise _Fail(f"{program.filename} has changed since {checkpoint} was written, and so has the program "
                            "it stages: the checkpoint belongs to the earlier version; pass --fresh to start over, "
                            "or --out another folder") from None
            raise _Fail(str(e)) from None
    if result.nonfinite_step is not None:
        print(f"estimax: error: {program.filename}: training stopped: {result.reason}", file=sys.stderr)
        status = _EXIT_ERROR
    state = result
    history = np.asarray(state.history)
    chosen = state.params if average is None else state.averaged_params
    learned = {n: np.asarray(chosen[n]) for n in program.params}  # in the file's order
    _save_npz_atomically(os.path.join(out, "params.npz"), learned)
    _save_npy_atomically(os.path.join(out, "history.npy"), history)
    written = [os.path.join(out, "params.npz"), os.path.join(out, "history.npy")]
    png = os.path.join(out, "loss.png")
    if len(history) and _plot_history(history, png, os.path.basename(program.filename), program.maximize):
        written.append(png)
    elif len(history):
        print("matplotlib is not installed: loss.png not written (install matplotlib for the plot)")
    window = min(len(history), max(chunk, 1))
    if window:
        tail = history[-window:]
        print(f"{state.steps_run} steps; objective (mean of the last {window} estimates): {np.mean(tail):.6g}")
    if average is None:
        print("learned parameters:")
    else:
        last = ", ".join(f"{n} = {_format_value(state.params[n])}" for n in program.params)
        print(f"learned parameters: the mean of the iterates of the last {state.averaged_steps} steps "
              f"(--average {average:g}; the last iterate: {last}):")
    for name, value in learned.items():
        print(f"  {name} = {_format_value(value)}")
    print("wrote " + ", ".join(written))
    return status, learned


def _solve_constrained(program, data, dims, *, steps, solver_name, lr, seed, chunk, out, fresh, progress):
    """``estimax run`` on a file with constraints: ``ex.solve``, checkpointed every chunk; a
    re-run resumes (``--steps`` may be raised, as for training)."""
    _check_counts(steps, chunk)
    if not program.params:
        raise _Fail(f"{program.filename} declares no parameters: there is nothing to solve for")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise _Fail(f"cannot create the output folder {out}: {e.strerror or e}", _EXIT_USAGE) from None
    params0 = program.init_params(dims)
    data = data if data is not None else {}
    plan = _stage(program, params0, program.abstract_data(dims))
    print(_plan_table(program, plan))
    checkpoint = os.path.join(out, "solve-checkpoint")
    if fresh and os.path.isfile(checkpoint):  # not a checkpoint folder: --fresh replaces it
        os.unlink(checkpoint)
    solvers = {
        "auto": None,
        "exact_al": ex.solvers.ExactAL(),
        "al": ex.solvers.AugmentedLagrangian(),
        "stochastic": ex.solvers.StochasticLagrangian(optimizer=optax.adam(lr)),
    }
    solver = solvers[solver_name]
    print(f"solving: at most {steps} steps of {'the default solver' if solver is None else solver.name}, seed {seed}; "
          f"checkpoint {checkpoint}", flush=True)
    def resuming(step, saved):  # called by ex.solve once every check has passed
        del saved
        print(f"resuming from {checkpoint} at step {step} (at most {steps} steps)", flush=True)

    try:
        with reporting(**_WORDS, on_resume=resuming):
            solution = ex.solve(program.objective, params0, data, solver=solver, maximize=program.maximize,
                                max_steps=steps, key=jax.random.PRNGKey(seed),
                                checkpoint=ex.Checkpoint(checkpoint, every=chunk, resume=not fresh), every=chunk,
                                progress=progress)
    except KeyboardInterrupt as stop:
        print(f"interrupted; {checkpoint} holds the run: run the same command to resume it", file=sys.stderr)
        return _EXIT_SIGNAL.get(getattr(stop, "signum", signal.SIGINT), 130), None
    except ex.CheckpointError as e:
        raise _Fail(str(e)) from None
    except ex.EstimaxError as e:
        raise _Fail(f"{program.filename}: {e}") from None
    learned = {n: np.asarray(solution.params[n]) for n in program.params}
    _save_npz_atomically(os.path.join(out, "params.npz"), learned)
    _save_npy_atomically(os.path.join(out, "history.npy"),
                         np.stack([solution.history[k] for k in ("value", "kkt", "infeasibility")], 1))
    print(f"{solution.result.name}: {solution.message}")
    print(f"{solution.steps} steps ({solution.stats['solver']}); objective {solution.value:.10g}; "
          f"KKT residual {solution.kkt:.3g}; infeasibility {solution.infeasibility:.3g}")
    print("solution:")
    for name, value in learned.items():
        print(f"  {name} = {_format_value(value)}")
    print("multipliers:")
    for name, value in solution.multipliers.items():
        print(f"  {name} = {_format_value(np.asarray(value))}")
    print(f"wrote {os.path.join(out, 'params.npz')}, {os.path.join(out, 'history.npy')} (value, KKT residual, "
          "infeasibility per step)")
    return (_EXIT_OK if solution.success else _EXIT_ERROR), learned


def _cmd_run(args, invocation: _Invocation) -> int:
    program = _load_program(args.file, invocation, allow_imports=getattr(args, "allow_import", None) or ())
    data, dims = _read_data(program, args.data, needed=True, invocation=invocation)
    print(f"{program.filename}: {_summary(program, dims, args.data is not None)}")
    out = args.out if args.out is not None else os.path.join("out", Path(program.filename).stem)
    _check_counts(args.steps, args.chunk)
    # a bar on a terminal, nothing in a log or pipe; --progress: plain lines there too
    progress = True if args.progress else False if args.no_progress else None
    if program.constraints and args.average is not None:
        raise _Fail(f"{program.filename} has constraints, solved by estimax.solve: --average applies to training "
                    "(estimax.fit) only", _EXIT_USAGE)
    with _output_folder(out):  # one run at a time in a folder: refused before anything is staged
        if program.constraints:
            status, _ = _solve_constrained(program, data, dims, steps=args.steps, solver_name=args.solver, lr=args.lr,
                                           seed=args.seed, chunk=args.chunk, out=out, fresh=args.fresh,
                                           progress=interactive() if progress is None else progress)
            return status
        status, _ = _train(
            program,
            data,
            dims,
            steps=args.steps,
            optimizer_name=args.optimizer,
            lr=args.lr,
            seed=args.seed,
            chunk=args.chunk,
            out=out,
            fresh=args.fresh,
            progress=progress,
            tracking=args.tracking,
            average=args.average,
        )
        return status
