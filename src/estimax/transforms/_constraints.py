"""The constraints pass: a program with ``ex.subject_to`` becomes an objective and constraints.

:func:`split` stages the program once and cuts its jaxpr into pieces: the objective (the
program's value) and one piece per ``subject_to`` (the constraint's value), each the part of
the program that piece needs (dead-code elimination), each an ordinary program again. The
solvers build the (augmented) Lagrangian from these pieces; a piece whose value depends on
random choices is an expectation, whose gradient the estimator pass estimates, so a
constraint ``E[g(x, ξ)] <= 0`` gets an unbiased gradient like an objective does.

The checks that name the user's mistake happen here: a constraint that does not depend on
the optimized parameters, a constraint inside ``jax.jit``/``lax.cond``/``lax.scan`` (state
it at the top level), two constraints with one name, an objective that is not a scalar.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Sequence

import jax

from .._errors import ProgramError, UnsupportedError
from ..dsl import _ir as ir
from ..dsl._constraints import ConstraintSpec, constraint_p, first_constraint
from ..runtime import _jax_compat as compat
from ._estimate import Expectation, as_program


class _Diagnosing(threading.local):
    on = False


#: set while ``ex.solve`` replays a failed step to find its first NaN
DIAGNOSING = _Diagnosing()


@dataclasses.dataclass(frozen=True, eq=False)
class Piece:
    """The objective or one constraint of a constrained program."""

    name: str
    kind: str  # "objective", "eq" (value == 0) or "le" (value <= 0)
    shape: tuple
    dtype: Any
    location: str | None
    stochastic: bool  # depends on random choices: an expectation
    jaxpr: Any  # open Jaxpr over (consts, *flat args), one output
    consts: tuple
    stated: str | None = None  # "ge" for a constraint the user wrote as value >= 0

    def __call__(self, *flat_args):
        """The piece's value (deterministic pieces only; random ones need an estimator)."""
        if DIAGNOSING.on:  # a replay under jax.debug_nans: say which piece, operation and line
            what = "in the objective" if self.kind == "objective" else f"in constraint {self.name!r}"
            return compat.eval_jaxpr_located(self.jaxpr, self.consts, *flat_args, context=what)[0]
        return compat.eval_jaxpr(self.jaxpr, self.consts, *flat_args)[0]

    def flat_program(self) -> Expectation:
        """The piece as a program of the flat arguments: its ``.estimate`` is an unbiased
        estimate, and ``jax.grad`` of that an unbiased gradient estimate."""
        jaxpr, consts = self.jaxpr, self.consts

        def fn(*flat_args):
            return compat.eval_jaxpr(jaxpr, consts, *flat_args)[0]

        fn.__name__ = self.name
        return Expectation(fn, name=self.name)

    def describe(self) -> str:
        shape = "scalar" if not self.shape else f"shape {self.shape}"
        expect = "E[...] " if self.stochastic else ""
        if self.stated == "ge":
            return f"{expect}>= 0 ({shape}; solved as -value <= 0)"
        return f"{expect}{'== 0' if self.kind == 'eq' else '<= 0'} ({shape})"


@dataclasses.dataclass(frozen=True, eq=False)
class Constrained:
    """A program split into its objective and constraints (see :func:`split`)."""

    name: str
    objective: Piece
    constraints: tuple[Piece, ...]
    in_tree: Any
    n_param_leaves: int  # the first leaves of the flat arguments are the optimized parameters

    @property
    def stochastic(self) -> bool:
        return self.objective.stochastic or any(c.stochastic for c in self.constraints)


def _nested_constraint(jaxpr) -> Any:
    """``(top-level equation, constraint equation)`` for the first ``constraint`` equation
    nested inside another equation of ``jaxpr``, if any."""
    hit = ir.find(jaxpr, constraint_p, nested_only=True)
    return None if hit is None else (hit[1][0], hit[0])


def split(program, args: Sequence, *, n_param_leaves: int | None = None) -> Constrained:
    """Split ``program(*args)`` into its objective and its constraints.

    ``n_param_leaves``: how many leading leaves of the flattened ``args`` are the optimized
    parameters (default: those of ``args[0]``); every constraint must depend on them.
    """
    program = as_program(program, "ex.solve")
    args = tuple(args)
    closed, in_tree, out_tree = program.stage(args)
    jaxpr = closed.jaxpr
    if n_param_leaves is None:
        n_param_leaves = len(jax.tree_util.tree_leaves(args[0]))
    if len(jaxpr.outvars) != 1 or jaxpr.outvars[0].aval.shape != ():
        shapes = [tuple(v.aval.shape) for v in jaxpr.outvars]
        raise ProgramError(
            f"program {program.name!r}: the objective (the program's value) must be a scalar; it "
            f"returns {shapes[0] if len(shapes) == 1 else f'{len(shapes)} values {shapes}'}. Reduce it, "
            "e.g. with jnp.sum or jnp.mean."
        )
    nested = _nested_constraint(jaxpr)
    if nested is not None:
        outer, inner = nested
        spec: ConstraintSpec = inner.params["spec"]
        raise UnsupportedError(
            f"constraint {spec.name!r} (at {spec.location or '?'}) is stated inside `{outer.primitive.name}` "
            "(jax.jit, lax.cond, lax.scan, a custom derivative, ...); state constraints at the top "
            "level of the program, where their values can be read."
        )
    eqns = [e for e in jaxpr.eqns if e.primitive is not constraint_p]
    specs, values = [], []
    seen: dict[str, ConstraintSpec] = {}
    for e in jaxpr.eqns:
        if e.primitive is not constraint_p:
            continue
        spec = e.params["spec"]
        if spec.name in seen:
            raise ProgramError(
                f"two constraints are named {spec.name!r} (at {seen[spec.name].location or '?'} and "
                f"{spec.location or '?'}); constraint names must be unique in a program."
            )
        seen[spec.name] = spec
        specs.append(spec)
        values.append(e.invars[0])
    full = compat.with_outputs(jaxpr, [jaxpr.outvars[0], *values], eqns)

    def piece(i: int, name: str, kind: str, location, stated=None) -> Piece:
        used = [j == i for j in range(len(full.outvars))]
        kept, used_inputs = compat.dce_jaxpr(full, used, instantiate=True)
        var = full.outvars[i]
        aval = var.aval
        if kind != "objective" and not any(used_inputs[:n_param_leaves]):
            raise ProgramError(
                f"constraint {name!r} (at {location or '?'}) does not depend on the optimized parameters "
                "(the program's first argument): it cannot be changed by the solver. Remove it, or "
                "make it a function of the parameters."
            )
        return Piece(
            name=name, kind=kind, shape=tuple(aval.shape), dtype=aval.dtype, location=location,
            stochastic=ir.contains_random(kept), jaxpr=kept, consts=tuple(closed.consts), stated=stated,
        )

    objective = piece(0, program.name, "objective", None)
    constraints = tuple(piece(i + 1, s.name, s.kind, s.location, s.stated) for i, s in enumerate(specs))
    del out_tree
    return Constrained(program.name, objective, constraints, in_tree, n_param_leaves)


def is_constrained(jaxpr) -> bool:
    """Whether ``jaxpr`` (or a jaxpr nested in it) states a constraint."""
    return first_constraint(jaxpr) is not None
