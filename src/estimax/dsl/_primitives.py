"""The language's primitives: ``sample`` and ``expect``.

Both bind JAX primitives so that a program stages to an ordinary jaxpr with estimax
equations in it. Neither primitive has an implementation, a lowering or a JVP rule of its
own: a random choice only has a meaning inside an estimator pass, which supplies the key and
the gradient strategy. Evaluating one anywhere else is an error that says what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import linecache
import re
import sys
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from .._errors import ArgumentError, EstimaxError, NoKeyError, ProgramError, StrategyError, UnsupportedError
from ..runtime import _jax_compat as compat
from ._strategy import Strategy
from ._site import OPERAND, SiteDist, SiteSpec, family_name

# --- naming scopes ------------------------------------------------------------------------
_local = threading.local()


class _NameScope:
    def __init__(self):
        self.counts: dict[str, int] = {}

    def derive(self, d) -> str:
        base = family_name(d).lower()
        i = self.counts.get(base, 0)
        self.counts[base] = i + 1
        return f"{base}_{i}"


@contextlib.contextmanager
def name_scope():
    """Fresh derived-name counters while a program is staged."""
    stack = getattr(_local, "scopes", None)
    if stack is None:
        stack = _local.scopes = []
    stack.append(_NameScope())
    try:
        yield
    finally:
        stack.pop()


def _current_scope() -> _NameScope:
    stack = getattr(_local, "scopes", None)
    return stack[-1] if stack else _NameScope()


@contextlib.contextmanager
def source_location(location: str):
    """Sites created inside report ``location`` (e.g. ``file.emx:3``) as where they are
    written: for front-ends whose source is not Python."""
    prev = getattr(_local, "location", None)
    _local.location = location
    try:
        yield
    finally:
        _local.location = prev


def _caller_location() -> str | None:
    """``file:line`` of the user's code that called into estimax (the innermost frame that is
    not estimax's, JAX's, NumPyro's or the standard library's), or the location a front-end
    set with :func:`source_location`."""
    override = getattr(_local, "location", None)
    if override is not None:
        return override
    return compat.caller_location(sys._getframe(1))


# --- sample --------------------------------------------------------------------------------
sample_p = compat.Primitive("estimax_sample")


def _no_key_error(*, spec: SiteSpec, **_):
    return NoKeyError(
        f"ex.sample site {spec.name!r} was evaluated outside an estimator, where there is no "
        "random key. Random choices get their keys from the estimator: call "
        "`objective.estimate(key, *args)`, `ex.grad(objective)(key, *args)` or "
        "`ex.value_and_grad(objective)(key, *args)` instead of calling the program directly."
    )


def _sample_impl(*leaves, spec):
    raise _no_key_error(spec=spec)


def _sample_abstract_eval(*avals, spec):
    site = SiteDist(spec, avals)
    custom = None if spec.strategy is None else spec.strategy.value_struct(site.lane)
    if custom is not None:  # a strategy that changes the value's type (a relaxation)
        out = jax.ShapeDtypeStruct(site.lane_sizes + tuple(custom.shape), custom.dtype)
    else:
        out = jax.eval_shape(lambda *l: SiteDist(spec, l).sample(jax.random.PRNGKey(0)), *avals)
    return compat.core_shaped(out)


def _sample_batch(args, dims, *, spec):
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    return sample_p.bind(*args, spec=spec.with_level(dims, size)), 0


def _sample_jvp(primals, tangents, *, spec):
    del primals, tangents
    raise EstimaxError(
        f"JAX tried to differentiate the random choice {spec.name!r} directly (jax.grad or "
        "jax.jvp of the raw program). A random choice has no derivative; the derivative of "
        "its *expectation* is what an estimator computes: use `ex.grad(objective)(key, ...)`, "
        "`jax.grad(objective.estimate, argnums=1)(key, ...)` or `ex.value_and_grad`."
    )


compat.register_rules(
    sample_p,
    impl=_sample_impl,
    abstract_eval=_sample_abstract_eval,
    batching_rule=_sample_batch,
    jvp_rule=_sample_jvp,
    lowering_error=_no_key_error,
)


def sample(d: dist.Distribution, estimator: Strategy | None = None, name: str | None = None):
    """A random choice ``x ~ d``, named ``name``, differentiated with ``estimator``.

    **Arguments:**

    - ``d``: a ``numpyro.distributions.Distribution``.
    - ``estimator``: a strategy (``ex.reparam``, ``ex.reinforce``, ``ex.enum``, ``ex.mvd``,
      ...) or ``None`` for the default: reparam when ``d`` has a reparameterized sampler,
      enumeration for a small finite support, REINFORCE otherwise.
    - ``name``: the site's name (unique in the program); derived from the family if omitted.

    Only meaningful inside a program run by an estimator::

        @ex.expectation
        def objective(mu):
            z = ex.sample(dist.Normal(mu, 1.0), name="z")
            return z ** 2

        objective.estimate(jax.random.PRNGKey(0), 0.5)
    """
    if name is not None and not isinstance(name, str):
        raise ArgumentError(f"ex.sample(name=...) expects a string; got {type(name).__name__} {name!r}.")
    if not isinstance(d, dist.Distribution):
        what = f"site {name!r}" if name else "ex.sample"
        hint = ""
        if isinstance(d, type) or callable(d):
            hint = " Did you pass the class or function instead of an instance, e.g. dist.Normal instead of dist.Normal(0.0, 1.0)?"
        raise ArgumentError(
            f"{what}: expected a numpyro.distributions.Distribution as the first argument; "
            f"got {type(d).__name__}.{hint}"
        )
    if name is None:
        name = _current_scope().derive(d)
        user_named = False
    else:
        user_named = True
    if estimator is not None:
        if isinstance(estimator, type) and issubclass(estimator, Strategy):
            raise StrategyError(
                f"site {name!r}: estimator={estimator.__name__} is a class; pass an instance "
                "such as ex.reinforce or ex.reinforce(baseline=0.5)."
            )
        if not isinstance(estimator, Strategy):
            raise StrategyError(
                f"site {name!r}: estimator must be an estimax strategy (ex.reparam, "
                f"ex.reinforce, ex.enum, ex.mvd, ...); got {type(estimator).__name__} {estimator!r}."
            )
        estimator.check(d, name)
        estimator, extras = estimator.split_operands()
    else:
        extras = ()
    leaves, treedef = jax.tree_util.tree_flatten(d)
    statics = tuple(OPERAND if isinstance(x, jax.core.Tracer) else x for x in leaves)
    operands = [x for x in leaves if isinstance(x, jax.core.Tracer)]
    anchors = list(getattr(_local, "anchors", ()))
    spec = SiteSpec(
        name=name,
        treedef=treedef,
        strategy=estimator,
        user_named=user_named,
        location=_caller_location(),
        statics=statics,
        n_extra=len(extras),
        n_anchors=len(anchors),
    )
    return sample_p.bind(*operands, *extras, *anchors, spec=spec)


# --- vmap with independent draws per lane ---------------------------------------------------
@contextlib.contextmanager
def _anchored(anchor):
    prev = getattr(_local, "anchors", ())
    _local.anchors = prev + (anchor,)
    try:
        yield
    finally:
        _local.anchors = prev


def vmap(fn: Callable, in_axes=0, out_axes=0, axis_size: int | None = None) -> Callable:
    """``jax.vmap`` for programs: every random choice inside is drawn independently per lane.

    Under plain ``jax.vmap`` a site whose distribution does not depend on the mapped values
    is drawn once and shared by all lanes (JAX calls no batching rule for it). ``ex.vmap``
    passes a mapped lane index to every site it contains, so each lane gets its own draw --
    what particles, data-point latents and multi-sample objectives need::

        zs = ex.vmap(lambda: ex.sample(dist.Normal(0.0, 1.0), name="z"), axis_size=8)()

    ``in_axes``/``out_axes``/``axis_size`` are as in ``jax.vmap``; ``axis_size`` is required
    when no argument is mapped.
    """

    def mapped(*args):
        axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
        if len(axes) != len(args):
            raise ArgumentError(
                f"ex.vmap: in_axes has {len(axes)} entries for {len(args)} arguments."
            )
        size = axis_size
        if size is None:
            sizes = {
                jnp.shape(leaf)[ax]
                for a, ax in zip(args, axes, strict=True)
                if ax is not None
                for leaf in jax.tree_util.tree_leaves(a)
            }
            if not sizes:
                raise ArgumentError("ex.vmap: no argument is mapped; give axis_size=.")
            size = sizes.pop()

        def inner(anchor, *a):
            with _anchored(anchor):
                return fn(*a)

        # Under a device mesh (``jax.set_mesh``, ``ex.fit(devices=)``) the outermost mapped
        # axis whose size the mesh divides is partitioned over the mesh's first axis: the lane
        # indices (from which every lane's keys derive) and the outputs are constrained, and
        # XLA's SPMD partitioner spreads the lanes' work. Inner ex.vmaps stay whole per device.
        lanes = _lane_axis(size)
        anchor = jnp.arange(size)
        if lanes is None:
            return jax.vmap(inner, in_axes=(0, *axes), out_axes=out_axes)(anchor, *args)
        anchor = jax.lax.with_sharding_constraint(anchor, jax.sharding.PartitionSpec(lanes))
        prev = getattr(_local, "sharded_lanes", False)
        _local.sharded_lanes = True
        try:
            out = jax.vmap(inner, in_axes=(0, *axes), out_axes=out_axes)(anchor, *args)
        finally:
            _local.sharded_lanes = prev
        if isinstance(out_axes, int):
            spec = jax.sharding.PartitionSpec(*([None] * out_axes), lanes)
            out = jax.tree.map(lambda y: jax.lax.with_sharding_constraint(y, spec)
                               if jnp.ndim(y) > out_axes and jnp.shape(y)[out_axes] == size else y, out)
        return out

    return mapped


def _lane_axis(size: int) -> str | None:
    """The mesh axis over which an ``ex.vmap`` of ``size`` lanes is partitioned, or ``None``
    (no mesh, a one-device mesh, a size the mesh does not divide, or inside a partitioned
    ``ex.vmap``)."""
    mesh = compat.abstract_mesh()
    if mesh is None or getattr(_local, "sharded_lanes", False):
        return None
    axis = mesh.axis_names[0]
    count = dict(mesh.shape)[axis]
    return axis if count > 1 and size % count == 0 else None


# --- expect --------------------------------------------------------------------------------
expect_p = compat.Primitive("estimax_expect")
expect_p.multiple_results = True


@dataclasses.dataclass(frozen=True, eq=False)
class ExpectSpec:
    """A nested expectation: the inner program (consts first) and the sample count.

    The operands are the inner program's constants, then its arguments, then -- when
    ``indexed`` -- one integer index array (which of ``size`` items of a finite sum of
    compositions the value belongs to; only the tracking pass reads it). With ``log`` the
    inner program returns log-weights ``l`` and the value is ``log E[exp(l)]``.
    """

    jaxpr: Any  # a Jaxpr whose constvars are bound from the first ``n_consts`` operands
    n_consts: int
    in_tree: Any
    out_tree: Any
    n: int
    name: str
    location: str | None
    cache: dict = dataclasses.field(default_factory=dict)
    log: bool = False
    indexed: bool = False
    size: int | None = None
    #: the tracking pass's form of a log-expectation: operands ``(c, seen, *operands)``,
    #: values ``(mean exp(l - c'), mean exp(l - c')², c')`` with ``c' = c`` where ``seen``
    #: and the plug-in ``log mean exp(l)`` elsewhere (see ``transforms/_compositional``)
    shifted: bool = False

    def __repr__(self) -> str:
        return f"{'log_expect' if self.log else 'expect'}({self.name!r}, n={self.n})"

    @property
    def call(self) -> str:
        """How the user wrote it, for messages: ``ex.expect('Z')``."""
        return f"ex.{'log_expect' if self.log else 'expect'}({self.name!r})"

    def split(self, operands):
        """``(jaxpr operands, index or None)``; a shifted spec's ``(c, seen)`` are dropped."""
        operands = list(operands)[2 if self.shifted else 0 :]
        if self.indexed:
            return operands[:-1], operands[-1]
        return operands, None

    def shifted_form(self) -> "ExpectSpec":
        out = self.cache.get("shifted")
        if out is None:
            out = self.cache["shifted"] = dataclasses.replace(self, indexed=False, size=None, shifted=True, cache={})
        return out


