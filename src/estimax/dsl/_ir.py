"""Queries over the language's IR (staged jaxprs): what a program contains.

Each query walks nested jaxprs (``jit``, ``cond``, ``scan``, ``while``, custom rules) and the
programs of nested expectations.
"""

from __future__ import annotations

from ..runtime import _jax_compat as compat
from ._primitives import expect_p, sample_p


def random_while(jaxpr) -> bool:
    """Whether a ``while_loop`` with random choices in its body occurs anywhere in ``jaxpr``
    (nested expectations included): reverse mode cannot pass it."""
    def walk(j, inside):
        for eqn in j.eqns:
            if eqn.primitive is sample_p and inside:
                return True
            if eqn.primitive is expect_p:
                if walk(eqn.params["spec"].jaxpr, inside):
                    return True
                continue
            loop = inside or eqn.primitive is compat.while_p
            if any(walk(sub, loop) for sub in compat.subjaxprs_of(eqn)):
                return True
        return False

    return walk(jaxpr, False)
