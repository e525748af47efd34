"""The plan and the certificate: what the estimator pass will do, and what it guarantees.

``collect_sites`` walks a staged program (through ``jit``, ``cond`` branches, loop bodies
and nested expectations) and records every random choice with its resolved strategy.
``certify`` combines the strategies' certificates with a dataflow check: a nested
expectation's estimate used nonlinearly (``log``, a product of two estimates, a branch on
it, a distribution parameter) is a plug-in estimate, so the program is ``biased``.
"""

from __future__ import annotations

import dataclasses
from typing import Any


import jax

from .._errors import CertificateError, ProgramError
from ..dsl._primitives import expect_p, sample_p
from ..dsl._site import SiteDist, describe
from ..runtime import _jax_compat as compat
from .estimators._base import ContinuationStrategy
from .estimators._enum import Enum
from .estimators._reinforce import Reinforce
from .estimators._reparam import Reparam
from .estimators._defaults import resolve
from ..dsl import _ir as ir
from ..dsl._ir import contains_expect, contains_random, refused_call  # noqa: F401  (re-exported)
from ._interpreter import Interpreter, rule
from ._rao_blackwell import analyze
from ._smoothness import breaks, with_defaults

RANK = {"exact": 0, "unbiased": 1, "consistent": 2, "biased": 3}


@dataclasses.dataclass(frozen=True)
class SitePlan:
    name: str
    distribution: str
    strategy: Any
    reason: str
    context: str
    location: str | None
    #: the gradient variance this site contributes (``explain(..., variance=True)``)
    variance: float | None = None
    #: the Monte Carlo standard error of ``variance`` (heavy-tailed estimators are noisy)
    variance_se: float | None = None
    #: for a site whose score terms are Rao-Blackwellized per element: the element count
    elements: int | None = None
    #: why this site's estimator is biased although its strategy is not in general
    caveat: str | None = None
    #: ``False`` where the site's distribution depends on no differentiated argument and its
    #: strategy adds nothing to the gradient (see :func:`without_gradient`)
    needs_gradient: bool = True

    @property
    def certificate(self) -> str:
        return self.strategy.certificate

    def describe_strategy(self) -> str:
        """The plan's strategy column: ``none`` for a site that needs no gradient term."""
        return self.strategy.describe() if self.needs_gradient else "none"


@dataclasses.dataclass(frozen=True)
class Certificate:
    kind: str  # "exact" (no random choices), "unbiased", "consistent" or "biased"
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        if not self.reasons:
            return self.kind
        if self.reasons == ("no random choices",):
            return "exact: no random choices"
        return self.kind + "\n" + "\n".join(f"  - {r}" for r in self.reasons)


def collect_sites(jaxpr, prefix: str = "", context: str = "program") -> list[SitePlan]:
    """Every site of ``jaxpr`` in program order, with the strategies the estimator pass will
    use (defaults the differentiability analysis replaced included); raises on duplicate
    names and on sites the pass refuses."""
    jaxpr = with_defaults(jaxpr)
    out: list[SitePlan] = []
    seen: dict[str, Any] = {}
    _walk(jaxpr, prefix, context, out, seen)
    return out


def _add(out, seen, plan, spec):
    prev = seen.get(plan.name)
    if prev is not None and prev[0] is not spec and not _exclusive(prev[1], plan.context):
        raise ProgramError(
            f"two random choices are named {plan.name!r} (at {prev[2] or '?'} and "
            f"{plan.location or '?'}); site names must be unique in a program. Rename one "
            "with ex.sample(..., name=...)."
        )
    if prev is None:
        seen[plan.name] = (spec, plan.context, plan.location)
        out.append(plan)


def _exclusive(ctx_a: str, ctx_b: str) -> bool:
    # Sites in different branches of the same cond are never both executed.
    return ctx_a != ctx_b and ctx_a.startswith("cond#") and ctx_b.startswith("cond#") and ctx_a.split("/")[0] == ctx_b.split("/")[0]


def _walk(jaxpr, prefix, context, out, seen):
    _Collect(out, seen).walk(jaxpr, prefix, context)


