"""Programs: ``@expectation``, and the estimators built from them."""

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


def _check_key(key, call: str):
    """``call`` is how the user called the estimator, without arguments: ``ex.grad(f)``."""
    got = key_problem(key)
    if got is not None:
        raise ProgramError(
            f"{call}(key, ...): the first argument must be a PRNG key (jax.random.key(0) or "
            f"jax.random.PRNGKey(0)); got {got}. Every estimator takes the key first: "
            f"{call}(key, *args)."
        )


class Expectation:
    """A program whose value is a random variable; built by :func:`expectation`.

    Calling it inside another program inlines it (its sites become that program's sites).
    ``.estimate(key, *args)`` is an unbiased estimate of its expected value; ``jax.grad`` of
    ``.estimate`` (or :func:`estimax.grad`) is an estimate of the expectation's gradient.
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
        self.estimate = jax.jit(self._estimate)

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

    def _estimator(self, args):
        from ..transforms._adev import build_estimator
        from ..transforms._certify import collect_sites

        from ._constraints import refuse_constraints

        closed, in_tree, out_tree = self.stage(args)
        refuse_constraints(closed.jaxpr)  # solved by ex.solve, never estimated as if unconstrained
        collect_sites(closed.jaxpr)  # validates names
        est = build_estimator(closed.jaxpr, len(closed.consts))
        consts = list(closed.consts)

        def flat_est(key, *flat_args):
            return jax.tree_util.tree_unflatten(out_tree, est(key, *consts, *flat_args))

        return flat_est, in_tree, out_tree

    def _estimate(self, key, *args):
        """An unbiased estimate of ``E[program(*args)]`` (same pytree as the program's value).

        Differentiable: ``jax.grad(objective.estimate, argnums=1)(key, theta)`` is the
        estimator pass's gradient estimate.
        """
        _check_key(key, f"{self.name}.estimate")
        flat_est, in_tree, _ = self._estimator(args)
        return flat_est(key, *jax.tree_util.tree_leaves(args))


def expectation(fn: Callable | None = None, *, name: str | None = None):
    """Declare a program whose value is a random variable.

    **Example:**

        >>> import jax, numpyro.distributions as dist, estimax as ex
        >>> @ex.expectation
        ... def objective(mu):
        ...     z = ex.sample(dist.Normal(mu, 1.0), name="z")
        ...     return (z - 1.0) ** 2
        >>> g = ex.grad(objective)(jax.random.PRNGKey(0), 0.0)   # estimates d/dmu E[(z-1)^2] = -2
    """
    if fn is None:
        return lambda f: Expectation(f, name=name)
    if isinstance(fn, Expectation):
        return fn
    return Expectation(fn, name=name)


def _as_program(objective, where: str) -> Expectation:
    if isinstance(objective, Expectation):
        return objective
    if callable(objective):
        return Expectation(objective)
    raise ProgramError(f"{where} expects a program (an @ex.expectation function); got {type(objective).__name__}.")


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
    program = _as_program(objective, entry)
    where = f"{entry}({program.name})"

    @jax.jit
    def f(key, *args):
        _check_key(key, where)
        single, nums = _normalize_argnums(argnums, len(args), where)
        _scalar_check(program, args, where)
        if require is not None:
            # the plan is a static analysis of the staged program: no compilation happens here
            from ..transforms._certify import explain, require_certificate

            require_certificate(explain(program, *args, argnums=argnums), require, where)
        shifted = nums[0] + 1 if single else tuple(a + 1 for a in nums)
        closed, _, _ = program.stage(args)
        if _random_while(closed.jaxpr):
            both = lambda *a: (program._estimate(*a),) * 2
            g, value = jax.jacfwd(both, argnums=shifted, has_aux=True)(key, *args)
            return value, g
        return jax.value_and_grad(program._estimate, argnums=shifted)(key, *args)

    return f


def _random_while(jaxpr) -> bool:
    """Whether a ``while_loop`` with random choices in its body occurs anywhere in ``jaxpr``
    (nested expectations included): reverse mode cannot pass it."""
    from ._primitives import expect_p, sample_p

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


def grad(objective, argnums: int | Sequence[int] = 0, *, require: str | None = None):
    """``g(key, *args) -> gradient estimate`` of ``E[objective(*args)]``; see :func:`value_and_grad`."""
    vg = _value_and_grad(objective, argnums, require, "ex.grad")
    return jax.jit(lambda key, *args: vg(key, *args)[1])


__all__ = ["Expectation", "expectation", "grad", "value_and_grad"]
