"""Checkpoints of a run's whole state, through orbax.

A run's checkpoints live in one folder (an ``orbax.checkpoint.CheckpointManager``): one
sub-folder per saved step, written to a temporary name and renamed when complete, so a reader
-- or a run killed while writing -- never sees a partial checkpoint. Each holds

- ``state``: the device state (parameters, optimizer and estimator state, PRNG key, step), a
  pytree of arrays; sharded arrays are saved by the processes that hold them;
- ``host``: host-side arrays (the history), saved with their shapes recorded in ``record``;
- ``record``: JSON: a format tag, the state's structure, and what the caller adds -- a
  configuration that a resumed run must match, and host-side scalars.

PRNG keys (``jax.random.key``) are saved as their raw ``key_data`` and re-wrapped on restore.
orbax is imported when a checkpoint is first used (it takes a second or two).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import numbers
import os
import signal
import tempfile
import warnings
from typing import Any, Mapping

import jax
import numpy as np

from .._errors import EstimaxError


class CheckpointError(EstimaxError, ValueError):
    """A checkpoint that cannot be read, or was written for another run."""


def save_npz_atomically(path: str, arrays: dict) -> None:
    """Write ``arrays`` to ``path`` as one ``.npz`` in one step (temporary file, fsync,
    ``os.replace``). Raises ``OSError`` when the folder cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _plain(tree) -> dict:
    """What orbax writes of ``tree``: its non-empty leaves by index (orbax refuses
    zero-size arrays; the structure restores them), typed PRNG keys as their ``key_data``."""
    leaves = jax.tree_util.tree_leaves(tree)
    return {f"leaf_{i}": jax.random.key_data(x) if _is_key(x) else x
            for i, x in enumerate(leaves) if np.size(x)}


def _structure(tree) -> dict:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return {"tree": str(treedef),
            "leaves": [[list(np.shape(x)), str(x.dtype) if _is_key(x) else str(np.dtype(getattr(x, "dtype", np.asarray(x).dtype)))]
                       for x in leaves]}


def _ocp():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import orbax.checkpoint as ocp
    return ocp


class Checkpointer:
    """The checkpoints of one run in ``directory``.

    ``format`` names the kind of run (``"estimax-fit/1"``); ``meta`` (JSON-able) is what a
    resumed run must match: :meth:`restore` refuses, naming the first difference, a
    checkpoint whose format, ``meta`` entries or state structure differ. ``keep`` is the
    number of most recent checkpoints kept.
    """

    def __init__(self, directory, *, format: str, meta: dict, keep: int = 2, info: dict | None = None):
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"the checkpoint {self.directory} is a file; a checkpoint is a folder "
                                  "(orbax writes one sub-folder per saved step). Pass a folder path.")
        self.format, self.meta, self.info = format, dict(meta), dict(info or {})
        ocp = _ocp()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
        self._ocp = ocp
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def close(self) -> None:
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, *, host: dict | None = None, extra: dict | None = None) -> None:
        """Save ``state`` (a pytree of arrays) as step ``step``, with host-side arrays ``host``
        (``{name: np.ndarray}``) and JSON-able ``extra``; replaces a checkpoint of the same step."""
        ocp = self._ocp
        host = {k: np.asarray(v) for k, v in (host or {}).items()}
        record = dict(self.meta, format=self.format, structure=_structure(state), step=int(step),
                      host={k: [list(v.shape), str(v.dtype)] for k, v in host.items()}, extra=extra or {},
                      info=self.info)
        items = dict(state=ocp.args.StandardSave(_plain(state)), record=ocp.args.JsonSave(record))
        if any(v.size for v in host.values()):  # orbax refuses empty arrays: their shapes restore them
            items["host"] = ocp.args.StandardSave({k: v for k, v in host.items() if v.size})
        if int(step) in self._manager.all_steps():
            self._manager.delete(int(step))
        self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        self._manager.wait_until_finished()

    def restore(self, template) -> tuple[Any, dict, dict] | None:
        """``(state, host, extra)`` from the latest checkpoint, ``state`` shaped like
        ``template``; ``None`` when the folder holds none."""
        step = self.latest_step()
        if step is None:
            return None
        ocp = self._ocp
        where = os.path.join(self.directory, str(step))
        try:
            record = self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"]
        except Exception as e:  # noqa: BLE001  (orbax raises several kinds)
            raise CheckpointError(f"cannot read the checkpoint {where}: {e}") from None
        if not isinstance(record, dict) or record.get("format") != self.format:
            got = record.get("format") if isinstance(record, dict) else "?"
            raise CheckpointError(f"{self.directory} holds checkpoints of another kind ({got!r}, not {self.format!r}).")
        for k, v in self.meta.items():
            if record.get(k) != v:
                raise CheckpointError(
                    f"{self.directory} was written for another run: its {k} is {record.get(k)!r}, this run's is "
                    f"{v!r}. Delete it (or pass another folder) to start over.")
        if record.get("structure") != _structure(template):
            raise CheckpointError(
                f"{self.directory} holds a state of another structure than this run's (other parameters, optimizer, "
                "solver or options). Delete it (or pass another folder) to start over.")
        plain = _plain(template)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
                                if isinstance(x, jax.Array) else x, plain)
        host_shapes = record.get("host") or {}
        items = dict(state=ocp.args.StandardRestore(abstract))
        if any(np.prod(s) for s, _ in host_shapes.values()):
            items["host"] = ocp.args.StandardRestore({k: np.zeros(s, d) for k, (s, d) in host_shapes.items()
                                                       if np.prod(s)})
        try:
            got = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot read the checkpoint {where}: {e}") from None
        leaves, treedef = jax.tree_util.tree_flatten(template)
        saved = got["state"]
        out = []
        for i, t in enumerate(leaves):
            v = saved[f"leaf_{i}"] if np.size(t) else t
            out.append(jax.random.wrap_key_data(v, impl=jax.random.key_impl(t)) if _is_key(t) and np.size(t) else v)
        state = jax.tree_util.tree_unflatten(treedef, out)
        host = {k: np.zeros(s, d) for k, (s, d) in host_shapes.items()}
        host.update({k: np.asarray(v) for k, v in (got.get("host") or {}).items()})
        return state, host, dict(record.get("extra") or {})