class _Collect(Interpreter):
    """Records each site's plan, with where it is (``context``): a structural walk (no values)."""

    def __init__(self, out, seen):
        self.out, self.seen = out, seen
        self.prefix, self.context = "", "program"

    def walk(self, jaxpr, prefix, context):
        saved = self.prefix, self.context
        self.prefix, self.context = prefix, context
        try:
            self.run(jaxpr, [None] * len(jaxpr.constvars), [None] * len(jaxpr.invars))
        finally:
            self.prefix, self.context = saved

    def default(self, eqn, ins):
        return [None] * len(eqn.outvars)

    def constants(self, consts):
        return [None] * len(consts)

    @rule(sample_p)
    def _sample(self, eqn, ins):
        prefix = self.prefix
        spec = eqn.params["spec"]
        avals = [v.aval for v in eqn.invars]
        strategy, reason = resolve(spec, avals)
        if isinstance(strategy, Enum):  # a plan that could not run is an error here too
            strategy.check_size(prefix + spec.name, SiteDist(spec, avals))
        lane = SiteDist(spec, avals).lane
        caveat = None
        if isinstance(strategy, Reinforce) and _support_moves(lane.support):
            caveat = (f"site {prefix + spec.name!r} uses ex.reinforce, but the support of "
                      f"{describe(lane)} moves with its parameters: the score function misses the "
                      "boundary's term. Use ex.mvd (Uniform has one) or ex.reparam")
        plan = SitePlan(
            name=prefix + spec.name,
            distribution=describe(lane, spec.levels),
            strategy=strategy,
            reason=reason,
            context=self.context,
            location=spec.location,
            caveat=caveat,
        )
        _add(self.out, self.seen, plan, spec)
        return [None]

    @rule(expect_p)
    def _expect(self, eqn, ins):
        spec = eqn.params["spec"]
        self.walk(spec.jaxpr, f"{self.prefix}{spec.name}/", f"expect {spec.name!r} (n={spec.n})")
        return self.default(eqn, ins)

    def inline(self, eqn, ins):
        super().inline(eqn, ins)
        return self.default(eqn, ins)

    def switch(self, eqn, ins):
        for b, br in enumerate(eqn.params["branches"]):
            self.walk(br.jaxpr, self.prefix, f"cond#{id(eqn)}/branch {b}")
        return self.default(eqn, ins)

    def loop(self, eqn, ins):
        if eqn.primitive is compat.scan_p:
            self.walk(eqn.params["jaxpr"].jaxpr, self.prefix, "scan body")
        else:
            self.walk(eqn.params["body_jaxpr"].jaxpr, self.prefix, "while body")
        return self.default(eqn, ins)


def _support_moves(constraint) -> bool:
    """Whether a support constraint of a per-lane distribution (built from abstract operands)
    has a bound that is an operand: the support depends on the parameters."""
    for v in vars(constraint).values() if hasattr(constraint, "__dict__") else ():
        if isinstance(v, (jax.ShapeDtypeStruct, jax.core.ShapedArray, jax.core.Tracer)):
            return True
        if hasattr(v, "__dict__") and type(v).__module__.startswith("numpyro.distributions.constraints"):
            if _support_moves(v):
                return True
    return False


def context_label(ctx: str) -> str:
    if ctx.startswith("cond#"):
        return "cond " + ctx.split("/", 1)[1]
    return ctx


# --- linearity of nested expectations -----------------------------------------------------
_LINEAR_ANY = {
    "add", "sub", "neg", "reduce_sum", "broadcast_in_dim", "reshape", "squeeze", "expand_dims",
    "transpose", "convert_element_type", "slice", "concatenate", "copy", "copy_p", "rev", "cumsum",
    "add_any", "reduce_precision", "real", "pjit", "jit", "stack", "split", "tile", "imag", "conj",
}
_LINEAR_FIRST = {"div"}  # linear in the first operand only
_LINEAR_ONE = {"mul", "dot_general"}  # linear when exactly one operand carries an estimate
_INDEXING = {"dynamic_slice", "gather", "dynamic_update_slice", "select_n", "pad"}


def _names(specs) -> str:
    calls = sorted({s.call for s in specs})
    return calls[0] if len(calls) == 1 else "the estimates of " + ", ".join(calls)


