"""Reading an objective file: a regular file (not a FIFO or a device) of bounded size, in UTF-8."""

from __future__ import annotations

import os
import stat

from .._errors import EstimaxError


#: The largest objective file read (a file is a program of a few hundred lines).
MAX_SOURCE_BYTES = 16 * 2**20


def read_source(path: str) -> str:
    """The text of the objective file at ``path``: a regular file (not a FIFO or a device, which
    could block or never end) of at most ``MAX_SOURCE_BYTES``, in UTF-8."""
    try:
        info = os.stat(path)
    except OSError as e:
        raise EstimaxError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise EstimaxError(f"{path} is {_file_kind(info.st_mode)}, not an objective file (a regular file)")
    if info.st_size > MAX_SOURCE_BYTES:
        raise EstimaxError(f"{path} is {info.st_size / 2**20:.0f} MiB; objective files are at most "
                           f"{MAX_SOURCE_BYTES // 2**20} MiB (is it the right file?)")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SOURCE_BYTES + 1)
    except OSError as e:
        raise EstimaxError(f"cannot read {path}: {e.strerror}") from None
    if len(raw) > MAX_SOURCE_BYTES:
        raise EstimaxError(f"{path} is larger than {MAX_SOURCE_BYTES // 2**20} MiB; objective files are at most that")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise EstimaxError(f"{path}:{line}: the file is not UTF-8 text (byte {raw[e.start]:#04x})") from None


def not_a_regular_file(path: str) -> str | None:
    """What ``path`` is when it is not a regular file ("a FIFO (named pipe)", "a device", ...):
    reading one could block forever or never end. ``None`` for a regular file (or a link to
    one) and for a path that cannot be examined (reading it then says why)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else _file_kind(mode)


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"

