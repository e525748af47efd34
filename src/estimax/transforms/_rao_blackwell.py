"""Rao-Blackwellization of score terms: each REINFORCE site multiplies only its downstream cost.

When a program's value is a sum of terms (``log p(x|z) + log p(z) − log q(z) ...``), the
score ``∇log p(s)`` of a site ``s`` only needs the terms that depend on ``s``'s value
(directly, or through later sites whose distributions depend on it): every other term ``t``
is a function of choices made before ``s`` or independent of it, so
``E[t ∇log p(s)] = 0``. Dropping those terms keeps the estimator unbiased and removes their
variance -- what NumPyro's TraceGraph_ELBO does with its dependency graph.

The analysis is static, over the program's top-level equations: the output is decomposed
through ``add``/``sub``/``neg`` and scaling by values that depend on no random choice;
every other equation is a leaf term. Sites inside ``cond`` branches, loop bodies and
inlined ``jit`` calls, and programs with non-scalar values, use the whole value (still
unbiased, just not Rao-Blackwellized). Measure-valued derivatives need no such step: their
two evaluations share their random numbers, so upstream terms cancel exactly.

**Per element** (what TraceGraph_ELBO does per plate element): a site whose value has a
leading batch axis of ``n`` independent elements (a batch of data points' latents, or
``ex.vmap`` lanes) gets one score per element. A term ``Σ_b u_b`` whose summand ``u_b``
depends on the site only through its element ``b`` -- checked by an alignment analysis
that follows the element axis through elementwise operations, broadcasts, reductions over
other axes, matrix products that do not contract it, transposes and nested ``jit`` /
``custom_jvp`` calls -- contributes ``u_b`` to element ``b``'s learning signal alone: for
``b' ≠ b``, ``u_{b'}`` is independent of element ``b``'s draw given what came before, so
``E[u_{b'} ∇log p(x_b)] = 0``. Terms that mix elements (or pass through a later site)
count whole for every element, as before.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from ..dsl import _ir as ir
from ..dsl._primitives import expect_p, sample_p
from ..dsl._site import SiteDist
from ..runtime import _jax_compat as compat
from ._interpreter import Interpreter, rule

_PASS = {"convert_element_type", "copy", "copy_p", "reduce_precision"}


@dataclasses.dataclass(frozen=True, eq=False)
class CostTerms:
    jaxpr: Any
    terms: tuple  # ((var_or_literal, chain), ...); chain: (("neg"|"mul"|"div", var|None), ...)
    masks: dict  # SiteSpec -> tuple[bool, ...] (which terms are downstream of the site)
    #: SiteSpec -> tuple per term: None, or (summand var, element axis) for a term that is
    #: the sum of a summand aligned with the site's elements (see the module doc)
    elements: dict = dataclasses.field(default_factory=dict)

    def mask(self, spec):
        """The site's mask over the terms (a tuple of bools, static), or ``None``."""
        m = self.masks.get(spec)
        return None if m is None else tuple(bool(b) for b in m)

    def element_plan(self, spec):
        """The site's per-element plan, or ``None`` where no term is aligned with it."""
        return self.elements.get(spec)

    def _chain(self, x, chain, read):
        for op, operand in chain:
            if op == "neg":
                x = -x
            elif op == "mul":
                x = x * read(operand)
            else:
                x = x / read(operand)
        return x

    def contributions(self, env):
        """Each term's contribution to the program's value, from the final environment."""
        read = lambda v: v.val if isinstance(v, compat.Literal) else env[v][0]
        return [jnp.asarray(self._chain(read(var), chain, read), jnp.result_type(float)) for var, chain in self.terms]

    def element_contributions(self, env, plan):
        """``(n,)``: the aligned terms' contributions per element of the site."""
        read = lambda v: v.val if isinstance(v, compat.Literal) else env[v][0]
        total = None
        for (_, chain), entry in zip(self.terms, plan, strict=True):
            if entry is None:
                continue
            summand, axis = entry
            u = jnp.asarray(read(summand), jnp.result_type(float))
            per_element = jnp.sum(jnp.moveaxis(u, axis, 0).reshape(u.shape[axis], -1), axis=1)
            c = self._chain(per_element, chain, read)
            total = c if total is None else total + c
        return total


