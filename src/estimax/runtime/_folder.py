"""A run's folder: its lock, files written in one step, and the words of errors about it.

- :class:`FolderLock`: one run at a time writes in a folder (``.estimax-lock``, ``flock``);
  the lock of a killed run is taken over;
- :func:`write_atomically` (and the ``.npz``/``.npy`` helpers): a file written in one step,
  with the mode every other file of a run has (``0o666`` less the umask);
- :class:`CheckpointError`, and :func:`reporting`: errors about checkpoints and folders tell
  the user what to do in the words of the interface in use (Python arguments, or the
  command's options).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import time

import numpy as np

from .._errors import EstimaxError

class CheckpointError(EstimaxError, ValueError):
    """A checkpoint that cannot be read, was written for another run, or a checkpoint folder
    that cannot be used (another run holds it, it cannot be written)."""

    def __init__(self, message: str, differences: tuple = ()):
        super().__init__(message)
        #: for a checkpoint of another run: the entries that differ (``"program"``, ``"data"``, ...)
        self.differences = tuple(differences)


# --- what the user is told to do: the Python API's words, or the command's ---------------------

_PYTHON_WORDS = {
    "start_over": "pass ex.Checkpoint(folder, resume=False) to start over in this folder, or use another folder",
    "another_folder": "use another folder",
    "run_again": "call again with the same arguments",
}
_WORDS: contextvars.ContextVar = contextvars.ContextVar("estimax_checkpoint_words", default=None)
_ON_RESUME: contextvars.ContextVar = contextvars.ContextVar("estimax_on_resume", default=None)


def _words(key: str) -> str:
    return (_WORDS.get() or _PYTHON_WORDS)[key]


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


@contextlib.contextmanager
def reporting(*, start_over: str, another_folder: str, run_again: str, on_resume=None):
    """While active, checkpoint errors say how to start over (``start_over``), pick another
    folder and run again in these words (a command's options rather than Python arguments),
    and ``on_resume(step, record)`` is called when a run resumes -- after every check has
    passed, so that nothing says "resuming" before a refusal."""
    words = _WORDS.set({"start_over": start_over, "another_folder": another_folder, "run_again": run_again})
    hook = _ON_RESUME.set(on_resume)
    try:
        yield
    finally:
        _WORDS.reset(words)
        _ON_RESUME.reset(hook)


# --- files ----------------------------------------------------------------------------------


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # not thread-safe: only where /proc is missing
    os.umask(mask)
    return mask


def write_atomically(path: str, write) -> None:
    """Write a file in one step: ``write(f)`` into a temporary file of the same folder, fsync,
    ``os.replace``; its mode is that of a file created with ``open`` (``0o666`` less the
    umask), like every other file a run writes. Raises ``OSError`` when the folder cannot be
    written (the previous file, if any, stays)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_npz_atomically(path: str, arrays: dict) -> None:
    """Write ``arrays`` to ``path`` as one ``.npz`` in one step (see :func:`write_atomically`).
    Raises ``OSError`` when the folder cannot be written."""
    write_atomically(path, lambda f: np.savez(f, **arrays))


def save_npy_atomically(path: str, array) -> None:
    """Write one array to ``path`` as ``.npy`` in one step (see :func:`write_atomically`)."""
    write_atomically(path, lambda f: np.save(f, np.asarray(array)))


def _why(e: BaseException) -> str:
    """An ``OSError``'s reason in words (``No space left on device``)."""
    return e.strerror or str(e) if isinstance(e, OSError) else str(e)


def _os_error(e: BaseException) -> OSError | None:
    """The ``OSError`` behind ``e`` (orbax and tensorstore wrap them), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        text = str(e)
        for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            if os.strerror(code) in text:
                return OSError(code, os.strerror(code))
        e = e.__cause__ or e.__context__
    return None



# --- the lock of a folder ---------------------------------------------------------------------

LOCK_NAME = ".estimax-lock"


class FolderLock:
    """The lock of a run's folder: one run at a time writes there.

    The lock is the file ``.estimax-lock`` in the folder, locked with ``flock`` while the run
    goes and holding the process id, host and command of the run that holds it. The kernel
    releases an ``flock`` when its process ends, however it ends (even by SIGKILL): a lock
    file left by a killed run is stale, and the next run takes it over. Where the file system
    has no ``flock``, the file is created exclusively (``O_EXCL``) instead, and a lock whose
    process no longer runs on this host is taken over.
    """

    def __init__(self, folder: str, what: str = "folder"):
        self.folder, self.what = folder, what
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: int | None = None
        self._exclusive = False  # the O_EXCL fallback holds it
        self.stale: dict | None = None  # the record of a dead holder taken over, if any

    def _record(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                           "command": " ".join(sys.argv)[:300]}).encode()

    def _refuse(self, holder: dict | None) -> CheckpointError:
        if holder:
            who = f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}"
            since = f", started {holder['started']}" if holder.get("started") else ""
            command = f": {holder['command']}" if holder.get("command") else ""
            who = f"{who}{since}{command}"
        else:
            who = "another process"
        return CheckpointError(
            f"the {self.what} {self.folder} is in use by another run ({who}); two runs in one folder would "
            f"overwrite each other's checkpoints. Wait for that run to end, or {_words('another_folder')}.")

    def _unwritable(self, e: OSError) -> CheckpointError:
        return CheckpointError(f"cannot write in the {self.what} {self.folder}: {_why(e)}. Make it writable, or "
                               f"{_words('another_folder')}.")

    def acquire(self) -> "FolderLock":
        for _ in range(8):
            existed = os.path.exists(self.path)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as e:
                raise self._unwritable(e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise self._refuse(holder) from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    if not existed:  # the empty file just made here is no one's lock
                        with contextlib.suppress(OSError):
                            os.unlink(self.path)
                    return self._acquire_exclusive()
                raise self._unwritable(e) from None
            try:  # the file locked must still be the lock (a run that ends removes it)
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.stale = _read_holder(fd)  # a record left there: its run ended without removing it
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, self._record(), 0)
            except OSError as e:
                os.close(fd)
                raise self._unwritable(e) from None
            self._fd = fd
            return self
        raise self._refuse(None)

    def _acquire_exclusive(self) -> "FolderLock":
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    with open(self.path, "rb") as f:
                        holder = json.loads(f.read() or b"{}")
                    age = time.time() - os.path.getmtime(self.path)
                except (OSError, ValueError):
                    holder, age = {}, 0.0
                dead = holder.get("host") == socket.gethostname() and not _alive(holder.get("pid"))
                if dead or (not holder and age > 30):  # (an empty file: a run that died before writing it)
                    self.stale = holder
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
                    continue
                raise self._refuse(holder) from None
            except OSError as e:
                raise self._unwritable(e) from None
            os.write(fd, self._record())
            self._fd, self._exclusive = fd, True
            return self
        raise self._refuse(None)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                os.unlink(self.path)  # while still locked: a waiting run then locks a fresh file
        with contextlib.suppress(OSError):
            os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
