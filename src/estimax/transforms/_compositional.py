"""The tracking pass: nonlinear functions of expectations, estimated consistently.

A program that applies a nonlinear ``f`` to an expectation -- ``log E_q[w]``, a variance
``E[L²] - E[L]²``, a per-anchor normalizer -- has no unbiased gradient estimator from a
bounded number of draws, and plugging one Monte Carlo mean into ``f`` is biased
(``explain`` says so). This pass rewrites such a program to carry **state across steps**:
a running estimate ``u`` of each expectation used nonlinearly, so that the gradient at step
``t`` is

    f'(u_t) · ∇ĝ(θ_t; ξ_t)        (chain rule, with the tracked value in f')

where ``ĝ`` is the inner expectation's own unbiased estimate (its sites' strategies give
``∇ĝ``). Technically each tracked ``ex.expect`` equation is replaced by
``u_t + (ĝ - stop_gradient(ĝ))``: its *value* is the tracked estimate, its *derivative*
that of a fresh draw. The rest of the program, and the estimator pass that runs it, are
unchanged. The estimator is consistent, not unbiased: ``u_t`` converges to ``E[g(θ_t)]``
as ``θ`` settles and ``β → 0``.

The update of ``u`` at step ``t`` (``ĝ_t = ĝ(θ_t; ξ_t)``; a new item starts at ``ĝ_t``):

- ``SCGD``  (Wang, Fang & Liu, stochastic compositional gradient descent):
  ``u_t = (1-β) u_{t-1} + β ĝ_t``;
- ``SOX``   (Wang & Yang, finite-sum coupled compositional optimization): the same moving
  average, one per index ``i`` of a finite sum ``(1/m) Σᵢ fᵢ(E[gᵢ])``, updated only for the
  indices drawn this step (``ex.expect(..., index=i, size=m)``);
- ``MSVR``  (Jiang et al., multi-block-single-probe variance reduction):
  ``u_t = (1-β) u_{t-1} + β ĝ_t + γ (ĝ_t - ĝ(θ_{t-1}; ξ_t))``, the correction evaluated with
  the *same* draws at the previous parameters (one extra forward pass per step);
  ``γ = (m - B)/(B (1-β)) + (1-β)`` for ``B`` indices of ``m`` per step, ``1-β`` without an
  index.

All three use the *updated* ``u_t`` in ``f'`` (as SCGD does). The outer update is the
optimizer's (optax: momentum for SOX's ``v_t``, Adam, ...).

``ex.log_expect`` (``log E[exp(l)]``) is tracked in log space: the state is ``s = log u``,
the draws enter as ``v = mean(exp(l - s))`` (an estimate of ``E[exp(l)]/exp(s)``, near 1),
``s_t = s_{t-1} + log((1-β) + β v)``, and the derivative is ``exp(s_{t-1} - s_t) ∇v`` --
nothing is exponentiated outside ``[l - s]``. The mean of ``v²`` is recorded too: the
importance weights' effective sample size, ``ESS/N = mean(v)² / mean(v²)``, tells when the
proposal covers the model poorly (``ex.fit`` reports it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from .._errors import ProgramError, UnsupportedError
from ..dsl import _ir as ir
from ..dsl._primitives import ExpectSpec, expect_p, sample_p
from ..runtime import _jax_compat as compat
from ._certify import RANK, Certificate, break_reason, collect_sites, compositions, differentiated_leaves
from ._estimate import Expectation, as_program
from ._interpreter import Interpreter, rule
from ._smoothness import breaks, with_defaults
from .estimators._enum import Enum

sg = jax.lax.stop_gradient


# --- the methods ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Tracking:
    """How tracked expectations are updated between steps; see the module docs."""

    #: the weight of a new draw, in (0, 1]; or a schedule ``step -> beta`` (an optax schedule)
    beta: Any = 0.1
    name: ClassVar[str] = "tracking"

    def __post_init__(self):
        b = self.beta
        if callable(b):
            return
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 < b <= 1.0:
            raise ValueError(
                f"{type(self).__name__}: beta must be in (0, 1] (the weight of a new draw) or a schedule "
                f"step -> beta; got {b!r}."
            )

    def beta_at(self, step):
        return self.beta(step) if callable(self.beta) else self.beta

    #: whether the update needs the inner estimate at the previous parameters
    uses_previous: ClassVar[bool] = False

    def gamma_for(self, spec: ExpectSpec, batch: int, beta) -> float:
        """The weight of the correction term (MSVR's ``γ``; 0: none) at weight ``beta``."""
        return 0.0

    def check(self, tracked: tuple[ExpectSpec, ...]) -> None:
        pass



@dataclasses.dataclass(frozen=True)
class SCGD(Tracking):
    """Moving averages of the inner expectations: ``u ← (1-β) u + β ĝ`` (one per index
    where the expectation has ``index=``)."""

    name: ClassVar[str] = "SCGD"


@dataclasses.dataclass(frozen=True)
class SOX(Tracking):
    """Per-index moving averages for finite sums of compositions ``(1/m) Σᵢ fᵢ(E[gᵢ])``:
    every tracked expectation must say which term it is (``ex.expect(..., index=i, size=m)``).
    Pair it with a momentum optimizer (``optax.sgd(lr, momentum=0.9)``) for SOX's outer
    moving average."""

    name: ClassVar[str] = "SOX"

    def check(self, tracked):
        loose = [s.call for s in tracked if not s.indexed]
        if loose:
            raise ProgramError(
                f"tracking=SOX keeps one estimate per term of a finite sum, but {', '.join(loose)} has no "
                "index: write ex.expect(g, index=i, size=m) (i: which of the m terms), or use SCGD/MSVR."
            )


@dataclasses.dataclass(frozen=True)
class MSVR(Tracking):
    """Variance-reduced tracking: ``u ← (1-β) u + β ĝ(θ_t) + γ (ĝ(θ_t) - ĝ(θ_{t-1}))`` with
    the same draws at both parameters. ``gamma=None``: the paper's ``(m-B)/(B(1-β)) + (1-β)``
    for ``B`` of ``m`` indices per step (``1-β`` without an index)."""

    gamma: float | None = None
    name: ClassVar[str] = "MSVR"
    uses_previous: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        g = self.gamma
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0):
            raise ValueError(f"MSVR: gamma must be a number >= 0, or None for the paper's choice; got {g!r}.")

    def gamma_for(self, spec, batch, beta):
        if self.gamma is not None:
            return float(self.gamma)
        if spec.indexed:
            return jnp.where(beta < 1, (spec.size - batch) / (batch * jnp.maximum(1.0 - beta, 1e-12)), 0.0) + (1.0 - beta)
        return 1.0 - beta