def _expect_no_key(*, spec: ExpectSpec, **_):
    return NoKeyError(
        f"ex.expect({spec.name!r}) was evaluated outside an estimator, where there is no random "
        "key. Use it inside a program and run that program with `.estimate(key, ...)`, or call "
        "`ex.expectation(fn).estimate(key, ...)` directly."
    )


def _expect_impl(*args, spec):
    raise _expect_no_key(spec=spec)


def _expect_abstract_eval(*avals, spec):
    if spec.shifted:
        return [spec.jaxpr.outvars[0].aval] * 3
    return [v.aval for v in spec.jaxpr.outvars]


def _expect_batch(args, dims, *, spec: ExpectSpec):
    nc = spec.n_consts
    if spec.shifted:
        raise UnsupportedError(
            f"the tracked form of {spec.call} cannot be vmapped; run one tracked fit per lane."
        )
    (args, index), (dims, index_dim) = spec.split(args), spec.split(dims)

    def per_lane(*ops):
        return compat.eval_jaxpr(spec.jaxpr, ops[:nc], *ops[nc:])

    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    with name_scope():
        closed = jax.make_jaxpr(jax.vmap(per_lane, in_axes=tuple(dims)))(*structs)
    new = dataclasses.replace(spec, jaxpr=closed.jaxpr, n_consts=len(closed.consts), cache={})
    extra = []
    if spec.indexed:  # the index follows the lanes: one index per lane
        size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None) if index_dim is None \
            else index.shape[index_dim]
        extra = [jnp.moveaxis(index, index_dim, 0) if index_dim is not None
                 else jnp.broadcast_to(index, (size, *jnp.shape(index)))]
    outs = expect_p.bind(*closed.consts, *args, *extra, spec=new)
    return outs, [0] * len(outs)


