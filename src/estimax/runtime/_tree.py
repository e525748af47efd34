"""Pytree helpers shared by the compiled loops: a finiteness test and a branch-free select."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _jax_compat as compat


def all_finite(tree) -> jax.Array:
    """Whether every floating-point leaf of ``tree`` is finite (a scalar bool; ``True`` for a
    tree without floating-point leaves). Integer and boolean leaves are not checked."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if compat.is_float_dtype(x.dtype)]
    return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def select(pred, on_true, on_false):
    """``on_true`` where the scalar ``pred`` holds, else ``on_false``, leaf by leaf."""
    return jax.tree.map(lambda a, b: jax.lax.select(pred, a, b), on_true, on_false)


__all__ = ["all_finite", "select"]
