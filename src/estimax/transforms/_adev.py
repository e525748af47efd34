"""The estimator pass: forward-mode automatic differentiation of expected values.

An interpreter walks the staged program carrying dual numbers ``(primal, tangent)``.
Deterministic equations get their tangents from ``jax.jvp``; each random choice hands its
continuation (the rest of the program, as a function of the choice's value) to the site's
strategy, which returns the program's value and an unbiased estimate of its tangent. The
resulting forward-mode estimator is linear in the input tangents, so wrapping it in
``jax.custom_jvp`` gives reverse mode (``jax.grad``) by JAX's own transposition.

Strategies that need no continuation (reparam, REINFORCE) are handled in the loop: a
REINFORCE site records a score ``(∇log p, b∇log p)`` that is multiplied by the program's
final value at the end. Strategies that do (enum, MVD) are called with a continuation
object; conditionals are turned into ``lax.switch`` over "branch, then the rest".

Sharp edges:

- ``lax.scan``/``fori_loop``/``while_loop`` bodies: reparam and REINFORCE sites work (they
  need no continuation); enum and MVD sites are refused when their parameters carry a
  derivative. A ``while_loop`` can be differentiated in forward mode only (as in JAX):
  ``ex.grad`` does that for such programs.
- Which strategy a default site gets depends on the whole program: ``build_estimator`` runs
  the differentiability analysis (``_smoothness.with_defaults``) first, as ``explain`` does.
- Random choices inside ``custom_jvp``/``custom_vjp`` functions are refused (``explain``
  refuses them too); ``jax.checkpoint`` functions are inlined like ``jit``.
- The gradient estimate is unbiased for first derivatives. Differentiating it again
  (``jax.hessian`` of ``estimate``) is *not* an unbiased Hessian estimator.
- A nested ``ex.expect`` is estimated by its own estimator with an independent key; used
  nonlinearly, the plug-in is biased (``explain`` says so).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import UnsupportedError
from ..dsl._primitives import ExpectSpec, expect_p, sample_p
from ..dsl._site import SiteDist
from ..dsl import _ir as ir
from ..dsl._ir import contains_random  # noqa: F401  (re-exported: other modules import it from here)
from ..runtime import _jax_compat as compat
from ._interpreter import Interpreter, rule
from .estimators._base import ContinuationStrategy, LocalStrategy, SiteContext
from ._rao_blackwell import CostTerms, analyze
from ._smoothness import log_weight_draws, with_defaults
from .estimators._defaults import resolve

Literal = compat.Literal


class Thread(NamedTuple):
    """State threaded through a run: the key for what is left, and pending score terms."""

    key: Any
    scores: tuple = ()
    #: the key of the site named by ``Estimator.override`` (per-site variance diagnostics), or None
    override: Any = None


# --- static questions about jaxprs ---------------------------------------------------------
def continuation_sites(jaxpr):
    """Names of sites in ``jaxpr`` whose (resolved) strategy needs a continuation (nested
    expectations excluded: they have their own estimator)."""
    out = []
    for eqn, _ in ir.eqns(jaxpr):
        if eqn.primitive is sample_p:
            strategy, _ = resolve(eqn.params["spec"], [v.aval for v in eqn.invars])
            if isinstance(strategy, ContinuationStrategy):
                out.append((eqn.params["spec"].name, strategy))
    return out


# --- helpers -------------------------------------------------------------------------------
def _read(env, v, mode):
    if isinstance(v, Literal):
        return v.val, None
    p, t = env[v]
    return p, (t if mode else None)


def _write(env, outvars, duals):
    for v, d in zip(outvars, duals, strict=True):
        if not isinstance(v, compat.DropVar):
            env[v] = d


def _inst(p, t):
    return compat.zero_tangent(compat.aval_of(p)) if t is None else t


def _clean_tangent(t):
    """``None`` for non-float (float0) tangents."""
    if t is None or not compat.is_float_dtype(t.dtype):
        return None
    return t


def jvp_eqn(eqn, duals, mode):
    """Apply a deterministic equation to dual numbers."""
    primals = [p for p, _ in duals]
    tangents = [t for _, t in duals]
    if not mode or all(t is None for t in tangents):
        try:
            return [(o, None) for o in compat.rebind(eqn, primals)]
        except FloatingPointError as e:
            raise compat.located_error(e, eqn) from None
    ts = [_inst(p, t) for p, t in zip(primals, tangents, strict=True)]
    try:
        outs, touts = jax.jvp(lambda *a: compat.rebind(eqn, a), primals, ts)
    except FloatingPointError as e:  # under jax.debug_nans: say which line of the program
        raise compat.located_error(e, eqn) from None
    return [(o, _clean_tangent(t)) for o, t in zip(outs, touts, strict=True)]


def _split(key):
    k1, k2 = jax.random.split(key)
    return k1, k2


def make_finish(costs: CostTerms | None):
    """The last continuation: instantiate tangents and add the pending score terms.

    A score ``(s, o, mask)`` adds ``value·s − o`` to the tangent, where ``value`` is the
    program's value or, with a Rao-Blackwellization ``mask``, the sum of the cost terms
    downstream of the site (see ``_rao_blackwell``).
    """

    def finish(outs, thread, mode, env):
        primals = [p for p, _ in outs]
        if not mode:
            return primals, None
        tangents = [_inst(p, t) for p, t in outs]
        stacked, downstream = None, {}  # the terms, stacked once; each distinct mask's sum of them
        for s, o, mask in thread.scores:
            plan = None
            if isinstance(mask, _Elements):
                mask, plan = mask
            if mask is not None and tuple(mask) not in downstream:
                if stacked is None:
                    stacked = jnp.stack(costs.contributions(env))
                # one dot a site, not one add a term: a thousand sites stay a thousand operations
                downstream[tuple(mask)] = jnp.dot(np.asarray(mask, stacked.dtype), stacked)
            new = []
            for p, t in zip(primals, tangents, strict=True):
                value = p
                if mask is not None:
                    value = downstream[tuple(mask)].astype(p.dtype)
                if plan is not None:  # value_b = the scalar terms + element b's own terms
                    value = value + costs.element_contributions(env, plan).astype(p.dtype)
                    term = jnp.sum(value * s.astype(p.dtype))
                else:
                    term = value * s.astype(p.dtype)
                if o is not None:
                    term = term - jnp.sum(o).astype(p.dtype)
                new.append(t + term)
            tangents = new
        return primals, tangents

    return finish


class _Elements(NamedTuple):
    """A per-element score's signal: the scalar terms' mask, and the aligned terms' plan."""

    mask: Any
    plan: tuple


