"""Progress displays, and progress from inside compiled loops through host callbacks.

Displays (:func:`make_display`): on a terminal (or in Jupyter), a tqdm bar when tqdm is
installed, else one line on stderr rewritten in place; in a log or a pipe, nothing unless
asked for, then plain lines a few seconds apart (no carriage returns); or the user's
function. Each has ``show(step, average=None, estimate=None)`` and ``close(note=None)``; a
resumed run's display starts at its step, and its rate counts only the steps run here.

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
import sys
import threading
import time
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


# --- displays --------------------------------------------------------------------------------


def _import_tqdm():
    """``tqdm.auto.tqdm`` if tqdm is installed, else ``None``. tqdm is optional, so it is
    imported here, when a bar is asked for, not when estimax is imported."""
    try:
        from tqdm.auto import tqdm  # optional dependency
    except ImportError:
        return None
    return tqdm


def _terminal(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):
        return False


def interactive() -> bool:
    """Whether a progress bar is wanted by default: stderr is a terminal, or a Jupyter kernel runs."""
    return _terminal(sys.stderr) or "ipykernel" in sys.modules


def _rate(done: int, seconds: float) -> str:
    """``", 1234 steps/s"`` for the steps run in this process; ``""`` before the first (a
    resumed or finished run has no rate yet)."""
    return f", {done / max(seconds, 1e-9):.0f} steps/s" if done > 0 else ""


class LinePrinter:
    """A single-line progress display on stderr, rewritten in place, for a terminal without
    tqdm. ``initial``: the step a resumed run starts at (its rate counts the steps run here)."""

    def __init__(self, total: int, desc: str, initial: int = 0):
        self.total, self.desc, self.initial, self.n, self.postfix = total, desc, initial, initial, ""
        self.t0 = time.perf_counter()
        self._width = 0

    def _show(self, end: str = ""):
        rate = _rate(self.n - self.initial, time.perf_counter() - self.t0)
        line = f"{self.desc}: {self.n}/{self.total} steps{f' ({rate[2:]})' if rate else ''}{self.postfix}"
        pad = " " * max(0, self._width - len(line))
        self._width = len(line)
        sys.stderr.write("\r" + line + pad + end)
        sys.stderr.flush()

    def show(self, step: int, average: float | None = None, estimate: float | None = None):
        self.n = max(self.n, step)
        if average is not None:
            self.postfix = f" objective={average:.5g}"
        elif estimate is not None:
            self.postfix = f" estimate={estimate:.5g}"
        self._show()

    def close(self, note: str | None = None):
        if note:
            self.postfix += f" [{note}]"
        self._show(end="\n")


class LogLines:
    """Progress for a log or a pipe (``progress=True`` when stderr is not a terminal): plain
    lines ending in a newline -- never a carriage return -- at most one every ``interval``
    seconds, and one when the run ends."""

    def __init__(self, total: int, desc: str, initial: int = 0, file=None, interval: float = 10.0):
        self.total, self.desc, self.initial, self.n, self.postfix = total, desc, initial, initial, ""
        self.file, self.interval = file, interval
        self.t0 = self._last = time.perf_counter()

    def _line(self, end: str = "") -> None:
        now = time.perf_counter()
        self._last = now
        percent = f" ({100 * self.n // self.total}%)" if self.total else ""
        file = self.file or sys.stderr
        file.write(f"{self.desc}: step {self.n}/{self.total}{percent}{_rate(self.n - self.initial, now - self.t0)}"
                   f"{self.postfix}{end}\n")
        file.flush()

    def show(self, step: int, average: float | None = None, estimate: float | None = None):
        self.n = max(self.n, step)
        if average is not None:
            self.postfix = f", objective={average:.5g}"
        elif estimate is not None:
            self.postfix = f", estimate={estimate:.5g}"
        if time.perf_counter() - self._last >= self.interval:
            self._line()

    def close(self, note: str | None = None):
        self._line(f" [{note}]" if note else "")


class TqdmBar:
    """A tqdm bar on stderr (or ``file``); a resumed run's bar starts at ``initial``, so its
    rate counts the steps run here, not those of the checkpoint."""

    def __init__(self, tqdm, total: int, desc: str, initial: int = 0, file=None):
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=file or sys.stderr,
                        dynamic_ncols=True)

    def show(self, step: int, average: float | None = None, estimate: float | None = None):
        if average is not None:
            self.bar.set_postfix_str(f"objective={average:.5g}", refresh=False)
        elif estimate is not None:
            self.bar.set_postfix_str(f"estimate={estimate:.5g}", refresh=False)
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def close(self, note: str | None = None):
        if note:
            self.bar.set_postfix_str(f"{self.bar.postfix or ''} [{note}]".strip(), refresh=True)
        self.bar.close()


class NoDisplay:
    def show(self, step: int, average: float | None = None, estimate: float | None = None):
        del step, average, estimate

    def close(self, note: str | None = None):
        del note


class Calls:
    """``progress=`` a function: called as ``progress(step, value)`` (the running objective
    after a chunk, or a step's estimate when reports come from inside the loop)."""

    def __init__(self, fn):
        self.fn = fn

    def show(self, step: int, average: float | None = None, estimate: float | None = None):
        self.fn(step, average if average is not None else estimate)

    def close(self, note: str | None = None):
        del note


class SolverLine:
    """``ex.solve``'s progress: ``name: step N  KKT r  value v`` on stdout, rewritten in place
    on a terminal; in a log or a pipe, a plain line at most every ``interval`` seconds and the
    last one when the run ends (never a carriage return)."""

    def __init__(self, name: str, interval: float = 10.0):
        self.name, self.interval, self.last = name, interval, None
        self._written = time.perf_counter()

    def show(self, step: int, kkt: float, value: float):
        self.last = f"{self.name}: step {step}  KKT {kkt:.3e}  value {value:.8g}"
        if _terminal(sys.stdout):
            print("\r" + self.last, end="", flush=True)
        elif time.perf_counter() - self._written >= self.interval:
            self._written = time.perf_counter()
            print(self.last, flush=True)

    def close(self, note: str | None = None):
        del note
        if _terminal(sys.stdout):
            print()
        elif self.last is not None:
            print(self.last, flush=True)


def make_display(progress, total: int, desc: str, initial: int = 0):
    """The display for ``progress=``: a function; ``None`` (the default: a bar when
    :func:`interactive`, else nothing); ``True`` (a bar when interactive, else plain lines:
    :class:`LogLines`); ``False``. ``initial``: the step the run starts at (a resumed run)."""
    if callable(progress):
        return Calls(progress)
    if progress is None:
        progress = interactive()
    if not progress:
        return NoDisplay()
    if not interactive():
        return LogLines(total, desc, initial)
    tqdm = _import_tqdm()
    if tqdm is None:
        return LinePrinter(total, desc, initial)
    return TqdmBar(tqdm, total, desc, initial)