# --- what is tracked -----------------------------------------------------------------------
class Item(NamedTuple):
    """One tracked expectation: its spec and the shapes of its table."""

    spec: ExpectSpec
    shapes: tuple  # per output leaf: the shape of one item's value
    dtypes: tuple
    batch: int  # indices drawn per step (1 without an index)


class ItemState(NamedTuple):
    value: tuple  # per output leaf: (size, *shape) or (*shape); log-values for log_expect
    seen: jax.Array  # float, (size,) or (): 1 where the item has been drawn


class TrackerState(NamedTuple):
    items: dict  # name -> ItemState
    previous: Any  # the parameters of the last step (MSVR), else None
    step: jax.Array


def tracked_items(jaxpr) -> tuple[Item, ...]:
    """The expectations a tracking pass must track in ``jaxpr``: those used nonlinearly."""

    _, specs = compositions(jaxpr)
    found: dict[int, Item] = {}
    _find(jaxpr, specs, found)
    items = tuple(found.values())
    names = [i.spec.name for i in items]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ProgramError(
            f"two tracked expectations are named {dup[0]!r}; each tracked expectation keeps its own "
            "estimate under its name: give them distinct names with ex.expect(..., name=...)."
        )
    return items


def _find(jaxpr, specs, found):
    for eqn, outer in ir.eqns(jaxpr):
        if eqn.primitive is not expect_p:
            continue
        spec = eqn.params["spec"]
        if spec not in specs or id(spec) in found:
            continue
        # inlined calls are transparent; inside any other construct, the estimate cannot be tracked
        inside = [o for o in outer if ir.policy(o) != ir.INLINE]
        if inside:
            raise UnsupportedError(
                f"{spec.call} is used nonlinearly inside `{inside[-1].primitive.name}` (at {compat.user_frame(eqn) or '?'}); "
                "the tracking pass keeps one running estimate per expectation and cannot "
                "carry it through that construct. Move the expectation out of it."
            )
        summed = [e.params["spec"].name for e, _ in ir.eqns(spec.jaxpr)
                  if e.primitive is sample_p and isinstance(e.params["spec"].strategy, Enum)]
        if spec.log and summed:
            raise UnsupportedError(
                f"site {summed[0]!r} of {spec.call} uses ex.enum, which averages the log-weight over its values "
                f"(at {spec.location or compat.user_frame(eqn) or '?'}); tracking log E[exp(l)] needs draws of l: "
                "let the site be drawn (the default, or ex.reinforce / ex.mvd)."
            )
        outs = [v.aval for v in eqn.outvars]
        _, index = spec.split(eqn.invars)
        k = 0 if index is None else len(index.aval.shape)
        found[id(spec)] = Item(
            spec,
            tuple(tuple(a.shape[k:]) for a in outs),
            tuple(a.dtype for a in outs),
            1 if index is None else max(1, math.prod(index.aval.shape)),
        )