def analyze(jaxpr) -> CostTerms | None:
    """The additive cost terms of ``jaxpr``'s value and each top-level site's mask over them."""
    if len(jaxpr.outvars) != 1 or getattr(jaxpr.outvars[0].aval, "shape", None) != ():
        return None
    producer = {}
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            producer[v] = eqn
    random_vars = _forward(jaxpr, lambda eqn: eqn.primitive is sample_p or eqn.primitive is expect_p or ir.holds_random(eqn))

    def is_random(v):
        return not isinstance(v, compat.Literal) and v in random_vars

    # The value's additive terms, depth first and left to right, with an explicit stack: a
    # Python sum of 10^4 terms is a chain of 10^4 ``add`` equations.
    terms: list = []
    stack: list = [(jaxpr.outvars[0], ())]
    while stack:
        v, chain = stack.pop()
        eqn = None if isinstance(v, compat.Literal) else producer.get(v)
        name = None if eqn is None else eqn.primitive.name
        if name in ("add", "add_any"):
            stack.append((eqn.invars[1], chain))
            stack.append((eqn.invars[0], chain))
        elif name == "sub":
            stack.append((eqn.invars[1], chain + (("neg", None),)))
            stack.append((eqn.invars[0], chain))
        elif name == "neg":
            stack.append((eqn.invars[0], chain + (("neg", None),)))
        elif name in _PASS and compat.is_float_dtype(eqn.invars[0].aval.dtype):
            stack.append((eqn.invars[0], chain))
        elif name == "mul" and not is_random(eqn.invars[0]):
            stack.append((eqn.invars[1], chain + (("mul", eqn.invars[0]),)))
        elif name == "mul" and not is_random(eqn.invars[1]):
            stack.append((eqn.invars[0], chain + (("mul", eqn.invars[1]),)))
        elif name == "div" and not is_random(eqn.invars[1]):
            stack.append((eqn.invars[0], chain + (("div", eqn.invars[1]),)))
        else:
            terms.append((v, chain))
    # Which top-level sites each value is computed from, as a bit set per value: one pass over
    # the equations, however many sites there are.
    sites: list = []
    upstream: dict = {}
    for eqn in jaxpr.eqns:
        bits = 0
        for v in eqn.invars:
            if not isinstance(v, compat.Literal):
                bits |= upstream.get(v, 0)
        if eqn.primitive is sample_p:
            bits |= 1 << len(sites)
            sites.append(eqn)
        if bits:
            for v in eqn.outvars:
                upstream[v] = bits
    downstream = [[False] * len(terms) for _ in sites]  # per site: which terms depend on it
    for t, (v, _) in enumerate(terms):
        bits = 0 if isinstance(v, compat.Literal) else upstream.get(v, 0)
        while bits:
            low = bits & -bits
            downstream[low.bit_length() - 1][t] = True
            bits ^= low
    masks, elements = {}, {}
    for i, eqn in enumerate(sites):
        spec = eqn.params["spec"]
        mask = downstream[i]
        plan = _element_plan(jaxpr, eqn, terms)
        if plan is not None:
            mask = [m and p is None for m, p in zip(mask, plan, strict=True)]
            elements[spec] = plan
        masks[spec] = tuple(mask)
    if len(terms) < 2 and not elements:
        return None
    return CostTerms(jaxpr, tuple(terms), masks, elements)


# --- per-element alignment ------------------------------------------------------------------
_FULL = "full"  # depends on the site, elements mixed
_ELEMENTWISE = {
    "add", "add_any", "sub", "mul", "div", "neg", "exp", "exp2", "log", "log1p", "expm1", "tanh",
    "logistic", "max", "min", "pow", "integer_pow", "sqrt", "rsqrt", "cbrt", "abs", "sign",
    "select_n", "convert_element_type", "square", "erf", "erfc", "erf_inv", "lgamma", "digamma",
    "eq", "ne", "lt", "gt", "le", "ge", "and", "or", "not", "xor", "stop_gradient", "copy",
    "copy_p", "floor", "ceil", "round", "is_finite", "sin", "cos", "atan2", "clamp", "rem",
    "reduce_precision", "nextafter", "sinh", "cosh", "asinh", "acosh", "atanh", "tan", "log_softmax",
}


def _element_plan(jaxpr, site_eqn, terms):
    """Per term: ``(summand, axis)`` where the term sums a summand aligned with the site's
    leading value axis, else ``None``; ``None`` overall when no term is."""
    out = site_eqn.outvars[0]
    batch = SiteDist(site_eqn.params["spec"], [v.aval for v in site_eqn.invars]).batch_shape
    if not batch or batch[0] < 2:  # the leading axis must index independent elements
        return None
    walk = _Alignment(site_eqn, tuple(getattr(out.aval, "shape", ()))[0])
    walk.run(jaxpr, [None] * len(jaxpr.constvars), [None] * len(jaxpr.invars))
    plan = tuple(walk.sums.get(v) if not isinstance(v, compat.Literal) else None for v, _ in terms)
    return plan if any(p is not None for p in plan) else None


