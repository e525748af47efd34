"""Programs: a user's function and its staged jaxprs, cached per argument signature.

The language layer knows how to stage a program; estimating it is the transforms' work
(:class:`estimax.transforms._estimate.Expectation`, a ``Program`` that can be estimated).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from .._errors import ProgramError
from ..runtime import _jax_compat as compat
from ._primitives import stage


def key_problem(key) -> str | None:
    """``None`` if ``key`` is one PRNG key (typed, or raw ``uint32[2]``); else what it is."""
    try:
        aval = compat.aval_of(key)
    except TypeError:
        return type(key).__name__
    if jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key):
        ok = aval.shape == ()
    else:
        ok = aval.dtype == jnp.uint32 and aval.shape == (2,)
    return None if ok else f"{aval.dtype}{list(aval.shape)}"


def check_key(key, call: str):
    """``call`` is how the user called the estimator, without arguments: ``ex.grad(f)``."""
    got = key_problem(key)
    if got is not None:
        raise ProgramError(
            f"{call}(key, ...): the first argument must be a PRNG key (jax.random.key(0) or "
            f"jax.random.PRNGKey(0)); got {got}. Every estimator takes the key first: "
            f"{call}(key, *args)."
        )


class Program:
    """A user's function, staged to a jaxpr per argument signature (``.stage``).

    Calling it inside another program inlines it (its sites become that program's sites).
    """

    def __init__(self, fn: Callable, name: str | None = None, certificate: tuple[str, str] | None = None):
        if not callable(fn):
            raise ProgramError(f"ex.expectation expects a function; got {type(fn).__name__}.")
        self.fn = fn
        functools.update_wrapper(self, fn)
        self.name = name or getattr(fn, "__name__", "program")
        #: ``(kind, reason)`` declared by the program's author where the program computes a
        #: surrogate whose gradient is, e.g., only consistent (self-normalized importance
        #: sampling); ``explain`` reports the weaker of this and what the pass derives.
        self.declared_certificate = certificate
        self._staged: dict = {}

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<estimax program {self.name}>"

    # -- staging -------------------------------------------------------------------------
    def stage(self, args: Sequence):
        """The staged program for ``args``: ``(closed_jaxpr, in_tree, out_tree)``.

        Cached per argument structure and abstract values, as ``jax.jit`` caches traces.
        """
        args = tuple(args)
        leaves, in_tree = jax.tree_util.tree_flatten(args)
        try:
            avals = tuple(compat.aval_of(x) for x in leaves)
            signature = (in_tree, tuple((a.shape, a.dtype, getattr(a, "weak_type", False)) for a in avals),
                         compat.abstract_mesh())  # a mesh partitions ex.vmap's lanes (dsl._primitives)
            hit = self._staged.get(signature)
        except TypeError:  # a leaf that is not an array: let `stage` report it
            signature, hit = None, None
        if hit is not None:
            return hit
        out = stage(self.fn, args, f"program {self.name!r}")
        if signature is not None and not any(isinstance(c, jax.core.Tracer) for c in out[0].consts):
            self._staged[signature] = out
        return out


__all__ = ["Program", "check_key", "key_problem"]
