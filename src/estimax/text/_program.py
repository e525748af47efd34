"""An objective file as an estimax program: ``parse`` and ``load`` give a ``TextProgram``.

A file is parsed with the lark grammar (``_syntax``) and checked statically (``_check``:
names, declarations, the objective's place). Its statements then become a Python function of
``(params, data)`` (``_lower``) that calls ``ex.sample``/``ex.expect`` exactly as a
hand-written program would, so staging it gives the same IR as the Python front-end: no pass
knows which front-end wrote a program. Errors while the program is traced (a wrong argument
to a distribution, a strategy that cannot apply, mismatched shapes) are reported at the
expression that caused them; errors the estimator passes raise about a site, at the site.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lark import Tree

from .._errors import EstimaxError
from ..dsl._primitives import expect_p as _expect_p
from ..dsl._primitives import sample_p as _sample_p
from ..transforms._estimate import Expectation
from ..runtime import _jax_compat as _compat
from ..transforms._certify import collect_sites
from ..transforms._constraints import split
from ._check import Checking, Declaration
from ._errors import TextError, _first_line, _fmt_shape
from ._imports import ImportPolicy
from ._library import _describe_value
from ._lower import Lowering, _too_deep, objective_function
from ._source import read_source
from ._syntax import parse_tree
from ._vocabulary import _INT32_MAX, _in_text_terms, _not_numeric

#: the statements a block runs, each under its `file.emx:line` (see ``Lowering.run``)
_RUN_STATEMENTS = {"sample_stmt", "let_stmt", "constraint_stmt", "maximize", "minimize", "return_stmt"}


class _TextExpectation(Expectation):
    """The program of an objective file. Staging also checks the plan (what ``explain`` and
    the estimators check later: e.g. the size of an enumeration), so that an error about a
    site is reported at the site's line in the file."""

    def __init__(self, fn, name, program: "TextProgram"):
        super().__init__(fn, name=name)
        self._text = program
        self._splitting = False

    def stage(self, args):
        try:
            out = super().stage(args)
            self._text._note_staged_sites(out[0].jaxpr)
            collect_sites(out[0].jaxpr)
            if self._text.constraints and not self._splitting:  # the constraints pass's checks, at the file's lines
                self._splitting = True
                try:
                    split(self, args)
                finally:
                    self._splitting = False
        except TextError:
            raise
        except EstimaxError as e:
            raise self._text._located(e) from None
        return out

    def _estimate(self, key, *args):
        try:
            return super()._estimate(key, *args)
        except TextError:
            raise
        except EstimaxError as e:
            raise self._text._located(e) from None