def init_items(items: tuple[Item, ...]) -> dict:
    out = {}
    for it in items:
        lead = (it.spec.size,) if it.spec.indexed else ()
        value = tuple(jnp.zeros(lead + s, d) for s, d in zip(it.shapes, it.dtypes, strict=True))
        seen = jnp.zeros(lead, value[0].dtype if value else jnp.float32)
        out[it.spec.name] = ItemState(value, seen)
    return out


# --- the rewritten program -----------------------------------------------------------------
def surrogate(closed, items: tuple[Item, ...], method: Tracking):
    """``fn(flat_args, item_states, previous, step) -> (outs, new_states, v, diagnostics)``.

    Evaluates ``closed`` with every tracked expectation replaced as described in the
    module docs. ``previous`` maps names to the inner estimates at the previous parameters
    (MSVR), or is ``None``; ``step`` is the step count (for a ``beta`` schedule). ``v`` maps names to this step's inner estimates (per leaf);
    ``diagnostics`` holds ``(mean v, mean v²)`` per log-space item.
    """
    by_spec = {id(it.spec): it for it in items}

    def fn(flat_args, states, previous, step):
        new_states, vs, diags = {}, {}, {}
        beta = method.beta_at(step)

        def tracked(eqn, ins):
            it = by_spec[id(eqn.params["spec"])]
            spec = it.spec
            st = states[spec.name]
            ops, index = spec.split(ins)
            if spec.indexed:
                u_old = [t[index] for t in st.value]
                seen = st.seen[index]
            else:
                u_old, seen = list(st.value), st.seen
            prev = None if previous is None else previous[spec.name]
            gamma = method.gamma_for(spec, it.batch, beta) if prev is not None else 0.0
            if spec.log:
                (v, m2, c), u_new, out = _log_update(spec, ops, u_old[0], seen, beta, gamma, prev)
                v_leaves, u_leaves, outs = [v], [u_new], [out]
                diags[spec.name] = (jnp.mean(v), jnp.mean(m2))
            else:
                v_leaves = list(expect_p.bind(*ins, spec=spec))
                u_leaves, outs = [], []
                for j, (v, u) in enumerate(zip(v_leaves, u_old, strict=True)):
                    vs_ = sg(v)
                    s = _bcast(seen, v)
                    ma = (1.0 - beta) * u + beta * vs_
                    if prev is not None:
                        ma = ma + gamma * (vs_ - prev[j])
                    u_new = jnp.where(s > 0, ma, vs_).astype(v.dtype)
                    u_leaves.append(u_new)
                    outs.append(u_new + (v - vs_))
            if spec.indexed:
                table = tuple(t.at[index].set(sg(u)) for t, u in zip(st.value, u_leaves, strict=True))
                seen_new = st.seen.at[index].set(1.0)
            else:
                table = tuple(sg(u) for u in u_leaves)
                seen_new = jnp.ones_like(st.seen)
            new_states[spec.name] = ItemState(table, seen_new)
            vs[spec.name] = tuple(sg(v) for v in v_leaves)
            return outs

        outs = _eval(closed.jaxpr, closed.consts, flat_args, by_spec, tracked)
        return outs, new_states, vs, diags

    return fn


