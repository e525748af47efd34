"""The command's exit statuses and its one error, ``_Fail``: a message and the status to exit
with. ``_Invocation`` is what the error reporting of ``_main`` needs to know about the file
being worked on."""

from __future__ import annotations

import dataclasses
import signal
from typing import Any

_EXIT_OK, _EXIT_ERROR, _EXIT_USAGE, _EXIT_INTERNAL = 0, 1, 2, 3
_EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


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

