"""The differentiability analysis: where a pathwise derivative cannot follow the program.

A pathwise (reparameterized) gradient differentiates the program along each draw. It is an
unbiased estimate of the derivative of the expectation when the program's value is a
continuous, almost-everywhere differentiable function of the draw and of the parameters.
Where the value *jumps* (``z > 0`` as a predicate, ``floor``, an integer cast, an
``argmax`` used as an index, a ``while_loop`` whose trip count depends on the draw) the
derivative along each draw is zero or wrong, and the mass that moves across the jump is
missed; where ``stop_gradient`` removes the only path from a draw to the result, the
derivative is dropped. Score-function and measure-valued estimators do not differentiate
the program, so they are right there.

This pass follows every value that carries a derivative -- the differentiated arguments,
and the draws of pathwise sites -- through the staged program, and records the *breaks*
that reach the result. Each abstract value carries

- ``d``: the origins (an argument, or a pathwise site) whose derivative flows into it;
- ``b``: the breaks it depends on discontinuously (which origin, which operation, where);
- ``sg``: the breaks made by ``stop_gradient`` (they count only for an origin that reaches
  the result through no other path: ``value + s - stop_gradient(s)`` surrogates, such as
  DReG's, and ``logsumexp``'s stabilizing shift keep their derivative).

The rules are one table, :data:`RULES`: primitive name -> what a derivative does there.
``smooth`` (the default for floating-point results) and ``kinked`` (``max``, ``abs``,
``clamp``, sorted values: continuous, differentiable almost everywhere) pass it on; a
``step`` (``floor``, ``round``, ``sign``, ``rem``) or any operation that turns a value with
a derivative into an integer or boolean (comparisons, ``argmax``, integer casts, the
permutation of ``argsort``) is a break; ``benign`` tests (``isnan``, ``isinf``,
``is_finite``) are not, since a finite value never crosses them. A ``select_n`` whose
predicate is such a comparison is continuous when its two branches agree on the
comparison's boundary: ``where(z > 0, z, 0)`` is ``max(z, 0)``; that is checked by
evaluating both branches on the boundary (below). Higher-order primitives each have one
policy: ``jit``/``checkpoint`` are inlined, ``cond`` and ``while`` add their predicate's
breaks to every output, loop carries are iterated to a fixed point, a nested ``expect`` is
followed into its program, and functions with their own derivative rule
(``custom_jvp``/``custom_vjp``) are taken at their word.

Used twice (see :func:`with_defaults` and :func:`breaks`): the default strategy of a site
whose reparameterized draw reaches a break becomes the next valid one (``ex.mvd`` where
registered, ``ex.reinforce`` otherwise, and always ``ex.reinforce`` inside loop bodies,
which continuations cannot cross); a site that chose ``ex.reparam`` itself keeps it and the
certificate says ``biased`` with the reason; a break of a differentiated argument makes the
program ``biased`` whatever its sites do.

Showing that branches agree on a boundary: the branches are expressions over the program's
values (followed through elementwise operations and inlined calls; anything else is an
opaque leaf). The comparison ``lhs ⋚ rhs`` is solved for one leaf ``x`` of ``lhs`` through
invertible steps (``neg``, ``add``/``sub``/``mul``/``div`` by the other side, ``abs``,
``exp``, ``log``), the other leaves are given random values (three draws), ``x`` is put on
the boundary, and both branches are evaluated there. Agreement at random points of
analytic expressions is agreement everywhere except on a set of probability zero.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..dsl._argmin import ARGMIN_SCOPE
from ..dsl._primitives import ExpectSpec, expect_p, sample_p
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
_INLINE = ("pjit", "jit", "closed_call", "core_call", "remat2", "checkpoint", "remat")


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


# --- the walker ----------------------------------------------------------------------------------
class Walker:
    """One pass of the analysis over a staged program.

    ``strategy_of(spec, avals) -> Strategy`` gives each site's strategy. With ``nested``
    (``spec -> replacement spec``) a nested expectation is analysed on its own, every input
    differentiated, as its estimator is built (see :func:`with_defaults`), and its value is
    opaque; otherwise the walk follows the operands into the expectation's program.
    """

    def __init__(self, strategy_of: Callable, *, nested: Callable | None = None):
        self.strategy_of = strategy_of
        self.nested = nested  # spec -> replacement ExpectSpec (defaults mode), or None
        self.names: dict[int, str] = {}  # id(AV) of a site's value -> the site's name
        self.sites: dict[Any, tuple] = {}  # SiteSpec -> (inside a loop body?, operand avals)
        self.rewritten: dict[Any, Any] = {}  # ExpectSpec -> its replacement (defaults mode)
        self._keep: list = []  # keeps AVs alive while their ids name sites
        self.trusted = False  # inside an ex.argmin's inner solve
        self.calls: list = []  # the inlined calls being walked, outermost first

    def _where(self, eqn) -> str | None:
        """The user's line of ``eqn``, or of the innermost call it is inside that has one."""
        where = compat.user_frame(eqn)
        for call in reversed(self.calls):
            if where is not None:
                break
            where = compat.user_frame(call)
        return where

    # -- entry points ----------------------------------------------------------------------
    def inputs(self, jaxpr, differentiated=None) -> list[AV]:
        """Abstract values of a program's inputs: those flagged (all by default) carry the
        arguments' derivative when they are floating point."""
        flags = differentiated if differentiated is not None else [True] * len(jaxpr.invars)
        out = []
        for i, (v, f) in enumerate(zip(jaxpr.invars, flags, strict=True)):
            av = AV(frozenset({ARGUMENTS}) if f and _is_float(v.aval) else _NONE, aval=v.aval)
            self.names[id(av)] = f"<argument {i}>" if len(flags) > 1 else "<argument>"
            self._keep.append(av)
            out.append(av)
        return out

    def run(self, jaxpr, consts_avs, in_avs, prefix="", loop=False):
        env: dict = {}

        def read(v):
            if isinstance(v, compat.Literal):
                return AV(aval=v.aval, val=v.val)
            return env[v]

        for v, a in zip(jaxpr.constvars, consts_avs, strict=True):
            env[v] = a
        for v, a in zip(jaxpr.invars, in_avs, strict=True):
            env[v] = a
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = self.eqn(eqn, ins, prefix, loop)
            for v, a in zip(eqn.outvars, outs, strict=True):
                if not isinstance(v, compat.DropVar):
                    env[v] = a
        return [read(v) for v in jaxpr.outvars]

    # -- one equation -------------------------------------------------------------------------
    def eqn(self, eqn, ins, prefix, loop):
        if not self.trusted and compat.in_scope(eqn, ARGMIN_SCOPE):
            self.trusted = True  # an inner solve: its certificate is the argmin's (see explain)
            try:
                return self.eqn(eqn, ins, prefix, loop)
            finally:
                self.trusted = False
        prim = eqn.primitive
        name = prim.name
        outs_avals = [v.aval for v in eqn.outvars]
        if prim is sample_p:
            return [self._sample(eqn, ins, prefix, loop)]
        if prim is expect_p:
            return self._expect(eqn, ins, prefix, loop)
        if name in _INLINE:
            sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            self.calls.append(eqn)  # a break inside a library function is located at its call
            try:
                if isinstance(sub, compat.ClosedJaxpr):
                    consts = [AV(aval=compat.aval_of(c)) for c in sub.consts]
                    return self.run(sub.jaxpr, consts, ins, prefix, loop)
                return self.run(sub, [], ins, prefix, loop)
            finally:
                self.calls.pop()
        if prim is compat.cond_p:
            return self._cond(eqn, ins, prefix, loop)
        if prim is compat.scan_p:
            return self._scan(eqn, ins, prefix)
        if prim is compat.while_p:
            return self._while(eqn, ins, prefix)
        if prim is compat.custom_jvp_call_p or prim is compat.custom_vjp_call_p:
            # a function with its own derivative rule: taken at its word (relu, logaddexp, xlogy)
            return self._smooth(ins, outs_avals, None)
        rule = RULES.get(name)
        if rule is None:
            rule = SMOOTH if all(_is_float(a) for a in outs_avals) else DISCRETE
        if self.trusted and rule in (STEP, DISCRETE, STOP):
            rule = BENIGN
        if name in _SHAPE and ins and not _is_float(outs_avals[0]):
            # a predicate broadcast to its select's shape: the same comparison, elementwise
            (a,) = ins[:1]
            return [AV(_NONE, _union(ins, "b"), _union(ins, "sg"), outs_avals[0], eqn=eqn if name in _ELEMENTWISE else None,
                       ins=tuple(ins) if name in _ELEMENTWISE else (), cmp=a.cmp)]
        if rule in (SMOOTH, KINKED):
            node = eqn if name in _ELEMENTWISE and len(outs_avals) == 1 else None
            return self._smooth(ins, outs_avals, node)
        if rule == BENIGN:
            node = eqn if name in _ELEMENTWISE and len(outs_avals) == 1 else None
            return [AV(b=_union(ins, "b"), sg=_union(ins, "sg"), aval=a, eqn=node, ins=tuple(ins) if node else ())
                    for a in outs_avals]
        if rule == STOP:
            sg = _union(ins, "sg") | frozenset(
                Break(o, "the derivative dropped by `stop_gradient`", self._where(eqn))
                for o in _union(ins, "d") if o.kind == "site")
            return [AV(b=_union(ins, "b"), sg=sg, aval=a) for a in outs_avals]
        if rule == SELECT:
            return [self._select(eqn, ins)]
        if rule == SORT:
            return self._sort(eqn, ins)
        return self._discrete(eqn, ins, outs_avals, step=rule == STEP)

    def _smooth(self, ins, outs_avals, node):
        d, b, sg = _union(ins, "d"), _union(ins, "b"), _union(ins, "sg")
        return [AV(d if _is_float(a) else _NONE, b, sg, a, eqn=node, ins=tuple(ins) if node else ())
                for a in outs_avals]

    def _discrete(self, eqn, ins, outs_avals, step):
        name = eqn.primitive.name
        d = _union(ins, "d")
        base_b, sg = _union(ins, "b"), _union(ins, "sg")
        cmp = None
        if name in _COMPARE and self._benign_compare(eqn, ins):
            return [AV(b=base_b, sg=sg, aval=a, eqn=eqn, ins=tuple(ins)) for a in outs_avals]
        if name in _COMPARE:
            what = f"the jump at `{_show(ins[0], self.names)} {_COMPARE[name]} {_show(ins[1], self.names)}`"
            cmp = (name, ins[0], ins[1], base_b)
        elif name == "convert_element_type":
            what = f"the conversion to {outs_avals[0].dtype}"
            if ins[0].cmp is not None:  # a cast predicate (jnp.where, lax.cond): keep its comparison
                cmp = ins[0].cmp
        elif step:
            what = f"the jumps of `{name}`"
        else:
            what = f"the discrete result of `{name}`"
        new = frozenset(Break(o, what, self._where(eqn)) for o in d)
        node = eqn if name in _ELEMENTWISE and len(outs_avals) == 1 else None
        return [AV(_NONE, base_b | new, sg, a, eqn=node, ins=tuple(ins) if node else (), cmp=cmp) for a in outs_avals]

    @staticmethod
    def _benign_compare(eqn, ins) -> bool:
        """``x != x`` (isnan), comparisons with ±inf or NaN: never crossed by a finite value."""
        a, b = eqn.invars
        if a is b and not isinstance(a, compat.Literal):
            return True
        for av in ins:
            v = _literal_value(av)
            if v is not None:
                arr = np.asarray(v)
                if arr.dtype.kind == "f" and arr.size and not np.all(np.isfinite(arr)):
                    return True
        return False

    def _select(self, eqn, ins):
        pred, cases = ins[0], ins[1:]
        aval = eqn.outvars[0].aval
        null = _null_case(pred) if len(cases) == 2 else None
        if null is not None:  # a guard: that case is taken only for non-finite values
            kept = cases[1 - null]
            return AV(kept.d | cases[null].d, kept.b | pred.b, kept.sg | pred.sg, aval, eqn=eqn, ins=tuple(ins))
        if len(cases) == 2:
            for i in (0, 1):
                if _is_infinite_literal(cases[i]):
                    # a mask to ±inf (a support check: NumPyro's validated log densities): off
                    # the support the value is infinite, so either that set has probability
                    # zero and the mask never acts, or the expectation is infinite; there is
                    # no finite derivative to lose at its edge
                    kept = cases[1 - i]
                    base = pred.cmp[3] if pred.cmp is not None else _NONE
                    return AV(kept.d, kept.b | base, kept.sg | pred.sg, aval, eqn=eqn, ins=tuple(ins))
        d, b, sg = _union(cases, "d"), _union(cases, "b"), _union(cases, "sg")
        pb = pred.b
        if pb and pred.cmp is not None and len(cases) == 2 and agree_on_boundary(pred.cmp, cases[0], cases[1]):
            pb = pred.cmp[3]  # continuous: only what the comparison's operands carried
        node = eqn
        return AV(d, b | pb, sg | pred.sg, aval, eqn=node, ins=tuple(ins))

    def _sort(self, eqn, ins):
        nk = eqn.params.get("num_keys", 1)
        keys = ins[:nk]
        kd = _union(keys, "d")
        kb = _union(keys, "b")
        where = self._where(eqn)
        outs = []
        for i, (v, a) in enumerate(zip(eqn.outvars, ins, strict=True)):
            if i == 0:  # the sorted values: continuous in the keys
                outs.append(AV(a.d, a.b | (kb if nk > 1 else _NONE), a.sg, v.aval))
                continue
            new = frozenset(Break(o, "the permutation of `sort`/`argsort`", where) for o in kd)
            outs.append(AV(a.d if _is_float(v.aval) else _NONE, a.b | kb | new, a.sg | _union(keys, "sg"), v.aval))
        return outs

    # -- sites and expectations -----------------------------------------------------------
    def _sample(self, eqn, ins, prefix, loop):
        spec = eqn.params["spec"]
        strategy = self.strategy_of(spec, [v.aval for v in eqn.invars])
        self.sites[spec] = (loop, [v.aval for v in eqn.invars])
        d_in = _union(ins, "d")
        out = eqn.outvars[0].aval
        pathwise = getattr(strategy, "pathwise_value", False)
        d = frozenset({Origin("site", prefix + spec.name, spec)}) if pathwise and d_in and _is_float(out) else _NONE
        av = AV(d, _union(ins, "b"), _union(ins, "sg"), out)
        self.names[id(av)] = prefix + spec.name
        self._keep.append(av)
        return av

    def _expect(self, eqn, ins, prefix, loop):
        spec: ExpectSpec = eqn.params["spec"]
        ops, index = spec.split(ins)
        if self.nested is not None:
            self.rewritten[spec] = self.nested(spec)
            outs_avals = [v.aval for v in eqn.outvars]
            return [AV(_union(ops, "d") if _is_float(a) else _NONE, _union(ins, "b"), _union(ins, "sg"), a)
                    for a in outs_avals]
        nc = spec.n_consts
        inner = f"{prefix}{spec.name}/"
        outs = self.run(spec.jaxpr, ops[:nc], ops[nc:], inner, loop)
        extra = index.b if index is not None else _NONE
        if spec.shifted:
            outs = outs * 3
        # the inner sites' derivatives end here: the expectation's value is an estimate whose
        # derivative its own estimator makes (a nonlinear use of it is a composition, which
        # the certificate reports on its own); their stop_gradient breaks are settled here
        own = lambda o: o.kind == "site" and o.name.startswith(inner)
        dropped = frozenset(br for br in _union(outs, "sg") if own(br.origin) and br.origin not in _union(outs, "d"))
        return [AV(frozenset(x for x in o.d if not own(x)), o.b | extra | dropped,
                   frozenset(br for br in o.sg if not own(br.origin)), v.aval)
                for o, v in zip(outs, eqn.outvars, strict=True)]

    # -- control flow ---------------------------------------------------------------------
    def _cond(self, eqn, ins, prefix, loop):
        index, ops = ins[0], ins[1:]
        branches = [self.run(br.jaxpr, [AV(aval=compat.aval_of(c)) for c in br.consts], ops, prefix, loop)
                    for br in eqn.params["branches"]]
        outs = []
        for i, v in enumerate(eqn.outvars):
            per = [br[i] for br in branches]
            pb = index.b
            if pb and index.cmp is not None and len(per) == 2 and agree_on_boundary(index.cmp, per[0], per[1]):
                pb = index.cmp[3]
            outs.append(AV(_union(per, "d"), _union(per, "b") | pb, _union(per, "sg") | index.sg, v.aval))
        return outs

    def _fixpoint(self, body: Callable, init: list, n: int):
        """Iterate ``carry -> body(carry)`` on abstract carries until their sets stop growing."""
        carry = [AV(a.d, a.b, a.sg, a.aval) for a in init]
        for _ in range(4 * n + 4):
            new = body(carry)
            grown = False
            nxt = []
            for c, o in zip(carry, new, strict=True):
                d, b, sg = c.d | o.d, c.b | o.b, c.sg | o.sg
                grown |= (d, b, sg) != (c.d, c.b, c.sg)
                nxt.append(AV(d, b, sg, c.aval))
            carry = nxt
            if not grown:
                return carry
        return carry

    def _scan(self, eqn, ins, prefix):
        p = eqn.params
        nc, ncar, body = p["num_consts"], p["num_carry"], p["jaxpr"]
        consts, init, xs = ins[:nc], ins[nc:nc + ncar], ins[nc + ncar:]
        bconsts = [AV(aval=compat.aval_of(c)) for c in body.consts]
        xs_in = [AV(a.d, a.b, a.sg, v.aval) for a, v in zip(xs, body.jaxpr.invars[nc + ncar:], strict=True)]
        carry = self._fixpoint(lambda c: self.run(body.jaxpr, bconsts, [*consts, *c, *xs_in], prefix, True)[:ncar],
                               init, ncar)
        outs = self.run(body.jaxpr, bconsts, [*consts, *carry, *xs_in], prefix, True)
        ys = [AV(a.d, a.b, a.sg, v.aval) for a, v in zip(outs[ncar:], eqn.outvars[ncar:], strict=True)]
        return [*carry, *ys]

    def _while(self, eqn, ins, prefix):
        p = eqn.params
        cn, bn, cond, body = p["cond_nconsts"], p["body_nconsts"], p["cond_jaxpr"], p["body_jaxpr"]
        cconsts, bconsts, init = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
        cc = [AV(aval=compat.aval_of(c)) for c in cond.consts]
        bc = [AV(aval=compat.aval_of(c)) for c in body.consts]

        def step(carry):
            (pred,) = self.run(cond.jaxpr, cc, [*cconsts, *carry], prefix, True)
            outs = self.run(body.jaxpr, bc, [*bconsts, *carry], prefix, True)
            # the trip count: every carry depends on the predicate's breaks
            return [AV(o.d, o.b | pred.b, o.sg | pred.sg, o.aval) for o in outs]

        carry = self._fixpoint(step, init, len(init))
        (pred,) = self.run(cond.jaxpr, cc, [*cconsts, *carry], prefix, True)
        return [AV(c.d, c.b | pred.b, c.sg | pred.sg, c.aval) for c in carry]


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


