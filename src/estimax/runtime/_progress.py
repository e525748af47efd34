"""Progress from inside compiled loops, through host callbacks.

A compiled loop that reports every ``k`` steps calls ``jax.debug.callback(report, token,
step, *values)`` on those steps only (inside a ``lax.cond``), unordered: the device does not
wait for the host, and no step synchronizes with it. ``token`` (an int32 argument of the
compiled loop, so that one compiled loop serves every run) selects the receiver registered
by :func:`receiving`. Under a device mesh the callback may arrive once per device; a
receiver sees each step once.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from typing import Callable

import jax
import jax.numpy as jnp

_RECEIVERS: dict[int, Callable] = {}
_LAST: dict[int, int] = {}
_LOCK = threading.Lock()
_TOKENS = itertools.count(1)


@contextlib.contextmanager
def receiving(receiver: Callable | None):
    """Register ``receiver(step, *values)`` for the duration; yields the int32 token to pass
    to the compiled loop (0, which reports nowhere, when ``receiver`` is ``None``)."""
    if receiver is None:
        yield jnp.int32(0)
        return
    token = next(_TOKENS) % (2**31 - 1) or 1
    with _LOCK:
        _RECEIVERS[token], _LAST[token] = receiver, -1
    try:
        yield jnp.int32(token)
    finally:
        jax.effects_barrier()  # callbacks still in flight arrive before the receiver goes
        with _LOCK:
            _RECEIVERS.pop(token, None)
            _LAST.pop(token, None)


def report(token, step, *values) -> None:
    """The host side of the callback."""
    token, step = int(token), int(step)
    with _LOCK:
        receiver = _RECEIVERS.get(token)
        if receiver is None or step <= _LAST.get(token, -1):
            return
        _LAST[token] = step
    receiver(step, *(float(v) for v in values))


def maybe_report(every: int | None, fire, token, step, *values) -> None:
    """In a compiled loop: when ``every`` is set and ``fire & (step % every == 0)``, send
    ``(step, *values)`` to the receiver of ``token`` (asynchronously)."""
    if not every:
        return
    when = fire & (token != 0) & (step % every == 0)
    jax.lax.cond(when, lambda: jax.debug.callback(report, token, step, *values), lambda: None)