class _Alignment(Interpreter):
    """Each value's state with respect to one site's elements: ``None`` (independent of the
    site), ``("aligned", axis)`` (element ``b`` of that axis depends on element ``b`` of the
    site only) or ``"full"``. Calls and custom rules are followed into; branches, loops and
    other constructs mix elements."""

    def __init__(self, site_eqn, n):
        self.site, self.n = site_eqn, n
        self.sums: dict = {}  # scalar var -> (summand, axis): a full reduction of an aligned value

    def read(self, env, v):
        return None if isinstance(v, compat.Literal) else env.get(v)

    def write(self, env, variables, states):
        for v, st in zip(variables, states, strict=True):
            if st is not None:
                env[v] = st

    def constants(self, consts):
        return [None] * len(consts)

    def interpret(self, eqn, ins):
        if eqn is self.site:
            return [("aligned", 0)]
        if all(s is None for s in ins):
            return [None] * len(eqn.outvars)
        return super().interpret(eqn, ins)

    @rule(sample_p, expect_p)
    def _random(self, eqn, ins):
        return [_FULL] * len(eqn.outvars)

    def enters(self, eqn):
        return bool(compat.subjaxprs_of(eqn))

    def default(self, eqn, ins):
        if eqn.primitive.name == "reduce_sum" and ins[0] not in (None, _FULL) and not eqn.outvars[0].aval.shape:
            self.sums[eqn.outvars[0]] = (eqn.invars[0], ins[0][1])
            return [_FULL]
        return _transfer(eqn, ins, self.n)

    def inline(self, eqn, ins):
        jaxpr, consts = compat.called_jaxpr(eqn)
        mixed = any(s == _FULL for s in ins) or len({s[1] for s in ins if s is not None}) != 1
        if mixed or len(jaxpr.invars) != len(eqn.invars) or len(jaxpr.outvars) != len(eqn.outvars):
            return [_FULL] * len(eqn.outvars)
        return self.run(jaxpr, self.constants(consts), ins)

    trust = inline  # a custom rule's primal function: followed like a call

    def switch(self, eqn, ins):
        return [_FULL] * len(eqn.outvars)

    loop = switch


def _transfer(eqn, ins, n):
    """Output states of ``eqn`` given its inputs' states (None: independent of the site)."""
    outs = eqn.outvars
    full = [_FULL] * len(outs)
    if any(s == _FULL for s in ins):
        return full
    axes = {s[1] for s in ins if s is not None}
    if len(axes) != 1:
        return full
    (a,) = axes
    name = eqn.primitive.name
    p = eqn.params
    if name in _ELEMENTWISE:
        shape = tuple(outs[0].aval.shape)
        ok = len(shape) > a and shape[a] == n and all(
            s is None or tuple(v.aval.shape) == shape for v, s in zip(eqn.invars, ins, strict=True)
        )
        return [("aligned", a)] * len(outs) if ok else full
    if name == "broadcast_in_dim":
        dims = tuple(p["broadcast_dimensions"])
        b = dims[a]
        return [("aligned", b)] if tuple(p["shape"])[b] == n else full
    if name in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin", "reduce_and", "reduce_or"):
        red = tuple(p["axes"])
        if a in red:
            return full
        return [("aligned", a - sum(1 for r in red if r < a))]
    if name == "squeeze":
        dims = tuple(d % len(eqn.invars[0].aval.shape) for d in p["dimensions"])
        return full if a in dims else [("aligned", a - sum(1 for d in dims if d < a))]
    if name == "transpose":
        return [("aligned", tuple(p["permutation"]).index(a))]
    if name == "dot_general":
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        if ins[0] is not None and ins[1] is None:
            contract, batch, rank = lc, lb, len(eqn.invars[0].aval.shape)
            offset = len(lb)
        elif ins[1] is not None and ins[0] is None:
            contract, batch, rank = rc, rb, len(eqn.invars[1].aval.shape)
            offset = len(lb) + len(eqn.invars[0].aval.shape) - len(lc) - len(lb)
        else:
            return full
        if a in contract:
            return full
        if a in batch:
            return [("aligned", tuple(batch).index(a))]
        free = [d for d in range(rank) if d not in contract and d not in batch]
        return [("aligned", offset + free.index(a))]
    return full


def _forward(jaxpr, seed) -> set:
    """Vars computed (transitively) from the outputs of equations where ``seed(eqn)``."""
    marked: set = set()
    for eqn in jaxpr.eqns:
        if seed(eqn) or any(not isinstance(v, compat.Literal) and v in marked for v in eqn.invars):
            marked.update(eqn.outvars)
    return marked
