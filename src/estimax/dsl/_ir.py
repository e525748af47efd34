"""Queries over the language's IR (staged jaxprs): what a program contains.

Every query here is answered by one walker, :func:`eqns`, which visits the equations of a
jaxpr and of every jaxpr nested in it (``jit``, ``cond``, ``scan``, ``while``, custom rules;
the programs of nested expectations on request), in program order.

The same module declares how the passes over the IR treat each higher-order primitive that
holds random choices (:data:`POLICIES`), and the one message for those no pass can enter
(:func:`refused_call`): the passes in ``transforms`` read both, so that every pass enters,
branches over, loops over or refuses the same constructs.
"""

from __future__ import annotations

import weakref

from .._errors import UnsupportedError
from ..runtime import _jax_compat as compat
from ._primitives import expect_p, sample_p

# --- the policies for higher-order primitives ---------------------------------------------------
#: evaluate the called jaxpr in place (its equations become the caller's)
INLINE = "inline"
#: one nested jaxpr per branch, chosen by the first operand
SWITCH = "switch"
#: a body evaluated a data-dependent number of times (``scan``, ``while``)
LOOP = "loop"
#: a function with its own derivative rule, taken at its word; random choices inside it
#: cannot be seen by its rule, so a pass that must see them refuses them
TRUST = "trust"
#: any other primitive holding random choices: refused with :func:`refused_call`
REFUSE = "refuse"

#: primitive -> policy; a primitive not listed is ``REFUSE``
POLICIES = {
    compat.jit_p: INLINE,
    compat.closed_call_p: INLINE,
    compat.remat_p: INLINE,
    compat.cond_p: SWITCH,
    compat.scan_p: LOOP,
    compat.while_p: LOOP,
    compat.custom_jvp_call_p: TRUST,
    compat.custom_vjp_call_p: TRUST,
}


def policy(eqn) -> str:
    """The declared policy of ``eqn``'s primitive (see :data:`POLICIES`)."""
    return POLICIES.get(eqn.primitive, REFUSE)


def refused_call(eqn) -> UnsupportedError:
    """The error for random choices inside a function with its own derivative rule (or
    another higher-order primitive no pass can enter); every pass raises this one."""
    return UnsupportedError(
        f"the estimator pass does not support random choices inside `{eqn.primitive.name}` (at "
        f"{compat.user_frame(eqn) or 'an unknown location'}): a custom_jvp/custom_vjp function "
        "defines its own derivative, which cannot include the derivative of a random choice's "
        "distribution. Move ex.sample out of the function and pass its value in."
    )


# --- the walker -----------------------------------------------------------------------------
def eqns(jaxpr, *, into_expect: bool = False, _outer: tuple = ()):
    """``(eqn, enclosing)`` for every equation of ``jaxpr`` and of the jaxprs nested in it,
    in program order (an equation before those nested in it); ``enclosing`` holds the
    equations it is nested in, outermost first. With ``into_expect`` the programs of nested
    expectations are visited too."""
    for eqn in jaxpr.eqns:
        yield eqn, _outer
        if into_expect and eqn.primitive is expect_p:
            subs = [eqn.params["spec"].jaxpr]
        else:
            subs = compat.subjaxprs_of(eqn)
        for sub in subs:
            yield from eqns(sub, into_expect=into_expect, _outer=_outer + (eqn,))


def find(jaxpr, primitive, *, nested_only: bool = False):
    """The first equation of ``primitive`` in ``jaxpr`` (nested jaxprs included) and the
    equations enclosing it, ``(eqn, enclosing)``, or ``None``. With ``nested_only`` only an
    equation inside another one counts."""
    for eqn, outer in eqns(jaxpr):
        if eqn.primitive is primitive and (outer or not nested_only):
            return eqn, outer
    return None


# --- the queries ------------------------------------------------------------------------------
# weakly keyed: a query's answer lives as long as the jaxpr it is about
_RANDOM: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_EXPECT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cached(cache, jaxpr, compute) -> bool:
    hit = cache.get(jaxpr)
    if hit is None:
        hit = cache[jaxpr] = compute()
    return hit


def contains_random(jaxpr) -> bool:
    """Whether ``jaxpr`` (or any jaxpr nested in it) binds ``sample`` or ``expect``."""
    return _cached(_RANDOM, jaxpr, lambda: any(e.primitive is sample_p or e.primitive is expect_p
                                               for e, _ in eqns(jaxpr)))


def contains_expect(jaxpr) -> bool:
    """Whether ``jaxpr`` (or any jaxpr nested in it) binds ``expect``."""
    return _cached(_EXPECT, jaxpr, lambda: find(jaxpr, expect_p) is not None)


def holds_random(eqn) -> bool:
    """Whether a jaxpr nested in ``eqn`` (a higher-order primitive) has random choices."""
    return any(contains_random(sub) for sub in compat.subjaxprs_of(eqn))


def random_while(jaxpr) -> bool:
    """Whether a ``while_loop`` with random choices in its body occurs anywhere in ``jaxpr``
    (nested expectations included): reverse mode cannot pass it."""
    return any(eqn.primitive is sample_p and any(o.primitive is compat.while_p for o in outer)
               for eqn, outer in eqns(jaxpr, into_expect=True))


__all__ = ["POLICIES", "policy", "refused_call", "eqns", "find", "contains_random", "contains_expect",
           "holds_random", "random_while"]