class TextProgram(Checking):
    """A parsed, checked objective file; ``objective`` is its ``@ex.expectation`` program.

    - ``objective(params, data)``: ``params`` and ``data`` are dicts of arrays keyed by the
      declared names; ``maximize`` says the direction.
    - ``init_params(dims)``, ``abstract_data(dims)``: declared initial values and data
      shapes (``dims`` maps named sizes to numbers; see :meth:`dims_from`).
    - ``sites``: the random choices' names and where they are written, ``(line, column)``;
      once the objective is staged, also under their full names in the program
      (``"expect/z"``, ``"marginal/u"``, ``"normalize/index"``), at the statement that draws
      each (a program's choices where the program is written; a ``marginal``'s or
      ``normalize``'s resampling index at the `~` that draws from it).
    """


    def __init__(self, source: str, filename: str = "<string>", allow_imports=()):
        self.source, self.filename = source, filename
        self.directory = os.path.dirname(os.path.abspath(filename)) if os.path.exists(filename) else os.getcwd()
        self._policy = ImportPolicy(self.directory, allow_imports)
        tree = parse_tree(source, filename)
        self._at = None  # the statement being read (for an error that has no better place)
        try:
            self._check(tree)
        except RecursionError:
            if self._at is None:
                raise TextError("an expression is nested too deeply to check", filename=filename, source=source,
                                line=1, column=1) from None
            raise self.error("this statement is nested too deeply to check: hundreds of blocks or expressions "
                             "inside one another", self._at, hint="name the inner parts with `let`") from None
        # the statement on each line (one per line), preferring a random choice's: a site's
        # location is the `file.emx:line` of the statement that ran ``ex.sample``
        self._statements: dict[int, Tree] = {}
        for stmt in tree.iter_subtrees_topdown():
            line = getattr(stmt.meta, "line", None)
            if stmt.data in _RUN_STATEMENTS and line is not None and (
                    stmt.data == "sample_stmt" or line not in self._statements):
                self._statements[line] = stmt
        self._staged_tokens: dict[str, Any] = {}  # full site name -> its strategy or name, once staged
        name = Path(filename).stem if filename != "<string>" else "text_objective"
        self.objective = _TextExpectation(objective_function(self), name=name, program=self)

    # -- errors about staged sites -------------------------------------------------------------
    def _located(self, e: EstimaxError) -> EstimaxError:
        """An error an estimator pass raised about a site (``site 'z': ...``), at the site's
        strategy (or name) in the file; other errors (about the caller's arguments) unchanged."""
        c = re.match(r"constraint '([^']+)' \(at [^)]*\) (.*)", str(e))
        if c is not None and c.group(1) in self.constraints:
            why = c.group(2).replace(" (the program's first argument)", "")
            return self.error(f"constraint {c.group(1)!r} {why}",
                              self.constraints[c.group(1)].children[1])
        m = re.match(r"site '([^']+)'|two random choices are named '([^']+)'", str(e))
        full = (m.group(1) or m.group(2)) if m else None
        token = None
        if full is not None:  # a program's choices are named where the program is called: match the last part
            token = (self._staged_tokens.get(full) or self._site_tokens.get(full)
                     or self._program_sites.get(full.rsplit("/", 1)[-1]))
        if token is None:
            return e
        if m.group(2) is not None and full not in self._site_tokens:
            # a program (or a marginal/normalize) drawn twice in one objective
            return self.error(f"the random choice {full!r} is drawn twice: a program that draws random choices "
                              "(or a marginal or normalize) can run once in an objective", token,
                              hint="for several independent draws, run it inside `plate(n=...) { ... }`")
        return self.error(_in_text_terms(_first_line(e)), token)

    def _note_staged_sites(self, jaxpr):
        """Record where each random choice of the staged objective is written, under its full
        name (as ``explain`` names it): the statement its location (``file.emx:line``, set
        while the statement ran) names. A site's short name is ambiguous -- the reverse model
        of a ``marginal`` draws ``marginal/u`` under the joint's name ``u`` -- and some sites
        have none in the file (``normalize/index``)."""
        base = os.path.basename(self.filename)
        tokens: dict[str, Any] = {}

        def walk(jaxpr, prefix):
            for eqn in jaxpr.eqns:
                if eqn.primitive is _sample_p:
                    spec = eqn.params["spec"]
                    file, _, line = (spec.location or "").rpartition(":")
                    stmt = self._statements.get(int(line)) if file == base and line.isdigit() else None
                    if stmt is not None and prefix + spec.name not in tokens:
                        tokens[prefix + spec.name] = stmt
                elif eqn.primitive is _expect_p:
                    walk(eqn.params["spec"].jaxpr, f"{prefix}{eqn.params['spec'].name}/")
                else:
                    for sub in _compat.subjaxprs_of(eqn):
                        walk(sub, prefix)

        walk(jaxpr, "")
        self._staged_tokens = {}
        for full, stmt in tokens.items():
            if stmt.data == "sample_stmt":
                name, strategy = stmt.children[0], stmt.children[2]
                self.sites[full] = (name.line, name.column)
                self._staged_tokens[full] = strategy or name
            else:  # e.g. a Python function of the file's imports that samples, called in a `let`
                self.sites[full] = (stmt.meta.line, stmt.meta.column)
                self._staged_tokens[full] = stmt

    # -- inputs -------------------------------------------------------------------------------
    def dims_from(self, data: dict | None) -> dict[str, int]:
        """Named sizes read off the data's shapes (``_DEFAULT_DIM`` where no data is given)."""
        dims: dict[str, int] = {}
        for decl in self.data.values():
            if data is None or decl.name not in data:
                continue
            shape = np.shape(data[decl.name])
            if len(shape) != len(decl.shape):
                raise self.error(f"data {decl.name!r} is declared with {len(decl.shape)} axes "
                                 f"{_fmt_shape(decl.shape)}; the given array has shape {shape}",
                                 line=decl.line, column=1)
            for want, got in zip(decl.shape, shape):
                if isinstance(want, str):
                    if dims.setdefault(want, got) != got:
                        raise self.error(f"size {want!r} is {dims[want]} in one data array and {got} in "
                                         f"{decl.name!r}", line=decl.line, column=1)
                elif want != got:
                    raise self.error(f"data {decl.name!r} is declared with shape {_fmt_shape(decl.shape)}; "
                                     f"the given array has shape {shape}", line=decl.line, column=1)
        return dims

    def init_params(self, dims: dict | None = None) -> dict:
        """The parameters' initial values (the declared ``= value``, else zeros)."""
        dims = dims or {}
        out = {}
        for decl in self.params.values():
            shape = decl.concrete_shape(dims)
            self._check_entries(decl, shape)
            if decl.init is None:
                out[decl.name] = jnp.zeros(shape, decl.dtype)
                continue
            try:
                value = Lowering(self, {}).eval(decl.init)
            except RecursionError:
                raise _too_deep(self, decl.init) from None
            if _not_numeric(value):
                raise self.error(f"the initial value of {decl.name!r} must be a number or an array; got "
                                 f"{_describe_value(value)}", decl.init)
            try:
                out[decl.name] = jnp.broadcast_to(jnp.asarray(value, decl.dtype), shape)
            except (TypeError, ValueError):
                raise self.error(f"the initial value of {decl.name!r} has shape {np.shape(value)}, which does "
                                 f"not fit the declared shape {shape}", decl.init) from None
        return out

    def _check_entries(self, decl: Declaration, shape: tuple):
        """One array has at most ``_INT32_MAX`` entries (XLA's and the language's indices are 32-bit)."""
        if math.prod(shape) > _INT32_MAX:
            named = {s: v for s, v in zip(decl.shape, shape) if isinstance(s, str)}
            sizes = ", ".join(f"{s}={v}" for s, v in named.items())
            what = "parameter" if decl.kind == "param" else "data"
            raise self.error(f"{what} {decl.name!r} would have {math.prod(shape)} entries (shape {shape}"
                             f"{', with ' + sizes if sizes else ''}); an array has at most {_INT32_MAX}",
                             line=decl.line, column=1)

    def abstract_data(self, dims: dict | None = None) -> dict:
        dims = dims or {}
        for d in self.data.values():
            self._check_entries(d, d.concrete_shape(dims))
        return {d.name: jax.ShapeDtypeStruct(d.concrete_shape(dims), d.dtype) for d in self.data.values()}

    def validate_data(self, data: dict) -> dict:
        """``data`` as arrays of the declared types; errors name the missing or extra array."""
        missing = [n for n in self.data if n not in data]
        if missing:
            decl = self.data[missing[0]]
            raise self.error(f"no data given for {missing[0]!r}", line=decl.line, column=1,
                             hint=f"the data file has {sorted(data)}")
        self.dims_from(data)
        for n, d in self.data.items():
            kind = np.asarray(data[n]).dtype.kind
            if kind not in "biuf":
                what = {"c": "complex numbers", "U": "text", "S": "bytes", "O": "Python objects"}.get(kind, f"dtype {np.asarray(data[n]).dtype}")
                raise self.error(f"data {n!r} holds {what}; it is declared {'real' if d.dtype == jnp.float32 else 'int'}",
                                 line=d.line, column=1)
        return {n: jnp.asarray(data[n], d.dtype) for n, d in self.data.items()}



def parse(source: str, filename: str = "<string>", allow_imports=()) -> TextProgram:
    """Parse and check an objective given as text. ``allow_imports``: the modules (by name) and
    Python files or folders (by path) that it may import beyond the defaults (see ``load``);
    relative ``from "file.py"`` imports are read from ``filename``'s folder, or the current
    directory when there is no such file."""
    return TextProgram(source, filename, allow_imports)


def load(path: str | os.PathLike, allow_imports=()) -> TextProgram:
    """Parse and check the objective file at ``path``.

    Importing runs code, so a file may import by default only from the numerical modules of
    ``ex.text.ALLOWED_MODULES`` and only Python files in its own folder (or below it);
    ``allow_imports`` lists what else it may import: module names (a module and its
    submodules, every name in them) and paths (a ``.py`` file, or a folder), relative to the
    current directory. See docs/objective-language.md, "Imports"."""
    path = os.fspath(path)
    return TextProgram(read_source(path), path, allow_imports)
