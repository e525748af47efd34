"""The flat view of a constrained problem that every solver works on.

A :class:`Problem` holds a split program (:mod:`estimax.transforms._constraints`), how to
flatten its parameters to one vector ``x``, and the parameter bounds. Bound to the data
(:meth:`Problem.bind`, inside the compiled solver loop) it gives the three functions every
solver needs, each of ``(x, key)``:

- ``f(x, key)``: the objective to **minimize** (negated for ``maximize=True``);
- ``eq(x, key)``: the equality constraints, one vector (``eq == 0``);
- ``ineq(x, key)``: the inequality constraints and the bounds, one vector (``ineq <= 0``).

Deterministic pieces ignore ``key`` and are exact; a piece that depends on random choices
is its estimator's unbiased estimate, whose ``jax.grad`` (and JVP/VJP) is the estimator
pass's unbiased derivative estimate.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .._errors import ProgramError
from ..runtime import _jax_compat as compat
from ..transforms._constraints import Constrained, Piece


@dataclasses.dataclass(frozen=True, eq=False)
class Segment:
    """Where one named constraint (or bound) sits in the flat ``eq``/``ineq`` vector."""

    name: str
    kind: str  # "eq" or "le"
    start: int
    shape: tuple
    stochastic: bool

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=int))


class Problem:
    """A constrained program, flattened for solvers (see the module doc)."""

    def __init__(self, split: Constrained, params, *, bounds=None, maximize: bool = False):
        self.split = split
        x0, self.unravel = ravel_pytree(params)
        if not jnp.issubdtype(x0.dtype, jnp.floating):
            raise ProgramError(f"ex.solve: the parameters must be floating point; they flatten to dtype {x0.dtype}.")
        self.dtype = x0.dtype
        self.n = int(x0.size)
        self.maximize = bool(maximize)
        self._programs: dict[str, Any] = {}
        self.eq_segments: list[Segment] = []
        self.ineq_segments: list[Segment] = []
        start = {"eq": 0, "le": 0}
        for c in split.constraints:
            seg = Segment(c.name, c.kind, start[c.kind], c.shape, c.stochastic)
            start[c.kind] += seg.size
            (self.eq_segments if c.kind == "eq" else self.ineq_segments).append(seg)
        self.lower, self.upper = _bounds(bounds, params, self.unravel, x0)
        self._lower_idx = np.flatnonzero(np.isfinite(self.lower))
        self._upper_idx = np.flatnonzero(np.isfinite(self.upper))
        for label, idx in (("lower", self._lower_idx), ("upper", self._upper_idx)):
            if idx.size:
                self.ineq_segments.append(Segment(f"bounds/{label}", "le", start["le"], (int(idx.size),), False))
                start["le"] += int(idx.size)
        self.m_eq, self.m_in = start["eq"], start["le"]
        self.x0 = x0

    # -- what a solver reads ---------------------------------------------------------------
    @property
    def stochastic(self) -> bool:
        return self.split.stochastic

    def bind(self, data_leaves, consts=None) -> "Bound":
        """The problem with its data; ``consts`` replace the staged program's constants (the
        values it closes over) when given: ``ex.argmin`` passes them in as inputs."""
        return Bound(self, tuple(data_leaves), None if consts is None else tuple(consts))

    def _value(self, piece: Piece, x, data, key, consts=None):
        leaves = jax.tree_util.tree_leaves(self.unravel(x))
        if not piece.stochastic:
            if consts is not None:
                return compat.eval_jaxpr(piece.jaxpr, consts, *leaves, *data)[0]
            return piece(*leaves, *data)
        prog = self._programs.get(id(piece))  # by identity: the objective may share a constraint's name
        if prog is None:
            prog = self._programs[id(piece)] = piece.flat_program()
        return prog.estimate(key, *leaves, *data)

    # -- results -----------------------------------------------------------------------------
    def multipliers(self, lam, mu) -> dict:
        """The flat multiplier vectors as a dict by constraint name (bounds by side)."""
        out = {}
        for seg in self.eq_segments:
            out[seg.name] = jnp.reshape(lam[seg.start:seg.start + seg.size], seg.shape)
        for seg in self.ineq_segments:
            out[seg.name] = jnp.reshape(mu[seg.start:seg.start + seg.size], seg.shape)
        return out


class Bound:
    """A :class:`Problem` with its data: ``f``, ``eq``, ``ineq`` of ``(x, key)``."""

    def __init__(self, problem: Problem, data, consts=None):
        self.problem, self.data, self.consts = problem, data, consts
        self.n, self.m_eq, self.m_in = problem.n, problem.m_eq, problem.m_in
        self.stochastic = problem.stochastic
        self.dtype = problem.dtype

    def _keys(self, key, n):
        return jax.random.split(key, n) if n > 1 else [key]

    def f(self, x, key=None) -> jax.Array:
        p = self.problem
        value = p._value(p.split.objective, x, self.data, _key(key), self.consts).astype(self.dtype)
        return -value if p.maximize else value

    def eq(self, x, key=None) -> jax.Array:
        return self._stack(self.problem.eq_segments, x, key)

    def ineq(self, x, key=None) -> jax.Array:
        p = self.problem
        parts = [self._stack([s for s in p.ineq_segments if not s.name.startswith("bounds/")], x, key)]
        if p._lower_idx.size:
            parts.append(jnp.asarray(p.lower[p._lower_idx], self.dtype) - x[p._lower_idx])
        if p._upper_idx.size:
            parts.append(x[p._upper_idx] - jnp.asarray(p.upper[p._upper_idx], self.dtype))
        return jnp.concatenate(parts) if parts else jnp.zeros((0,), self.dtype)

    def _stack(self, segments, x, key):
        if not segments:
            return jnp.zeros((0,), self.dtype)
        key = _key(key)
        keys = self._keys(key, len(segments))
        pieces = {c.name: c for c in self.problem.split.constraints}
        vals = [jnp.ravel(self.problem._value(pieces[s.name], x, self.data, k, self.consts)).astype(self.dtype)
                for s, k in zip(segments, keys)]
        return jnp.concatenate(vals)


def _key(key):
    return jax.random.PRNGKey(0) if key is None else key


def _bounds(bounds, params, unravel, x0) -> tuple[np.ndarray, np.ndarray]:
    """Flat lower/upper bound vectors from ``bounds``: ``None``, a ``(lower, upper)`` pair of
    pytrees like ``params`` (``None`` leaves or ``±inf`` entries for no bound), or a dict
    ``{name: (lower, upper)}`` for dict parameters."""
    n = x0.size
    lower, upper = np.full(n, -np.inf), np.full(n, np.inf)
    if bounds is None:
        return lower, upper
    if isinstance(bounds, dict) and isinstance(params, dict):
        unknown = sorted(set(bounds) - set(params))
        if unknown:
            raise ProgramError(f"ex.solve: bounds for {unknown}, which are not parameters (they are {sorted(params)}).")
        lo_tree = {k: (bounds[k][0] if k in bounds else None) for k in params}
        hi_tree = {k: (bounds[k][1] if k in bounds else None) for k in params}
    elif isinstance(bounds, tuple) and len(bounds) == 2:
        lo_tree, hi_tree = bounds
    else:
        raise ProgramError(
            "ex.solve: bounds= takes a (lower, upper) pair shaped like the parameters, or a dict "
            "{name: (lower, upper)} for dict parameters."
        )
    out = []
    for side, tree, fill in (("lower", lo_tree, -np.inf), ("upper", hi_tree, np.inf)):
        out.append(_flat_side(side, tree, params, fill))
    lower, upper = out
    bad = np.flatnonzero(lower > upper)
    if bad.size:
        raise ProgramError(f"ex.solve: a lower bound exceeds its upper bound at flat index {int(bad[0])} "
                           f"({lower[bad[0]]} > {upper[bad[0]]}).")
    return lower, upper


def _flat_side(side: str, tree, params, fill) -> np.ndarray:
    if tree is None:
        return np.full(ravel_pytree(params)[0].size, fill)
    p_leaves, p_def = jax.tree_util.tree_flatten(params)
    if not isinstance(params, (dict, list, tuple)) or len(p_leaves) == 1 and not isinstance(tree, (dict, list, tuple)):
        tree_leaves = [tree]
    else:
        try:
            tree_leaves = p_def.flatten_up_to(tree)
        except (ValueError, TypeError) as e:
            raise ProgramError(f"ex.solve: the {side} bounds are not shaped like the parameters: {e}") from None
    flat = []
    for i, (b, p) in enumerate(zip(tree_leaves, p_leaves)):
        shape = np.shape(p)
        if b is None:
            flat.append(np.full(shape, fill, float))
            continue
        try:
            flat.append(np.broadcast_to(np.asarray(b, float), shape))
        except ValueError:
            raise ProgramError(
                f"ex.solve: the {side} bound of parameter leaf {i} has shape {np.shape(b)}; the parameter "
                f"has shape {shape}."
            ) from None
    return np.concatenate([np.ravel(f) for f in flat]) if flat else np.zeros(0)