# --- the two uses ----------------------------------------------------------------------------------
def breaks(jaxpr, differentiated=None, strategy_of: Callable | None = None) -> tuple[list[Break], Walker]:
    """The breaks that reach ``jaxpr``'s result when the inputs flagged in ``differentiated``
    (all of them by default) carry a derivative. Nested expectations are followed."""
    from .estimators._defaults import resolve

    walker = Walker(strategy_of or (lambda spec, avals: resolve(spec, avals)[0]))
    consts = [AV(aval=v.aval) for v in jaxpr.constvars]
    outs = walker.run(jaxpr, consts, walker.inputs(jaxpr, differentiated))
    return result_breaks(outs), walker


_DEFAULTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def with_defaults(jaxpr):
    """``jaxpr`` with every default strategy that the analysis shows biased replaced by the
    next valid one (``SiteSpec.strategy`` set, ``SiteSpec.reason`` saying why), in nested
    expectations too. The same object when nothing changes; cached per jaxpr."""
    try:
        hit = _DEFAULTS.get(jaxpr)
    except TypeError:
        hit = None
    if hit is not None:
        return hit
    out = _with_defaults(jaxpr)
    try:
        _DEFAULTS[jaxpr] = out
        if out is not jaxpr:
            _DEFAULTS[out] = out
    except TypeError:
        pass
    return out