def _nonlinear_uses(jaxpr, flagged_in: list, prefix="") -> tuple[list, list[str], set]:
    """Propagate which nested expectations' estimates each value carries; list the
    nonlinear uses (the compositions) and collect the expectations used nonlinearly.

    Returns ``(output flags, problems, specs)``: a frozenset of ``ExpectSpec`` per output,
    one message per nonlinear use, and the set of specs whose estimates are used
    nonlinearly (``ex.log_expect`` always is: it is the log of an expectation).
    """
    walk = _NonlinearUses()
    ins = [frozenset(f) if f else _NO_FLAGS for f in flagged_in]
    outs = walk.run(jaxpr, [_NO_FLAGS] * len(jaxpr.constvars), ins)
    return outs, walk.problems, walk.used


_NO_FLAGS: frozenset = frozenset()


class _NonlinearUses(Interpreter):
    """Each value's flags: the nested expectations whose estimates it carries."""

    def __init__(self):
        self.problems: list[str] = []
        self.used: set = set()

    def _flag(self, msg, specs):
        self.problems.append(msg)
        self.used.update(specs)

    def read(self, env, v):
        return _NO_FLAGS if isinstance(v, compat.Literal) else env.get(v, _NO_FLAGS)

    def constants(self, consts):
        return [_NO_FLAGS] * len(consts)

    def interpret(self, eqn, ins):
        if eqn.primitive not in self.rules and not any(ins):
            return self._unflagged(eqn)
        return super().interpret(eqn, ins)

    def enters(self, eqn):  # every higher-order primitive applied to an estimate
        return bool(compat.subjaxprs_of(eqn))

    def _unflagged(self, eqn):
        # walk nested jaxprs for expectations used inside them; conservatively treat the
        # equation's outputs as carrying their estimates
        out_flag = _NO_FLAGS
        for sub in compat.subjaxprs_of(eqn):
            if contains_expect(sub):
                outs = self.run(sub, [_NO_FLAGS] * len(sub.constvars), [_NO_FLAGS] * len(sub.invars))
                out_flag = out_flag.union(*outs)
        return [out_flag] * len(eqn.outvars)

    @rule(expect_p)
    def _expect(self, eqn, ins):
        spec = eqn.params["spec"]
        out_flag = _NO_FLAGS.union(*ins)
        if exact_estimate(spec):  # its estimate is its value: any function of it is exact
            return [out_flag] * len(eqn.outvars)
        where = compat.user_frame(eqn) or "?"
        # the expectation's own program: a composition inside it is estimated by a plug-in
        # too (E[log ĝ] is not log E[g]); its estimate is linear in the inner draws only
        _, inner, _ = _nonlinear_uses(spec.jaxpr, [_NO_FLAGS] * len(spec.jaxpr.invars))
        self.problems += [f"inside {spec.call}: {p}" for p in inner]
        if out_flag:
            self._flag(f"the arguments of {spec.call} depend on {_names(out_flag)} (at {where})", out_flag)
        summed = [e.params["spec"].name for e, _ in ir.eqns(spec.jaxpr) if e.primitive is sample_p
                  and isinstance(e.params["spec"].strategy, Enum)]
        if spec.log and summed:
            self._flag(f"site {summed[0]!r} of {spec.call} uses ex.enum, which averages the log-weight over its "
                       "values: the log-mean-exp of such averages is not log E[exp(l)], even tracked; let the "
                       "site be drawn (the default, or ex.reinforce / ex.mvd)", {spec})
        if spec.log:
            self._flag(f"{spec.call} is the log of an expectation: its estimate is the log-mean-exp of "
                       f"{spec.n} draw{'s' if spec.n > 1 else ''} (at {spec.location or where})", {spec})
        return [frozenset({spec})] * len(eqn.outvars)

    @rule(sample_p)
    def _sample(self, eqn, ins):
        out_flag = _NO_FLAGS.union(*ins)
        if out_flag:
            where = compat.user_frame(eqn) or "?"
            self._flag(f"the distribution of site {eqn.params['spec'].name!r} depends on {_names(out_flag)} (at {where})", out_flag)
        return [_NO_FLAGS] * len(eqn.outvars)

    def default(self, eqn, ins):
        name = eqn.primitive.name
        where = compat.user_frame(eqn) or "?"
        out_flag = _NO_FLAGS.union(*ins)
        if name == "convert_element_type" and not compat.is_float_dtype(eqn.params["new_dtype"]):
            self._flag(f"the conversion of {_names(out_flag)} to {eqn.params['new_dtype']} (at {where})", out_flag)
        elif name in _LINEAR_ANY and name not in ("pjit", "jit"):
            pass
        elif name in _LINEAR_FIRST:
            if ins[1]:
                self._flag(f"`{name}` by {_names(ins[1])} (at {where})", ins[1])
        elif name in _LINEAR_ONE:
            if sum(bool(f) for f in ins) > 1:
                self._flag(f"a product of expectation estimates, `{name}` of {_names(out_flag)} (at {where})", out_flag)
        elif name in _INDEXING:
            idx_flags = ins[:1] if name == "select_n" else ins[1:] if name in ("dynamic_slice", "gather") else []
            bad = _NO_FLAGS.union(*idx_flags)
            if bad:
                self._flag(f"`{name}` indexed or selected by {_names(bad)} (at {where})", bad)
        else:  # a nonlinear operation, or a branch, loop or custom rule applied to an estimate
            self._flag(f"`{name}` applied to {_names(out_flag)} (at {where})", out_flag)
        return [out_flag] * len(eqn.outvars)

    switch = loop = trust = default


