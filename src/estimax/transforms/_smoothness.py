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

The rules are one table (``_continuity.RULES``: primitive name -> what a derivative does
there), with the check that a ``select`` whose branches agree on its comparison's boundary is
continuous (``_continuity.agree_on_boundary``). Higher-order primitives follow their declared
policies (``dsl._ir.POLICIES``): ``jit``/``checkpoint`` are inlined, ``cond`` and ``while``
add their predicate's breaks to every output, loop carries are iterated to a fixed point, a
nested ``expect`` is followed into its program, and functions with their own derivative rule
(``custom_jvp``/``custom_vjp``) are taken at their word.

Used twice (see :func:`with_defaults` and :func:`breaks`): the default strategy of a site
whose reparameterized draw reaches a break becomes the next valid one (``ex.mvd`` where
registered, ``ex.reinforce`` otherwise, and always ``ex.reinforce`` inside loop bodies,
which continuations cannot cross); a site that chose ``ex.reparam`` itself keeps it and the
certificate says ``biased`` with the reason; a break of a differentiated argument makes the
program ``biased`` whatever its sites do.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable

import numpy as np

from ..dsl import _ir as ir
from ..dsl._argmin import ARGMIN_SCOPE
from ..dsl._primitives import ExpectSpec, expect_p, sample_p
from ..runtime import _jax_compat as compat
from ._continuity import (ARGUMENTS, AV, BENIGN, DISCRETE, KINKED, RULES, SELECT, SMOOTH, SORT, STEP, STOP,
                          _COMPARE, _ELEMENTWISE, _NONE, _SHAPE, Break, Origin, _is_float, _is_infinite_literal,
                          _literal_value, _null_case, _show, _union, agree_on_boundary, result_breaks)
from ._interpreter import Interpreter, rule
from .estimators._defaults import fallback, resolve
from .estimators._enum import Enum


