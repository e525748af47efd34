"""The ``estimax`` command: check, explain and train objective files.

    estimax check FILE [--data DATA.npz] [--allow-import MODULE|PATH ...]
    estimax explain FILE [--data DATA.npz] [--params PARAMS.npz] [--variance] [--seed S]
                         [--allow-import MODULE|PATH ...]
    estimax run FILE [--data DATA.npz] [--steps N] [--optimizer adam] [--lr LR] [--seed S]
                     [--chunk C] [--out DIR] [--fresh] [--no-progress]
                     [--allow-import MODULE|PATH ...]
    estimax demo [--steps N] [--out DIR]

``main(argv)`` runs one command and returns its exit status:

- 0: done.
- 1: an error in the objective file, the data, a parameter file or a checkpoint. Errors in
  the file read ``file:line:column: error: message``, then the line with a caret under the
  offending text (and, for syntax errors, what was expected there).
- 2: a usage error: a bad option, a file that does not exist or cannot be read.
- 3: an internal error of estimax (one line; ``--debug`` shows the traceback).
- 130: interrupted (SIGINT, Ctrl-C); 143: terminated (SIGTERM). An interrupted ``run``
  saves its checkpoint first; the same command then resumes it.

Sharp edges:

- ``run`` resumes bit for bit: its checkpoint (``OUT/checkpoint/``, :func:`estimax.fit`'s,
  through orbax) holds the parameters, the optimizer state, the
  PRNG key, the step and the history, and step ``i`` of :func:`estimax.fit` uses the
  ``i``-th key split off the run's key whatever the chunking. A resumed run therefore ends
  with the parameters an uninterrupted run would have (on the same machine and JAX
  version). A checkpoint is refused when the file's parameters, the program it stages
  (comments and layout aside), the optimizer, the learning rate, the seed or the data differ
  from the run that wrote it; ``--fresh`` starts over. A file with constraints resumes the
  same way (``--steps`` may be raised). The output folder is locked while a ``run`` goes: a
  second ``run`` on it is refused, naming the process that holds it.
- Reading a file runs only code it may import: the numerical modules of the allow-list and
  ``.py`` files in the objective file's own folder (importing a ``.py`` file runs it). Any
  other import is a located error until ``--allow-import MODULE|PATH`` names it (see
  ``estimax.dsl.text._imports``).
- ``check`` and ``explain`` without ``--data`` stage the objective with every named size
  (``real[N]``) set to a small default; pass ``--data`` to use the data's sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import math
import os
import re
import shutil
import signal
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

_EXIT_OK, _EXIT_ERROR, _EXIT_USAGE, _EXIT_INTERNAL = 0, 1, 2, 3
_EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
_OPTIMIZERS = ("adam", "sgd", "rmsprop", "adagrad")


class _Fail(Exception):
    """An error the command reports in one message, with its exit status."""

    def __init__(self, message: str, code: int = _EXIT_ERROR):
        super().__init__(message)
        self.message, self.code = message, code


@dataclasses.dataclass
class _Invocation:
    """What error reporting needs to know: the file being worked on and its program."""

    path: str | None = None
    program: Any = None
    note: str | None = None  # printed after a TextError (e.g. where the data came from)


# --- reading inputs ------------------------------------------------------------------------


def _load_program(path: str, invocation: _Invocation, allow_imports=()):
    """The parsed, checked objective file at ``path`` (an ``ex.text.TextProgram``);
    ``allow_imports``: what it may import beyond the defaults (``--allow-import``)."""
    import estimax as ex
    from estimax.dsl.text._program import MAX_SOURCE_BYTES, not_a_regular_file

    invocation.path = path
    if not os.path.exists(path):
        raise _Fail(f"no such file: {path}", _EXIT_USAGE)
    if os.path.isdir(path):
        raise _Fail(f"{path} is a directory, not an objective file", _EXIT_USAGE)
    kind = not_a_regular_file(path)
    if kind is not None:  # a FIFO would block, /dev/zero would never end
        raise _Fail(f"{path} is {kind}, not an objective file; give the path of a .emx file", _EXIT_USAGE)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SOURCE_BYTES + 1)
    except OSError as e:
        raise _Fail(f"cannot read {path}: {e.strerror or e}", _EXIT_USAGE) from None
    if len(raw) > MAX_SOURCE_BYTES:
        raise _Fail(f"{path} is larger than {MAX_SOURCE_BYTES // 2**20} MiB, too large for an objective file "
                    "(is it the right file?)", _EXIT_USAGE)
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise _Fail(
            f"{path}:{line}: the file is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})"
        ) from None
    if any(not entry.strip() for entry in allow_imports or ()):
        raise _Fail("--allow-import needs a module name or a path; got an empty one", _EXIT_USAGE)
    program = ex.text.parse(source, path, allow_imports=allow_imports or ())
    invocation.program = program
    return program


def _load_npz(path: str, what: str, hint: str | None = None) -> dict:
    """The named arrays of the ``.npz`` file at ``path``, read eagerly (no pickles). Each
    array's header is read first: an array larger than the file holds (a damaged or crafted
    header) or than the machine's memory is refused before anything is allocated."""
    import numpy as np
    from numpy.lib import format as npy_format

    from estimax.dsl.text._program import not_a_regular_file

    if not os.path.exists(path):
        raise _Fail(f"no such {what} file: {path}", _EXIT_USAGE)
    if os.path.isdir(path):
        raise _Fail(f"{path} is a directory, not a {what} file (.npz)", _EXIT_USAGE)
    kind = not_a_regular_file(path)
    if kind is not None:  # a FIFO would block, /dev/zero would never end
        raise _Fail(f"{path} is {kind}, not a {what} file (.npz)", _EXIT_USAGE)
    hint = hint or f"write it with numpy.savez({path!r}, name=array, ...)"

    def size(n: int) -> str:
        return f"{n} bytes" if n < 2**20 else f"{n / 2**30:.3g} GiB"

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this system: no limit but the file's own sizes
        memory = None

    def check_members(f):
        total = 0
        with zipfile.ZipFile(f) as archive:
            for info in archive.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                need = info.file_size
                if info.filename.endswith(".npy"):
                    with archive.open(info) as member:
                        version = npy_format.read_magic(member)
                        read_header = getattr(npy_format, "_read_array_header", None)
                        if read_header is not None:
                            shape, _, dtype = read_header(member, version)
                        elif version == (1, 0):
                            shape, _, dtype = npy_format.read_array_header_1_0(member)
                        else:
                            shape, _, dtype = npy_format.read_array_header_2_0(member)
                        header = member.tell()
                    if dtype.hasobject:
                        continue  # refused when read (no pickles)
                    need = math.prod(shape) * dtype.itemsize
                    if need > info.file_size - header:
                        raise _Fail(f"{path} is damaged: the header of array {name!r} says shape {tuple(shape)} of "
                                    f"{dtype} ({size(need)}), but the file holds {size(info.file_size - header)} of "
                                    f"data for it; {hint}")
                total += need
                if memory is not None and total > memory:
                    raise _Fail(f"{path}: the arrays take {size(total)} (array {name!r} alone {size(need)}), more "
                                f"than this machine's memory ({size(memory)}); is it the right file?")

    try:
        with open(path, "rb") as f:
            magic = f.read(6)
            f.seek(0)
            if magic == b"\x93NUMPY":
                raise _Fail(f"{path} holds a single array (.npy), not named arrays; {hint}")
            if not magic.startswith(b"PK"):
                raise _Fail(f"{path} is not a .npz file (not a zip archive of arrays); {hint}")
            check_members(f)
            f.seek(0)
            loaded = np.load(f, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise _Fail(f"{path} holds a single array (.npy), not named arrays; {hint}")
            with loaded:
                return {name: np.asarray(loaded[name]) for name in loaded.files}
    except _Fail:
        raise
    except PermissionError as e:
        raise _Fail(f"cannot read {path}: {e.strerror or e}", _EXIT_USAGE) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, NotImplementedError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _Fail(f"{path} is not a readable .npz file of arrays ({detail}); {hint}") from None


def _read_data(program, data_path: str | None, *, needed: bool, invocation: _Invocation):
    """``(data, dims)``: the validated data (``None`` when none is given) and the named sizes."""
    if data_path is None:
        if needed and program.data:
            raise _Fail(
                f"{program.filename} declares data ({_declarations(program.data.values())}); "
                "pass it with --data DATA.npz",
                _EXIT_USAGE,
            )
        return None, {}
    raw = _load_npz(data_path, "data")
    invocation.note = f"(the data come from {data_path})"  # errors below point at a declaration
    _check_data_types(program, raw)
    data = program.validate_data(raw)
    dims = program.dims_from(raw)
    invocation.note = None
    unused = sorted(n for n in raw if n not in program.data)
    if unused:  # a misspelled name, or the wrong file: say so rather than drop them silently
        declared = ", ".join(program.data) or "none"
        print(f"estimax: warning: {data_path} has array{'s' if len(unused) > 1 else ''} that no `data` "
              f"declaration of {program.filename} uses: {', '.join(unused)} (ignored; declared: {declared})",
              file=sys.stderr)
    return data, dims


def _check_data_types(program, raw: dict):
    """Each declared array holds numbers of a kind its declaration can take (no strings, no
    complex numbers; whole numbers for ``int``)."""
    import numpy as np

    for name, decl in program.data.items():
        if name not in raw:
            continue  # validate_data names what is missing
        a = raw[name]
        declared = _type_text(decl)
        if not (
            np.issubdtype(a.dtype, np.bool_)
            or np.issubdtype(a.dtype, np.integer)
            or np.issubdtype(a.dtype, np.floating)
        ):
            raise program.error(
                f"data {name!r} holds {a.dtype} values; the file declares it {declared}",
                line=decl.line,
                column=1,
                hint="save numbers: real or integer arrays",
            )
        whole = not np.issubdtype(a.dtype, np.floating) or np.all(np.isfinite(a) & (a == np.round(a)))
        if declared.startswith("int") and not whole:
            raise program.error(
                f"data {name!r} holds fractional numbers; the file declares it {declared}",
                line=decl.line,
                column=1,
                hint="declare it real, or save whole numbers",
            )


def _declarations(decls) -> str:
    return ", ".join(f"{d.name}: {_type_text(d)}" for d in decls)


def _type_text(decl) -> str:
    import jax.numpy as jnp

    base = "int" if jnp.issubdtype(decl.dtype, jnp.integer) else "real"
    return base + (f"[{', '.join(str(s) for s in decl.shape)}]" if decl.shape else "")


def _summary(program, dims: dict, dims_given: bool) -> str:
    direction = "maximize" if program.maximize else "minimize"
    parts = [direction]
    if program.params:
        parts.append("parameters " + _declarations(program.params.values()))
    if program.data:
        parts.append("data " + _declarations(program.data.values()))
    named = {}  # each named size, as the declarations resolve it (a default without data)
    for d in (*program.params.values(), *program.data.values()):
        for size, value in zip(d.shape, d.concrete_shape(dims)):
            if isinstance(size, str):
                named.setdefault(size, value)
    if named:
        sizes = ", ".join(f"{n}={named[n]}" for n in sorted(named))
        parts.append(f"sizes {sizes}" + ("" if dims_given else " (a default; --data gives the data's sizes)"))
    return "; ".join(parts)


# --- staging and the plan ------------------------------------------------------------------


def _stage(program, params, data):
    """The plan of the program at these inputs; also traces its gradient estimator, so that
    every error that training would meet at trace time is met here."""
    import jax

    import estimax as ex

    plan = ex.explain(program.objective, params, data)
    key = jax.random.PRNGKey(0)
    if not plan.constraints:
        jax.eval_shape(ex.value_and_grad(program.objective), key, params, data)
        return plan
    from estimax.transforms._constraints import split

    parts = split(program.objective, (params, data))
    flat = jax.tree_util.tree_leaves((params, data))
    for piece in (parts.objective, *parts.constraints):  # each expectation's estimator, as the solver builds it
        if piece.stochastic:
            jax.eval_shape(jax.grad(piece.flat_program().estimate, argnums=1), key, *flat)
    return plan


def _site_location(program, site: str) -> tuple[int, int] | None:
    """Where the site named ``site`` is written (nested sites are named ``"expect/z"``)."""
    return program.sites.get(site) or program.sites.get(site.rsplit("/", 1)[-1])


def _table(header: tuple, rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
    return lines + [fmt.format(*(str(c) for c in r)).rstrip() for r in rows]


def _plan_table(program, plan) -> str:
    """The per-site table with each site's line in the file (and its variance, if measured)."""
    header = ("site", "line", "distribution", "strategy", "why", "where")
    measured = plan.total_variance is not None
    if measured:
        header += ("grad variance",)
    rows = []
    for s in plan.sites:
        at = _site_location(program, s.name)
        row = (
            s.name,
            f"{at[0]}:{at[1]}" if at else "?",
            s.distribution,
            s.strategy.describe(),
            s.reason,
            s.context,
        )
        if measured:
            row += ("n/a" if s.variance is None else f"{s.variance:.4g} ± {s.variance_se:.2g}",)
        rows.append(row)
    lines = [f"estimator plan for {os.path.basename(program.filename)}"]
    lines += _table(header, rows) if rows else ["(no random choices)"]
    per_element = [f"{s.name} ({s.elements} elements)" for s in plan.sites if s.elements]
    if per_element:
        lines.append("score terms Rao-Blackwellized per element: " + ", ".join(per_element))
    if measured:
        lines.append(f"total gradient variance (trace of the covariance): {plan.total_variance:.4g}")
    lines.append(f"certificate: {plan.certificate}")
    if plan.constraints:
        lines.append("constraints (`estimax run` solves the constrained problem with its Lagrangian):")
        rows = [(name, f"{os.path.basename(where)}" if where else "?", kind, mult) for name, kind, mult, where in plan.constraints]
        lines += _table(("constraint", "line", "kind", "multiplier"), rows)
    if plan.argmins:
        lines.append("inner problems (argmin):")
        rows = [(a.name, os.path.basename(a.location) if a.location else "?", a.solver, a.describe_method(),
                 a.certificate) for a in plan.argmins]
        lines += _table(("argmin", "line", "inner solver", "hypergradient", "certificate"), rows)
    return "\n".join(lines)


# --- check, explain ------------------------------------------------------------------------


def _cmd_check(args, invocation: _Invocation) -> int:
    program = _load_program(args.file, invocation, allow_imports=args.allow_import)
    _, dims = _read_data(program, args.data, needed=False, invocation=invocation)
    params = program.init_params(dims)
    plan = _stage(program, params, program.abstract_data(dims))
    print(f"{program.filename}: ok: {_summary(program, dims, args.data is not None)}")
    print(_plan_table(program, plan))
    return _EXIT_OK


def _cmd_explain(args, invocation: _Invocation) -> int:
    import jax

    import estimax as ex

    program = _load_program(args.file, invocation, allow_imports=args.allow_import)
    data, dims = _read_data(program, args.data, needed=args.variance, invocation=invocation)
    params = program.init_params(dims)
    if args.params is not None:
        params = _tree_from_arrays(params, _load_npz(args.params, "parameter"), args.params, prefix="")
    plan = _stage(program, params, program.abstract_data(dims))
    if args.variance:
        inputs = data if data is not None else {}
        plan = ex.explain(program.objective, params, inputs, variance=True, key=jax.random.PRNGKey(args.seed))
    print(f"{program.filename}: {_summary(program, dims, args.data is not None)}")
    if args.params is not None:
        print(f"parameters from {args.params}")
    print(_plan_table(program, plan))
    return _EXIT_OK


# --- checkpoints ---------------------------------------------------------------------------


def _leaf_name(path) -> str:
    import jax

    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k).strip(".[]'\""))
    return ".".join(parts)