# --- the continuation object ---------------------------------------------------------------
class _Cont:
    __slots__ = ("run", "jaxpr", "env", "i", "outvar", "thread", "k", "mode")

    def __init__(self, run, jaxpr, env, i, outvar, thread, k, mode):
        self.run, self.jaxpr, self.env, self.i = run, jaxpr, env, i
        self.outvar, self.thread, self.k, self.mode = outvar, thread, k, mode

    def __call__(self, value, tangent=None, *, mode=None):
        mode = self.mode if mode is None else mode
        env = dict(self.env)
        _write(env, [self.outvar], [(value, tangent if mode else None)])
        return self.run(self.jaxpr, env, self.i, self.thread, self.k, mode)

    def with_score(self, score, offset):
        thread = self.thread._replace(scores=self.thread.scores + ((score, offset, None),))
        return _Cont(self.run, self.jaxpr, self.env, self.i, self.outvar, thread, self.k, self.mode)


# --- the interpreter -----------------------------------------------------------------------
class Estimator:
    """The estimator pass over one program, in continuation-passing style.

    Hand-written rather than on ``Interpreter``: a site whose strategy needs a continuation
    returns from the middle of the walk. It reads the same policy table (``dsl._ir``).
    ``costs`` is the program's Rao-Blackwellization (or ``None``); ``override`` names the
    site whose key comes from ``Thread.override`` (per-site variance), or is ``None``.
    """

    def __init__(self, costs: CostTerms | None = None, override: str | None = None):
        self.costs = costs
        self.override = override

    def _element_plan(self, jaxpr, spec):
        if self.costs is None or jaxpr is not self.costs.jaxpr:
            return None
        return self.costs.element_plan(spec)

    def _score_mask(self, jaxpr, spec):
        if self.costs is None or jaxpr is not self.costs.jaxpr:
            return None
        return self.costs.mask(spec)

    def run_jaxpr(self, jaxpr, consts, in_duals, thread, k, mode):
        env = {}
        _write(env, jaxpr.constvars, [(c, None) for c in consts])
        _write(env, jaxpr.invars, in_duals)
        return self.run_eqns(jaxpr, env, 0, thread, k, mode)

    def run_eqns(self, jaxpr, env, i, thread: Thread, k: Callable, mode: bool):
        eqns = jaxpr.eqns
        while i < len(eqns):
            eqn = eqns[i]
            prim = eqn.primitive
            if prim is sample_p:
                spec = eqn.params["spec"]
                duals = [_read(env, v, mode) for v in eqn.invars]
                site = SiteDist(spec, [p for p, _ in duals])
                strategy, _ = resolve(spec, site.operands)
                key, k_site = _split(thread.key)
                if self.override is not None and self.override == spec.name:
                    k_site = thread.override
                thread = thread._replace(key=key)
                tangents = [t for _, t in duals]
                ctx = SiteContext(spec.name, site, spec.merge_tangents(tangents), k_site, mode, spec.extras(tangents))
                if isinstance(strategy, LocalStrategy):
                    plan = self._element_plan(jaxpr, spec) if mode else None
                    with compat.source_context(eqn):
                        result = strategy.forward_elements(ctx) if plan is not None else None
                        if result is None:
                            plan = None
                            result = strategy.forward(ctx)
                    x, x_dot, score = result
                    _write(env, eqn.outvars, [(x, _clean_tangent(x_dot) if mode else None)])
                    if score is not None and mode:
                        mask = self._score_mask(jaxpr, spec)
                        entry = (*score, mask if plan is None else _Elements(mask, plan))
                        thread = thread._replace(scores=thread.scores + (entry,))
                else:
                    cont = _Cont(self.run_eqns, jaxpr, env, i + 1, eqn.outvars[0], thread, k, mode)
                    with compat.source_context(eqn):
                        return strategy.estimate(ctx, cont)
            elif prim is expect_p:
                key, k_sub = _split(thread.key)
                thread = thread._replace(key=key)
                duals = [_read(env, v, mode) for v in eqn.invars]
                spec = eqn.params["spec"]
                inner = self._inner_override(spec)
                if inner is not None:  # the overridden site is inside: its draws follow thread.override
                    k_sub = jnp.stack([k_sub, thread.override])
                _write(env, eqn.outvars, _apply_keyed(expect_estimator(spec, inner), k_sub, duals, mode))
            elif ir.holds_random(eqn):
                policy = ir.policy(eqn)
                if policy == ir.INLINE:
                    return self._inline(jaxpr, env, i, thread, k, mode)
                if policy == ir.SWITCH:
                    return self._cond(jaxpr, env, i, thread, k, mode)
                if policy != ir.LOOP:  # TRUST, REFUSE: random choices the pass cannot enter
                    raise ir.refused_call(eqn)
                thread = _loop(eqn, env, thread, mode)
            else:
                _write(env, eqn.outvars, jvp_eqn(eqn, [_read(env, v, mode) for v in eqn.invars], mode))
            i += 1
        return k([_read(env, v, mode) for v in jaxpr.outvars], thread, mode, env)

    def _inner_override(self, spec) -> str | None:
        """The overridden site's name inside the nested expectation ``spec``, if it is there."""
        if self.override is None or not self.override.startswith(spec.name + "/"):
            return None
        return self.override[len(spec.name) + 1:]

    def _after(self, jaxpr, env, i, k):
        eqn = jaxpr.eqns[i]

        def after(outs, thread, mode, inner_env):
            del inner_env
            env2 = dict(env)
            _write(env2, eqn.outvars, outs)
            return self.run_eqns(jaxpr, env2, i + 1, thread, k, mode)

        return after

    def _inline(self, jaxpr, env, i, thread, k, mode):
        eqn = jaxpr.eqns[i]
        inner, consts = compat.called_jaxpr(eqn)
        duals = [_read(env, v, mode) for v in eqn.invars]
        return self.run_jaxpr(inner, consts, duals, thread, self._after(jaxpr, env, i, k), mode)

    def _cond(self, jaxpr, env, i, thread, k, mode):
        eqn = jaxpr.eqns[i]
        index, _ = _read(env, eqn.invars[0], mode)
        duals = [_read(env, v, mode) for v in eqn.invars[1:]]
        after = self._after(jaxpr, env, i, k)

        def branch(closed):
            def run(thread_, primals, tangents):
                return self.run_jaxpr(closed.jaxpr, closed.consts, list(zip(primals, tangents, strict=True)), thread_, after, mode)

            return run

        primals = [p for p, _ in duals]
        tangents = [t for _, t in duals]
        return jax.lax.switch(index, [branch(b) for b in eqn.params["branches"]], thread, primals, tangents)


