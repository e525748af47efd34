"""The differentiability analysis's rule table and its continuity checks.

The rules are one table, :data:`RULES`: primitive name -> what a derivative does there.
``smooth`` (the default for floating-point results) and ``kinked`` (``max``, ``abs``,
``clamp``, sorted values: continuous, differentiable almost everywhere) pass it on; a
``step`` (``floor``, ``round``, ``sign``, ``rem``) or any operation that turns a value with
a derivative into an integer or boolean (comparisons, ``argmax``, integer casts, the
permutation of ``argsort``) is a break; ``benign`` tests (``isnan``, ``isinf``,
``is_finite``) are not, since a finite value never crosses them. A ``select_n`` whose
predicate is such a comparison is continuous when its two branches agree on the
comparison's boundary: ``where(z > 0, z, 0)`` is ``max(z, 0)``.

Showing that branches agree on a boundary (:func:`agree_on_boundary`): the branches are
expressions over the program's values (followed through elementwise operations and inlined
calls; anything else is an opaque leaf). The comparison ``lhs ⋚ rhs`` is solved for one leaf
``x`` of ``lhs`` through invertible steps (``neg``, ``add``/``sub``/``mul``/``div`` by the
other side, ``abs``, ``exp``, ``log``), the other leaves are given random values (three
draws), ``x`` is put on the boundary, and both branches are evaluated there. Agreement at
random points of analytic expressions is agreement everywhere except on a set of
probability zero.

The walker that applies the table is in :mod:`._smoothness`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..runtime import _jax_compat as compat

# --- the rule table ----------------------------------------------------------------------------
SMOOTH, KINKED, STEP, DISCRETE, BENIGN, STOP, SELECT, SORT = (
    "smooth", "kinked", "step", "discrete", "benign", "stop", "select", "sort")

#: primitive name -> rule; names not listed are ``smooth`` when their results are floating
#: point and ``discrete`` otherwise (a derivative cannot pass into an integer or a boolean)
RULES: dict[str, str] = {
    **dict.fromkeys(("max", "min", "abs", "clamp", "reduce_max", "reduce_min", "cummax", "cummin"), KINKED),
    **dict.fromkeys(("floor", "ceil", "round", "sign", "rem", "nextafter"), STEP),
    **dict.fromkeys(("lt", "le", "gt", "ge", "eq", "ne", "argmax", "argmin", "bitcast_convert_type",
                     "reduce_and", "reduce_or", "top_k"), DISCRETE),
    "is_finite": BENIGN,
    "stop_gradient": STOP,
    "select_n": SELECT,
    "sort": SORT,
}

_COMPARE = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}
_FLIP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}
#: primitives whose output element depends on the same-position input elements only: the
#: expressions the boundary check evaluates are built from these
_ELEMENTWISE = {
    "add", "sub", "mul", "div", "neg", "abs", "max", "min", "exp", "exp2", "log", "log1p", "expm1",
    "sqrt", "rsqrt", "cbrt", "integer_pow", "pow", "square", "tanh", "logistic", "sin", "cos", "tan",
    "sinh", "cosh", "asinh", "acosh", "atanh", "asin", "acos", "atan", "atan2", "erf", "erfc", "erf_inv",
    "lgamma", "digamma", "select_n", "convert_element_type", "broadcast_in_dim", "clamp", "copy",
    "copy_p", "sign", "floor", "ceil", "round", "not", "and", "or", "reduce_precision",
    "lt", "le", "gt", "ge", "eq", "ne", "is_finite", "reshape", "squeeze", "expand_dims", "rem",
}
#: operations that move or copy elements: a comparison's result keeps its meaning through them
_SHAPE = {"broadcast_in_dim", "reshape", "squeeze", "expand_dims", "copy", "copy_p", "transpose"}


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a derivative comes from: the differentiated arguments, or a pathwise site."""

    kind: str  # "argument" or "site"
    name: str
    spec: Any = None  # the site's SiteSpec (compared by identity)


ARGUMENTS = Origin("argument", "the differentiated arguments")


@dataclasses.dataclass(frozen=True)
class Break:
    """A derivative of ``origin`` that does not pass ``what`` (at ``where``)."""

    origin: Origin
    what: str  # e.g. "the jump at `z > 0.0`"
    where: str | None

    def describe(self) -> str:
        return f"{self.what} ({self.where or 'an unknown location'})"


_NONE: frozenset = frozenset()


class AV:
    """An abstract value: derivative origins, breaks, and how it was computed (for the
    boundary check): ``eqn``/``ins``/``k`` for an elementwise node, ``val`` for a literal,
    ``cmp`` for a comparison (possibly cast) that a select may use as its predicate."""

    __slots__ = ("d", "b", "sg", "aval", "eqn", "ins", "k", "val", "cmp", "__weakref__")

    def __init__(self, d=_NONE, b=_NONE, sg=_NONE, aval=None, eqn=None, ins=(), k=0, val=None, cmp=None):
        self.d, self.b, self.sg, self.aval = d, b, sg, aval
        self.eqn, self.ins, self.k, self.val, self.cmp = eqn, ins, k, val, cmp


