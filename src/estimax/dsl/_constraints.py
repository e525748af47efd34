"""Constraints stated inside a program: ``ex.subject_to(eq=..., le=..., ge=...)``.

A program that states constraints is a constrained problem::

    def problem(x):
        ex.subject_to(eq=jnp.sum(x ** 2) - 1.0, name="sphere")     # sum(x²) = 1
        ex.subject_to(le=x[0] - 0.5, name="cap")                    # x[0] <= 0.5
        return jnp.sum(x)                                           # the objective

    ex.solve(problem, x0, solver=ex.solvers.ExactAL())

``subject_to`` binds the ``constraint`` primitive of the IR (one equation per call, with the
constraint's value as its operand). The constraints pass
(:mod:`estimax.transforms._constraints`) splits a staged program into its objective and its
constraints; the estimator pass refuses the primitive, so a constrained program is never
silently differentiated as if it had no constraints.

A constraint whose value depends on random choices (``ex.sample``) is a constraint *in
expectation*: ``E[g(x, ξ)] <= 0``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from .._errors import ArgumentError, EstimaxError
from ..runtime import _jax_compat as compat
from ._ir import find
from ._primitives import _caller_location, _current_scope

@dataclasses.dataclass(frozen=True)
class ConstraintSpec:
    """A constraint's name, kind (``"eq"``: value = 0, ``"le"``: value <= 0) and where it is
    written; ``stated`` is how the user wrote it (``"ge"`` is kept as ``-value <= 0``)."""

    name: str
    kind: str
    location: str | None
    stated: str | None = None

    def __repr__(self) -> str:
        return f"constraint({self.name!r}, {self.kind})"


constraint_p = compat.Primitive("estimax_constraint")
constraint_p.multiple_results = True


def _not_solved(*, spec: ConstraintSpec, **_):
    return EstimaxError(
        f"this program states constraints (ex.subject_to {spec.name!r}, at {spec.location or '?'}); "
        "a constrained program is solved with ex.solve(program, params, ..., solver=...), which "
        "builds its Lagrangian. To estimate or differentiate the objective alone, remove the "
        "ex.subject_to calls."
    )


def _impl(value, *, spec):
    raise _not_solved(spec=spec)


def _abstract_eval(value, *, spec):
    del value, spec
    return []


def _batch(args, dims, *, spec):
    raise EstimaxError(
        f"constraint {spec.name!r} (at {spec.location or '?'}) is inside jax.vmap or ex.vmap; state "
        "constraints at the top level of the program (a vector constraint covers many at once)."
    )


def _jvp(primals, tangents, *, spec):
    del primals, tangents
    raise _not_solved(spec=spec)


compat.register_rules(
    constraint_p,
    impl=_impl,
    abstract_eval=_abstract_eval,
    batching_rule=_batch,
    jvp_rule=_jvp,
    lowering_error=_not_solved,
)

def subject_to(*, eq=None, le=None, ge=None, name: str | None = None) -> None:
    """State a constraint of the enclosing program: exactly one of

    - ``eq=h``: ``h == 0``;
    - ``le=g``: ``g <= 0``;
    - ``ge=g``: ``g >= 0`` (stored as ``-g <= 0``).

    The value may be a scalar or an array (one constraint per entry, one multiplier per
    entry). ``name`` names the constraint in ``explain`` and in the solution's multipliers
    (default ``"eq_0"``, ``"le_1"``, ... in order of appearance). A value that depends on
    random choices is a constraint in expectation.
    """
    given = {k: v for k, v in (("eq", eq), ("le", le), ("ge", ge)) if v is not None}
    if len(given) != 1:
        raise ArgumentError(
            "ex.subject_to takes exactly one of eq= (value == 0), le= (value <= 0) or ge= (value >= 0); "
            f"got {', '.join(k + '=' for k in given) or 'none'}."
        )
    (kind, value), = given.items()
    if name is not None and (not isinstance(name, str) or not name):
        raise ArgumentError(f"ex.subject_to(name=...) expects a non-empty string; got {name!r}.")
    if isinstance(value, bool) or not _is_numeric(value):
        raise ArgumentError(
            f"ex.subject_to({kind}=...) expects a number or an array (the constraint's value); got "
            f"{type(value).__name__}. Write `{kind}=lhs - rhs`, not a comparison."
        )
    value = jnp.asarray(value)
    if not compat.is_float_dtype(value.dtype):
        what = "booleans (a comparison?)" if value.dtype == jnp.bool_ else f"dtype {value.dtype}"
        raise ArgumentError(
            f"ex.subject_to({kind}=...): the constraint's value must be floating point; got {what}. "
            f"Write `{kind}=lhs - rhs` for `lhs {'==' if kind == 'eq' else '<=' if kind == 'le' else '>='} rhs`."
        )
    stated = kind
    if kind == "ge":
        value, kind = -value, "le"
    counts = _current_scope().counts  # per staging of the program, like derived site names
    index = counts.get("#constraint", 0)
    counts["#constraint"] = index + 1
    if name is None:
        name = f"{kind}_{index}"
    constraint_p.bind(value, spec=ConstraintSpec(name, kind, _caller_location(), stated))


def _is_numeric(x) -> bool:
    return isinstance(x, (int, float, np.ndarray, np.generic)) or hasattr(x, "dtype") and hasattr(x, "shape")


def first_constraint(jaxpr) -> ConstraintSpec | None:
    """The spec of the first constraint stated in ``jaxpr`` (or a jaxpr nested in it)."""
    hit = find(jaxpr, constraint_p)
    return None if hit is None else hit[0].params["spec"]


def refuse_constraints(jaxpr) -> None:
    """Raise the error that says a constrained program is solved with ``ex.solve``."""
    spec = first_constraint(jaxpr)
    if spec is not None:
        raise _not_solved(spec=spec)
