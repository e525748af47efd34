"""What identifies a run: digests of programs, optimizers, solvers and data that are the same
in every process.

A checkpoint may be resumed only by the run that wrote it, so a run is identified by what
determines its result: its staged program, its data, its optimizer's hyperparameters, its
key, its starting point and its options. Each is reduced here to a digest with no memory
address, no ``id()``, no ``repr`` of a function and no source location in it, so that the
same run started again in a new process has the same identity:

- **a staged program** (a closed jaxpr, :func:`program_digest`): its equations in order --
  the primitive, the types of the inputs and outputs, the parameters described as values
  (below), sub-jaxprs recursively -- with variables numbered by first appearance, and the
  bytes of its constants. Source locations (``source_info``, the ``location`` of a site) are
  left out: a comment or a moved line changes nothing; an edited formula, constant or
  distribution does.
- **a value** (:func:`describe`): numbers and strings as text; arrays as dtype, shape and
  bytes; containers element by element; classes and functions by module and qualified name;
  a function also by its code (bytecode, constants and names, not its line numbers) and the
  contents of its closure's cells; dataclasses and other objects by their public fields.
- **an optax optimizer**: an optax transformation is a pair of closures (``init``,
  ``update``), and its hyperparameters -- learning rate, ``b1``, ``eps``, a schedule's
  numbers -- are the contents of their cells. So the optimizer is described as a value, and
  the numbers found on the way are kept with their paths (``update.update_fns[1].step_size``)
  to say which one differs. The description is of the optimizer, not of a probe run of it:
  no numerics, so the same on every machine.

What is not followed: module globals that a function reads, and attributes whose name starts
with ``_`` (caches). Code is part of a function's description, so a checkpoint written under
another version of Python, JAX or optax may be refused as written by another run.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import re
import sys
import types
from importlib.metadata import version
from typing import Any

import jax
import numpy as np

from . import _jax_compat as compat

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{4,}")
# not part of what a value is: where it is written, caches, explanations
_SKIPPED = frozenset({"location", "cache", "debug_info", "source_info", "reason"})
_MAX_DEPTH = 24
_BUDGET = 200_000  # nodes: beyond them a description is cut (the same way in every process)
_SIMPLE = (type(None), bool, int, float, complex, str)


class _Leaf:
    """A placeholder for the ``i``-th leaf of a distribution unflattened from its treedef."""

    def __init__(self, i: int):
        self.i = i


class _Operand:
    """An operand of an equation, described by its variable's token."""

    def __init__(self, token: str):
        self.token = token


