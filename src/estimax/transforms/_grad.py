"""``ex.grad`` and ``ex.value_and_grad``: gradient estimators of expectations."""

from __future__ import annotations

from typing import Sequence

import jax

from .._errors import ProgramError
from ..dsl._ir import random_while
from ..dsl._program import check_key
from ._certify import require_certificate
from ._estimate import Expectation, as_program
from ._explain import explain


def _normalize_argnums(argnums, nargs: int, where: str):
    single = isinstance(argnums, int)
    nums = (argnums,) if single else tuple(argnums)
    for a in nums:
        if not isinstance(a, int) or not -nargs <= a < nargs:
            raise ProgramError(
                f"{where}: argnums={argnums!r} is out of range for a program called with "
                f"{nargs} argument(s) (argnums counts the program's own arguments; the key is "
                "not one of them)."
            )
    return single, tuple(a % nargs for a in nums)


def _scalar_check(program: Expectation, args, where: str):
    closed, _, _ = program.stage(args)
    outs = closed.jaxpr.outvars
    if len(outs) != 1 or outs[0].aval.shape != ():
        shown = ", ".join(str(v.aval) for v in outs) or "nothing"
        raise ProgramError(
            f"{where}: the program {program.name!r} returns {shown}; gradient estimation needs a "
            "single scalar. Reduce it in the program (e.g. `return jnp.sum(loss)` or "
            f"`jnp.mean`), or use {program.name}.estimate for vector values."
        )


def value_and_grad(objective, argnums: int | Sequence[int] = 0, *, require: str | None = None):
    """``f(key, *args) -> (estimate, gradient estimate)``; ``argnums`` as in ``jax.grad``.

    The gradient is an unbiased estimate of ``∇ E[objective(*args)]`` when ``explain``
    certifies the program ``unbiased``. With a tuple ``argnums`` the gradient is a tuple.
    ``require="unbiased"`` (or ``"consistent"``) checks the certificate first, when the
    program is staged and before anything is compiled, and raises
    :class:`~estimax.CertificateError` with the reasons when it is weaker.

    A program whose random choices sit in a ``lax.while_loop`` body (a random trip count)
    is differentiated in forward mode, one pass per differentiated coordinate, since JAX
    cannot reverse a ``while_loop``; the estimate is the same.
    """
    return _value_and_grad(objective, argnums, require, "ex.value_and_grad")


def _value_and_grad(objective, argnums, require, entry: str):
    program = as_program(objective, entry)
    where = f"{entry}({program.name})"

    @jax.jit
    def f(key, *args):
        check_key(key, where)
        single, nums = _normalize_argnums(argnums, len(args), where)
        _scalar_check(program, args, where)
        if require is not None:
            # the plan is a static analysis of the staged program: no compilation happens here
            require_certificate(explain(program, *args, argnums=argnums), require, where)
        shifted = nums[0] + 1 if single else tuple(a + 1 for a in nums)
        closed, _, _ = program.stage(args)
        if random_while(closed.jaxpr):
            both = lambda *a: (program._estimate(*a),) * 2
            g, value = jax.jacfwd(both, argnums=shifted, has_aux=True)(key, *args)
            return value, g
        return jax.value_and_grad(program._estimate, argnums=shifted)(key, *args)

    return f


def grad(objective, argnums: int | Sequence[int] = 0, *, require: str | None = None):
    """``g(key, *args) -> gradient estimate`` of ``E[objective(*args)]``; see :func:`value_and_grad`."""
    vg = _value_and_grad(objective, argnums, require, "ex.grad")
    return jax.jit(lambda key, *args: vg(key, *args)[1])


__all__ = ["grad", "value_and_grad"]