def _bcast(seen, v):
    return jnp.reshape(seen, jnp.shape(seen) + (1,) * (jnp.ndim(v) - jnp.ndim(seen)))


def _log_update(spec: ExpectSpec, ops, s_old, seen, beta, gamma, prev):
    """Log-space tracking of ``log E[exp(l)]``; returns ``((v, mean v², c), s_new, out)``."""
    s_seen = _bcast(seen, s_old) > 0
    v, m2, c = expect_p.bind(sg(s_old), s_seen.astype(s_old.dtype), *ops, spec=spec.shifted_form())
    vs_ = sg(v)
    arg = (1.0 - beta) + beta * vs_
    if prev is not None:
        arg = arg + gamma * (vs_ - prev[0])
    # MSVR's correction can overshoot, even below zero: one step may shrink the tracked
    # value by at most half the factor a plain moving average can, (1 - β) / 2
    arg = jnp.where(beta < 1, jnp.maximum(arg, 0.5 * (1.0 - beta)), arg)
    s_new = c + jnp.log(jnp.where(s_seen, arg, vs_))
    scale = sg(jnp.exp(c - s_new))
    return (v, m2, c), s_new.astype(s_old.dtype), s_new + scale * (v - vs_)


def _eval(jaxpr, consts, args, by_spec, tracked):
    return _Tracked(by_spec, tracked).run(jaxpr, consts, args)


class _Tracked(Interpreter):
    """Evaluation with the tracked expectations replaced (``tracked(eqn, ins)``); calls that
    hold one are inlined, everything else is re-bound."""

    def __init__(self, by_spec, tracked):
        self.by_spec, self.tracked = by_spec, tracked

    @rule(expect_p)
    def _expect(self, eqn, ins):
        if id(eqn.params["spec"]) in self.by_spec:
            return self.tracked(eqn, ins)
        return self.default(eqn, ins)

    def enters(self, eqn):
        return _has_tracked(eqn, self.by_spec)


def _has_tracked(eqn, by_spec) -> bool:
    return any(e.primitive is expect_p and id(e.params["spec"]) in by_spec
               for sub in compat.subjaxprs_of(eqn) for e, _ in ir.eqns(sub))


__all__ = ["Tracking", "SCGD", "SOX", "MSVR", "TrackerState", "ItemState", "tracked_items", "surrogate"]