class _Walker:
    """Feeds a stable description of values into a hash; optionally collects the numbers met
    on the way with their paths."""

    def __init__(self, numbers: list | None = None):
        self.hash = hashlib.sha256()
        self.nodes = 0
        self.active: set[int] = set()  # ids of the containers being walked (cycles); never hashed
        self.numbers = numbers
        self.leaves: list | None = None  # what the _Leaf placeholders stand for, while one is walked
        self.private = False  # walk attributes named with a leading underscore too

    def emit(self, *tokens) -> None:
        for t in tokens:
            self.hash.update(t if isinstance(t, bytes) else str(t).encode())
            self.hash.update(b"\x00")

    def number(self, path: str, text: str) -> None:
        if self.numbers is not None and len(self.numbers) < 500:
            self.numbers.append((path, text))

    # -- values ----------------------------------------------------------------------------
    def walk(self, x: Any, path: str = "", depth: int = 0) -> None:
        self.nodes += 1
        if self.nodes > _BUDGET:
            self.emit("<cut>")
            return
        if depth > _MAX_DEPTH:
            self.emit("<deep>", _type_name(type(x)))
            return
        if x is None or isinstance(x, bool):
            self.emit(repr(x))
            return
        if isinstance(x, (int, float, complex)) and not isinstance(x, enum.Enum):
            text = repr(x)
            self.emit(type(x).__name__, text)
            self.number(path, text)
            return
        if isinstance(x, str):
            self.emit("str", _ADDRESS.sub("0x?", x))
            return
        if isinstance(x, _Operand):
            self.emit("operand", x.token)
            return
        if isinstance(x, _Leaf):
            if self.leaves is None:
                self.emit("leaf")
            else:
                self.walk(self.leaves[x.i], path, depth + 1)
            return
        if isinstance(x, _Described):
            self.emit("<described apart>")
            return
        if isinstance(x, bytes):
            self.emit("bytes", hashlib.sha256(x).hexdigest())
            return
        if isinstance(x, np.dtype) or (isinstance(x, type) and issubclass(x, np.generic)):
            self.emit("dtype", str(np.dtype(x)))
            return
        if isinstance(x, (np.ndarray, np.generic, jax.Array)):
            self.array(x, path)
            return
        if isinstance(x, type):
            self.emit("type", _type_name(x))
            return
        if isinstance(x, enum.Enum):
            self.emit("enum", _type_name(type(x)), x.name)
            return
        if isinstance(x, compat.ClosedJaxpr):
            self.jaxpr(x.jaxpr, depth, list(x.consts))
            return
        if isinstance(x, compat.Jaxpr):
            self.jaxpr(x, depth)
            return
        if isinstance(x, jax.tree_util.PyTreeDef):
            self.treedef(x, depth)
            return
        if isinstance(x, types.CodeType):
            self.code(x, depth)
            return
        key = id(x)
        if key in self.active:
            self.emit("<cycle>")
            return
        self.active.add(key)
        try:
            self.compound(x, path, depth)
        finally:
            self.active.discard(key)

    def treedef(self, treedef, depth: int) -> None:
        """A pytree structure, rebuilt with placeholder leaves and walked attribute by attribute
        (its text lists a NumPyro distribution's fields in a per-process order)."""
        try:
            shape = jax.tree_util.tree_unflatten(treedef, [_Leaf(-1)] * treedef.num_leaves)
        except Exception:  # noqa: BLE001  (a node that needs real leaves: its text)
            self.emit("treedef", _ADDRESS.sub("0x?", str(treedef)))
            return
        kept_leaves, kept_private = self.leaves, self.private
        self.leaves, self.private = None, True
        try:
            self.emit("treedef", treedef.num_leaves)
            self.walk(shape, "", depth + 1)
        finally:
            self.leaves, self.private = kept_leaves, kept_private

    def array(self, x, path: str) -> None:
        if isinstance(x, jax.core.Tracer):  # a traced value kept in a closure: its type only
            self.emit("traced", str(x.dtype), tuple(np.shape(x)))
            return
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        self.emit("array", str(x.dtype), tuple(np.shape(x)))
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return  # another process holds part of it: its shape and dtype only
        try:
            a = np.ascontiguousarray(np.asarray(x))
        except Exception:  # noqa: BLE001  (an array that cannot be read here: its type only)
            self.emit("unreadable")
            return
        if a.dtype == object:  # its bytes are addresses: the elements
            for i, v in enumerate(a.ravel().tolist()):
                self.walk(v, f"{path}[{i}]", 1)
            return
        self.emit(hashlib.sha256(a.tobytes()).hexdigest())
        if a.size == 1 and a.dtype.kind in "biufc":
            self.number(path, repr(a.reshape(()).item()))

    def compound(self, x, path: str, depth: int) -> None:
        d = depth + 1
        if isinstance(x, tuple) and hasattr(x, "_fields"):  # a NamedTuple (optax's GradientTransformation)
            self.emit("namedtuple", _type_name(type(x)))
            for name, v in zip(x._fields, x):
                self.emit(name)
                self.walk(v, _join(path, name), d)
            return
        if isinstance(x, (tuple, list)):
            self.emit(type(x).__name__, len(x))
            for i, v in enumerate(x):
                self.walk(v, f"{path}[{i}]", d)
            return
        if isinstance(x, dict):
            self.emit("dict", len(x))
            for k, v in sorted(x.items(), key=lambda kv: _order(kv[0])):
                self.walk(k, path, d)
                self.walk(v, _join(path, str(k)), d)
            return
        if isinstance(x, (set, frozenset)):
            self.emit("set", len(x))
            for v in sorted(x, key=_order):
                self.walk(v, path, d)
            return
        if isinstance(x, functools.partial):
            self.emit("partial")
            self.walk(x.func, path, d)
            self.walk(x.args, _join(path, "args"), d)
            self.walk(x.keywords, path, d)
            return
        if isinstance(x, types.MethodType):
            self.emit("method", x.__func__.__qualname__)
            self.walk(x.__func__, path, d)
            self.walk(x.__self__, path, d)
            return
        if isinstance(x, types.FunctionType):
            self.function(x, path, d)
            return
        wrapped = getattr(x, "__wrapped__", None)
        if wrapped is not None and callable(x):  # jax.jit and functools.wraps wrappers
            self.emit("wrapper", _type_name(type(x)))
            self.walk(wrapped, path, d)
            return
        if isinstance(x, types.ModuleType):
            self.emit("module", x.__name__)
            return
        if isinstance(x, (types.BuiltinFunctionType, types.BuiltinMethodType)):
            self.emit("builtin", getattr(x, "__module__", None) or "", getattr(x, "__qualname__", x.__name__))
            return
        if isinstance(x, _Stand):
            self.emit("object", _type_name(type(x.value)))
            fields = [(f.name, x.replacement if f.name == x.name else getattr(x.value, f.name, None))
                      for f in dataclasses.fields(x.value)]
            for name, v in fields:
                if name.startswith("_") or name in _SKIPPED:
                    continue
                self.emit(name)
                self.walk(v, _join(path, name), d)
            return
        self.emit("object", _type_name(type(x)))
        if dataclasses.is_dataclass(x):
            fields = [(f.name, getattr(x, f.name, None)) for f in dataclasses.fields(x)]
        elif hasattr(x, "__dict__"):
            fields = sorted(vars(x).items())
        else:
            slots = [s for c in type(x).__mro__ for s in getattr(c, "__slots__", ())]
            fields = [(s, getattr(x, s, None)) for s in sorted(set(slots)) if isinstance(s, str)]
        for name, v in fields:
            if (name.startswith("_") and not self.private) or name in _SKIPPED:
                continue
            self.emit(name)
            self.walk(v, _join(path, name), d)

    def function(self, fn: types.FunctionType, path: str, depth: int) -> None:
        self.emit("function", fn.__module__ or "", fn.__qualname__)
        self.code(fn.__code__, depth)
        self.walk(fn.__defaults__, _join(path, "defaults"), depth)
        self.walk(fn.__kwdefaults__, path, depth)
        for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
            self.emit(name)
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                self.emit("<empty>")
                continue
            self.walk(value, _join(path, name), depth)

    def code(self, code: types.CodeType, depth: int) -> None:
        self.emit("code", code.co_code, code.co_names, code.co_argcount, code.co_kwonlyargcount)
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                self.code(c, depth + 1)
            else:
                self.walk(c, "", depth + 1)

    # -- staged programs -------------------------------------------------------------------
    def jaxpr(self, jaxpr, depth: int, consts=None) -> None:
        """A jaxpr met as a value (a parameter): the hashes of its outputs, its inputs
        named by position."""
        self.emit("jaxpr", self.outputs(jaxpr, None, consts, depth))

    def outputs(self, jaxpr, bound: list[str] | None, consts, depth: int) -> list[str]:
        """The hash of each output of ``jaxpr``: how it is computed from the inputs, not in
        which order the equations list their operands. Each variable's hash is that of the
        equation that makes it, over the hashes of its operands (a Merkle hash of the data
        flow), so a program whose operands are listed in another order (NumPyro flattens a
        distribution's parameters in the order of a Python set, which changes from process to
        process) has the same hashes. ``bound``: the hashes of the constant and input
        variables (a called jaxpr's are its caller's operands); else they are named by
        position, and a closed jaxpr's constants by their contents."""
        env: dict = {}
        n_const = len(jaxpr.constvars)
        for i, v in enumerate(jaxpr.constvars):
            if bound is not None:
                env[v] = bound[i]
            elif consts is not None and i < len(consts):
                env[v] = _h("const", describe(consts[i]), _aval(v.aval))
            else:
                env[v] = _h("constvar", i, _aval(v.aval))
        for i, v in enumerate(jaxpr.invars):
            env[v] = bound[n_const + i] if bound is not None else _h("in", i, _aval(v.aval))

        def token(v) -> str:
            if isinstance(v, compat.Literal):
                val = v.val
                text = repr(val) if isinstance(val, _SIMPLE) else describe(val)
                return _h("literal", text, _aval(v.aval))
            return env[v]

        effects = sorted(type(e).__name__ for e in getattr(jaxpr, "effects", ()))
        for eqn in jaxpr.eqns:
            self.nodes += 1
            outs = self.equation(eqn, [token(v) for v in eqn.invars], depth)
            for v, h in zip(eqn.outvars, outs):
                if type(v).__name__ != "DropVar":
                    env[v] = h
        return [_h("effects", effects, token(v)) if effects else token(v) for v in jaxpr.outvars]

    def equation(self, eqn, ins: list[str], depth: int) -> list[str]:
        """The hashes of ``eqn``'s outputs, from its primitive, its parameters and its operands'
        hashes."""
        avals = [_aval(v.aval) for v in eqn.outvars]
        spec = eqn.params.get("spec")
        site = self.site(spec, ins, depth) if spec is not None else None
        if site is not None:
            rest = {k: v for k, v in eqn.params.items() if k != "spec"}
            header = _h(eqn.primitive.name, site, self.params(rest, depth))
            return [_h(header, i, a) for i, a in enumerate(avals)]
        calls = _called(eqn.params)
        if len(calls) == 1:  # a call (jit, custom_jvp, checkpoint, scan, expect, ...): its body's data flow
            where, jaxpr, consts = calls[0]
            n_bind = len(jaxpr.invars) + (0 if consts is not None else len(jaxpr.constvars))
            if n_bind <= len(ins):
                bound = ins[:n_bind]
                if consts is not None:
                    bound = [_h("const", describe(c), _aval(v.aval)) for v, c in zip(jaxpr.constvars, consts)] + bound
                inner = self.outputs(jaxpr, bound, None, depth + 1)
                header = _h(eqn.primitive.name, self.params(eqn.params, depth, skip=where), ins[n_bind:])
                if len(inner) == len(avals):
                    return [_h(header, h, a) for h, a in zip(inner, avals)]
                return [_h(header, inner, i, a) for i, a in enumerate(avals)]
        header = _h(eqn.primitive.name, self.params(eqn.params, depth), ins)
        return [_h(header, i, a) for i, a in enumerate(avals)]

    def params(self, params: dict, depth: int, skip=None) -> str:
        """A hash of an equation's parameters (``skip``: the path of a jaxpr described apart)."""
        sub = _Walker()
        sub.nodes = self.nodes
        for k in sorted(params):
            if k in _SKIPPED:
                continue
            v = params[k]
            if skip is not None and skip[0] == k:
                v = _without(v, skip[1:])
            sub.emit(k)
            sub.walk(v, "", depth + 1)
        self.nodes = sub.nodes
        return sub.hash.hexdigest()

    def site(self, spec, ins: list[str], depth: int) -> str | None:
        """A random choice's description, in an order of its own: the distribution rebuilt
        from its treedef with placeholders and walked attribute by attribute (``loc``,
        ``scale``), each placeholder standing for its operand's hash or its static value; the
        per-operand axes of its lifts the same way. ``None`` when ``spec`` is not a site's."""
        treedef, statics, levels = (getattr(spec, a, None) for a in ("treedef", "statics", "levels"))
        if not (isinstance(treedef, jax.tree_util.PyTreeDef) and isinstance(statics, tuple)
                and isinstance(levels, tuple) and dataclasses.is_dataclass(spec)):
            return None
        try:
            operands = [_Operand(t) for t in ins]
            leaves = list(spec.merge(operands))
            shape = jax.tree_util.tree_unflatten(treedef, [_Leaf(i) for i in range(len(leaves))])
            tail = len(ins) - spec.n_extra - spec.n_anchors
            per_level = [(list(spec.full_axes(axes)), tuple(axes)[tail:], size) for axes, size in levels]
        except Exception:  # noqa: BLE001  (not a distribution's spec: described as it is)
            return None
        sub = _Walker()
        sub.private = True  # a distribution keeps parameters in attributes such as `_component_distribution`
        sub.leaves = leaves
        sub.walk(shape, "", depth + 1)
        sub.emit("extras", ins[tail:])
        for axes, trailing, size in per_level:
            sub.leaves = axes
            sub.emit("level", size, trailing)
            sub.walk(shape, "", depth + 1)
        sub.leaves, sub.private = None, False
        for f in dataclasses.fields(spec):
            if f.name in ("treedef", "statics", "levels") or f.name in _SKIPPED or f.name.startswith("_"):
                continue
            sub.emit(f.name)
            sub.walk(getattr(spec, f.name), "", depth + 1)
        self.nodes += sub.nodes
        return sub.hash.hexdigest()


