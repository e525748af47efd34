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
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from ..dsl._primitives import expect_p, sample_p
from ..runtime import _jax_compat as compat

_PASS = {"convert_element_type", "copy", "copy_p", "reduce_precision"}


@dataclasses.dataclass(frozen=True, eq=False)
class CostTerms:
    jaxpr: Any
    terms: tuple  # ((var_or_literal, chain), ...); chain: (("neg"|"mul"|"div", var|None), ...)
    masks: dict  # SiteSpec -> tuple[bool, ...] (which terms are downstream of the site)

    def mask(self, spec):
        m = self.masks.get(spec)
        return None if m is None else jnp.asarray(m, jnp.result_type(float))

    def contributions(self, env):
        """Each term's contribution to the program's value, from the final environment."""
        read = lambda v: v.val if isinstance(v, compat.Literal) else env[v][0]
        out = []
        for var, chain in self.terms:
            x = read(var)
            for op, operand in chain:
                if op == "neg":
                    x = -x
                elif op == "mul":
                    x = x * read(operand)
                else:
                    x = x / read(operand)
            out.append(x)
        return [jnp.asarray(c, jnp.result_type(float)) for c in out]


def analyze(jaxpr) -> CostTerms | None:
    """The additive cost terms of ``jaxpr``'s value and each top-level site's mask over them."""
    if len(jaxpr.outvars) != 1 or getattr(jaxpr.outvars[0].aval, "shape", None) != ():
        return None
    producer = {}
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            producer[v] = eqn
    random_vars = _forward(jaxpr, lambda eqn: eqn.primitive is sample_p or eqn.primitive is expect_p or _has_random(eqn))

    def is_random(v):
        return not isinstance(v, compat.Literal) and v in random_vars

    terms: list = []

    def decompose(v, chain):
        eqn = None if isinstance(v, compat.Literal) else producer.get(v)
        name = None if eqn is None else eqn.primitive.name
        if name in ("add", "add_any"):
            decompose(eqn.invars[0], chain)
            decompose(eqn.invars[1], chain)
        elif name == "sub":
            decompose(eqn.invars[0], chain)
            decompose(eqn.invars[1], chain + (("neg", None),))
        elif name == "neg":
            decompose(eqn.invars[0], chain + (("neg", None),))
        elif name in _PASS and compat.is_float_dtype(eqn.invars[0].aval.dtype):
            decompose(eqn.invars[0], chain)
        elif name == "mul" and not is_random(eqn.invars[0]):
            decompose(eqn.invars[1], chain + (("mul", eqn.invars[0]),))
        elif name == "mul" and not is_random(eqn.invars[1]):
            decompose(eqn.invars[0], chain + (("mul", eqn.invars[1]),))
        elif name == "div" and not is_random(eqn.invars[1]):
            decompose(eqn.invars[0], chain + (("div", eqn.invars[1]),))
        else:
            terms.append((v, chain))

    decompose(jaxpr.outvars[0], ())
    if len(terms) < 2:
        return None
    masks = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive is sample_p:
            down = _forward(jaxpr, lambda e, site=eqn: e is site)
            masks[eqn.params["spec"]] = tuple(not isinstance(v, compat.Literal) and v in down for v, _ in terms)
    return CostTerms(jaxpr, tuple(terms), masks)


def _has_random(eqn) -> bool:
    from ._adev import contains_random

    return any(contains_random(sub) for sub in compat.subjaxprs_of(eqn))


def _forward(jaxpr, seed) -> set:
    """Vars computed (transitively) from the outputs of equations where ``seed(eqn)``."""
    marked: set = set()
    for eqn in jaxpr.eqns:
        if seed(eqn) or any(not isinstance(v, compat.Literal) and v in marked for v in eqn.invars):
            marked.update(eqn.outvars)
    return marked
