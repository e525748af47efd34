"""``ex.trace``: run a program inside another and keep its random choices and log density.

``ex.trace(guide)(*args)`` stages ``guide`` and replays its equations into the enclosing
program: its random choices become the enclosing program's sites (with their own names and
strategies), and alongside its value it returns each top-level site's value and the total
log density ``log q`` of all its choices at the values drawn -- what variational objectives
need (``log p(x, z) - log q(z)``). Sites mapped with ``jax.vmap``/``ex.vmap`` keep their
batch axes and contribute the sum of their lanes' log densities.

Sharp edges: sites inside ``lax.cond`` branches or loop bodies count in ``log_prob`` but are
not listed in ``sites`` (they are not always drawn, or drawn many times). A site with a
relaxation strategy (``gumbel_softmax``, ``straight_through``) has no density of its value.
Random choices in a ``lax.while_loop`` are refused; ``jit`` and ``jax.checkpoint`` calls are
inlined, and random choices inside ``custom_jvp``/``custom_vjp`` functions are refused with
the message every pass gives (``dsl._ir.POLICIES``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from .._errors import UnsupportedError
from ..runtime import _jax_compat as compat
from ._interpreter import Interpreter, rule
from .estimators._defaults import resolve
from .estimators._reparam import Reparam
from ..dsl._primitives import expect_p, sample_p, stage
from ..dsl._site import SiteDist, log_density  # noqa: F401  (log_density: re-exported for models)


@dataclasses.dataclass(frozen=True)
class Trace:
    """What ``ex.trace(program)(*args)`` returns (inside a program)."""

    value: Any
    sites: dict[str, Any]
    log_prob: Any
    specs: dict = dataclasses.field(default_factory=dict)  # name -> SiteSpec (top level)

    def __getitem__(self, name: str):
        try:
            return self.sites[name]
        except KeyError:
            raise KeyError(f"no top-level site named {name!r} in the trace; sites: {sorted(self.sites)}") from None


def trace(
    program: Callable, *, stop_params: bool = False, values: dict | None = None, prefix: str = ""
) -> Callable[..., Trace]:
    """``ex.trace(program)(*args) -> Trace(value, sites, log_prob)``; see the module doc.

    With ``stop_params=True`` the log density is evaluated with the distributions'
    parameters behind ``stop_gradient`` (the values keep their pathwise dependence): the
    "sticking the landing" form of ``log q`` (Roeder et al. 2017), whose score term --
    zero in expectation -- is dropped. ``stop_params="non-reparam"`` does so only for the
    sites whose strategy is not reparameterization (score-function, enumerated, MVD sites):
    there ``E[∇θ log q(x)] = 0`` with ``x`` not moving with ``θ``, so a single-draw ELBO
    may drop that term, as NumPyro's and Pyro's ELBOs do for such sites.

    With ``values={name: value}`` those top-level sites are not drawn: they take the given
    values and ``log_prob`` scores them (what wake-sleep and forward-KL objectives need).
    """
    fn = getattr(program, "fn", program)
    label = getattr(fn, "__name__", "program")

    def call(*args):
        closed, in_tree, out_tree = stage(fn, args, f"ex.trace({label!r})", fresh_names=False, float_outputs=False)
        flat = jax.tree_util.tree_leaves(args)
        specs: dict = {}
        outs, sites, logp = replay(
            closed.jaxpr, closed.consts, flat, stop_params=stop_params, specs=specs, values=values, prefix=prefix
        )
        missing = set(values or ()) - set(sites)
        if missing:
            raise KeyError(f"ex.trace({label!r}, values=...): no top-level sites named {sorted(missing)}; sites: {sorted(sites)}")
        return Trace(jax.tree_util.tree_unflatten(out_tree, outs), sites, logp, specs)

    return call


def _zero():
    return jnp.zeros((), jnp.result_type(float))


def replay(
    jaxpr,
    consts,
    args,
    *,
    stop_params: bool = False,
    specs: dict | None = None,
    values: dict | None = None,
    prefix: str = "",
):
    """Re-bind ``jaxpr``'s equations in the current trace: ``(outs, sites, log_prob)``."""
    r = Replay(stop_params, {} if specs is None else specs, {} if values is None else values, prefix)
    outs = r.run(jaxpr, consts, args)
    return outs, r.sites, r.logp