def _union(avs, field):
    out = _NONE
    for a in avs:
        out = out | getattr(a, field)
    return out


def _is_float(aval) -> bool:
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and bool(jax.dtypes.issubdtype(dtype, np.inexact))


def _literal_value(av: AV):
    """The concrete value of ``av`` if it is a literal (through casts and broadcasts)."""
    while av.val is None and av.eqn is not None and av.eqn.primitive.name in (
            "convert_element_type", "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "copy", "copy_p"):
        av = av.ins[0]
    return av.val


def _show(av: AV, names: dict) -> str:
    v = _literal_value(av)
    if v is not None:
        arr = np.asarray(v)
        return f"{arr.item():g}" if arr.size == 1 else "<constant>"
    while av.eqn is not None and av.eqn.primitive.name in ("convert_element_type", "broadcast_in_dim", "copy", "copy_p"):
        av = av.ins[0]
    name = names.get(id(av))
    if name is not None:
        return name
    if av.eqn is not None:
        return f"{av.eqn.primitive.name}(…)"
    return "…"


def result_breaks(outs: list[AV]) -> list[Break]:
    """The breaks that reach the result: every discontinuity, and the ``stop_gradient``s of
    origins that reach the result through no other path. In a stable order."""
    reached = _union(outs, "d")
    hard = _union(outs, "b")
    soft = frozenset(br for br in _union(outs, "sg") if br.origin not in reached)
    return sorted(hard | soft, key=lambda br: (br.origin.kind, br.origin.name, br.where or "", br.what))


def _is_infinite_literal(av: AV) -> bool:
    v = _literal_value(av)
    if v is None:
        return False
    arr = np.asarray(v)
    return arr.dtype.kind == "f" and arr.size > 0 and not np.any(np.isfinite(arr))


def _null_case(pred: AV) -> int | None:
    """For a boolean guard against non-finite values -- ``isfinite(x)``, ``isnan(x)``,
    ``x == inf``, their negations and conjunctions -- the case of a two-way select taken only
    where a value is infinite or NaN (``0`` for False, ``1`` for True); else ``None``.
    Finite values never take it, so its discontinuities do not count
    (``jnp.where(jnp.isfinite(x), f(x), inf * (x > 0))`` in NumPyro's Bernoulli)."""
    if pred.eqn is None:
        return None
    name = pred.eqn.primitive.name
    ins = pred.ins
    if name in _SHAPE or name == "convert_element_type":
        return _null_case(ins[0])
    if name == "is_finite":
        return 0
    if name == "not":
        inner = _null_case(ins[0])
        return None if inner is None else 1 - inner
    if name in ("and", "or"):
        a, b = _null_case(ins[0]), _null_case(ins[1])
        if name == "and" and a == 0 and b == 0:
            return 0  # true wherever both are: false only on a null set
        if name == "or" and a == 1 and b == 1:
            return 1
        return None
    if name in _COMPARE and len(ins) == 2:
        if pred.eqn.invars[0] is pred.eqn.invars[1] and not isinstance(pred.eqn.invars[0], compat.Literal):
            return {"ne": 1, "lt": 1, "gt": 1, "eq": 0, "le": 0, "ge": 0}[name]  # x != x: NaN only
        for i, av in enumerate(ins):
            v = _literal_value(av)
            if v is None:
                continue
            arr = np.asarray(v)
            if arr.dtype.kind != "f" or arr.size != 1 or np.isfinite(arr):
                continue
            if np.isnan(arr):
                return 1 if name == "ne" else 0  # every comparison with NaN is false but !=
            op = name if i == 1 else _FLIP[name]  # as "x op c"
            pos = bool(arr > 0)
            # x op +inf / x op -inf for finite x:
            always = {"lt": pos, "le": pos, "gt": not pos, "ge": not pos, "eq": False, "ne": True}[op]
            return 0 if always else 1
    return None


# --- showing that the branches of a select agree on its comparison's boundary ----------------
def agree_on_boundary(cmp, case_false: AV, case_true: AV) -> bool:
    """Whether ``select(lhs ⋚ rhs, case_false, case_true)`` is continuous across the boundary
    ``lhs = rhs``: its two branches take the same value there (see the module doc)."""
    _, lhs, rhs, _ = cmp
    if _same(case_false, case_true):
        return True
    if {_key(case_false), _key(case_true)} == {_key(lhs), _key(rhs)}:  # max / min
        return True
    try:
        with jax.ensure_compile_time_eval():
            return _agree_numerically(lhs, rhs, case_false, case_true)
    except Exception:  # an expression that cannot be evaluated here: not shown
        return False


def _strip(av: AV) -> AV:
    while av.eqn is not None and av.eqn.primitive.name in ("convert_element_type", "broadcast_in_dim", "copy", "copy_p") \
            and _is_float(av.aval) and _is_float(av.ins[0].aval):
        av = av.ins[0]
    return av


def _key(av: AV):
    av = _strip(av)
    v = _literal_value(av)
    if v is not None:
        arr = np.asarray(v)
        return ("lit", arr.item()) if arr.size == 1 else ("av", id(av))
    return ("av", id(av))


def _same(a: AV, b: AV) -> bool:
    return _key(a) == _key(b)


def _leaves(av: AV, out: dict):
    if av.val is not None:
        return
    if av.eqn is None:
        out[id(av)] = av
        return
    for i in av.ins:
        _leaves(i, out)


def _depends(av: AV, leaf: AV) -> bool:
    if av is leaf:
        return True
    return av.eqn is not None and any(_depends(i, leaf) for i in av.ins)


def _evaluate(av: AV, values: dict, memo: dict):
    hit = memo.get(id(av))
    if hit is not None:
        return hit
    if id(av) in values:  # a leaf, or a value put on the boundary
        out = values[id(av)]
    elif av.val is not None:
        out = np.asarray(av.val)
    elif av.eqn is None:
        raise KeyError("a leaf without a value")
    else:
        out = compat.rebind(av.eqn, [_evaluate(i, values, memo) for i in av.ins])[av.k]
    memo[id(av)] = out
    return out


def _solve(lhs: AV, target, leaf: AV, values: dict):
    """Values of ``leaf`` where ``lhs = target`` (a list: ``abs`` has two roots), or ``None``."""
    if lhs is leaf:
        return [target]
    if lhs.eqn is None:
        return None
    name = lhs.eqn.primitive.name
    ins = lhs.ins
    if name in ("convert_element_type", "copy", "copy_p", "reduce_precision") and _is_float(ins[0].aval):
        return _solve(ins[0], target, leaf, values)
    if name == "neg":
        return _solve(ins[0], -target, leaf, values)
    if name in ("exp", "log", "abs"):
        inv = {"exp": [jnp.log(target)], "log": [jnp.exp(target)], "abs": [target, -target]}[name]
        out = []
        for t in inv:
            r = _solve(ins[0], t, leaf, values)
            if r is None:
                return None
            out += r
        return out
    if name in ("add", "sub", "mul", "div"):
        a, b = ins
        da, db = _depends(a, leaf), _depends(b, leaf)
        if da == db:
            return None
        other = _evaluate(b if da else a, values, {})
        if name == "add":
            t = target - other
        elif name == "sub":
            t = target + other if da else other - target
        elif name == "mul":
            t = target / other
        else:
            t = target * other if da else other / target
        return _solve(a if da else b, t, leaf, values)
    return None


def _agree_numerically(lhs, rhs, case_false, case_true) -> bool:
    leaves: dict = {}
    for av in (lhs, rhs, case_false, case_true):
        _leaves(av, leaves)
    # the boundary is put on the compared value itself (the branches may depend on the draw
    # through it only: where(f(z) > c, f(z) - c, 0)), else solved for a leaf of that side
    # that carries a derivative (else any). Leaves keep random values even where a value on
    # the boundary hides them: agreement then holds for every value of those leaves, a
    # stronger statement than needed.
    for side, other in ((lhs, rhs), (rhs, lhs)):
        side_leaves: dict = {}
        _leaves(side, side_leaves)
        candidates = [_strip(side)] + sorted(side_leaves.values(), key=lambda a: not a.d)
        for x in candidates:
            if x.val is not None:
                continue
            if _depends(other, x) or not _is_float(x.aval):
                continue
            if _check_at_boundary(x, side, other, leaves, case_false, case_true):
                return True
    return False


def _check_at_boundary(x, side, other, leaves, case_false, case_true) -> bool:
    free = [a for a in leaves.values() if a is not x]
    side = _strip(side) if x is _strip(side) else side
    if any(a.aval is None or not _is_float(a.aval) for a in free):
        return False
    for trial in range(3):
        key = jax.random.PRNGKey(7919 + trial)
        values = {}
        for i, a in enumerate(free):
            values[id(a)] = np.asarray(jax.random.uniform(jax.random.fold_in(key, i), a.aval.shape, a.aval.dtype, 0.5, 1.5))
        target = _evaluate(other, values, {})
        roots = _solve(side, jnp.asarray(target), x, values)
        values = dict(values)
        if not roots:
            return False
        for r in roots:
            r = np.asarray(r)
            if r.shape != tuple(x.aval.shape):
                try:
                    r = np.broadcast_to(r, x.aval.shape)
                except ValueError:
                    return False
            values[id(x)] = r.astype(x.aval.dtype)
            a = np.asarray(_evaluate(case_false, values, {}), np.float64)
            b = np.asarray(_evaluate(case_true, values, {}), np.float64)
            if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
                return False
            tol = float(np.finfo(x.aval.dtype).eps) ** 0.5
            if not np.all(np.abs(a - b) <= tol * (1.0 + np.abs(a) + np.abs(b))):
                return False
    return True


__all__ = ["RULES", "AV", "Break", "Origin", "ARGUMENTS", "agree_on_boundary", "result_breaks"]