def exact_estimate(spec) -> bool:
    """Whether the estimate of the nested expectation ``spec`` is its exact value: it has
    random choices and every one is summed exactly (``ex.enum``, not inside a loop or a
    branch). A function of it then needs no tracking and is no plug-in. An expectation
    without random choices is not exact in this sense: its randomness comes from its
    arguments (samples the caller streams in), as a log-expectation's draws always must."""
    if spec.log:
        return False
    found = False
    for eqn, outer in ir.eqns(spec.jaxpr, into_expect=True):
        if eqn.primitive is sample_p:
            if any(o.primitive is not expect_p and ir.policy(o) != ir.INLINE for o in outer):
                return False
            strategy, _ = resolve(eqn.params["spec"], [v.aval for v in eqn.invars])
            if not isinstance(strategy, Enum):
                return False
            found = True
    return found


def compositions(jaxpr) -> tuple[list[str], set]:
    """``(messages, specs)``: the nonlinear uses of nested expectations in ``jaxpr`` and the
    expectations involved -- what the tracking pass tracks."""
    _, problems, used = _nonlinear_uses(jaxpr, [frozenset()] * len(jaxpr.invars))
    return problems, used


def certify(jaxpr, sites: list[SitePlan], differentiated=None) -> Certificate:
    """The certificate of ``jaxpr``'s estimator (with the plan's ``sites``) when the inputs
    flagged in ``differentiated`` (all by default) are differentiated."""
    jaxpr = with_defaults(jaxpr)
    kind = "unbiased"
    reasons: list[str] = []
    for s in sites:
        c = s.strategy.certificate
        if RANK[c] > RANK[kind]:
            kind = c
        if c != "unbiased":
            reasons.append(f"site {s.name!r} uses {s.strategy.describe()} ({c})")
        if s.caveat is not None:
            kind = "biased"
            reasons.append(s.caveat)
        if s.context in ("scan body", "while body") and isinstance(s.strategy, ContinuationStrategy):
            reasons.append(
                f"site {s.name!r} uses {s.strategy.describe()} inside a loop body: refused "
                "when its parameters are differentiated"
            )
    found, _ = breaks(jaxpr, differentiated)
    for br in found:
        kind = "biased"
        reasons.append(break_reason(br))
    problems, _ = compositions(jaxpr)
    if problems:
        kind = "biased"
        reasons += [f"plug-in of a nested expectation: {p}" for p in problems]
        reasons.append("a nonlinear function of an expectation has no unbiased estimator from one draw; "
                       "ex.fit(..., tracking=ex.tracking.SCGD()) (or SOX, MSVR) tracks it instead (consistent)")
    if not sites and kind == "unbiased":  # nothing random: the estimate is the value, its gradient jax.grad's
        return Certificate("exact", ("no random choices",) + tuple(reasons))
    return Certificate(kind, tuple(reasons))