# --- the tracked estimator -----------------------------------------------------------------
class Tracker:
    """A program's tracked gradient estimator: ``init`` the state, then ``value_and_grad``.

    Built by :func:`track`. ``value_and_grad(key, state, *args)`` returns
    ``((value, grads), new_state, diagnostics)``: ``value`` is the program's value with the
    tracked estimates in place of the plug-ins, ``grads`` its gradient with respect to
    argument ``argnums`` (the estimator described in the module docs), ``diagnostics`` maps
    each ``ex.log_expect`` to ``(mean v, mean v²)``: the first two moments of its importance
    weights relative to the tracked value. Pooled over steps, ``mean(v)²/mean(v²)`` is their
    effective sample size as a fraction of the draws (what ``ex.fit`` reports). Pooling
    matters: within one step of ``n`` draws the fraction cannot fall below ``1/n``, however
    heavy the weights' tail.
    Pure and jit-able; ``ex.fit(..., tracking=...)`` runs it in its fused loop.
    """

    def __init__(self, program, method: Tracking, argnums: int = 0):
        if not isinstance(method, Tracking):
            raise ProgramError(
                "tracking= expects a tracking method: ex.tracking.SCGD(beta), ex.tracking.SOX(beta) or "
                f"ex.tracking.MSVR(beta); got {type(method).__name__} {method!r}."
            )
        self.program = program
        self.method = method
        self.argnums = argnums
        self._built: dict = {}

    def __repr__(self) -> str:
        return f"<tracked estimator of {self.program.name} ({self.method})>"

    def build(self, args):
        """``(items, surrogate program)`` for arguments shaped like ``args``."""

        closed, in_tree, out_tree = self.program.stage(args)
        key = id(closed)
        hit = self._built.get(key)
        if hit is not None and hit[0] is closed:
            return hit[1], hit[2]
        outs = closed.jaxpr.outvars
        if len(outs) != 1 or outs[0].aval.shape != ():
            raise ProgramError(
                f"tracking: the program {self.program.name!r} must return one scalar to be minimized; "
                f"it returns {', '.join(str(v.aval) for v in outs) or 'nothing'}."
            )
        items = tracked_items(closed.jaxpr)
        if not items:
            raise ProgramError(
                f"tracking: the program {self.program.name!r} uses no expectation nonlinearly, so there "
                "is nothing to track; its plain estimator is already unbiased (ex.fit without tracking=)."
            )
        self.method.check(tuple(it.spec for it in items))
        fn = surrogate(closed, items, self.method)

        def tracked_program(*a):
            *user, states, previous, step = a
            outs, new_states, vs, diags = fn(jax.tree_util.tree_leaves(tuple(user)), states, previous, step)
            return jax.tree_util.tree_unflatten(out_tree, outs), (new_states, vs, diags)

        prog = Expectation(tracked_program, name=f"{self.program.name} (tracked)")
        self._built[key] = (closed, items, prog)
        return items, prog

    def items(self, *args) -> tuple[Item, ...]:
        return self.build(args)[0]

    def certificate(self, *args):
        """The tracked estimator's certificate at ``args``: ``consistent`` (or weaker, when a
        site's strategy is), with the plug-in reasons replaced by what is tracked."""

        closed, _, _ = self.program.stage(args)
        items, _ = self.build(args)
        kind, reasons = "consistent", []
        for site in collect_sites(closed.jaxpr):
            c = site.strategy.certificate
            if RANK[c] > RANK[kind]:
                kind = c
            if c != "unbiased":
                reasons.append(f"site {site.name!r} uses {site.strategy.describe()} ({c})")
        for br in breaks(with_defaults(closed.jaxpr), differentiated_leaves(args, self.argnums))[0]:
            kind = "biased"
            reasons.append(break_reason(br))
        for it in items:
            s = it.spec
            per = f"one estimate per index (of {s.size})" if s.indexed else "one running estimate"
            space = ", in log space" if s.log else ""
            reasons.append(
                f"{s.call} tracked by {self.method} ({per}{space}): consistent, its bias vanishes as "
                "beta -> 0 with the parameters moving slower than the tracked value"
            )
        return Certificate(kind, tuple(reasons))

    def init(self, *args) -> TrackerState:
        """The initial state for arguments ``args`` (the program's, parameters included):
        nothing seen yet; each item starts at its first draw."""
        items, _ = self.build(args)
        previous = args[self.argnums] if self.method.uses_previous else None
        return TrackerState(init_items(items), previous, jnp.int32(0))

    def value_and_grad(self, key, state: TrackerState, *args):
        _, prog = self.build(args)
        a = self.argnums
        previous = None
        if self.method.uses_previous:
            before = args[:a] + (state.previous,) + args[a + 1 :]
            _, (_, previous, _) = prog._estimate(key, *before, state.items, None, state.step)

        def loss(p):
            out, aux = prog._estimate(key, *args[:a], p, *args[a + 1 :], state.items, previous, state.step)
            return out, aux

        (value, (items, _, diags)), grads = jax.value_and_grad(loss, has_aux=True)(args[a])
        new = TrackerState(items, args[a] if self.method.uses_previous else None, state.step + 1)
        return (value, grads), new, diags


def track(objective, tracking: Tracking | None = None, argnums: int = 0) -> Tracker:
    """The tracked estimator of ``objective`` (default ``SCGD()``); see :class:`Tracker`.

        >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, estimax as ex
        >>> @ex.expectation
        ... def risk(theta):                       # log E[exp(z)], z ~ N(theta, 1): = theta + 1/2
        ...     def l():
        ...         return ex.sample(dist.Normal(theta, 1.0), name="z")
        ...     return ex.log_expect(l, name="log_mgf")() ** 2
        >>> t = ex.tracking.track(risk, ex.tracking.SCGD(beta=0.5))
        >>> state = t.init(1.0)
        >>> (value, grad), state, diag = t.value_and_grad(jax.random.key(0), state, 1.0)
    """

    program = as_program(objective, "ex.tracking.track")
    return Tracker(program, SCGD() if tracking is None else tracking, argnums)


__all__ += ["Tracker", "track"]