def _h(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]


def _called(params: dict) -> list:
    """The jaxprs among an equation's parameters, as ``(path, jaxpr, consts)``: ``consts``
    is a closed jaxpr's constants, ``None`` for an open jaxpr (whose constants are operands,
    as in a nested expectation's spec)."""
    out = []
    for k, v in params.items():
        if isinstance(v, compat.ClosedJaxpr):
            out.append(((k,), v.jaxpr, list(v.consts)))
        elif isinstance(v, compat.Jaxpr):
            out.append(((k,), v, None))
        elif isinstance(v, (tuple, list)):
            for i, u in enumerate(v):
                if isinstance(u, compat.ClosedJaxpr):
                    out.append(((k, i), u.jaxpr, list(u.consts)))
                elif isinstance(u, compat.Jaxpr):
                    out.append(((k, i), u, None))
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            for f in dataclasses.fields(v):
                u = getattr(v, f.name, None)
                if isinstance(u, compat.Jaxpr):
                    out.append(((k, f.name), u, None))
                elif isinstance(u, compat.ClosedJaxpr):
                    out.append(((k, f.name), u.jaxpr, list(u.consts)))
    return out


class _Described:
    """Stands for a jaxpr described apart, in a parameter's description."""


def _without(value, path: tuple):
    """``value`` with the jaxpr at ``path`` replaced by a marker."""
    if not path:
        return _Described()
    head, rest = path[0], path[1:]
    if isinstance(value, (tuple, list)):
        items = list(value)
        items[head] = _without(items[head], rest)
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)
    replaced = _Stand(value, head, _without(getattr(value, head), rest))
    return replaced


