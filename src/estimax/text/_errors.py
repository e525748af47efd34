"""Errors in objective files: file, line, column, the offending line and a caret under it."""

from __future__ import annotations

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
