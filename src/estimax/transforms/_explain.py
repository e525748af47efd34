"""``ex.explain``: the per-site plan of a program's estimator, and its certificate.

The plan is data (:class:`Plan`, its sites :class:`~estimax.SitePlan`); ``str(plan)`` is the
table the command prints. The certificate comes from :mod:`._certify`.
"""

from __future__ import annotations

import dataclasses

from .._errors import ProgramError
from ..dsl._argmin import find_argmins
from ._certify import (RANK, Certificate, SitePlan, certify, collect_sites, context_label, differentiated_leaves,
                       mark_elements, require_certificate, without_gradient)
from ._compositional import tracked_items
from ._constraints import is_constrained, split
from ._estimate import as_program
from ._smoothness import with_defaults
from ._variance import site_variances


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``explain`` returns: the per-site plan and the estimator's certificate."""

    program: str
    sites: tuple[SitePlan, ...]
    certificate: Certificate
    #: total gradient variance (trace of the covariance), when measured
    total_variance: float | None = None
    #: a constrained program's constraints: (name, kind, multiplier, where) each
    constraints: tuple = ()
    #: the program's inner problems (``ex.argmin``): an ``ArgminSpec`` each
    argmins: tuple = ()
    #: the expectations used nonlinearly (compositions): (call, tracked as, where) each
    compositions: tuple = ()

    def site(self, name: str) -> SitePlan:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site named {name!r}; sites: {[s.name for s in self.sites]}")

    def __str__(self) -> str:
        header = ("site", "distribution", "strategy", "why", "where")
        rows = [
            (s.name, s.distribution, s.describe_strategy(), s.reason, s.context) for s in self.sites
        ]
        if self.total_variance is not None:
            header = header + ("grad variance",)
            rows = [
                r + ("n/a" if s.variance is None else f"{s.variance:.4g} ± {s.variance_se:.2g}",)
                for r, s in zip(rows, self.sites)
            ]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [f"estimator plan for {self.program}"]
        if rows:
            lines += [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
            lines += [fmt.format(*r).rstrip() for r in rows]
        else:
            lines.append("(no random choices)")
        per_element = [f"{s.name} ({s.elements} elements)" for s in self.sites if s.elements]
        if per_element:
            lines.append("score terms Rao-Blackwellized per element: " + ", ".join(per_element))
        if self.total_variance is not None:
            lines.append(f"total gradient variance (trace of the covariance): {self.total_variance:.4g}")
        lines.append(f"certificate: {self.certificate}")
        if self.constraints:
            rows = [("constraint", "kind", "multiplier", "where"), *self.constraints]
            widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
            fmt = "  ".join(f"{{:<{w}}}" for w in widths)
            lines.append("constraints (solved with ex.solve, which builds their Lagrangian):")
            lines += [fmt.format(*rows[0]).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
            lines += [fmt.format(*r).rstrip() for r in rows[1:]]
        if self.argmins:
            rows = [("argmin", "variables", "inner solver", "hypergradient", "certificate", "where")]
            for a in self.argmins:
                size = f"{a.n}" + (f", {a.m_eq} eq" if a.m_eq else "") + (f", {a.m_in} ineq" if a.m_in else "")
                rows.append((a.name, size, a.solver, a.describe_method(), a.certificate, a.location or "?"))
            widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
            fmt = "  ".join(f"{{:<{w}}}" for w in widths)
            lines.append("inner problems (ex.argmin):")
            lines += [fmt.format(*rows[0]).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
            lines += [fmt.format(*r).rstrip() for r in rows[1:]]
        if self.compositions:
            rows = [("expectation used nonlinearly", "tracked by ex.fit as", "where"), *self.compositions]
            widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
            fmt = "  ".join(f"{{:<{w}}}" for w in widths)
            lines.append("compositions (ex.fit tracks them across steps: estimax.tracking):")
            lines += [fmt.format(*rows[0]).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
            lines += [fmt.format(*r).rstrip() for r in rows[1:]]
        return "\n".join(lines)

    __repr__ = __str__


def explain(objective, *args, variance: bool = False, key=None, argnums=0, samples=(32, 16),
            require: str | None = None) -> Plan:
    """The per-site plan and the certificate of ``objective``'s estimator at ``args``.

    ``args`` are the program's arguments (no key); only their shapes and dtypes matter --
    unless ``variance=True``: then the gradient estimator (with respect to ``argnums``) is
    run at ``args`` and each site's contribution to its variance is measured: the expected
    variance of the gradient when only that site's random numbers change,
    ``E[Var(ĝ | all other sites)]``, summed over gradient coordinates (``samples`` =
    (outer, inner) draws; needs ``key``). A site with a large share is the one to give a
    better strategy or baseline. Sites in nested expectations are measured (all their draws
    changed together); sites in loop bodies show ``n/a`` (one key drives every iteration).

    ``argnums`` also says which arguments are differentiated for the certificate: a
    comparison of a differentiated argument (``z > theta``) makes it ``biased``, one of
    data does not. ``require="unbiased"`` (or ``"consistent"``) raises
    :class:`~estimax.CertificateError` when the certificate is weaker.
    """
    program = as_program(objective, "ex.explain")
    closed, _, _ = program.stage(args)
    jaxpr = with_defaults(closed.jaxpr)
    sites = collect_sites(jaxpr)
    sites = [dataclasses.replace(s, context=context_label(s.context)) for s in sites]
    sites = mark_elements(jaxpr, sites)
    differentiated = differentiated_leaves(args, argnums) if args else None
    sites = without_gradient(jaxpr, sites, differentiated)
    total = None
    if variance:
        if key is None:
            raise ProgramError("ex.explain(..., variance=True) needs key= to draw the estimates.")
        measured, total = site_variances(program, closed, args, sites, key=key, argnums=argnums, samples=samples)
        sites = [
            dataclasses.replace(s, variance=measured[s.name][0], variance_se=measured[s.name][1])
            if s.name in measured
            else s
            for s in sites
        ]
    certificate = certify(jaxpr, sites, differentiated)
    declared = program.declared_certificate
    if declared is not None:
        kind, reason = declared
        if RANK[kind] > RANK[certificate.kind]:
            certificate = Certificate(kind, certificate.reasons + (reason,))
        else:
            certificate = Certificate(certificate.kind, certificate.reasons + (reason,))
    argmins = tuple(find_argmins(closed.jaxpr))
    for a in argmins:
        if a.method == "implicit":
            reason = (f"argmin {a.name!r}: implicit differentiation, exact up to the inner solver's tolerance "
                      "(a converged inner solve is checked at run time)")
        else:
            reason = (f"argmin {a.name!r}: {a.linear_solver}: the exact derivative of a truncated solve, "
                      "consistent as the solve converges")
        kind = certificate.kind if a.method == "implicit" or RANK[certificate.kind] >= RANK["consistent"] \
            else "consistent"
        certificate = Certificate(kind, certificate.reasons + (reason,))
    constraints = ()
    if is_constrained(closed.jaxpr):
        constraints = tuple(
            (c.name, c.describe(), f"λ[{c.name}]" if c.kind == "eq" else f"μ[{c.name}] >= 0", c.location or "?")
            for c in split(program, args).constraints
        )
    plan = Plan(program.name, tuple(sites), certificate, total, constraints, argmins, _compositions(closed.jaxpr))
    require_certificate(plan, require, f"ex.explain({program.name})")
    return plan


def _compositions(jaxpr) -> tuple:
    try:
        items = tracked_items(jaxpr)
    except Exception as e:  # a composition the pass cannot track: say so in the table
        return (("?", f"not trackable: {e}", ""),)
    rows = []
    for it in items:
        s = it.spec
        how = (f"one estimate per index (of {s.size})" if s.indexed else "one running estimate") + (
            ", in log space" if s.log else "")
        rows.append((s.call, how, s.location or "?"))
    return tuple(rows)


__all__ = ["Plan", "explain"]