class _Stand:
    """A dataclass value with one field replaced (for :func:`_without`)."""

    def __init__(self, value, name: str, replacement):
        self.value, self.name, self.replacement = value, name, replacement


def _aval(aval) -> str:
    shape = getattr(aval, "shape", None)
    dtype = getattr(aval, "dtype", None)
    weak = "weak" if getattr(aval, "weak_type", False) else ""
    return f"{dtype}{list(shape) if shape is not None else type(aval).__name__}{weak}"


def _type_name(t: type) -> str:
    return f"{getattr(t, '__module__', '')}.{getattr(t, '__qualname__', getattr(t, '__name__', '?'))}"


def _order(k) -> tuple:
    return (type(k).__name__, str(k) if isinstance(k, _SIMPLE) else "")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# --- the public helpers ------------------------------------------------------------------------


def describe(value) -> str:
    """A digest of ``value``'s stable description (see the module doc)."""
    w = _Walker()
    w.walk(value)
    return w.hash.hexdigest()[:32]


def describe_with_numbers(value) -> tuple[str, list[tuple[str, str]]]:
    """``(digest, numbers)``: :func:`describe` and the numbers found on the way, each with its
    path (the first 500), to say which hyperparameter differs."""
    numbers: list = []
    w = _Walker(numbers)
    w.walk(value)
    return w.hash.hexdigest()[:32], [list(n) for n in numbers]