def _with_defaults(jaxpr):
    from .estimators._defaults import fallback, resolve

    chosen: dict = {}  # SiteSpec -> (strategy, reason)

    def strategy_of(spec, avals):
        hit = chosen.get(spec)
        return hit[0] if hit is not None else resolve(spec, avals)[0]

    def nested(spec: ExpectSpec):
        inner = with_defaults(spec.jaxpr)
        return spec if inner is spec.jaxpr else dataclasses.replace(spec, jaxpr=inner, cache={})

    while True:
        walker = Walker(strategy_of, nested=nested)
        consts = [AV(aval=v.aval) for v in jaxpr.constvars]
        outs = walker.run(jaxpr, consts, walker.inputs(jaxpr))
        new = False
        for br in result_breaks(outs):
            spec = br.origin.spec
            if br.origin.kind != "site" or spec in chosen or spec.strategy is not None:
                continue
            strategy = fallback(spec, walker.sites[spec][1], walker.sites[spec][0])
            chosen[spec] = (strategy, f"default: reparam would miss {br.describe()}")
            new = True
        if not new:
            break
    specs = {s: dataclasses.replace(s, strategy=st, reason=why) for s, (st, why) in chosen.items()}
    expects = {s: r for s, r in walker.rewritten.items() if r is not s}
    if not specs and not expects:
        return jaxpr
    return _rewrite(jaxpr, specs, expects)


def _rewrite(jaxpr, specs: dict, expects: dict):
    """``jaxpr`` with the site and expectation specs replaced, at every depth."""
    eqns = []
    changed = False
    for eqn in jaxpr.eqns:
        new = eqn
        if eqn.primitive is sample_p and eqn.params["spec"] in specs:
            new = eqn.replace(params={**eqn.params, "spec": specs[eqn.params["spec"]]})
        elif eqn.primitive is expect_p and eqn.params["spec"] in expects:
            new = eqn.replace(params={**eqn.params, "spec": expects[eqn.params["spec"]]})
        else:
            new = compat.map_subjaxprs(eqn, lambda j: _rewrite(j, specs, expects))
        changed |= new is not eqn
        eqns.append(new)
    return jaxpr.replace(eqns=eqns) if changed else jaxpr


__all__ = ["RULES", "Break", "Origin", "breaks", "with_defaults", "agree_on_boundary"]


