"""``ex.argmin``: an inner optimization problem as a value of the outer program.

::

    def inner(w, log_lam, X, y):                      # ridge regression
        return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.exp(log_lam) * jnp.sum(w ** 2)

    def outer(log_lam):
        w = ex.argmin(inner, jnp.zeros(d), log_lam, X_train, y_train)
        return jnp.mean((X_val @ w - y_val) ** 2)

    jax.grad(outer)(0.0)           # the hypergradient, by implicit differentiation

The inner program may state constraints (``ex.subject_to``); it must be deterministic.
``ex.argmin`` binds the ``argmin`` marker of the IR, so ``ex.explain`` of a program that
uses it lists each inner problem with its hypergradient method, inner solver and certificate.
See :mod:`estimax.transforms._bilevel` for the methods.
"""

from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp

from .._errors import ProgramError
from ..runtime import _jax_compat as compat
from ._primitives import _caller_location, _current_scope

argmin_p = compat.Primitive("estimax_argmin")
#: the name scope around an inner solve (see ``transforms/_smoothness``)
ARGMIN_SCOPE = "estimax_argmin_solve"
argmin_p.multiple_results = True


def _impl(*, spec):
    del spec
    return []


def _abstract_eval(*, spec):
    del spec
    return []


def _batch(args, dims, *, spec):
    del args, dims
    return argmin_p.bind(spec=spec), []


def _jvp(primals, tangents, *, spec):
    del primals, tangents
    return argmin_p.bind(spec=spec), []


compat.register_rules(argmin_p, impl=_impl, abstract_eval=_abstract_eval, batching_rule=_batch, jvp_rule=_jvp)