def _tree_from_arrays(template, arrays: dict, source: str, prefix: str):
    """``template``'s structure with its leaves read from ``arrays`` by name; an error naming
    what is missing or has another shape or type."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for path, leaf in leaves:
        name = ".".join(p for p in (prefix, _leaf_name(path)) if p)
        if name not in arrays:
            have = sorted(n for n in arrays if n.startswith(prefix))
            raise _Fail(f"{source} has no array {name!r} (it has {', '.join(have) or 'none'})")
        value = arrays[name]
        want_shape, want_dtype = np.shape(leaf), np.asarray(leaf).dtype
        if value.shape != want_shape:
            raise _Fail(f"{source}: {name!r} has shape {list(value.shape)}; expected {list(want_shape)}")
        if value.dtype != want_dtype:
            if not (np.issubdtype(value.dtype, np.floating) and np.issubdtype(want_dtype, np.floating)):
                raise _Fail(f"{source}: {name!r} has type {value.dtype}; expected {want_dtype}")
            value = value.astype(want_dtype)
        out.append(jnp.asarray(value))
    return jax.tree_util.tree_unflatten(treedef, out)


def _digest(*chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c if isinstance(c, bytes) else str(c).encode())
    return h.hexdigest()


def _data_digest(data: dict | None) -> str:
    import numpy as np

    parts = []
    for name in sorted(data or {}):
        a = np.ascontiguousarray(np.asarray(data[name]))
        parts += [name, str(a.dtype), str(a.shape), a.tobytes()]
    return _digest(*parts)


def _save_npz_atomically(path: str, arrays: dict):
    """Write ``arrays`` to ``path`` in one step (see ``runtime._checkpoint``)."""
    from .runtime._checkpoint import save_npz_atomically

    try:
        save_npz_atomically(path, arrays)
    except OSError as e:
        raise _Fail(f"cannot write {path}: {e.strerror or e}") from None


def _save_npy_atomically(path: str, array):
    """Write one array to ``path`` in one step (see ``runtime._checkpoint``)."""
    from .runtime._checkpoint import save_npy_atomically

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
    from .runtime._checkpoint import CheckpointError, FolderLock, reporting

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
    from .runtime._checkpoint import CheckpointError, read_record

    try:
        return read_record(folder)
    except CheckpointError as e:
        raise _Fail(f"{e}; pass --fresh to start over, or --out another folder") from None


_CHECKED = ("params", "optimizer", "lr", "seed", "data_sha256", "maximize")  # what a resumed run must match


def _check_checkpoint(path: str, record: dict, config: dict) -> None:
    """Refuse, with what differs, a checkpoint written for other parameters, another
    optimizer, learning rate, seed or data."""
    from .solvers._fit import _CHECKPOINT_FORMAT

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
        for field, what in (("optimizer", "optimizer"), ("lr", "learning rate"), ("seed", "seed"))
        if record.get(field) != config[field]
    ]
    if differences:
        raise _Fail(f"{path} was written by a run with another {'; '.join(differences)}; {again}")
    if record.get("data_sha256") != config["data_sha256"]:
        raise _Fail(f"{path} was written by a run on other data; {again}")


# --- run -----------------------------------------------------------------------------------


def _optimizer(name: str, lr: float):
    import optax

    return {"adam": optax.adam, "sgd": optax.sgd, "rmsprop": optax.rmsprop, "adagrad": optax.adagrad}[name](
        lr
    )


def _format_value(x) -> str:
    import numpy as np

    a = np.asarray(x)
    if a.ndim == 0:
        return f"{a.item():.6g}"
    if a.size <= 8:
        return " ".join(np.array2string(a, precision=4, separator=", ", suppress_small=True).split())
    summary = f"mean {a.mean():.4g}, std {a.std():.4g}, min {a.min():.4g}, max {a.max():.4g}"
    return f"array of shape {list(a.shape)}: {summary}"


def _plot_history(history, path: str, title: str, maximize: bool) -> bool:
    """Write the loss curve to ``path``; ``False`` when matplotlib is not installed."""
    import numpy as np

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
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
    progress: bool,
) -> tuple[int, dict | None]:
    """Train ``program`` with checkpoints in ``out``; ``(exit status, learned params)``."""
    import jax
    import numpy as np

    import estimax as ex
    from estimax.runtime._checkpoint import reporting

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
    }

    plan = _stage(program, params0, program.abstract_data(dims))
    print(_plan_table(program, plan))

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
                checkpoint=ex.Checkpoint(checkpoint, every=chunk, meta={k: config[k] for k in _CHECKED}, info=config,
                                         resume=not fresh),
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
    learned = {n: np.asarray(state.params[n]) for n in program.params}  # in the file's order
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
    print("learned parameters:")
    for name, value in learned.items():
        print(f"  {name} = {_format_value(value)}")
    print("wrote " + ", ".join(written))
    return status, learned


def _solve_constrained(program, data, dims, *, steps, solver_name, lr, seed, chunk, out, fresh, progress):
    """``estimax run`` on a file with constraints: ``ex.solve``, checkpointed every chunk; a
    re-run resumes (``--steps`` may be raised, as for training)."""
    import jax
    import numpy as np
    import optax

    import estimax as ex
    from estimax.runtime._checkpoint import reporting

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
    with _output_folder(out):  # one run at a time in a folder: refused before anything is staged
        if program.constraints:
            status, _ = _solve_constrained(program, data, dims, steps=args.steps, solver_name=args.solver, lr=args.lr,
                                           seed=args.seed, chunk=args.chunk, out=out, fresh=args.fresh,
                                           progress=not args.no_progress)
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
            progress=not args.no_progress,
        )
        return status


# --- demo ----------------------------------------------------------------------------------

_DEMO_FILE = "mixture.emx"
_DEMO_WEIGHTS = (0.35, 0.65)  # of the components
_DEMO_MEANS = (-2.0, 2.0)
_DEMO_SCALES = (0.5, 0.7)


def _demo_data(n: int, seed: int):
    """``(x, labels)``: ``n`` points of a known two-component mixture."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = rng.choice(2, size=n, p=_DEMO_WEIGHTS)
    x = rng.normal(np.asarray(_DEMO_MEANS)[labels], np.asarray(_DEMO_SCALES)[labels])
    return x.astype(np.float32), labels