def break_reason(br) -> str:
    hint = ""
    if "the jump at" in br.what:
        hint = ("; if this is a jnp.where whose branches meet at the boundary, write it with "
                "jnp.maximum / jnp.minimum / jnp.clip (continuous) instead")
    if br.origin.kind == "site":
        strategy = br.origin.spec.strategy
        return (f"site {br.origin.name!r} uses ex.{strategy.describe()}, whose pathwise derivative "
                f"misses {br.describe()}: estimator=ex.mvd (where the family has one) or "
                f"ex.reinforce is unbiased here, and is what the default picks{hint}")
    return (f"the derivative of the differentiated arguments does not pass {br.describe()}, and "
            "no site's estimator can account for that: make the comparison a random choice (e.g. "
            "`ex.sample(dist.Bernoulli(probs=p))` for `u < p`), or replace it by a smooth "
            f"surrogate (e.g. jax.nn.sigmoid((z - t) / temperature) for `z > t`; biased too){hint}")


NO_PARAMETERS = "no parameters: no gradient"


def without_gradient(jaxpr, sites: list[SitePlan], differentiated=None) -> list[SitePlan]:
    """``sites`` with ``needs_gradient=False`` where the site's operands carry no derivative of
    the inputs flagged in ``differentiated`` (all by default; a minibatch index, noise with
    fixed parameters) and its strategy only differentiates the distribution's parameters:
    REINFORCE (its score term would be zero; the estimator pass adds none, since no tangent
    reaches the site) or reparam (the draw carries no derivative). Enumeration, measure-valued
    derivatives and relaxations still change the estimate, so they stay."""
    _, walker = breaks(with_defaults(jaxpr), differentiated)
    out = []
    for s in sites:
        if not walker.carried.get(s.name, True) and isinstance(s.strategy, (Reinforce, Reparam)):
            why = "its distribution depends on no differentiated argument"
            if s.reason.startswith("chosen"):
                why += f"; {s.strategy.describe()} chosen in the program"
            s = dataclasses.replace(s, needs_gradient=False, reason=f"{NO_PARAMETERS} ({why})", elements=None)
        out.append(s)
    return out


def mark_elements(jaxpr, sites):
    """Set ``elements`` on the top-level sites whose scores are Rao-Blackwellized per element."""
    costs = analyze(jaxpr)
    if costs is None or not costs.elements:
        return sites
    sizes = {}
    for eqn in jaxpr.eqns:
        spec = eqn.params.get("spec") if eqn.primitive is sample_p else None
        if spec is None or spec not in costs.elements:
            continue
        strategy, _ = resolve(spec, [v.aval for v in eqn.invars])
        takes = getattr(strategy, "takes_elements", None)
        if takes is not None and takes(spec, spec.extras([v.aval for v in eqn.invars])):
            sizes[spec.name] = eqn.outvars[0].aval.shape[0]
    return [dataclasses.replace(s, elements=sizes[s.name]) if s.name in sizes else s for s in sites]


def differentiated_leaves(args, argnums) -> list[bool]:
    """Per flattened leaf of ``args``: whether it belongs to an argument in ``argnums``."""
    nums = {argnums % len(args)} if isinstance(argnums, int) else {a % len(args) for a in argnums}
    flags: list[bool] = []
    for i, a in enumerate(args):
        flags += [i in nums] * len(jax.tree_util.tree_leaves(a))
    return flags


def require_certificate(plan, require: str | None, where: str) -> None:
    """Raise :class:`CertificateError` when ``plan``'s certificate (an :class:`~estimax.Plan`) is
    weaker than ``require``."""
    if require is None:
        return
    if require not in ("unbiased", "consistent", "biased"):
        raise ProgramError(f"{where}: require= expects 'unbiased' or 'consistent'; got {require!r}.")
    if RANK[plan.certificate.kind] > RANK[require]:
        raise CertificateError(
            f"{where}: require={require!r}, but the estimator of {plan.program!r} is "
            f"{plan.certificate}\n(ex.explain shows the whole plan)", plan)


__all__ = ["Certificate", "SitePlan", "certify", "collect_sites", "require_certificate", "without_gradient"]