def _expect_jvp(primals, tangents, *, spec):
    del primals, tangents
    raise EstimaxError(
        f"JAX tried to differentiate ex.expect({spec.name!r}) directly. Differentiate the "
        "enclosing program with ex.grad / ex.value_and_grad instead."
    )


compat.register_rules(
    expect_p,
    impl=_expect_impl,
    abstract_eval=_expect_abstract_eval,
    batching_rule=_expect_batch,
    jvp_rule=_expect_jvp,
    lowering_error=_expect_no_key,
)


def stage(fn: Callable, args: tuple, what: str, *, fresh_names: bool = True, float_outputs: bool = True):
    """Trace ``fn(*args)`` to a jaxpr (in a fresh naming scope unless ``fresh_names=False``).

    Returns ``(closed_jaxpr, in_tree, out_tree)``; ``args`` may hold arrays or
    ``ShapeDtypeStruct``s.
    """
    flat, in_tree = jax.tree_util.tree_flatten(args)

    def flat_fn(*flat_args):
        out = fn(*jax.tree_util.tree_unflatten(in_tree, flat_args))
        leaves, out_tree = jax.tree_util.tree_flatten(out)
        flat_fn.out_tree = out_tree
        return leaves

    structs = []
    for i, x in enumerate(flat):
        try:
            aval = compat.aval_of(x) if not isinstance(x, jax.ShapeDtypeStruct) else x
            structs.append(jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False)))
        except TypeError as e:
            raise ProgramError(
                f"{what}: argument leaf {i} is a {type(x).__name__}, not an array; program "
                "arguments must be pytrees of arrays and numbers."
            ) from e
    # A traced value (a random choice's, an argument's, or computed from them) used where Python
    # needs a concrete one: JAX's error names its own frames and ``flat_fn``; say which of the
    # user's lines did it, which random choices the value comes from, and what to write instead.
    def traced_use_error(e) -> ProgramError:
        how = compat.concretization_kind(e)
        at = compat.exception_location(e)
        where, code, sites = "an unknown location", "", []
        if at is not None:
            file, line, frame = at
            where, code = f"{file}:{line}", linecache.getline(file, line).strip()
            code = re.sub(r"\s+#[^'\"]*$", "", code)  # the line without its comment
            local = frame.f_locals
            for word in dict.fromkeys(re.findall(r"[A-Za-z_]\w*", code)):  # the line's names, in order
                try:
                    leaves = jax.tree_util.tree_leaves(local[word]) if word in local else ()
                except Exception:  # noqa: BLE001 -- a value that is no pytree: not traced
                    leaves = ()
                for leaf in leaves:  # the random choices the line's traced values come from
                    for prim, params in compat.traced_origins(leaf, stop_at={sample_p}):
                        if prim is sample_p and params["spec"].name not in sites:
                            sites.append(params["spec"].name)
        use = {
            "bool": "as a Python bool", "int": "as a Python int", "float": "as a Python number",
            "array": "as a NumPy array",
        }.get(how, "where a concrete value is needed (a shape, a size)")
        if code:
            message = f"{what}: `{code}` (at {where}) uses a traced value {use}."
        else:
            message = f"{what}: a traced value is used {use} at {where}."
        if sites:
            named = ", ".join(repr(n) for n in sites[:3]) + (", ..." if len(sites) > 3 else "")
            message += (
                f" The value comes from the random choice{'s' if len(sites) > 1 else ''} {named}: the values "
                "of ex.sample are traced arrays, not numbers, while a program is staged (an estimator draws "
                "them later, under jit)."
            )
        else:
            message += (
                " While a program is staged its arguments, the values of ex.sample and everything computed "
                "from them are traced arrays, not numbers (an estimator runs the program under jit)."
            )
        message += {
            "bool": " Python's `if`, `while`, `and`, `or` and `not` need a concrete bool: branch with "
                    "`jax.lax.cond(pred, true_fn, false_fn, *operands)`, or choose a value with "
                    "`jnp.where(pred, a, b)`.",
            "int": " A Python loop count, size or list index must be a number when the program is staged: "
                   "loop with `jax.lax.fori_loop(0, n, body, init)` or `jax.lax.while_loop`, or run a fixed "
                   "maximum and mask the extra steps with `jnp.where(i < n, a, b)`; index a jnp array, not a "
                   "Python list, with a traced index.",
            "array": " Compute with jax.numpy (`jnp.exp(z)`), not NumPy (`np.exp(z)`).",
        }.get(how, " Keep it an array: compute with jnp functions, and choose between values with "
                   "`jnp.where(pred, a, b)` or `jax.lax.cond`.")
        return ProgramError(message)

    try:
        with name_scope() if fresh_names else contextlib.nullcontext():
            closed = jax.make_jaxpr(flat_fn)(*structs)
    except compat.CONCRETIZATION_ERRORS as e:
        raise traced_use_error(e) from e
    for v in closed.jaxpr.outvars if float_outputs else ():
        if not compat.is_float_dtype(v.aval.dtype):
            raise ProgramError(
                f"{what} returns a value of dtype {v.aval.dtype}; an expectation's value must be "
                "floating point. Convert it, e.g. `return jnp.asarray(b, jnp.float32)`."
            )
    return closed, in_tree, flat_fn.out_tree