def argmin(inner, init, *args, method: str = "implicit", solver=None, linear_solver: str = "auto",
           tol: float | None = None, max_steps: int | None = None, linear_tol: float | None = None,
           steps: int | None = None, truncate: int | None = None, key=None, throw: bool = True,
           full_output: bool = False, name: str | None = None, bounds=None):
    """The solution ``y*`` of ``min_y inner(y, *args)``, differentiable with respect to ``args``
    (and to the values ``inner`` closes over).

    Args:
        inner: the inner objective ``inner(y, *args) -> scalar``: a function or an
            ``@ex.expectation`` program without random choices; ``ex.subject_to`` in it states
            constraints on ``y``.
        init: the starting point, a pytree of floating-point arrays (not differentiated).
        args: the outer arguments; derivatives of ``y*`` flow to them.
        method: ``"implicit"`` (implicit differentiation of the optimality conditions; exact up
            to the inner tolerance) or ``"unrolled"`` (differentiate through ``steps`` solver
            iterations; ``truncate=K`` differentiates only the last ``K``).
        solver: the inner solver. Default: ``ex.solvers.Newton()`` without constraints
            (``Newton(line_search=False)`` when unrolled), ``ExactAL()`` with equalities,
            ``AugmentedLagrangian()`` with inequalities.
        linear_solver: for ``"implicit"``: ``"cg"``, ``"gmres"``, ``"neumann"``, ``"dense"`` or
            ``"auto"`` (dense up to 64 unknowns, else CG without constraints, GMRES with them).
        tol: the inner KKT tolerance (default ``1e-10`` in float64, ``1e-5`` in float32);
            ``linear_tol``: the relative tolerance of the implicit linear solve (default: ``tol``
            scaled, ``1e-10`` / ``1e-6``).
        max_steps: the inner solver's iteration budget (default 100; ``steps`` when unrolled).
        throw: with ``"implicit"``, fail at run time (an error naming this argmin) when the
            inner solve did not converge: its derivatives would be wrong.
        full_output: return ``(y*, ArgminInfo)``: the result code, steps, KKT residual,
            inner value (differentiable) and multipliers.
        name: the name ``explain`` shows (default ``argmin_0``, ``argmin_1``, ...).
        bounds: ``(lower, upper)`` on the inner variables, shaped like ``init`` (``None`` or
            ``±inf`` for none; concrete values, not traced), as in ``ex.solve``: inequality constraints ``bounds/lower`` and
            ``bounds/upper``, differentiated through the KKT system like the others.
    """
    from ..solvers._problem import Problem
    from ..transforms._bilevel import ArgminInfo, ArgminSpec, Inner, check_method, choose_linear_solver
    from ..transforms._constraints import split
    from ..transforms._estimate import as_program as _as_program

    counts = _current_scope().counts
    index = counts.get("#argmin", 0)
    counts["#argmin"] = index + 1
    if name is None:
        name = f"argmin_{index}"
    where = f"ex.argmin({name!r})"
    if not isinstance(name, str) or not name:
        raise ProgramError(f"ex.argmin(name=...) expects a non-empty string; got {name!r}.")
    program = _as_program(inner, where)
    leaves = jax.tree_util.tree_leaves(init)
    if not leaves or not all(compat.is_float_dtype(jnp.result_type(x)) for x in leaves):
        raise ProgramError(f"{where}: init (the inner variables' starting point) must be a non-empty pytree of "
                           f"floating-point arrays; got {jax.tree_util.tree_map(lambda x: jnp.result_type(x), init)}.")
    for i, a in enumerate(jax.tree_util.tree_leaves(args)):
        if not hasattr(a, "dtype") and not isinstance(a, (int, float, bool, complex)):
            raise ProgramError(f"{where}: argument leaf {i} is a {type(a).__name__}; arguments are arrays.")
    try:
        parts = split(program, (init, *args))
    except ProgramError as e:
        raise ProgramError(f"{where}: {e}") from None
    if parts.stochastic:
        raise ProgramError(
            f"{where}: the inner objective {program.name!r} has random choices (ex.sample); an inner problem must be "
            "deterministic. Average the randomness out (a fixed sample passed as an argument), or state the bilevel "
            "problem for a stochastic bilevel solver."
        )
    used = compat.dce_jaxpr(parts.objective.jaxpr, [True], instantiate=True)[1]
    if not parts.constraints and not any(used[:parts.n_param_leaves]):
        raise ProgramError(f"{where}: the inner objective {program.name!r} does not depend on the inner variables "
                           "(its first argument): there is nothing to minimize.")
    try:
        problem = Problem(parts, init, bounds=bounds)
    except ProgramError as e:
        raise ProgramError(f"{where}: {str(e).replace('ex.solve: ', '')}") from None
    except jax.errors.TracerArrayConversionError:
        raise ProgramError(f"{where}: bounds= must be concrete values (NumPy arrays or numbers): which entries are "
                           "bounded is part of the problem's structure. Got traced arrays.") from None
    constrained = bool(problem.m_eq or problem.m_in)
    check_method(method, linear_solver, constrained, where)
    if method == "unrolled" and constrained:
        raise ProgramError(f"{where}: method='unrolled' supports unconstrained inner problems; this one has "
                           "constraints. Use method='implicit' (through the KKT system).")
    if solver is None:
        from ..solvers import AugmentedLagrangian, ExactAL
        from ..solvers._unconstrained import Newton

        solver = (Newton(line_search=(method != "unrolled")) if not constrained
                  else ExactAL() if not problem.m_in else AugmentedLagrangian())
    try:
        solver.check(problem)
    except ProgramError as e:
        raise ProgramError(f"{where}: {e}") from None
    if method == "unrolled" and not getattr(solver, "unrollable", False):
        raise ProgramError(
            f"{where}: method='unrolled' differentiates through the solver's steps, which {solver.name} cannot "
            "(its step loops inside, e.g. a line search). Use ex.solvers.GradientDescent(learning_rate=...) or "
            "ex.solvers.Newton(line_search=False), or method='implicit'."
        )
    f64 = problem.dtype == jnp.float64
    tol = (1e-10 if f64 else 1e-5) if tol is None else tol
    linear_tol = (1e-10 if f64 else 1e-6) if linear_tol is None else linear_tol
    if method == "unrolled":
        steps = 100 if steps is None else steps
        if not (isinstance(steps, int) and steps >= 1):
            raise ProgramError(f"{where}: steps must be a positive integer; got {steps!r}.")
        if truncate is not None and not (isinstance(truncate, int) and 1 <= truncate <= steps):
            raise ProgramError(f"{where}: truncate must be an integer in [1, steps={steps}]; got {truncate!r}.")
    max_steps = max_steps or 100
    size = problem.n + problem.m_eq + problem.m_in
    linear = choose_linear_solver(linear_solver, size, constrained) if method == "implicit" else (
        f"unrolled, {steps} steps" + (f" (last {truncate} differentiated)" if truncate else ""))
    key = jax.random.PRNGKey(0) if key is None else key
    runner = Inner(problem, solver, method=method, linear_solver=linear, max_steps=max_steps, tol=float(tol),
                   linear_tol=float(linear_tol), steps=steps, truncate=truncate)
    certificate = "exact (to the inner tolerance)" if method == "implicit" else "consistent"
    argmin_p.bind(spec=ArgminSpec(name, method, solver.name, linear, certificate, _caller_location(),
                                  problem.n, problem.m_eq, problem.m_in))
    x0 = jnp.asarray(jax.flatten_util.ravel_pytree(init)[0], problem.dtype)
    arg_leaves = [jnp.asarray(a) for a in jax.tree_util.tree_leaves(args)]
    consts = list(parts.objective.consts)
    # the scope marks the solve for the differentiability analysis: its stopping tests and
    # step selections are the inner solver's, covered by the argmin's own certificate
    with jax.named_scope(ARGMIN_SCOPE):
        x, lam, mu, result, nsteps, kkt, value = runner(x0, key, arg_leaves, consts)
    if throw and method == "implicit":
        import equinox as eqx

        x = eqx.error_if(
            x, result != 0,
            f"{where}: the inner solve ({solver.name}) did not converge, so its implicit derivatives would be "
            f"wrong. Raise max_steps (now {max_steps}) or tol, give a better init, or pass throw=False and "
            "read the result with full_output=True.",
        )
    solution = problem.unravel(x)
    if not full_output:
        return solution
    info = ArgminInfo(result=result, steps=nsteps, kkt=kkt, value=value, multipliers=problem.multipliers(lam, mu))
    return solution, info


def find_argmins(jaxpr) -> list:
    """The specs of every ``ex.argmin`` in ``jaxpr`` (nested jaxprs included), in order."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive is argmin_p:
            out.append(eqn.params["spec"])
        for sub in compat.subjaxprs_of(eqn):
            out.extend(find_argmins(sub))
    return out


__all__ = ["argmin", "argmin_p", "find_argmins"]