def _cmd_demo(args, invocation: _Invocation) -> int:
    import importlib.resources

    import numpy as np

    out = args.out
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise _Fail(f"cannot create the output folder {out}: {e.strerror or e}", _EXIT_USAGE) from None
    source = importlib.resources.files("estimax.dsl.text").joinpath("demos", _DEMO_FILE)
    path = os.path.join(out, _DEMO_FILE)
    with importlib.resources.as_file(source) as packaged:
        shutil.copyfile(packaged, path)
    x, labels = _demo_data(args.n, seed=0)
    data_path = os.path.join(out, "mixture-data.npz")
    np.savez(data_path, x=x)
    print(f"the demo: a two-component Gaussian mixture fitted by variational inference, written in {path}")
    print(
        f"{len(x)} points of a mixture with weights {list(_DEMO_WEIGHTS)}, means {list(_DEMO_MEANS)}, "
        f"scales {list(_DEMO_SCALES)} (in {data_path})\n"
    )
    program = _load_program(path, invocation)
    data, dims = _read_data(program, data_path, needed=True, invocation=invocation)
    status, learned = _train(
        program,
        data,
        dims,
        steps=args.steps,
        optimizer_name="adam",
        lr=args.lr,
        seed=args.seed,
        chunk=args.chunk,
        out=out,
        fresh=True,
        progress=not args.no_progress,
    )
    if learned is None:
        return status
    weight1 = 1.0 / (1.0 + math.exp(-float(learned["w_logit"])))
    rows = [
        (
            "weights",
            list(_DEMO_WEIGHTS),
            [float(np.mean(labels == k)) for k in (0, 1)],
            [1.0 - weight1, weight1],
        ),
        ("means", list(_DEMO_MEANS), [float(x[labels == k].mean()) for k in (0, 1)], learned["m"].tolist()),
        (
            "scales",
            list(_DEMO_SCALES),
            [float(x[labels == k].std()) for k in (0, 1)],
            np.exp(learned["log_sigma"]).tolist(),
        ),
    ]

    def fmt(v):
        return "[" + ", ".join(f"{a:+.2f}" for a in v) + "]"

    print("\nthe fitted mixture:")
    print(
        "\n".join(
            _table(
                ("", "true", "in the sample", "fitted"),
                [(r[0], fmt(r[1]), fmt(r[2]), fmt(r[3])) for r in rows],
            )
        )
    )
    again = f"estimax run {path} --data {data_path} --out {out} --steps {args.steps} --lr {args.lr:g}"
    print(f"\nto run it again: {again}")
    return status


