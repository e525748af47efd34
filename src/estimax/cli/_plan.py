"""``estimax check`` and ``estimax explain``: stage the objective and its gradient estimator,
and print the estimator plan, with each site's line in the file."""

from __future__ import annotations

import os

import jax

import estimax as ex
from ..transforms._constraints import split
from ._errors import _EXIT_OK, _Invocation
from ._inputs import _declarations, _load_npz, _load_program, _read_data, _tree_from_arrays

def _summary(program, dims: dict, dims_given: bool) -> str:
    direction = "maximize" if program.maximize else "minimize"
    parts = [direction]
    if program.params:
        parts.append("parameters " + _declarations(program.params.values()))
    if program.data:
        parts.append("data " + _declarations(program.data.values()))
    named = {}  # each named size, as the declarations resolve it (a default without data)
    for d in (*program.params.values(), *program.data.values()):
        for size, value in zip(d.shape, d.concrete_shape(dims)):
            if isinstance(size, str):
                named.setdefault(size, value)
    if named:
        sizes = ", ".join(f"{n}={named[n]}" for n in sorted(named))
        parts.append(f"sizes {sizes}" + ("" if dims_given else " (a default; --data gives the data's sizes)"))
    return "\n  ".join(parts)  # one part a line: a summary fits in 80 columns


# --- staging and the plan ------------------------------------------------------------------


def _stage(program, params, data):
    """The plan of the program at these inputs; also traces its gradient estimator, so that
    every error that training would meet at trace time is met here."""
    plan = ex.explain(program.objective, params, data)
    key = jax.random.PRNGKey(0)
    if not plan.constraints:
        jax.eval_shape(ex.value_and_grad(program.objective), key, params, data)
        return plan
    parts = split(program.objective, (params, data))
    flat = jax.tree_util.tree_leaves((params, data))
    for piece in (parts.objective, *parts.constraints):  # each expectation's estimator, as the solver builds it
        if piece.stochastic:
            jax.eval_shape(jax.grad(piece.flat_program().estimate, argnums=1), key, *flat)
    return plan


def _site_location(program, site: str) -> tuple[int, int] | None:
    """Where the site named ``site`` is written (nested sites are named ``"expect/z"``)."""
    return program.sites.get(site) or program.sites.get(site.rsplit("/", 1)[-1])


def _table(header: tuple, rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
    return lines + [fmt.format(*(str(c) for c in r)).rstrip() for r in rows]


def _plan_table(program, plan, tracking="auto") -> str:
    """The per-site table with each site's line in the file (and its variance, if measured);
    ``tracking``: how ``run`` estimates the compositions (``"auto"`` before a run chooses,
    else the method, or ``None`` for the plug-in)."""
    header = ("site", "line", "distribution", "strategy", "why", "where")
    measured = plan.total_variance is not None
    if measured:
        header += ("grad variance",)
    rows = []
    for s in plan.sites:
        at = _site_location(program, s.name)
        row = (
            s.name,
            f"{at[0]}:{at[1]}" if at else "?",
            s.distribution,
            s.describe_strategy(),
            s.reason,
            s.context,
        )
        if measured:
            row += ("n/a" if s.variance is None else f"{s.variance:.4g} ± {s.variance_se:.2g}",)
        rows.append(row)
    lines = [f"estimator plan for {os.path.basename(program.filename)}"]
    lines += _table(header, rows) if rows else ["(no random choices)"]
    per_element = [f"{s.name} ({s.elements} elements)" for s in plan.sites if s.elements]
    if per_element:
        lines.append("score terms Rao-Blackwellized per element: " + ", ".join(per_element))
    if measured:
        lines.append(f"total gradient variance (trace of the covariance): {plan.total_variance:.4g}")
    lines.append(f"certificate: {plan.certificate}")
    if plan.constraints:
        lines.append("constraints (`estimax run` solves the constrained problem with its Lagrangian):")
        rows = [(name, f"{os.path.basename(where)}" if where else "?", kind, mult) for name, kind, mult, where in plan.constraints]
        lines += _table(("constraint", "line", "kind", "multiplier"), rows)
    if plan.argmins:
        lines.append("inner problems (argmin):")
        rows = [(a.name, os.path.basename(a.location) if a.location else "?", a.solver, a.describe_method(),
                 a.certificate) for a in plan.argmins]
        lines += _table(("argmin", "line", "inner solver", "hypergradient", "certificate"), rows)
    if plan.compositions:
        lines.append("nonlinear functions of expectations (compositions):")
        rows = [(call, where.rsplit(":", 1)[-1] if where else "?", _estimated_by(tracking, how))
                for call, how, where in plan.compositions]
        lines += _table(("expectation", "line", "estimated by"), rows)
    return "\n".join(lines)


def _estimated_by(tracking, how: str) -> str:
    """How ``run`` estimates one composition: tracked (and how), or the plug-in."""
    if tracking is None:
        return "plug-in: the estimate in the function, biased (--tracking none)"
    if tracking == "auto":
        return f"`run`: tracked by SCGD(beta=0.1) ({how}); --tracking chooses"
    return f"tracked by {tracking!r}: {how}"


# --- check, explain ------------------------------------------------------------------------


def _cmd_check(args, invocation: _Invocation) -> int:
    program = _load_program(args.file, invocation, allow_imports=args.allow_import)
    _, dims = _read_data(program, args.data, needed=False, invocation=invocation)
    params = program.init_params(dims)
    plan = _stage(program, params, program.abstract_data(dims))
    print(f"{program.filename}: ok: {_summary(program, dims, args.data is not None)}")
    print(_plan_table(program, plan))
    return _EXIT_OK


def _cmd_explain(args, invocation: _Invocation) -> int:
    program = _load_program(args.file, invocation, allow_imports=args.allow_import)
    data, dims = _read_data(program, args.data, needed=args.variance, invocation=invocation)
    params = program.init_params(dims)
    if args.params is not None:
        params = _tree_from_arrays(params, _load_npz(args.params, "parameter"), args.params, prefix="")
    plan = _stage(program, params, program.abstract_data(dims))
    if args.variance:
        inputs = data if data is not None else {}
        plan = ex.explain(program.objective, params, inputs, variance=True, key=jax.random.PRNGKey(args.seed))
    print(f"{program.filename}: {_summary(program, dims, args.data is not None)}")
    if args.params is not None:
        print(f"parameters from {args.params}")
    print(_plan_table(program, plan))
    return _EXIT_OK
