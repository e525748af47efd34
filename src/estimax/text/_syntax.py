"""The syntax: the lark grammar (``grammar.lark``), parsing, and syntax errors worded for the
file's reader -- what was expected, grouped ("a statement", "an expression"), an unclosed
``{`` found where it was opened, a statement keyword guessed from a misspelling.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path

from lark import Lark, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from ._errors import TextError, error_at
from ._vocabulary import _STATEMENT_KEYWORDS

_TOKEN_NAMES = {
    "NAME": "a name", "NUMBER": "a number", "INT": "an integer", "STRING": "a string",
    "_NL": "the end of the line", "ADDOP": "'+' or '-'", "MULOP": "'*', '/' or '%'",
    "COMPOP": "a comparison", "$END": "the end of the file",
}
# What may start an expression, and the binary operators: listed as one item each in
# "expected ..." rather than a dozen tokens.
_EXPRESSION_START = {"NAME", "NUMBER", "STRING", "LPAR", "LSQB", "MINUS", "PLUS", "TRUE", "FALSE", "EXPECT", "PLATE"}
_OPERATORS = {"ADDOP", "MULOP", "COMPOP", "AND", "OR"}
_STATEMENT_START = {"DATA", "FROM", "LET", "MAXIMIZE", "MINIMIZE", "PARAM", "RETURN", "NAME", "PROGRAM", "SUBJECT_TO"}


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = (Path(__file__).parent / "grammar.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _token_name(t: str) -> str:
    if t in _TOKEN_NAMES:
        return _TOKEN_NAMES[t]
    try:
        pattern = _parser().get_terminal(t).pattern
    except KeyError:
        return t
    # keywords and punctuation are string terminals: show the text itself
    return repr(pattern.value) if pattern.type == "str" else t


def _describe_expected(expected) -> str:
    expected = set(expected)
    if "_NL" in expected:  # the parser sees a final new line: the end of the file is the end of a line
        expected.discard("$END")
    groups = []
    if _STATEMENT_START <= expected:
        expected -= _STATEMENT_START | {"_NL", "$END"}
        groups.append("a statement")
    if _EXPRESSION_START <= expected:
        expected -= _EXPRESSION_START | {"IF", "NOT"}
        groups.append("an expression")
    if {"ADDOP", "MULOP"} <= expected:
        expected -= _OPERATORS | {"__ANON_0"}
        groups.append("an operator")
    named = sorted({_token_name(t) for t in expected}, key=lambda n: (not n.startswith("'"), n))
    names = groups + named
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _accepted(e: UnexpectedInput, fallback) -> set:
    """The tokens the parser would take at the error: tried one by one (lark's LALR tables
    merge states, so the table's own list can name tokens that would fail one step later)."""
    try:
        return set(e.interactive_parser.accepts())
    except Exception:  # noqa: BLE001 -- older lark, or no parser state at this error
        return set(fallback or ())


def _unclosed_brace(source: str) -> tuple[int, int] | None:
    """Line and column of the last ``{`` that no ``}`` closes (comments and strings skipped)."""
    stack = []
    for lineno, line in enumerate(source.split("\n"), start=1):
        for m in re.finditer(r'#.*|"[^"\n]*"|[{}]', line):
            if m.group() == "{":
                stack.append((lineno, m.start() + 1))
            elif m.group() == "}" and stack:
                stack.pop()
    return stack[-1] if stack else None


def parse_tree(source: str, filename: str) -> Tree:
    """The syntax tree of ``source``; a ``TextError`` at a syntax error."""
    try:
        return _parser().parse(source if source.endswith("\n") else source + "\n")
    except UnexpectedInput as e:
        raise _syntax_error(e, source, filename) from None
    except RecursionError:
        raise TextError("an expression is nested too deeply to read", filename=filename, source=source,
                        line=1, column=1) from None


def _statement_hint(source: str, accepted: set, line: int) -> str | None:
    """After a statement's first word the parser wants only `~`: the word was meant as a keyword,
    or the statement is a random choice missing its `~`."""
    if accepted != {"TILDE"}:
        return None
    lines = source.split("\n")
    m = re.match(r"\s*([A-Za-z_]\w*)", lines[line - 1] if 0 < line <= len(lines) else "")
    if m is None:
        return None
    close = difflib.get_close_matches(m.group(1), _STATEMENT_KEYWORDS, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"a statement that starts with a name is a random choice: `{m.group(1)} ~ <distribution>`"


def _syntax_error(e: UnexpectedInput, source: str, filename: str) -> TextError:
    error = functools.partial(error_at, filename, source)
    line, column = getattr(e, "line", 1), getattr(e, "column", 1)
    if isinstance(e, UnexpectedToken):
        tok = e.token
        if tok.type == "$END" and (brace := _unclosed_brace(source)) is not None:
            return error("syntax error: this `{` is never closed; expected '}' before the end of the file",
                         line=brace[0], column=brace[1])
        what = "end of line" if tok.type == "_NL" else ("end of file" if tok.type == "$END" else f"{tok.value!r}")
        accepted = _accepted(e, e.expected)
        msg = f"syntax error: unexpected {what}; expected {_describe_expected(accepted)}"
        end = tok.end_column if tok.type not in ("_NL", "$END") and tok.end_line == tok.line else None
        return error(msg, line=line, column=column, end_column=end, hint=_statement_hint(source, accepted, line))
    if isinstance(e, UnexpectedCharacters):
        char = source[e.pos_in_stream] if e.pos_in_stream < len(source) else "?"
        if char == '"':
            return error("syntax error: this string is not closed on its line; expected '\"'",
                         line=line, column=column)
        accepted = _accepted(e, e.allowed)
        allowed = _describe_expected(accepted) if accepted else "a statement"
        msg = f"syntax error: unexpected character {char!r}; expected {allowed}"
        return error(msg, line=line, column=column, hint=_statement_hint(source, accepted, line))
    if isinstance(e, UnexpectedEOF):
        return error(f"syntax error: the file ends too early; expected {_describe_expected(e.expected)}",
                     line=max(1, source.count("\n")), column=1)
    return error(f"syntax error: {e}", line=line, column=column)
