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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from .._errors import UnsupportedError
from ..runtime import _jax_compat as compat
from ._adev import contains_random
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
    specs = {} if specs is None else specs
    values = {} if values is None else values
    env: dict = {}
    read = lambda v: v.val if isinstance(v, compat.Literal) else env[v]

    def write(vs, xs):
        for v, x in zip(vs, xs, strict=True):
            if not isinstance(v, compat.DropVar):
                env[v] = x

    write(jaxpr.constvars, list(consts))
    write(jaxpr.invars, list(args))
    sites: dict[str, Any] = {}
    logp = _zero()
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        prim = eqn.primitive
        if prim is sample_p:
            spec = eqn.params["spec"]
            if spec.strategy is not None and spec.strategy.value_struct(SiteDist(spec, ins).lane) is not None:
                raise UnsupportedError(
                    f"ex.trace: site {spec.name!r} uses {spec.strategy!r}, whose relaxed value has "
                    "no density under the site's distribution; trace it with a discrete strategy, "
                    "or use a relaxed distribution (e.g. dist.RelaxedBernoulliLogits) as the site."
                )
            if spec.name in values:
                given = jnp.asarray(values[spec.name])
                if given.shape != tuple(eqn.outvars[0].aval.shape):
                    raise ValueError(
                        f"ex.trace(values=...): site {spec.name!r} has shape "
                        f"{tuple(eqn.outvars[0].aval.shape)}; the given value has {given.shape}."
                    )
                outs = [given.astype(eqn.outvars[0].aval.dtype)]
            elif prefix:
                subfuns, bind = compat.bind_params(eqn)
                bind = {**bind, "spec": dataclasses.replace(spec, name=prefix + spec.name)}
                outs = [eqn.primitive.bind(*subfuns, *ins, **bind)]
            else:
                outs = compat.rebind(eqn, ins)
            params = [jax.lax.stop_gradient(x) for x in ins] if _stops(stop_params, spec, ins) else ins
            logp = logp + SiteDist(spec, params).log_prob(outs[0]).astype(logp.dtype)
            sites[spec.name] = outs[0]
            specs[spec.name] = spec
        elif prim is expect_p or not _has_sites(eqn):
            outs = compat.rebind(eqn, ins)
        elif prim is compat.jit_p or prim is compat.closed_call_p:
            closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            outs, inner_sites, lp = replay(
                closed.jaxpr, closed.consts, ins, stop_params=stop_params, specs=specs, values=values, prefix=prefix
            )
            sites.update(inner_sites)
            logp = logp + lp
        elif prim is compat.cond_p:
            branches = [
                (lambda c: lambda ops: _drop_sites(replay(c.jaxpr, c.consts, ops, stop_params=stop_params, prefix=prefix)))(c)
                for c in eqn.params["branches"]
            ]
            outs, lp = jax.lax.switch(ins[0], branches, ins[1:])
            logp = logp + lp
        elif prim is compat.scan_p:
            outs, lp = _replay_scan(eqn, ins, stop_params, prefix)
            logp = logp + lp
        else:
            raise UnsupportedError(
                f"ex.trace: random choices inside `{prim.name}` (at "
                f"{compat.user_frame(eqn) or 'an unknown location'}) are not supported; move "
                "them out, or into a lax.scan or lax.cond."
            )
        write(eqn.outvars, outs)
    return [read(v) for v in jaxpr.outvars], sites, logp


def _stops(stop_params, spec, operands) -> bool:
    """Whether the site's log density is evaluated with its parameters stopped."""
    if stop_params != "non-reparam":
        return bool(stop_params)
    strategy, _ = resolve(spec, operands)
    return not isinstance(strategy, Reparam)


def _drop_sites(result):
    outs, _, lp = result
    return outs, lp


def _has_sites(eqn) -> bool:
    return any(contains_random(sub) for sub in compat.subjaxprs_of(eqn))


def _replay_scan(eqn, ops, stop_params, prefix):
    p = eqn.params
    nc, ncar, body = p["num_consts"], p["num_carry"], p["jaxpr"]
    consts, init, xs = ops[:nc], list(ops[nc : nc + ncar]), list(ops[nc + ncar :])

    def step(carry, x):
        lp, c = carry
        outs, _, dlp = replay(body.jaxpr, body.consts, [*consts, *c, *x], stop_params=stop_params, prefix=prefix)
        return (lp + dlp, outs[:ncar]), outs[ncar:]

    (lp, carry), ys = jax.lax.scan(step, (_zero(), init), xs, length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    return [*carry, *ys], lp