refused_call = ir.refused_call  # the shared refusal (``explain`` raises it too)


def _apply_keyed(fn, key, duals, mode):
    """Apply ``fn(key, *primals) -> outs`` to dual numbers (JAX differentiates ``fn``)."""
    primals = [p for p, _ in duals]
    if not mode or all(t is None for _, t in duals):
        return [(o, None) for o in fn(key, *primals)]
    ts = [_inst(p, t) for p, t in duals]
    outs, touts = jax.jvp(lambda *a: fn(key, *a), primals, ts)
    return [(o, _clean_tangent(t)) for o, t in zip(outs, touts, strict=True)]


def _loop(eqn, env, thread, mode):
    duals = [_read(env, v, mode) for v in eqn.invars]
    key, k_loop = _split(thread.key)
    thread = thread._replace(key=key)
    differentiated = mode and any(t is not None for _, t in duals)
    body = eqn.params["jaxpr"] if eqn.primitive is compat.scan_p else eqn.params["body_jaxpr"]
    if eqn.primitive is compat.while_p and ir.contains_random(eqn.params["cond_jaxpr"].jaxpr):
        raise UnsupportedError(
            f"a random choice in the condition of a lax.while_loop (at "
            f"{compat.user_frame(eqn) or 'an unknown location'}) is not supported; sample in "
            "the body and carry the value into the condition."
        )
    if differentiated:
        bad = continuation_sites(body.jaxpr)
        if bad:
            name, strategy = bad[0]
            raise UnsupportedError(
                f"site {name!r} uses ex.{strategy.name} inside a lax.{'scan' if eqn.primitive is compat.scan_p else 'while_loop'} "
                f"body (fori_loop lowers to these). ex.{strategy.name} evaluates the rest of the "
                "program at other values of the site, and that continuation cannot cross a loop "
                "boundary. Use estimator=ex.reinforce (or ex.reparam for a reparameterizable "
                "distribution), unroll the loop with a Python for-loop, or wrap the randomness "
                "in ex.expect(...) and use its value linearly."
            )
    outs = _apply_keyed(lambda kk, *ops: _loop_pathwise(eqn, kk, ops), k_loop, duals, mode)
    *outs, (s, s_dot), (o, o_dot) = outs
    _write(env, eqn.outvars, outs)
    if differentiated and s_dot is not None:
        thread = thread._replace(scores=thread.scores + ((s_dot, o_dot, None),))
    return thread


