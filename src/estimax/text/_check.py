"""The static checks of an objective file, before anything runs: the statements' order (the
objective last), imports under the import policy (``_imports``), declarations and their
sizes, names resolved in order (and defined once), blocks that end with ``return``, and where
each random choice is written. ``Checking`` is the part of ``TextProgram`` that does them.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import math
import os
import sys
from pathlib import Path
from typing import Any

from lark import Token, Tree

from ._errors import TextError, _first_line, _relative, error_at
from ._imports import module_allowed, opt_in_hint
from ._library import FUNCTIONS
from ._vocabulary import (
    _DEFAULT_DIM,
    _FLOAT32_MAX,
    _INT32_MAX,
    _KEYWORDS,
    _TYPES,
    CONSTANTS,
    DISTRIBUTIONS,
    STRATEGIES,
    _too_large,
)


@dataclasses.dataclass(frozen=True)
class Declaration:
    """A ``param`` or ``data`` declaration: name, element type and shape (ints or names)."""

    kind: str  # "param" or "data"
    name: str
    dtype: Any
    shape: tuple  # ints, or str for a named size
    init: Any = None  # the init expression's tree, for params
    line: int = 0

    def concrete_shape(self, dims: dict) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims.get(d, _DEFAULT_DIM) for d in self.shape)


class Checking:
    """Reads and checks a parsed file (``_check``), filling the declarations (``params``,
    ``data``), ``imports``, ``programs``, ``constraints``, the top-level statements
    (``body``) and the random choices' places (``sites``). Needs ``source``, ``filename``,
    ``directory`` and the import policy ``_policy``."""

    source: str
    filename: str

    def error(self, message: str, node=None, *, hint: str | None = None, line=None, column=None, end_column=None) -> TextError:
        """A mistake in this file, at ``node`` (a tree or a token of it) or at ``line`` and ``column``."""
        return error_at(self.filename, self.source, message, node, hint=hint, line=line, column=column,
                        end_column=end_column)

    def _check(self, tree: Tree):
        self.imports: dict[str, Any] = {}
        self.params: dict[str, Declaration] = {}
        self.data: dict[str, Declaration] = {}
        self.body: list[Tree] = []
        self.sites: dict[str, tuple[int, int]] = {}
        self._size_tokens: dict[tuple[str, str], Token] = {}  # (declared name, size name) -> the size
        self._site_tokens: dict[str, Any] = {}  # full site name ("expect/z") -> its strategy or name in the file
        self._site_names: dict[str, Token] = {}  # full site name -> its name in the file
        self._program_sites: dict[str, Any] = {}  # a program's site name -> its strategy or name (first program wins)
        self.programs: dict[str, Tree] = {}
        self.constraints: dict[str, Tree] = {}  # name -> the `subject_to` statement
        self.maximize = True
        self._objective_node: Tree | None = None
        self._read(tree)
        self._check_names()

    # -- reading the statements ------------------------------------------------------------------
    def _read(self, tree: Tree):
        stmts = list(tree.children)
        for i, stmt in enumerate(stmts):
            kind = stmt.data
            self._at = stmt
            if self._objective_node is not None:
                raise self.error("statements after the objective: `maximize`/`minimize` must come last",
                                 stmt, hint=f"the objective is on line {self._objective_node.meta.line}")
            if kind == "import_stmt":
                self._import(stmt)
            elif kind in ("param_decl", "data_decl"):
                self._declare(stmt)
            elif kind in ("let_stmt", "sample_stmt"):
                self._note_binding(stmt)
                self.body.append(stmt)
            elif kind == "program_def":
                self.programs[str(stmt.children[0])] = stmt
                self.body.append(stmt)
            elif kind == "constraint_stmt":
                self._note_constraint(stmt)
                self.body.append(stmt)
            elif kind in ("maximize", "minimize"):
                self.maximize = kind == "maximize"
                self._objective_node = stmt
                self.body.append(stmt)
            elif kind == "return_stmt":
                raise self.error("`return` is only allowed at the end of an `expect { ... }` block; "
                                 "the objective is stated with `maximize` or `minimize`", stmt)
        if self._objective_node is None:
            lines = self.source.split("\n")
            line = max((i + 1 for i, t in enumerate(lines) if t.strip()), default=1)
            raise self.error("the file states no objective", line=line, column=1,
                             hint="end it with `maximize <expression>` or `minimize <expression>`")

    def _note_constraint(self, stmt: Tree):
        name_tok, value = stmt.children
        if not (isinstance(value, Tree) and value.data == "compare" and str(value.children[1]) in ("==", "<=", ">=")):
            what = f"`{value.children[1]}`" if isinstance(value, Tree) and value.data == "compare" else "an expression"
            raise self.error(f"a constraint is a comparison with ==, <= or >=; this is {what}", value,
                             hint="e.g. `subject_to budget: sum(w) == 1.0` or `subject_to cap: x <= 2.0`")
        name = str(name_tok) if name_tok is not None else f"{'eq' if str(value.children[1]) == '==' else 'le'}_{len(self.constraints)}"
        if name in self.constraints:
            prev = self.constraints[name]
            raise self.error(f"another constraint is named {name!r} (line {prev.meta.line}); constraint names must be unique",
                             name_tok or stmt)
        self.constraints[name] = stmt

    def _defined(self) -> dict[str, str]:
        out = {n: "an import" for n in self.imports}
        out.update({n: "a parameter" for n in self.params})
        out.update({n: "a data array" for n in self.data})
        for d in self.data.values():
            out.update({n: "a size" for n in d.shape if isinstance(n, str) and n not in out})
        return out

    def _check_new_name(self, token: Token, what: str, defined: dict[str, str]):
        name = str(token)
        if name in defined:
            raise self.error(f"{name!r} is already defined (as {defined[name]}); {what} needs a new name", token)
        if name in _KEYWORDS:
            raise self.error(f"{name!r} is a keyword; {what} needs another name", token)
        if name in FUNCTIONS or name in DISTRIBUTIONS or name in CONSTANTS:
            raise self.error(f"{name!r} is a built-in name; {what} needs another name", token)

    def _import(self, stmt: Tree):
        """``from "file.py" import name`` or ``from module import name``, under the import policy
        (``_imports``): nothing runs before the import is known to be allowed."""
        module_node, name, alias = stmt.children
        target = str(alias or name)
        self._check_new_name(alias or name, "an import", self._defined())
        policy = self._policy
        if module_node.data == "file_module":
            path = str(module_node.children[0])[1:-1]
            full = path if os.path.isabs(path) else os.path.join(self.directory, path)
            if not os.path.exists(full):
                raise self.error(f"no such file: {path!r}", module_node,
                                 hint=f"looked for {_relative(full)}; a relative path is read from the objective file's folder")
            why = policy.refuse_file(full)
            if why is not None:
                raise self.error(f"importing {path!r} is not allowed: {why}", module_node,
                                 hint=opt_in_hint(_relative(os.path.realpath(full))))
            spec = importlib.util.spec_from_file_location(Path(full).stem, full)
            if spec is None or spec.loader is None or not os.path.isfile(full):
                raise self.error(f"cannot import {path!r}: not a Python file", module_node)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except (Exception, SystemExit) as e:  # noqa: BLE001 -- the user's module failed to import
                raise self.error(f"importing {path!r} failed: {type(e).__name__}: {_first_line(e)}",
                                 module_node) from None
            policy.trust(module)  # the file's own code: what it defines may be used freely
            where = repr(path)
        else:
            dotted = ".".join(str(t) for t in module_node.children)
            submodule = f"{dotted}.{name}"
            if policy.module_opted_in(dotted):
                module = self._import_module(dotted, module_node, search_folder=True)
                policy.trust(module)
            elif module_allowed(dotted):
                module = self._import_module(dotted, module_node)
            elif module_allowed(submodule) or policy.module_opted_in(submodule):
                # `from jax import numpy`: the module jax.numpy itself
                self.imports[target] = self._import_module(submodule, name)
                if policy.module_opted_in(submodule):
                    policy.trust(self.imports[target])
                return
            else:
                raise self.error(f"importing from module {dotted!r} is not allowed: importing a module runs its code, "
                                 "and an objective file imports by default only from numerical modules (math, numpy, "
                                 "jax.numpy, jax.nn, jax.lax, jax.scipy, numpyro.distributions; the list is "
                                 "ex.text.ALLOWED_MODULES)", module_node, hint=opt_in_hint(dotted))
            where = f"module {dotted!r}"
        if not hasattr(module, str(name)):
            if module_node.data == "dotted_module" and (module_allowed(submodule) or policy.module_opted_in(dotted)):
                value = self._import_module(submodule, name)  # a submodule not imported by its package
            else:
                names = [n for n in dir(module) if not n.startswith("_")]
                close = difflib.get_close_matches(str(name), names, n=1)
                raise self.error(f"{where} has no name {str(name)!r}", name,
                                 hint=f"did you mean {close[0]!r}?" if close else None)
        else:
            value = getattr(module, str(name))
        why = policy.refuse_name(module, str(name), value)
        if why is not None:
            entry = getattr(value, "__name__", None) if inspect.ismodule(value) and not str(name).startswith("_") else None
            raise self.error(f"importing {str(name)!r} is not allowed: {why}", name,
                             hint=opt_in_hint(entry or getattr(module, "__name__", "?")))
        if policy.trusted(module):
            policy.trust(value)
        self.imports[target] = value

    def _import_module(self, dotted: str, node, search_folder: bool = False):
        """The module ``dotted``; with ``search_folder`` (an opted-in module), the objective file's
        folder is searched too."""
        added = search_folder and self.directory not in sys.path
        if added:  # modules next to the objective file, for this import only
            sys.path.insert(0, self.directory)
        try:
            return importlib.import_module(dotted)
        except (Exception, SystemExit) as e:  # noqa: BLE001 -- not found, or the module's own code failed
            what = _first_line(e) if isinstance(e, ImportError) else f"{type(e).__name__}: {_first_line(e)}"
            raise self.error(f"cannot import module {dotted!r}: {what}", node) from None
        finally:
            if added and self.directory in sys.path:
                sys.path.remove(self.directory)

    def _declare(self, stmt: Tree):
        kind = "param" if stmt.data == "param_decl" else "data"
        name, type_node = stmt.children[0], stmt.children[1]
        init = stmt.children[2] if kind == "param" else None
        self._check_new_name(name, f"a {kind} declaration", self._defined())
        type_name = type_node.children[0]
        if str(type_name) not in _TYPES:
            raise self.error(f"unknown type {str(type_name)!r}; expected 'real' or 'int'", type_name)
        if kind == "param" and str(type_name) != "real":
            raise self.error(f"parameter {str(name)!r} must be real (parameters are optimized)", type_name)
        shape = []
        for d in type_node.children[1:]:
            tok = d.children[0]
            if d.data == "int_dim":
                if _too_large(str(tok)):
                    shown = str(tok) if len(str(tok)) <= 24 else f"{str(tok)[:12]}... ({len(str(tok))} digits)"
                    raise self.error(f"the size {shown} is too large: an axis has at most {_INT32_MAX} entries", tok)
                if int(tok) < 1:
                    raise self.error("a size must be at least 1", tok)
                shape.append(int(tok))
            else:
                shape.append(str(tok))
                self._size_tokens.setdefault((str(name), str(tok)), tok)
        decl = Declaration(kind, str(name), _TYPES[str(type_name)], tuple(shape), init, stmt.meta.line)
        static = [s for s in shape if isinstance(s, int)]
        if math.prod(static) > _INT32_MAX:
            raise self.error(f"{kind} {str(name)!r} is declared with {math.prod(static)} entries; an array has at most "
                             f"{_INT32_MAX}", type_node)
        (self.params if kind == "param" else self.data)[str(name)] = decl

    def _note_binding(self, stmt: Tree):
        name = stmt.children[0]
        if stmt.data == "sample_stmt":
            self.sites[str(name)] = (name.line, name.column)

    # -- static name resolution ----------------------------------------------------------------
    def _check_names(self):
        known = dict(self._defined())
        for decl in self.params.values():
            if decl.init is not None:
                self._resolve(decl.init, {})  # built-ins only
        for d in (*self.params.values(), *self.data.values()):
            for size in d.shape:
                if isinstance(size, str) and d.kind == "param" and not any(size in x.shape for x in self.data.values()):
                    raise self.error(f"parameter {d.name!r} has a size {size!r} that no data declaration has",
                                     self._size_tokens.get((d.name, size)),
                                     line=d.line, column=1, hint="give the size as a number, or declare data with it")
        self._resolve_block(self.body, known)

    def _resolve_block(self, stmts, known: dict[str, str], prefix: str = "", program: bool = False):
        for stmt in stmts:
            self._at = stmt
            if stmt.data == "program_def":
                self._resolve_program(stmt, known)
            elif stmt.data in ("let_stmt", "sample_stmt"):
                name, value = stmt.children[0], stmt.children[1]
                self._resolve(value, known, prefix)
                if stmt.data == "sample_stmt" and stmt.children[2] is not None:
                    self._resolve_strategy(stmt.children[2], known, prefix)
                what = "a let-binding" if stmt.data == "let_stmt" else "a random choice"
                self._check_new_name(name, what, known)
                known[str(name)] = "a random choice" if stmt.data == "sample_stmt" else "a let-binding"
                if stmt.data == "sample_stmt":
                    if program:
                        self._program_sites.setdefault(str(name), stmt.children[2] or name)
                        self.sites.setdefault(str(name), (name.line, name.column))
                    else:
                        self._note_site(prefix + str(name), name, stmt.children[2])
            elif stmt.data == "constraint_stmt":
                if prefix or program:
                    raise self.error("constraints are stated at the top level of the file", stmt)
                self._resolve(stmt.children[1], known, prefix)
            else:  # maximize, minimize, return
                self._resolve(stmt.children[0], known, prefix)

    def _resolve_program(self, stmt: Tree, known: dict[str, str]):
        name, args_node, *body = stmt.children
        self._check_new_name(name, "a program", known)
        inner = dict(known)
        for a in ([] if args_node is None else args_node.children):
            self._check_new_name(a, "a program's argument", inner)
            inner[str(a)] = "an argument"
        self._check_block(stmt, body, "a `program`", "programs")
        # the program sees what is defined before it; not itself (no recursion)
        self._resolve_block(body, inner, program=True)
        known[str(name)] = "a program"

    def _check_block(self, node: Tree, stmts: list, what: str, plural: str):
        for i, s in enumerate(stmts[:-1]):
            if s.data == "return_stmt":
                raise self.error(f"statements after `return`: it must be the last statement of {what} block",
                                 stmts[i + 1], hint=f"the block's `return` is on line {s.meta.line}")
        if not stmts or stmts[-1].data != "return_stmt":
            raise self.error(f"{what} block must end with `return <expression>`", node)
        for s in stmts[:-1]:
            if s.data == "program_def":
                raise self.error(f"programs are defined at the top level of the file, not inside {what} block", s)
            if s.data == "constraint_stmt":
                raise self.error(f"constraints are stated at the top level of the file, not inside {what} block", s)
            if s.data not in ("let_stmt", "sample_stmt"):
                raise self.error(f"only `let`, `~` and a final `return` are allowed inside {plural}", s)

    def _note_site(self, full: str, name: Token, strategy):
        # Blocks do not scope names of random choices (every `expect` block's function is
        # `expect`; a plate's choices keep their names), so two blocks' random choices of one
        # name would be the same site ("expect/u").
        if full in self._site_names:
            prev = self._site_names[full]
            raise self.error(f"another block has a random choice named {str(name)!r} (line {prev.line}); "
                             "random choices in `expect` and `plate` blocks need distinct names", name)
        self._site_names[full] = name
        self._site_tokens[full] = strategy or name  # errors about the site point at its strategy, else its name

    def _note_block_sites(self, stmts):
        for s in stmts:
            if s.data == "sample_stmt":
                n = s.children[0]
                self.sites.setdefault(str(n), (n.line, n.column))

    def _resolve_strategy(self, node: Tree, known, prefix: str = ""):
        name = node.children[0]
        if str(name) not in STRATEGIES:
            close = difflib.get_close_matches(str(name), list(STRATEGIES), n=1)
            raise self.error(f"unknown strategy @{name}; expected one of {', '.join('@' + s for s in STRATEGIES)}",
                             name, hint=f"did you mean @{close[0]}?" if close else None)
        if node.children[1] is not None:
            for kw in node.children[1].children:
                if not (str(kw.children[0]) == "learn" and kw.children[1].data in ("true", "false")):
                    self._resolve(kw.children[1], known, prefix)

    def _resolve(self, node, known: dict[str, str], prefix: str = ""):
        """Check the names of an expression, left to right. A loop over a stack, not a recursion:
        a sum of 10^4 terms is a tree 10^4 deep."""
        stack = [node]
        while stack:
            node = stack.pop()
            if not isinstance(node, Tree):
                continue
            if node.data == "number":
                self._check_number(node)
            elif node.data == "name":
                self._resolve_name(node.children[0], known)
            elif node.data in ("expect_block", "plate_block"):
                self._resolve_scope(node, known, prefix)
            elif node.data == "kwarg":
                stack.append(node.children[1])
            elif node.data == "attr":
                stack.append(node.children[0])
            else:
                stack.extend(reversed(node.children))

    def _resolve_name(self, tok: Token, known: dict[str, str]):
        name = str(tok)
        if name in known or name in FUNCTIONS or name in DISTRIBUTIONS or name in CONSTANTS:
            return
        candidates = list(known) + list(FUNCTIONS) + list(DISTRIBUTIONS) + list(CONSTANTS)
        close = difflib.get_close_matches(name, candidates, n=1)
        later = name in self.sites or any(
            s.data == "let_stmt" and str(s.children[0]) == name for s in self.body
        )
        hint = f"did you mean {close[0]!r}?" if close else None
        if later:
            hint = f"{name!r} is defined further down; statements run in order"
        raise self.error(f"unknown name {name!r}", tok, hint=hint)

    def _check_number(self, node: Tree):
        """A number literal must fit its type: whole numbers are 32-bit integers, others 32-bit
        floats (a larger one would overflow, or silently become infinity)."""
        tok = node.children[0]
        text = str(tok)
        shown = text if len(text) <= 24 else f"{text[:12]}... ({len(text)} characters)"
        if text.isdigit():
            if _too_large(text):
                raise self.error(f"the whole number {shown} is too large: whole numbers are 32-bit integers "
                                 f"(at most {_INT32_MAX})", tok,
                                 hint="for a real number, write it with a decimal point or an exponent (e.g. 1e11)")
        elif float(text) > _FLOAT32_MAX:
            raise self.error(f"the number {shown} is too large: real numbers are 32-bit floats (at most about 3.4e38)",
                             tok)

    def _resolve_scope(self, node: Tree, known: dict[str, str], prefix: str):
        """An ``expect { ... }`` or ``plate(...) { ... }`` block in an expression."""
        if node.data == "expect_block":
            kwargs, *stmts = node.children
            if kwargs is not None:
                for kw in kwargs.children:
                    if str(kw.children[0]) != "n":
                        raise self.error(f"expect takes only n=...; got {str(kw.children[0])}=", kw.children[0])
                    self._resolve(kw.children[1], known, prefix)
            self._check_block(node, stmts, "an `expect { ... }`", "`expect`")
            self._note_block_sites(stmts)
            self._resolve_block(stmts, dict(known), prefix + "expect/")  # the block's function is `expect`
        elif node.data == "plate_block":
            spec, *stmts = node.children
            inner = dict(known)
            if spec.data == "plate_size":
                key = spec.children[0].children[0]
                if str(key) != "n":
                    raise self.error(f"plate takes n=... or `name in array`; got {str(key)}=", key)
                self._resolve(spec.children[0].children[1], known, prefix)
            else:
                for item in spec.children:
                    element, array = item.children
                    self._resolve(array, known, prefix)
                    self._check_new_name(element, "a plate's element", inner)
                    inner[str(element)] = "a plate's element"
            self._check_block(node, stmts, "a `plate { ... }`", "`plate`")
            self._note_block_sites(stmts)
            self._resolve_block(stmts, inner, prefix)  # a plate's random choices keep their names