def tree_digest(tree) -> str:
    """A digest of a pytree: its structure (rebuilt and walked, as in a program's description)
    and each leaf's dtype, shape and bytes (only dtype and shape for an array another process
    holds part of)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    w = _Walker()
    w.treedef(treedef, 0)
    for x in leaves:
        w.walk(x if isinstance(x, (np.ndarray, np.generic, jax.Array)) else np.asarray(x), "", 1)
    return w.hash.hexdigest()[:32]


def optimizer_identity(optimizer) -> tuple[str, list]:
    """An optax optimizer's identity: ``(digest, numbers)`` of its ``init`` and ``update``
    closures (its hyperparameters; see the module doc)."""
    return describe_with_numbers(optimizer)


def program_digest(closed_jaxpr, in_tree=None) -> str:
    """A digest of a staged program: the data flow of its equations, their parameters and its
    constants (no source locations), and the structure of its arguments."""
    w = _Walker()
    if in_tree is not None:
        w.treedef(in_tree, 0)
    w.emit("outputs", w.outputs(closed_jaxpr.jaxpr, None, list(closed_jaxpr.consts), 0))
    return w.hash.hexdigest()[:32]


def number_differences(old: list, new: list, limit: int = 3) -> list[str]:
    """The numbers at the same path that differ (``"path was a, now b"``), from two
    :func:`describe_with_numbers` lists; at most ``limit``."""
    before = {p: v for p, v in (old or [])}
    after = {p: v for p, v in (new or [])}
    out = [f"{p or 'value'} was {before[p]}, now {v}" for p, v in after.items() if p in before and before[p] != v]
    return out[:limit]


# --- saying how two identities differ -----------------------------------------------------------

_LABELS = {
    "program": "the program differs (its staged operations, constants or distributions, or the types and shapes "
               "of its arguments)",
    "optimizer": "the optimizer differs (its transformations or hyperparameters)",
    "solver": "the solver or its options differ",
    "start": "the starting point differs (the initial parameters, optimizer state or multipliers)",
    "key": "its key is not this run's",
    "data": "its data is not this run's (other values, shapes or types)",
    "bounds": "the bounds differ",
}


def difference(key: str, old, new, old_about, new_about) -> str:
    """How identity entry ``key`` differs, in words (``old``: the checkpoint's; ``*_about``:
    the numbers found in the optimizer or solver, to name the one that changed)."""
    if old is None:
        return f"it does not record its {key}"
    if key in ("optimizer", "solver"):
        detail = number_differences(old_about or [], new_about or [])
        return f"the {key} differs: {'; '.join(detail)}" if detail else _LABELS[key]
    if isinstance(new, dict) and isinstance(old, dict):  # options: name each one
        changed = [f"{k} {old.get(k)!r} (now {new.get(k)!r})" for k in sorted(set(old) | set(new))
                   if old.get(k) != new.get(k)]
        return f"its {key} differ: {', '.join(changed)}"
    return _LABELS.get(key, f"its {key} differs")


@functools.lru_cache(maxsize=1)
def versions() -> dict:
    """The versions of what stages and describes a run (recorded with each checkpoint)."""
    out = {"python": ".".join(map(str, sys.version_info[:3])), "jax": jax.__version__}
    for name in ("optax", "numpyro", "estimax"):
        try:
            out[name] = version(name)
        except Exception:  # noqa: BLE001
            pass
    return out


def versions_changed(saved) -> str:
    """The versions that differ from a checkpoint's ``saved`` ones, in words ("" if none)."""
    if not isinstance(saved, dict):
        return ""
    now = versions()
    changed = [f"{k} {saved[k]} (now {now[k]})" for k in sorted(saved) if k in now and saved[k] != now[k]]
    return ", ".join(changed)