def expect(program: Callable, *, n: int = 1, name: str | None = None, index=None, size: int | None = None) -> Callable:
    """The expectation of ``program`` as a value inside another program.

    ``ex.expect(g)(*args)`` is an unbiased estimate of ``E[g(*args)]`` (the mean of ``n``
    independent estimates by ``g``'s own estimator), with a gradient estimate from ``g``'s
    sites. Used *linearly* by the enclosing program the result stays unbiased; a nonlinear
    function of it is a plug-in estimate and ``explain`` certifies the program as biased.
    Trained with ``ex.fit(..., tracking=...)`` such an expectation is tracked across steps
    instead (a consistent estimator; see ``estimax.tracking``).

    ``index``/``size``: for a finite sum of compositions ``(1/size) Σᵢ fᵢ(E[gᵢ])``, the
    integer index ``i`` (a scalar, or one per lane under ``ex.vmap``) of the term this
    expectation belongs to, out of ``size``: the tracking pass then keeps one estimate per
    index (SOX, MSVR). Ignored by the plug-in estimator.
    """
    return _expect_call(program, n=n, name=name, index=index, size=size, log=False, what="ex.expect")


def log_expect(log_program: Callable, *, n: int = 1, name: str | None = None, index=None,
               size: int | None = None) -> Callable:
    """``log E[exp(l)]`` where ``l = log_program(*args)`` is a log-weight: a log-partition
    function, a log-normalizer, a log-evidence.

    The plug-in estimate is ``log((1/n) Σₖ exp(lₖ))`` over ``n`` draws, computed in log
    space; it is biased (Jensen), and ``explain`` says so. Trained with
    ``ex.fit(..., tracking=...)`` the expectation is tracked in log space across steps: the
    tracked value is kept as its logarithm and updated as ``s + log((1-β) + β v)`` with
    ``v = mean(exp(l - s))``, so nothing overflows, and the importance weights'
    effective sample size is reported. ``index``/``size`` as in :func:`expect`.

        >>> import jax.numpy as jnp, numpyro.distributions as dist, estimax as ex
        >>> @ex.expectation
        ... def nll(theta, x):                      # an energy model f(x) = -(x - theta)^2 / 2
        ...     def log_w():                        # log of exp(f(y)) / q(y), y ~ q = N(0, 3)
        ...         y = ex.sample(dist.Normal(0.0, 3.0), name="y")
        ...         return -0.5 * (y - theta) ** 2 - dist.Normal(0.0, 3.0).log_prob(y)
        ...     return jnp.mean(0.5 * (x - theta) ** 2) + ex.log_expect(log_w, n=16, name="log_z")()
    """
    return _expect_call(log_program, n=n, name=name, index=index, size=size, log=True, what="ex.log_expect")