class Replay(Interpreter):
    """Re-binds a program's equations, recording its top-level sites and their log density.

    ``jit``/``checkpoint`` calls are inlined (their sites are top-level sites); the sites of
    ``cond`` branches and ``scan`` bodies count in the log density only."""

    def __init__(self, stop_params, specs: dict, values: dict, prefix: str):
        self.stop_params, self.specs, self.values, self.prefix = stop_params, specs, values, prefix
        self.sites: dict[str, Any] = {}
        self.logp = _zero()

    def _nested(self):
        """A replay of a branch or loop body: its sites are not listed, no values are given."""
        return Replay(self.stop_params, {}, {}, self.prefix)

    @rule(sample_p)
    def _sample(self, eqn, ins):
        spec = eqn.params["spec"]
        if spec.strategy is not None and spec.strategy.value_struct(SiteDist(spec, ins).lane) is not None:
            raise UnsupportedError(
                f"ex.trace: site {spec.name!r} uses {spec.strategy!r}, whose relaxed value has "
                "no density under the site's distribution; trace it with a discrete strategy, "
                "or use a relaxed distribution (e.g. dist.RelaxedBernoulliLogits) as the site."
            )
        if spec.name in self.values:
            given = jnp.asarray(self.values[spec.name])
            if given.shape != tuple(eqn.outvars[0].aval.shape):
                raise ValueError(
                    f"ex.trace(values=...): site {spec.name!r} has shape "
                    f"{tuple(eqn.outvars[0].aval.shape)}; the given value has {given.shape}."
                )
            outs = [given.astype(eqn.outvars[0].aval.dtype)]
        elif self.prefix:
            subfuns, bind = compat.bind_params(eqn)
            bind = {**bind, "spec": dataclasses.replace(spec, name=self.prefix + spec.name)}
            outs = [eqn.primitive.bind(*subfuns, *ins, **bind)]
        else:
            outs = compat.rebind(eqn, ins)
        params = [jax.lax.stop_gradient(x) for x in ins] if _stops(self.stop_params, spec, ins) else ins
        self.logp = self.logp + SiteDist(spec, params).log_prob(outs[0]).astype(self.logp.dtype)
        self.sites[spec.name] = outs[0]
        self.specs[spec.name] = spec
        return outs

    @rule(expect_p)
    def _expect(self, eqn, ins):
        return self.default(eqn, ins)

    def inline(self, eqn, ins):
        # the call's log density is summed on its own, then added (as the call's whole term)
        outer, self.logp = self.logp, _zero()
        try:
            outs = super().inline(eqn, ins)
        finally:
            inner, self.logp = self.logp, outer
        self.logp = self.logp + inner
        return outs

    def switch(self, eqn, ins):
        def branch(closed):
            def run(ops):
                r = self._nested()
                return r.run(closed.jaxpr, closed.consts, ops), r.logp

            return run

        outs, lp = jax.lax.switch(ins[0], [branch(c) for c in eqn.params["branches"]], ins[1:])
        self.logp = self.logp + lp
        return outs

    def loop(self, eqn, ins):
        if eqn.primitive is not compat.scan_p:
            raise UnsupportedError(
                f"ex.trace: random choices inside `{eqn.primitive.name}` (at "
                f"{compat.user_frame(eqn) or 'an unknown location'}) are not supported; move "
                "them out, or into a lax.scan or lax.cond."
            )
        p = eqn.params
        nc, ncar, body = p["num_consts"], p["num_carry"], p["jaxpr"]
        consts, init, xs = ins[:nc], list(ins[nc : nc + ncar]), list(ins[nc + ncar :])

        def step(carry, x):
            lp, c = carry
            r = self._nested()
            outs = r.run(body.jaxpr, body.consts, [*consts, *c, *x])
            return (lp + r.logp, outs[:ncar]), outs[ncar:]

        (lp, carry), ys = jax.lax.scan(step, (_zero(), init), xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
        self.logp = self.logp + lp
        return [*carry, *ys]


def _stops(stop_params, spec, operands) -> bool:
    """Whether the site's log density is evaluated with its parameters stopped."""
    if stop_params != "non-reparam":
        return bool(stop_params)
    strategy, _ = resolve(spec, operands)
    return not isinstance(strategy, Reparam)