@contextlib.contextmanager
def stop_on_signals(enabled: bool = True):
    """While active, SIGINT and SIGTERM set the returned list's first entry instead of
    interrupting: the loop finishes its chunk, saves, then stops (main thread only). A second
    signal interrupts at once (``KeyboardInterrupt``; the last checkpoint stays)."""
    received: list = []
    previous = {}

    def handler(signum, frame):
        del frame
        if received:
            raise interrupted(signum)
        received.append(signum)

    if enabled:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: no handlers
                pass
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def interrupted(signum) -> KeyboardInterrupt:
    """The exception that ends a run stopped by ``signum`` once its checkpoint is saved."""
    stop = KeyboardInterrupt(f"stopped by signal {int(signum)}; the checkpoint holds the run: call again to resume")
    stop.signum = signum
    return stop


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where and how often a run saves its whole state (``ex.fit``, ``ex.solve``).

    - ``directory``: the run's folder; a call with the same arguments resumes from it;
    - ``every``: steps between saves (default: ``ex.fit`` 1000, rounded to its chunks;
      ``ex.solve`` its ``every``); a run also saves when it ends and when it is interrupted;
    - ``keep``: the number of most recent checkpoints kept;
    - ``meta``: JSON-able entries that a resumed run must match, besides the ones estimax
      checks itself (program, options, key, the data's shapes and contents, the state's
      structure) -- e.g. a configuration or a code version;
    - ``info``: JSON-able entries saved with each checkpoint and not checked (read them back
      with ``estimax.runtime._checkpoint.read_record``).
    """

    directory: str | os.PathLike
    every: int | None = None
    keep: int = 2
    meta: Mapping | None = None
    info: Mapping | None = None

    def __post_init__(self):
        if not isinstance(self.directory, (str, os.PathLike)):
            raise TypeError(f"Checkpoint: directory must be a path; got {type(self.directory).__name__}.")
        for name in ("every", "keep"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
                raise ValueError(f"Checkpoint: {name} must be a positive integer; got {v!r}.")


def read_record(directory) -> dict | None:
    """The JSON record of the latest checkpoint in ``directory`` (its format, ``meta``
    entries, ``step`` and ``info``), or ``None`` when there is none."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        if os.path.exists(directory):
            raise CheckpointError(f"the checkpoint {directory} is a file; a checkpoint is a folder.")
        return None
    steps = [int(d) for d in os.listdir(directory) if d.isdigit() and os.path.isdir(os.path.join(directory, d))]
    if not steps:
        return None
    path = os.path.join(directory, str(max(steps)), "record", "metadata")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the checkpoint {directory}: {e}") from None
    return record if isinstance(record, dict) else None


def as_checkpoint(checkpoint, what: str) -> Checkpoint | None:
    """``checkpoint=`` as a :class:`Checkpoint` (a path is a folder with the defaults)."""
    if checkpoint is None or isinstance(checkpoint, Checkpoint):
        return checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        return Checkpoint(checkpoint)
    raise TypeError(f"{what}: checkpoint must be a folder path or an estimax.Checkpoint; got {type(checkpoint).__name__}.")


def digest(tree) -> str:
    """A short digest of a pytree's structure, shapes, dtypes and (where this process holds
    all of an array) contents: what identifies a run's data."""
    h = hashlib.sha256()
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    h.update(str(treedef).encode())
    for x in leaves:
        if _is_key(x):
            x = jax.random.key_data(x)
        h.update(f"{np.shape(x)}{getattr(x, 'dtype', type(x).__name__)}".encode())
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            h.update(np.ascontiguousarray(np.asarray(x)).tobytes())
    return h.hexdigest()[:16]