# --- pathwise evaluation (inside loop bodies, where JAX differentiates) -----------------
def _zero_scalar():
    return jnp.zeros((), jnp.result_type(float))


def eval_pathwise(jaxpr, consts, args, key):
    """Evaluate ``jaxpr`` with local strategies only: ``(outs, s, o)`` with DiCE surrogates."""
    ev = Pathwise(key)
    outs = ev.run(jaxpr, consts, args)
    return outs, ev.s, ev.o


class Pathwise(Interpreter):
    """Evaluation where JAX differentiates (loop bodies): each site's local strategy gives its
    value and DiCE score terms, summed in ``s`` and ``o``; equation ``i`` draws with
    ``fold_in(key, i)``."""

    def __init__(self, key):
        self.key = key
        self.s, self.o = _zero_scalar(), _zero_scalar()
        self.count = 0
        self.k_eqn = None

    def interpret(self, eqn, ins):
        self.k_eqn = jax.random.fold_in(self.key, self.count)
        self.count += 1
        return super().interpret(eqn, ins)

    @rule(sample_p)
    def _sample(self, eqn, ins):
        spec = eqn.params["spec"]
        site = SiteDist(spec, ins)
        strategy, _ = resolve(spec, ins)
        ctx = SiteContext(spec.name, site, (None,) * len(site.leaves), self.k_eqn, False)
        if isinstance(strategy, LocalStrategy):
            x, s, o = strategy.pathwise(ctx)
        else:  # reached only where no derivative flows (checked by the caller)
            x, s, o = jax.lax.stop_gradient(site.sample(self.k_eqn)), None, None
        if s is not None:
            self.s = self.s + s.astype(self.s.dtype)
        if o is not None:
            self.o = self.o + o.astype(self.o.dtype)
        return [x]

    @rule(expect_p)
    def _expect(self, eqn, ins):
        return list(expect_estimator(eqn.params["spec"])(self.k_eqn, *ins))

    def _add(self, outs, s, o):
        self.s, self.o = self.s + s, self.o + o
        return outs

    def inline(self, eqn, ins):
        inner, consts = compat.called_jaxpr(eqn)
        return self._add(*eval_pathwise(inner, consts, ins, self.k_eqn))

    def switch(self, eqn, ins):
        branches = [
            (lambda c: lambda kk, ops: eval_pathwise(c.jaxpr, c.consts, ops, kk))(c)
            for c in eqn.params["branches"]
        ]
        return self._add(*jax.lax.switch(ins[0], branches, self.k_eqn, ins[1:]))

    def loop(self, eqn, ins):
        *outs, s, o = _loop_pathwise(eqn, self.k_eqn, ins)
        return self._add(outs, s, o)


