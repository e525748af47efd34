"""Errors in objective files: file, line, column, the offending line and a caret under it.

``TextError`` is the error; ``error_at`` locates one at a node or token of the parsed file;
the other helpers word what a message says (a value's kind, an exception's first line).
"""

from __future__ import annotations

import os
import re

import jax
from lark import Token, Tree

from .._errors import EstimaxError


class TextError(EstimaxError):
    """A mistake in an objective file, located in it.

    ``str(error)`` reads ``file:line:column: error: message``, then the line and a caret
    (``^~~~``) under the offending text, then any hint.
    """

    def __init__(self, message: str, *, filename: str, source: str, line: int, column: int, end_column: int | None = None, hint: str | None = None):
        self.message, self.filename, self.line, self.column = message, filename, line, column
        self.end_column, self.hint = end_column, hint
        lines = source.splitlines()
        self.text = lines[line - 1] if 0 < line <= len(lines) else ""
        super().__init__(self._format())

    def _format(self) -> str:
        out = [f"{self.filename}:{self.line}:{self.column}: error: {self.message}"]
        if self.text:
            width = 1
            if self.end_column is not None and self.end_column > self.column:
                width = self.end_column - self.column
            width = max(1, min(width, len(self.text) - self.column + 1))
            out.append("    " + self.text)
            out.append("    " + " " * (self.column - 1) + "^" + "~" * (width - 1))
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)


def error_at(filename: str, source: str, message: str, node=None, *, hint: str | None = None, line=None, column=None,
             end_column=None) -> TextError:
    """A ``TextError`` at ``node`` (a tree of the parsed file, or a token), else at ``line``
    and ``column``; a node that spans lines is underlined to the end of its first line."""
    if node is not None:
        meta = node.meta if isinstance(node, Tree) else None
        if meta is not None and not getattr(meta, "empty", True):
            line, column = meta.line, meta.column
            end_column = meta.end_column if meta.end_line == meta.line else _line_end(source, line)
        elif isinstance(node, Token):
            line, column = node.line, node.column
            end_column = node.end_column if node.end_line == node.line else None
    return TextError(message, filename=filename, source=_shown(source), line=line or 1,
                     column=column or 1, end_column=end_column, hint=hint)


def _line_end(source: str, line: int) -> int:
    lines = _shown(source).split("\n")
    return len(lines[line - 1].rstrip()) + 1 if 0 < line <= len(lines) else 1


def _shown(source: str) -> str:
    """``source`` as the error shows it: lines split where the parser splits them (at
    ``\\n``); other characters that Python counts as line breaks shown as U+FFFD, so the
    line and the caret are the ones the parser meant."""
    return re.sub(r"[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]", "\ufffd", source.replace("\r\n", "\n"))


def _relative(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive
        return path
    return path if rel.startswith(".." + os.sep) else rel


def _describe_error(e: BaseException) -> str:
    if isinstance(e, (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError,
                      jax.errors.TracerArrayConversionError)):
        return ("this needs a number written in the file, not a value computed from parameters, "
                "data or random choices")
    text = _first_line(e)
    if isinstance(e, (EstimaxError, TypeError, ValueError, IndexError, ArithmeticError)):
        return text
    return f"{type(e).__name__}: {text}"


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]" if shape else "scalar"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
