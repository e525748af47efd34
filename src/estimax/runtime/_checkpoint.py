"""Checkpoints of a run's whole state, through orbax.

A run's checkpoints live in one folder (an ``orbax.checkpoint.CheckpointManager``): one
sub-folder per saved step, written to a temporary name and renamed when complete, so a reader
-- or a run killed while writing -- never sees a partial checkpoint. Each holds

- ``state``: the device state (parameters, optimizer and estimator state, PRNG key, step), a
  pytree of arrays; sharded arrays are saved by the processes that hold them;
- ``host``: host-side arrays (the history), saved with their shapes recorded in ``record``;
- ``record``: JSON: a format tag, the run's identity (digests of what determines its result:
  program, optimizer or solver, data, key, starting point, options; see ``_identity``), the
  state's structure, the versions that wrote it, and what the caller adds -- entries that a
  resumed run must match, and host-side scalars;
- ``estimax-files.json``: each file's size and SHA-256, written once orbax has finished the
  checkpoint and checked before it is read (a damaged checkpoint is refused before orbax
  reads it, and the previous one is offered).

The folder is locked while a run uses it (:class:`FolderLock`, the file ``.estimax-lock``):
a second run on the same folder is refused, naming the process that holds it; the lock of a
killed run is taken over. A save that fails (a full disk) removes its partial files, keeps
the previous checkpoints and says so.

PRNG keys (``jax.random.key``) are saved as their raw ``key_data`` and re-wrapped on restore.
orbax is imported when a checkpoint is first used (it takes a second or two).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import numbers
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from typing import Any, Mapping

import jax
import numpy as np

from ._identity import difference, tree_digest, versions, versions_changed
from ._folder import (  # noqa: F401  (CheckpointError, FolderLock, reporting, the writers: re-exported)
    _ON_RESUME,
    LOCK_NAME,
    CheckpointError,
    FolderLock,
    _os_error,
    _sentence,
    _why,
    _words,
    reporting,
    save_npy_atomically,
    save_npz_atomically,
    write_atomically,
)


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
        import orbax.checkpoint as ocp  # at first use: its import is slow (start-up time)
    return ocp


# --- checkpoints ------------------------------------------------------------------------------

_MANIFEST = "estimax-files.json"
_TMP = ".orbax-checkpoint-tmp"


def _files(folder: str) -> dict:
    """``{path: [size, sha256]}`` of the files under ``folder`` (but the manifest)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder)
            if rel == _MANIFEST:
                continue
            h = hashlib.sha256()
            with open(full, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[rel] = [os.path.getsize(full), h.hexdigest()]
    return out


class _Damaged(Exception):
    """A checkpoint whose files are not those that were written (or cannot be read)."""


def _short(e: BaseException) -> str:
    """An orbax/tensorstore error in one short line (without the tensorstore spec it dumps)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = text.split(" [tensorstore_spec")[0]
    return text if len(text) <= 300 else text[:300] + "..."


def _quiet_closed_loop() -> None:
    """When an orbax read fails, tensorstore may finish the reads it had started and report
    them to the event loop that orbax has closed meanwhile: ``RuntimeError: Event loop is
    closed``, an "unraisable" exception printed with a traceback at any later time, even after
    the error has been reported. Those reports carry nothing: drop them (others still reach
    the previous hook). Installed when a checkpoint folder is opened."""
    previous = sys.unraisablehook
    if getattr(previous, "estimax_quiet", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and "Event loop is closed" in str(e):
            return
        previous(unraisable)

    hook.estimax_quiet = True
    sys.unraisablehook = hook


class _OrbaxRecords(logging.Filter):
    """Drops orbax's log records while a checkpoint folder is open, and after a save or read
    failed: the failure is logged by orbax's threads with a traceback (``ERROR:absl:...
    Traceback``), and the tasks of its event loop by asyncio when they are collected ("Task
    exception was never retrieved"), sometimes well after the failure has reached the caller,
    who gets one clear message instead."""

    open = 0  # checkpointers open in this process
    failed = False  # a save or read failed: orbax's threads may still report it, at any later time

    def filter(self, record: logging.LogRecord) -> bool:
        if not (_OrbaxRecords.open or _OrbaxRecords.failed) or record.name not in ("absl", "asyncio"):
            return True
        try:
            message = str(record.msg)
        except Exception:  # noqa: BLE001
            return True
        if record.name == "asyncio":  # the tasks of orbax's failed event loop, collected later
            return not (_OrbaxRecords.failed and "exception was never retrieved" in message)
        # orbax's records start with its process tag; absl's own frames hide orbax's file name
        return not (message.startswith("[process=") or f"{os.sep}orbax{os.sep}" in (record.pathname or ""))


_ORBAX_RECORDS = _OrbaxRecords()


def _orbax_quiet(on: bool) -> None:
    """Count a checkpointer opened (``on``) or closed; the filter is installed once, on the
    ``absl`` logger (orbax logs through absl) and the root logger's handlers."""
    _OrbaxRecords.open = max(0, _OrbaxRecords.open + (1 if on else -1))
    if on:
        for target in (logging.getLogger("absl"), logging.getLogger("asyncio"), *logging.getLogger().handlers,
                       *logging.getLogger("absl").handlers):
            if _ORBAX_RECORDS not in target.filters:
                target.addFilter(_ORBAX_RECORDS)


_TIDY: set = set()


def _tidy_at_exit(directory: str) -> None:
    """After a failed save, orbax's threads may go on writing the partial checkpoint after the
    failure has been reported; Python joins them before its ``atexit`` functions, which then
    remove what they wrote -- under the folder's lock, so never another run's files."""
    if directory in _TIDY or jax.process_count() > 1:
        return
    _TIDY.add(directory)

    def tidy():
        # daemon threads (orbax's writers among them) are not joined at exit: give them a
        # moment to finish, so that nothing writes the partial checkpoint after it is removed
        deadline = time.monotonic() + 3.0
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and thread.daemon and thread.is_alive():
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        lock = FolderLock(directory)
        try:
            lock.acquire()
        except CheckpointError:
            return  # another run holds the folder now: it removes leftovers itself
        try:
            for name in os.listdir(directory):
                if _TMP in name:
                    shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        except OSError:
            pass
        finally:
            lock.release()

    atexit.register(tidy)


class Checkpointer:
    """The checkpoints of one run in ``directory``.

    ``format`` names the kind of run (``"estimax-fit/2"``). ``identity`` (JSON-able, checked)
    is what determines the run's result, by entry (``program``, ``optimizer``, ``data``,
    ...); ``meta`` (JSON-able, checked) are the caller's own entries; ``about`` (JSON-able,
    not checked) helps say *how* an entry differs (the optimizer's numbers).
    :meth:`restore` refuses, naming every difference, a checkpoint whose format, identity,
    ``meta`` or state structure differ. ``keep`` is the number of most recent checkpoints
    kept; ``resume=False`` removes the folder's checkpoints first (a fresh start).

    The folder is locked while the checkpointer is open (:class:`FolderLock`): a second run
    on the same folder is refused, naming the process that holds it. Each checkpoint's files
    are listed with their sizes and digests (``estimax-files.json`` in its folder) once
    orbax has finished it, and checked before it is read.
    """

    def __init__(self, directory, *, format: str, meta: dict, identity: dict | None = None,
                 about: dict | None = None, keep: int = 2, info: dict | None = None, resume: bool = True):
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"the checkpoint {self.directory} is a file; a checkpoint is a folder "
                                  "(orbax writes one sub-folder per saved step). Pass a folder path.")
        self.format, self.meta, self.info = format, dict(meta), dict(info or {})
        self.identity, self.about = dict(identity or {}), dict(about or {})
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create the checkpoint folder {self.directory}: {_why(e)}. Choose a "
                                  f"folder you can write ({_words('another_folder')}).") from None
        _quiet_closed_loop()
        self._lock = FolderLock(self.directory, "checkpoint folder")
        self._closed = False
        if jax.process_index() == 0:  # the processes of one multi-host run share the folder
            self._lock.acquire()
        _orbax_quiet(True)
        try:
            self._remove_partial()
            ocp = _ocp()
            options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
            self._ocp = ocp
            self._manager = ocp.CheckpointManager(self.directory, options=options)
            if not resume:
                for step in list(self._manager.all_steps()):
                    self._manager.delete(step)
        except BaseException:
            _orbax_quiet(False)
            self._lock.release()
            raise

    def _remove_partial(self) -> None:
        """Remove what a save that did not finish left (a killed run, a full disk): orbax's
        temporary folders. Only the holder of the lock writes here, so none is in progress."""
        if jax.process_count() > 1:
            return
        for name in os.listdir(self.directory):
            if _TMP in name:
                path = os.path.join(self.directory, name)
                for _ in range(20):  # a thread of the failed save may still be writing there
                    shutil.rmtree(path, ignore_errors=True)
                    if not os.path.exists(path):
                        break
                    time.sleep(0.05)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._manager.close()  # waits for orbax's threads
        except Exception:  # noqa: BLE001  (closing after a failed save: nothing more to report)
            pass
        finally:
            with contextlib.suppress(Exception):
                self._remove_partial()  # what a failed save's threads wrote after its failure
            _orbax_quiet(False)
            self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, *, host: dict | None = None, extra: dict | None = None) -> None:
        """Save ``state`` (a pytree of arrays) as step ``step``, with host-side arrays ``host``
        (``{name: np.ndarray}``) and JSON-able ``extra``; replaces a checkpoint of the same step.
        A save that fails (a full disk) leaves the previous checkpoints as they were and raises
        a :class:`CheckpointError` that says so."""
        ocp = self._ocp
        host = {k: np.asarray(v) for k, v in (host or {}).items()}
        record = dict(self.meta, format=self.format, identity=self.identity, about=self.about,
                      versions=versions(), structure=_structure(state), step=int(step),
                      host={k: [list(v.shape), str(v.dtype)] for k, v in host.items()}, extra=extra or {},
                      info=self.info)
        items = dict(state=ocp.args.StandardSave(_plain(state)), record=ocp.args.JsonSave(record))
        if any(v.size for v in host.values()):  # orbax refuses empty arrays: their shapes restore them
            items["host"] = ocp.args.StandardSave({k: v for k, v in host.items() if v.size})
        previous = [s for s in self._manager.all_steps() if s != int(step)]
        try:
            if int(step) in self._manager.all_steps():
                self._manager.delete(int(step))
            self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
            self._manager.wait_until_finished()
            if jax.process_count() == 1:
                where = os.path.join(self.directory, str(int(step)))
                manifest = json.dumps({"files": _files(where)}).encode()
                write_atomically(os.path.join(where, _MANIFEST), lambda f: f.write(manifest))
        except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise several kinds)
            _OrbaxRecords.failed = True
            _quiet_closed_loop()
            self._remove_partial()
            _tidy_at_exit(self.directory)
            if int(step) in self._manager.all_steps():  # complete, but not its list of files: not kept either
                with contextlib.suppress(Exception):
                    self._manager.delete(int(step))
            cause = _os_error(e)
            kept = (f"the previous checkpoint (step {max(previous)}) is kept" if previous
                    else "no checkpoint of this run was saved before")
            if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CheckpointError(
                    f"cannot save the checkpoint of step {int(step)} in {self.directory}: the disk is full "
                    f"({_why(cause)}); {kept}. Free some space and {_words('run_again')} to resume from it.") from None
            reason = _why(cause) if cause is not None else _short(e)
            raise CheckpointError(
                f"cannot save the checkpoint of step {int(step)} in {self.directory}: {reason}; {kept}. "
                f"{_sentence(_words('run_again'))} once the folder can be written, or "
                f"{_words('another_folder')}.") from None

    # -- restore -------------------------------------------------------------------------------
    def restore(self, template) -> tuple[Any, dict, dict] | None:
        """``(state, host, extra)`` from the latest checkpoint, ``state`` shaped like
        ``template``; ``None`` when the folder holds none. A damaged latest checkpoint is
        refused, saying whether the previous one is intact and how to resume from it."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        try:
            return self._restore(steps[0], template)
        except _Damaged as damage:
            where = os.path.join(self.directory, str(steps[0]))
            message = f"the latest checkpoint {where} (step {steps[0]}) is damaged: {damage}."
            for step in steps[1:]:
                try:
                    self._restore(step, template)
                except (_Damaged, CheckpointError):
                    continue
                message += (f" The previous checkpoint, step {step}, is intact: to resume from it, move the damaged "
                            f"one out of the folder (mv {where} {where}.damaged) and {_words('run_again')}.")
                break
            else:
                message += " No earlier checkpoint of this run is intact."
            raise CheckpointError(f"{message} Or {_words('start_over')}.") from None

    def _check(self, record: dict, template) -> None:
        """Refuse a checkpoint of another kind, format or run, naming every difference."""
        got = record.get("format")
        if got != self.format:
            family = self.format.rsplit("/", 1)[0]
            if isinstance(got, str) and got.rsplit("/", 1)[0] == family:
                raise CheckpointError(
                    f"{self.directory} holds checkpoints in an older format ({got!r}; this version of estimax writes "
                    f"{self.format!r}), which does not record everything that identifies a run, so it cannot be "
                    f"resumed safely; {_words('start_over')}.", ("format",))
            raise CheckpointError(f"{self.directory} holds checkpoints of another kind ({got!r}, not {self.format!r}); "
                                  f"{_words('start_over')}.", ("format",))
        differences, said = [], []
        saved, about = record.get("identity") or {}, record.get("about") or {}
        for k, v in self.identity.items():
            if saved.get(k) != v:
                differences.append(k)
                said.append(difference(k, saved.get(k), v, about.get(k), self.about.get(k)))
        for k, v in self.meta.items():
            if record.get(k) != v:
                differences.append(k)
                said.append(f"its {k} is {record.get(k)!r}, this run's is {v!r}")
        if record.get("structure") != _structure(template):
            differences.append("structure")
            said.append("it holds a state of another structure than this run's (other parameters, optimizer, "
                        "solver or options)")
        if differences:
            versions_ = versions_changed(record.get("versions"))
            raise CheckpointError(
                f"{self.directory} was written by another run: " + "; ".join(said) + "."
                + (f" (It was written under {versions_}: code that stages or describes the run may differ.)"
                   if versions_ and ("program" in differences or "optimizer" in differences or "solver" in differences)
                   else "")
                + f" {_sentence(_words('start_over'))}.", tuple(differences))

    def _restore(self, step: int, template):
        where = os.path.join(self.directory, str(step))
        manifest = os.path.join(where, _MANIFEST)
        if os.path.exists(manifest):
            try:
                with open(manifest) as f:
                    expected = json.load(f)["files"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise _Damaged(f"its list of files cannot be read ({e})") from None
            for rel, (size, digest_) in sorted(expected.items()):
                full = os.path.join(where, rel)
                if not os.path.isfile(full):
                    raise _Damaged(f"{rel} is missing")
                if os.path.getsize(full) != size:
                    raise _Damaged(f"{rel} has {os.path.getsize(full)} bytes, {size} when it was written")
            actual = _files(where)
            for rel, (size, digest_) in sorted(expected.items()):
                if actual.get(rel, [None, None])[1] != digest_:
                    raise _Damaged(f"{rel} is not what was written (its contents changed)")
        try:
            with open(os.path.join(where, "record", "metadata")) as f:
                record = json.load(f)
        except (OSError, ValueError) as e:
            raise _Damaged(f"its record cannot be read ({_why(e) if isinstance(e, OSError) else e})") from None
        if not isinstance(record, dict):
            raise _Damaged("its record is not a JSON object")
        self._check(record, template)
        ocp = self._ocp
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
            _OrbaxRecords.failed = True
            _quiet_closed_loop()
            raise _Damaged(f"orbax cannot read it ({_short(e)})") from None
        leaves, treedef = jax.tree_util.tree_flatten(template)
        saved = got["state"]
        out = []
        for i, t in enumerate(leaves):
            v = saved[f"leaf_{i}"] if np.size(t) else t
            out.append(jax.random.wrap_key_data(v, impl=jax.random.key_impl(t)) if _is_key(t) and np.size(t) else v)
        state = jax.tree_util.tree_unflatten(treedef, out)
        host = {k: np.zeros(s, d) for k, (s, d) in host_shapes.items()}
        host.update({k: np.asarray(v) for k, v in (got.get("host") or {}).items()})
        self._resumed = (step, record)
        return state, host, dict(record.get("extra") or {})

    def resuming(self, step: int) -> None:
        """Say that the run resumes at ``step`` (the caller has checked it can): calls the
        ``on_resume`` of :func:`reporting`, if any."""
        hook = _ON_RESUME.get()
        if hook is not None:
            hook(int(step), getattr(self, "_resumed", (None, {}))[1])


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
      checks itself (the staged program, the optimizer's or solver's hyperparameters, the
      data, the key, the starting point, the options, the state's structure) -- e.g. a
      configuration or a code version;
    - ``info``: JSON-able entries saved with each checkpoint and not checked (read them back
      with ``estimax.runtime._checkpoint.read_record``);
    - ``resume``: ``True`` (default): continue the run saved in the folder, and refuse a
      folder written by another run, naming what differs; ``False``: start over -- the
      folder's checkpoints are removed (once its lock is taken) and the run starts from its
      first step.
    """

    directory: str | os.PathLike
    every: int | None = None
    keep: int = 2
    meta: Mapping | None = None
    info: Mapping | None = None
    resume: bool = True

    def __post_init__(self):
        if not isinstance(self.directory, (str, os.PathLike)):
            raise TypeError(f"Checkpoint: directory must be a path; got {type(self.directory).__name__}.")
        if not isinstance(self.resume, bool):
            raise TypeError(f"Checkpoint: resume must be True (continue the saved run) or False (start over); "
                            f"got {self.resume!r}.")
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
    """A digest of a pytree's structure, shapes, dtypes and (where this process holds all of
    an array) contents: what identifies a run's data, key and starting point. The same in
    every process (see ``_identity``)."""
    return tree_digest(tree)