def _loop_pathwise(eqn, key, ops):
    """A ``scan``/``while`` equation with random choices: ``[*outs, s, o]``."""
    p = eqn.params
    zero = _zero_scalar()
    if eqn.primitive is compat.scan_p:
        nc, ncar, body = p["num_consts"], p["num_carry"], p["jaxpr"]
        consts, init, xs = ops[:nc], list(ops[nc : nc + ncar]), list(ops[nc + ncar :])

        def step(carry, x):
            kk, s, o, c = carry
            kk, sub = _split(kk)
            outs, ds, do = eval_pathwise(body.jaxpr, body.consts, [*consts, *c, *x], sub)
            return (kk, s + ds, o + do, outs[:ncar]), outs[ncar:]

        (_, s, o, carry), ys = jax.lax.scan(
            step, (key, zero, zero, init), xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
        )
        return [*carry, *ys, s, o]
    cn, bn, cond, body = p["cond_nconsts"], p["body_nconsts"], p["cond_jaxpr"], p["body_jaxpr"]
    cconsts, bconsts, init = ops[:cn], ops[cn : cn + bn], list(ops[cn + bn :])

    def cond_fn(carry):
        return compat.eval_jaxpr(cond.jaxpr, cond.consts, *cconsts, *carry[3])[0]

    def body_fn(carry):
        kk, s, o, c = carry
        kk, sub = _split(kk)
        outs, ds, do = eval_pathwise(body.jaxpr, body.consts, [*bconsts, *c], sub)
        return kk, s + ds, o + do, outs

    _, s, o, carry = jax.lax.while_loop(cond_fn, body_fn, (key, zero, zero, init))
    return [*carry, s, o]


