"""Per-site gradient variance: which random choice makes the estimate noisy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ..dsl import _ir as ir
from ..dsl._primitives import expect_p, sample_p
from ._adev import build_estimator


def _gradient_fn(closed, args, argnums, override_site):
    est = build_estimator(closed.jaxpr, len(closed.consts), override_site=override_site)
    consts = list(closed.consts)
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)

    def value(key, *a):
        return est(key, *consts, *jax.tree_util.tree_leaves(a))[0]

    def grad_vector(key, *a):
        g = jax.grad(value, argnums=tuple(n + 1 for n in nums))(key, *a)
        return ravel_pytree(g)[0]

    return grad_vector


def _in_loops(jaxpr) -> set[str]:
    """The names (``expect/site`` inside nested expectations) of the sites in a loop body:
    one key drives every iteration, so a site's own draws cannot be changed alone."""
    out = set()
    for eqn, outer in ir.eqns(jaxpr, into_expect=True):
        if eqn.primitive is sample_p and any(ir.policy(o) == ir.LOOP for o in outer):
            prefix = "".join(o.params["spec"].name + "/" for o in outer if o.primitive is expect_p)
            out.add(prefix + eqn.params["spec"].name)
    return out


def site_variances(program, closed, args, sites, *, key, argnums, samples):
    """``({site: (E[Var(ĝ | other sites)], its standard error)}, total variance)``, summed
    over gradient coordinates. Estimates are computed ``inner`` at a time (bounded memory)."""
    outer, inner = samples
    k_outer, k_inner, k_total = jax.random.split(key, 3)
    outer_keys = jax.random.split(k_outer, outer)
    inner_bases = jax.random.split(k_inner, outer)  # fresh inner draws for every outer draw

    plain = _gradient_fn(closed, args, argnums, None)
    total_keys = jax.random.split(k_total, outer * inner).reshape((outer, inner) + k_total.shape)
    chunks = jax.jit(
        lambda ks: jax.lax.map(lambda k: jax.vmap(plain, in_axes=(0, *[None] * len(args)))(k, *args), ks)
    )(total_keys)
    g = np.asarray(chunks, np.float64).reshape(outer * inner, -1)
    total = float(np.sum(np.var(g, axis=0, ddof=1)))

    out = {}
    looped = _in_loops(closed.jaxpr)
    for s in sites:
        if s.name in looped:
            continue
        fn = _gradient_fn(closed, args, argnums, s.name)

        def conditional_variance(k_o, k_base, fn=fn):
            pairs = jax.vmap(lambda k_i: jnp.stack([k_o, k_i]))(jax.random.split(k_base, inner))
            gs = jax.vmap(fn, in_axes=(0, *[None] * len(args)))(pairs, *args)
            return jnp.sum(jnp.var(gs, axis=0, ddof=1))

        # outer draws one after another (lax.map): memory is that of `inner` estimates
        v = jax.jit(lambda ko, kb: jax.lax.map(lambda a: conditional_variance(*a), (ko, kb)))(outer_keys, inner_bases)
        v = np.asarray(v, np.float64)
        out[s.name] = (float(np.mean(v)), float(np.std(v, ddof=1) / np.sqrt(len(v))))
    del program
    return out, total