def _expect_call(program, *, n, name, index, size, log, what) -> Callable:
    fn = getattr(program, "fn", program)
    if not callable(fn):
        raise ProgramError(f"{what} expects a function (a program); got {type(program).__name__}.")
    label = name or getattr(fn, "__name__", "expect")
    if name is not None and not isinstance(name, str):
        raise ArgumentError(f"{what}(name=...) expects a string; got {type(name).__name__} {name!r}.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ArgumentError(f"{what}({label!r}, n=...) expects a positive integer; got {n!r}.")
    if (index is None) != (size is None):
        raise ArgumentError(
            f"{what}({label!r}): index= and size= go together: the index of this term and the "
            f"number of terms in the finite sum; got index={'None' if index is None else '...'}, size={size!r}."
        )
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ArgumentError(f"{what}({label!r}, size=...) expects a positive integer (the number of terms); got {size!r}.")
    if index is not None:
        index = jnp.asarray(index)
        if not jnp.issubdtype(index.dtype, jnp.integer):
            raise ArgumentError(f"{what}({label!r}, index=...) expects integers (which term of the sum); got dtype {index.dtype}.")
    location = _caller_location()

    def call(*args):
        closed, in_tree, out_tree = stage(fn, args, f"{what}({label!r})")
        if log and (len(closed.jaxpr.outvars) != 1):
            raise ProgramError(
                f"{what}({label!r}): the program must return one array of log-weights; it returns "
                f"{len(closed.jaxpr.outvars)} values."
            )
        flat = jax.tree_util.tree_leaves(args)
        if index is not None:
            shape = tuple(closed.jaxpr.outvars[0].aval.shape)
            if index.shape != () and index.shape != shape[: index.ndim]:
                raise ProgramError(
                    f"{what}({label!r}): index has shape {index.shape}; it must be a scalar (one term) "
                    f"or match the leading axes of the value, of shape {shape}."
                )
        spec = ExpectSpec(
            jaxpr=closed.jaxpr,
            n_consts=len(closed.consts),
            in_tree=in_tree,
            out_tree=out_tree,
            n=n,
            name=label,
            location=location,
            log=log,
            indexed=index is not None,
            size=size,
        )
        extra = [index] if index is not None else []
        outs = expect_p.bind(*closed.consts, *[jnp.asarray(x) for x in flat], *extra, spec=spec)
        return jax.tree_util.tree_unflatten(out_tree, outs)

    return call