# --- estimators as functions -------------------------------------------------------------
def build_estimator(jaxpr, n_consts: int, override_site: str | None = None) -> Callable:
    """``est(key, *inputs) -> tuple(outputs)``: the unbiased estimator of ``jaxpr``.

    ``inputs`` binds the jaxpr's constvars (the first ``n_consts``) then its invars. The
    primal is one simulation of the program (enumerated sites summed exactly); the JVP is
    the estimator pass; ``jax.grad`` works by transposing it.

    With ``override_site``, ``key`` is a pair of keys: the second one drives that site
    alone (to measure the variance it contributes with everything else held fixed).
    """

    # the plan: defaults whose pathwise derivative would be biased are replaced (explain
    # shows the same plan, from the same cached analysis)
    jaxpr = with_defaults(jaxpr)
    costs = analyze(jaxpr)
    finish = make_finish(costs)

    def run(key, inputs, tangents, mode):
        consts = inputs[:n_consts]
        duals = list(zip(inputs[n_consts:], tangents[n_consts:], strict=True))
        const_duals = list(zip(consts, tangents[:n_consts], strict=True))
        env = {}
        _write(env, jaxpr.constvars, const_duals)
        _write(env, jaxpr.invars, duals)
        thread = Thread(key) if override_site is None else Thread(key[0], override=key[1])
        return Estimator(costs, override_site).run_eqns(jaxpr, env, 0, thread, finish, mode)

    @jax.custom_jvp
    def est(key, *inputs):
        outs, _ = run(key, inputs, [None] * len(inputs), False)
        return tuple(outs)

    def est_jvp(primals, tangents):
        key, *inputs = primals
        _, *tin = tangents
        tin = [None if compat.is_symbolic_zero(t) else _clean_tangent(t) for t in tin]
        outs, touts = run(key, inputs, tin, True)
        return tuple(outs), tuple(touts)

    est.defjvp(est_jvp, symbolic_zeros=True)
    return est


def expect_estimator(spec: ExpectSpec, override_site: str | None = None) -> Callable:
    """The estimator of a nested ``expect``: the mean of ``spec.n`` independent estimates.

    For ``ex.log_expect`` it is the plug-in ``log((1/n) Σₖ exp(lₖ))`` (biased; see
    ``_certify``), and for its shifted form (the tracking pass's) the mean of
    ``exp(lₖ - c)`` with its second moment. The index operand of an indexed expectation is
    not the inner program's. With ``override_site`` (a site of the inner program, for the
    per-site variance), the key is a pair: the second drives that site in every draw.
    """
    cached = ("est", override_site)
    est = spec.cache.get(cached)
    if est is not None:
        return est
    # a log-expectation draws its log-weight: no default site of it is enumerated
    jaxpr = log_weight_draws(with_defaults(spec.jaxpr)) if spec.log else spec.jaxpr
    single = build_estimator(jaxpr, spec.n_consts, override_site=override_site)

    def draws(key, inputs):
        if override_site is not None:  # one key pair per draw: (its own, its overridden site's)
            pairs = jnp.stack([jax.random.split(key[0], spec.n), jax.random.split(key[1], spec.n)], axis=1)
            return jax.vmap(lambda kk: single(kk, *inputs))(pairs)
        if spec.n == 1:
            return [o[None] for o in single(key, *inputs)]
        return jax.vmap(lambda kk: single(kk, *inputs))(jax.random.split(key, spec.n))

    if spec.shifted:

        def est(key, c, seen, *inputs):
            (logw,) = draws(key, spec.split((c, seen, *inputs))[0])
            plug = jax.nn.logsumexp(jax.lax.stop_gradient(logw), axis=0) - jnp.log(spec.n).astype(logw.dtype)
            c_eff = jax.lax.stop_gradient(jnp.where(seen > 0, c, plug))
            w = jnp.exp(logw - c_eff[None])
            return jnp.mean(w, axis=0), jax.lax.stop_gradient(jnp.mean(w * w, axis=0)), c_eff

    elif spec.n == 1 and override_site is None:

        def est(key, *inputs):
            return single(key, *spec.split(inputs)[0])

    else:

        def est(key, *inputs):
            outs = draws(key, spec.split(inputs)[0])
            if spec.log:
                return tuple(jax.nn.logsumexp(o, axis=0) - jnp.log(spec.n).astype(o.dtype) for o in outs)
            return tuple(jnp.mean(o, axis=0) for o in outs)

    spec.cache[cached] = est
    return est


__all__ = ["build_estimator", "expect_estimator", "contains_random"]