# --- the command line ----------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected a seed between 0 and 2**32 - 1, got {value}")
    return value


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the Python traceback of an internal error",
    )
    parser = argparse.ArgumentParser(
        prog="estimax",
        description="Check, explain and train objective files written in the estimax language "
        "(see docs/objective-language.md).",
        epilog="exit status: 0 ok, 1 an error in the file/data/checkpoint, 2 a usage error, "
        "3 an internal error, 130 interrupted",
    )
    parser.add_argument(
        "--debug", action="store_true", default=False, help="show the Python traceback of an internal error"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # check, explain and run read objective files: the import opt-in is theirs
    imports = argparse.ArgumentParser(add_help=False)
    imports.add_argument(
        "--allow-import",
        metavar="MODULE|PATH",
        action="append",
        default=[],
        help="let FILE import from this module (and its submodules), or this Python file or folder, "
        "beyond the defaults (numerical modules; .py files in FILE's folder); repeatable. "
        "Importing runs the module's or file's code",
    )

    p = sub.add_parser(
        "check",
        parents=[common, imports],
        help="parse and check a file; print its estimator plan",
        description="Parse FILE, resolve its names, stage the objective and its gradient "
        "estimator (checking shapes and types) and print the estimator plan and certificate.",
    )
    p.add_argument("file", metavar="FILE", help="the objective file (.emx)")
    p.add_argument("--data", metavar="DATA.npz", help="take the named sizes (real[N]) from these arrays")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "explain",
        parents=[common, imports],
        help="the per-site table and certificate",
        description="Print the per-site table of FILE's estimator (each random choice, its "
        "line, distribution and gradient strategy) and its certificate; with --variance, "
        "how much gradient variance each site contributes at the initial (or given) parameters.",
    )
    p.add_argument("file", metavar="FILE", help="the objective file (.emx)")
    p.add_argument(
        "--data", metavar="DATA.npz", help="the data (needed with --variance when FILE declares data)"
    )
    p.add_argument(
        "--params", metavar="PARAMS.npz", help="parameters to explain at (e.g. a run's params.npz)"
    )
    p.add_argument("--variance", action="store_true", help="measure each site's gradient variance")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the variance measurement (default: 0)")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser(
        "run",
        parents=[common, imports],
        help="train the parameters of a file's objective",
        description="Train FILE's parameters with estimax.fit, with a progress bar. "
        "The whole state is checkpointed to OUT/checkpoint/ after every chunk and "
        "on Ctrl-C; running the same command again resumes from it. At the end, "
        "writes OUT/params.npz, OUT/history.npy and OUT/loss.png.",
    )
    p.add_argument("file", metavar="FILE", help="the objective file (.emx)")
    p.add_argument("--data", metavar="DATA.npz", help="the data: one array per `data` declaration")
    p.add_argument("--steps", type=_positive_int, default=1000, help="optimizer steps (default: 1000)")
    p.add_argument("--optimizer", choices=_OPTIMIZERS, default="adam", help="the optimizer (default: adam)")
    p.add_argument("--lr", type=_learning_rate, default=1e-2, help="learning rate (default: 0.01)")
    p.add_argument(
        "--seed", type=_seed, default=0, help="seed of the estimator's random numbers (default: 0)"
    )
    p.add_argument(
        "--chunk",
        type=_positive_int,
        default=100,
        help="steps per compiled chunk, and between checkpoints (default: 100)",
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default: out/<file name>)")
    p.add_argument("--fresh", action="store_true", help="start over, ignoring a checkpoint in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--solver",
        choices=("auto", "exact_al", "al", "stochastic"),
        default="auto",
        help="for a file with constraints: the solver (default: auto, chosen from the problem)",
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="fit the demo mixture and report the result",
        description="Fit a two-component Gaussian mixture (an objective file shipped with "
        "estimax, with a discrete and a continuous latent) to generated data: prints the "
        "plan, trains, and compares the fit with the truth. Writes the file, the data and "
        "the run's outputs to DIR.",
    )
    p.add_argument("--steps", type=_positive_int, default=1000, help="optimizer steps (default: 1000)")
    p.add_argument("--lr", type=_learning_rate, default=0.1, help="Adam's learning rate (default: 0.1)")
    p.add_argument(
        "--seed", type=_seed, default=0, help="seed of the estimator's random numbers (default: 0)"
    )
    p.add_argument("--chunk", type=_positive_int, default=100, help="steps per compiled chunk (default: 100)")
    p.add_argument("--n", type=_positive_int, default=200, help="number of data points (default: 200)")
    p.add_argument(
        "--out", metavar="DIR", default=os.path.join("out", "demo"), help="output folder (default: out/demo)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("estimax")
    except Exception:  # noqa: BLE001 -- not installed: the source tree's version
        return "unknown"


def _exit_status(code) -> int:
    if code is None:
        return _EXIT_OK
    return code if isinstance(code, int) else _EXIT_USAGE


def _paragraph(message: str) -> str:
    return "\n".join(line for line in message.strip().splitlines() if line.strip()) or "(no message)"


def _estimax_error(e: Exception, invocation: _Invocation) -> str:
    """An estimax error as one paragraph naming the file; at the site's line when it names one."""
    message = _paragraph(str(e))
    program = invocation.program
    if program is not None:
        for name in re.findall(r"'([^'\s]+)'", message):
            at = _site_location(program, name)
            if at is not None:
                line, column = at
                first, _, rest = message.partition("\n")
                located = program.error(
                    first, line=line, column=column, end_column=column + len(name.rsplit("/", 1)[-1])
                )
                return str(located) + ("\n" + rest if rest else "")
    where = invocation.path or "estimax"
    return f"{where}: error: {message}"


def main(argv: list[str] | None = None) -> int:
    """Run the ``estimax`` command with ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed)
        return _exit_status(e.code)
    if args.command is None:
        parser.print_help(sys.stderr)
        return _EXIT_USAGE
    invocation = _Invocation()
    try:
        from estimax import EstimaxError
        from estimax.dsl.text import TextError

        try:
            return args.func(args, invocation)
        except _Fail as e:
            print(f"estimax: error: {e.message}", file=sys.stderr)
            return e.code
        except TextError as e:
            print(str(e), file=sys.stderr)
            if invocation.note:
                print(invocation.note, file=sys.stderr)
            return _EXIT_ERROR
        except EstimaxError as e:
            print(_estimax_error(e, invocation), file=sys.stderr)
            return _EXIT_ERROR
        except RecursionError:
            print(
                f"estimax: error: {invocation.path}: the program is too deep for estimax's analysis "
                "(Python's recursion limit was reached outside the statements it can locate); this is a "
                "limit of estimax, not a mistake in the file: please report it with the file",
                file=sys.stderr,
            )
            return _EXIT_ERROR
        except SystemExit as e:  # from Python code the file imports
            print(
                f"estimax: error: {invocation.path}: Python code imported by the file called "
                f"sys.exit({e.code!r})",
                file=sys.stderr,
            )
            return _EXIT_ERROR
        except Exception as e:  # the device ran out of memory: the sizes are too large
            if "RESOURCE_EXHAUSTED" not in str(e) or type(e).__name__ not in (
                "JaxRuntimeError",
                "XlaRuntimeError",
            ):
                raise
            print(
                f"estimax: error: {invocation.path}: out of memory: {_paragraph(str(e)).splitlines()[0]}",
                file=sys.stderr,
            )
            return _EXIT_ERROR
    except KeyboardInterrupt:
        print("estimax: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `estimax explain FILE | head`: quiet, as other tools are
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return _EXIT_ERROR
    except Exception as e:  # a bug of estimax: one line, not a traceback
        if args.debug:
            raise
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(
            f"estimax: internal error: {type(e).__name__}: {detail}"
            " (run with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return _EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