# --- the walker ----------------------------------------------------------------------------------
class Walker(Interpreter):
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
        self.carried: dict[str, bool] = {}  # site name -> whether its operands carry a derivative
        self.rewritten: dict[Any, Any] = {}  # ExpectSpec -> its replacement (defaults mode)
        self._keep: list = []  # keeps AVs alive while their ids name sites
        self.trusted = False  # inside an ex.argmin's inner solve
        self.calls: list = []  # the inlined calls being walked, outermost first
        self.prefix, self.in_loop = "", False  # the site-name prefix; inside a loop body?

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

    def walk(self, jaxpr, consts_avs, in_avs, prefix, loop):
        """``run`` with the site-name prefix and the inside-a-loop-body flag set."""
        saved = self.prefix, self.in_loop
        self.prefix, self.in_loop = prefix, loop
        try:
            return self.run(jaxpr, consts_avs, in_avs)
        finally:
            self.prefix, self.in_loop = saved

    def read(self, env, v):
        if isinstance(v, compat.Literal):
            return AV(aval=v.aval, val=v.val)
        return env[v]

    def constants(self, consts):
        return [AV(aval=compat.aval_of(c)) for c in consts]

    # -- one equation -------------------------------------------------------------------------
    def interpret(self, eqn, ins):
        if not self.trusted and compat.in_scope(eqn, ARGMIN_SCOPE):
            self.trusted = True  # an inner solve: its certificate is the argmin's (see explain)
            try:
                return super().interpret(eqn, ins)
            finally:
                self.trusted = False
        return super().interpret(eqn, ins)

    def enters(self, eqn):  # every higher-order primitive: derivatives flow through them all
        return bool(compat.subjaxprs_of(eqn))

    @rule(sample_p)
    def _sample_rule(self, eqn, ins):
        return [self._sample(eqn, ins, self.prefix, self.in_loop)]

    @rule(expect_p)
    def _expect_rule(self, eqn, ins):
        return self._expect(eqn, ins, self.prefix, self.in_loop)

    def inline(self, eqn, ins):
        self.calls.append(eqn)  # a break inside a library function is located at its call
        try:
            return super().inline(eqn, ins)
        finally:
            self.calls.pop()

    def switch(self, eqn, ins):
        return self._cond(eqn, ins, self.prefix, self.in_loop)

    def loop(self, eqn, ins):
        if eqn.primitive is compat.scan_p:
            return self._scan(eqn, ins, self.prefix)
        return self._while(eqn, ins, self.prefix)

    def trust(self, eqn, ins):
        # a function with its own derivative rule: taken at its word (relu, logaddexp, xlogy)
        return self._smooth(ins, [v.aval for v in eqn.outvars], None)

    def default(self, eqn, ins):
        name = eqn.primitive.name
        outs_avals = [v.aval for v in eqn.outvars]
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
        self.carried[prefix + spec.name] = self.carried.get(prefix + spec.name, False) or bool(d_in)
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
        outs = self.walk(spec.jaxpr, ops[:nc], ops[nc:], inner, loop)
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
        branches = [self.walk(br.jaxpr, self.constants(br.consts), ops, prefix, loop)
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
        carry = self._fixpoint(lambda c: self.walk(body.jaxpr, bconsts, [*consts, *c, *xs_in], prefix, True)[:ncar],
                               init, ncar)
        outs = self.walk(body.jaxpr, bconsts, [*consts, *carry, *xs_in], prefix, True)
        ys = [AV(a.d, a.b, a.sg, v.aval) for a, v in zip(outs[ncar:], eqn.outvars[ncar:], strict=True)]
        return [*carry, *ys]

    def _while(self, eqn, ins, prefix):
        p = eqn.params
        cn, bn, cond, body = p["cond_nconsts"], p["body_nconsts"], p["cond_jaxpr"], p["body_jaxpr"]
        cconsts, bconsts, init = ins[:cn], ins[cn:cn + bn], ins[cn + bn:]
        cc = [AV(aval=compat.aval_of(c)) for c in cond.consts]
        bc = [AV(aval=compat.aval_of(c)) for c in body.consts]

        def step(carry):
            (pred,) = self.walk(cond.jaxpr, cc, [*cconsts, *carry], prefix, True)
            outs = self.walk(body.jaxpr, bc, [*bconsts, *carry], prefix, True)
            # the trip count: every carry depends on the predicate's breaks
            return [AV(o.d, o.b | pred.b, o.sg | pred.sg, o.aval) for o in outs]

        carry = self._fixpoint(step, init, len(init))
        (pred,) = self.walk(cond.jaxpr, cc, [*cconsts, *carry], prefix, True)
        return [AV(c.d, c.b | pred.b, c.sg | pred.sg, c.aval) for c in carry]


# --- the two uses ----------------------------------------------------------------------------------
def breaks(jaxpr, differentiated=None, strategy_of: Callable | None = None) -> tuple[list[Break], Walker]:
    """The breaks that reach ``jaxpr``'s result when the inputs flagged in ``differentiated``
    (all of them by default) carry a derivative. Nested expectations are followed."""
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
    chosen: dict = {}  # SiteSpec -> (strategy, reason)

    def strategy_of(spec, avals):
        hit = chosen.get(spec)
        return hit[0] if hit is not None else resolve(spec, avals)[0]

    def nested(spec: ExpectSpec):
        inner = with_defaults(spec.jaxpr)
        if spec.log:
            inner = log_weight_draws(inner)
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


def log_weight_draws(jaxpr):
    """An ``ex.log_expect`` program with its default ``ex.enum`` sites drawn instead: the
    log-mean-exp needs draws of the log-weight ``l``, and an enumerated site gives ``E[l]``
    (whose exp is not ``E[exp(l)]``). They become ``ex.mvd`` where the family has a rule,
    else ``ex.reinforce`` (as for a reparameterized sampler that a jump would bias)."""
    specs = {}
    for eqn, outer in ir.eqns(jaxpr):
        if eqn.primitive is not sample_p:
            continue
        spec = eqn.params["spec"]
        if spec.strategy is not None or spec.reason is not None or spec in specs:
            continue
        avals = [v.aval for v in eqn.invars]
        if isinstance(resolve(spec, avals)[0], Enum):
            in_loop = any(ir.policy(o) == ir.LOOP for o in outer)
            specs[spec] = dataclasses.replace(
                spec, strategy=fallback(spec, avals, in_loop),
                reason="default: ex.log_expect needs draws of its log-weight (ex.enum would average it first)")
    return _rewrite(jaxpr, specs, {}) if specs else jaxpr


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


__all__ = ["RULES", "Break", "Origin", "Walker", "breaks", "with_defaults", "log_weight_draws", "agree_on_boundary"]


