"""What an objective file may import.

Importing runs code: a module's top level runs when it is first imported, and a ``.py``
file runs when it is imported. So that ``estimax check FILE`` runs only code its reader
asked for, a file may by default

- import names from the numerical modules of :data:`ALLOWED_MODULES` (and the submodules
  of :data:`ALLOWED_PACKAGES`): functions and values that are not modules, not private
  (``_name``), not in :data:`DENIED_NAMES` (what reads or writes files or runs other code:
  ``numpy.load``, ``numpy.memmap``, ``numpy.test``, ...) and not one of Python's built-in
  functions; a name that is itself a module only when that module is allowed
  (``from jax import numpy``); the same rules hold for ``module.name`` in expressions;
- import Python files (``from "helpers.py" import f``) that lie in the objective file's
  folder or below it, after following symbolic links.

Anything else needs an opt-in: ``--allow-import ENTRY`` on the command line,
``allow_imports=[ENTRY, ...]`` in :func:`estimax.text.load`. An entry is a module name
(that module and its submodules may be imported, every name in them) or a path (a ``.py``
file, or a folder whose files may be imported).
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import os
from typing import Iterable

#: Modules whose public functions and values an objective file may import by default.
ALLOWED_MODULES: tuple[str, ...] = (
    "math",
    "numpy",
    "numpy.fft",
    "numpy.linalg",
    "jax.numpy",
    "jax.numpy.fft",
    "jax.numpy.linalg",
    "jax.nn",
    "jax.lax",
    "jax.lax.linalg",
    "jax.scipy.linalg",
    "jax.scipy.signal",
    "jax.scipy.special",
    "jax.scipy.stats",
    "numpyro.distributions",
    "numpyro.distributions.constraints",
    "numpyro.distributions.transforms",
)
#: Packages whose submodules are allowed too (``jax.scipy.stats.norm``).
ALLOWED_PACKAGES: tuple[str, ...] = ("jax.scipy.stats",)
#: Names an objective file may not import from an allowed module, nor reach with ``.``:
#: they read or write files (``numpy.load`` also unpickles), run other code (``numpy.test``
#: runs pytest) or install callbacks.
DENIED_NAMES: frozenset[str] = frozenset({
    "load", "loads", "save", "savez", "savez_compressed", "loadtxt", "savetxt", "genfromtxt",
    "recfromtxt", "recfromcsv", "fromfile", "tofile", "fromregex", "memmap", "DataSource", "open",
    "test", "info", "show_config", "show_runtime", "get_include", "lookfor", "source", "who",
    "seterrcall", "pure_callback", "io_callback", "callback", "debug_callback",
})
# Python's built-in functions that reach the interpreter (eval, exec, open, __import__, ...):
# whatever an allowed module re-exports under another name.
_SAFE_BUILTINS = {"abs", "all", "any", "bool", "complex", "divmod", "float", "int", "len", "max", "min", "pow",
                  "range", "round", "slice", "sum", "tuple", "list", "zip", "enumerate", "reversed", "sorted"}
_DENIED_BUILTINS = tuple(
    v for k, v in vars(builtins).items()
    if callable(v) and k not in _SAFE_BUILTINS and not (isinstance(v, type) and issubclass(v, BaseException))
)


def module_allowed(name: str) -> bool:
    """Whether the module called ``name`` is on the allow-list."""
    return name in ALLOWED_MODULES or any(name.startswith(p + ".") for p in ALLOWED_PACKAGES)


def _denied_objects() -> list:
    """The objects behind :data:`DENIED_NAMES` in the allowed modules (to catch them under
    another name), and the dangerous built-ins."""
    out = list(_DENIED_BUILTINS)
    for m in ALLOWED_MODULES:
        try:
            module = importlib.import_module(m)
        except ImportError:  # an optional part of a library that is not installed
            continue
        for n in DENIED_NAMES:
            if n in vars(module):
                out.append(vars(module)[n])
    return out


_DENIED_CACHE: list = []


def _is_denied_object(value) -> bool:
    if not _DENIED_CACHE:
        _DENIED_CACHE.append(_denied_objects())
    return any(value is d for d in _DENIED_CACHE[0])


def _is_module_name(entry: str) -> bool:
    parts = entry.split(".")
    return all(p.isidentifier() for p in parts) and not entry.endswith(".py")


class ImportPolicy:
    """The imports allowed to one objective file: the defaults plus the opt-ins ``allow``.

    ``directory``: the objective file's folder; relative paths in ``allow`` are read from the
    current directory, as a command line's are."""

    def __init__(self, directory: str, allow: Iterable[str] | None = ()):
        if isinstance(allow, (str, os.PathLike)):
            allow = [allow]
        self.allow = tuple(os.fspath(a) for a in (allow or ()))
        for a in self.allow:
            if not a.strip():
                raise ValueError("allow_imports: an empty entry; give a module name or a path")
        self.directory = os.path.realpath(directory)
        self._modules = tuple(a for a in self.allow if _is_module_name(a))
        self._paths = tuple(os.path.realpath(a) for a in self.allow)
        self._trusted: list = []  # module objects the file may use freely (opted in, or its own files)

    # -- modules -----------------------------------------------------------------------------
    def module_opted_in(self, dotted: str) -> bool:
        return any(dotted == m or dotted.startswith(m + ".") for m in self._modules)

    def trust(self, value) -> None:
        if inspect.ismodule(value) and not self.trusted(value):
            self._trusted.append(value)

    def trusted(self, module) -> bool:
        return any(module is t for t in self._trusted)

    def refuse_name(self, module, name: str, value) -> str | None:
        """Why ``module.name`` (whose value is ``value``) may not be used; ``None`` if it may."""
        if self.trusted(module):
            return None
        where = getattr(module, "__name__", "?")
        if self.module_opted_in(where):
            return None
        if not module_allowed(where):
            return f"module {where!r} is not one an objective file may use"
        if name.startswith("_"):
            return f"{where}.{name} is private (its name starts with '_')"
        if inspect.ismodule(value):
            real = getattr(value, "__name__", name)
            if module_allowed(real) or self.module_opted_in(real):
                return None
            return f"{where}.{name} is the module {real!r}, which is not one an objective file may import"
        if name in DENIED_NAMES or _is_denied_object(value):
            return (f"{where}.{name} reads or writes files or runs other code; an objective file may not use it"
                    if name in DENIED_NAMES else f"{where}.{name} is Python's built-in "
                    f"{getattr(value, '__name__', name)!r}; an objective file may not use it")
        return None

    # -- files -------------------------------------------------------------------------------
    def refuse_file(self, path: str) -> str | None:
        """Why the Python file at ``path`` may not be imported; ``None`` if it may."""
        real = os.path.realpath(path)
        if _inside(real, self.directory):
            return None
        for p in self._paths:
            if real == p or _inside(real, p):
                return None
        link = f" (a link to {real})" if os.path.islink(path) else ""
        return (f"it is outside the objective file's folder{link}: importing a Python file runs it, so only "
                f"files in {self.directory} (or below it) are imported unless allowed")


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # another drive
        return False


def opt_in_hint(entry: str) -> str:
    """How to allow ``entry`` (a module name or a path)."""
    return (f"if you trust it, allow it: `--allow-import {entry}` on the command line, "
            f"or ex.text.load(..., allow_imports=[{entry!r}]) in Python")
