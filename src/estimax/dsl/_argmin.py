"""The language's part of ``ex.argmin`` (an inner optimization problem as a value of the
outer program; the example and the function are in ``estimax.solvers._argmin``).

``ex.argmin`` binds the ``argmin`` marker of the IR, so ``ex.explain`` of a program that
uses it lists each inner problem with its hypergradient method, inner solver and certificate.
This module holds the language's part: the ``argmin`` marker primitive, its static
:class:`ArgminSpec` and :func:`find_argmins`; ``ex.argmin`` itself (validation, the inner
problem, the solve, the hypergradient methods) is ``estimax.solvers._argmin``.
"""

from __future__ import annotations

import dataclasses

from ..runtime import _jax_compat as compat

argmin_p = compat.Primitive("estimax_argmin")
#: the name scope around an inner solve (see ``transforms/_smoothness``)
ARGMIN_SCOPE = "estimax_argmin_solve"
argmin_p.multiple_results = True


@dataclasses.dataclass(frozen=True)
class ArgminSpec:
    """What ``explain`` shows of one ``ex.argmin``: its name, hypergradient method, inner
    solver, linear solver, the certificate of its derivatives and where it is written."""

    name: str
    method: str
    solver: str
    linear_solver: str
    certificate: str
    location: str | None
    n: int
    m_eq: int
    m_in: int

    def describe_method(self) -> str:
        if self.method == "implicit":
            return f"implicit ({self.linear_solver})"
        return self.linear_solver  # "unrolled, N steps (last K differentiated)"


def _impl(*, spec):
    del spec
    return []


def _abstract_eval(*, spec):
    del spec
    return []


def _batch(args, dims, *, spec):
    del args, dims
    return argmin_p.bind(spec=spec), []


def _jvp(primals, tangents, *, spec):
    del primals, tangents
    return argmin_p.bind(spec=spec), []


compat.register_rules(argmin_p, impl=_impl, abstract_eval=_abstract_eval, batching_rule=_batch, jvp_rule=_jvp)


def find_argmins(jaxpr) -> list:
    """The specs of every ``ex.argmin`` in ``jaxpr`` (nested jaxprs included), in order."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive is argmin_p:
            out.append(eqn.params["spec"])
        for sub in compat.subjaxprs_of(eqn):
            out.extend(find_argmins(sub))
    return out


__all__ = ["ARGMIN_SCOPE", "ArgminSpec", "argmin_p", "find_argmins"]
