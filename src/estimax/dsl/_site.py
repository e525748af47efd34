"""What a random choice is: its static description and its distribution, lifted over vmap.

A site's distribution is a NumPyro distribution carried through the staged program as its
pytree leaves (operands of ``sample_p``) and its tree structure (a static parameter). When a
program maps a site with ``jax.vmap``, the site records the mapped axes as a *level*; the
per-lane distribution is never rebuilt with new shapes (NumPyro keeps ``batch_shape`` as
static data), every operation is ``jax.vmap``-ed over the levels instead. So the value of a
site with levels ``(B2, B1)`` has shape ``(B2, B1, *per_lane_shape)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

Level = tuple[tuple[Any, ...], int]  # (in_axes per leaf, mapped size)


class _Operand:
    def __repr__(self):
        return "<operand>"


#: marks, in ``SiteSpec.statics``, a leaf that is an operand of ``sample_p``
OPERAND = _Operand()


@dataclasses.dataclass(frozen=True, eq=False)
class SiteSpec:
    """The static part of a ``sample`` site (hashable by identity).

    A distribution's leaves that are concrete when the program is staged (Python numbers,
    NumPy arrays: ``scale=1.0``, a Binomial's ``total_count``) stay here in ``statics``;
    only traced leaves become operands of ``sample_p``. So static structure stays static
    (enumerating a Binomial needs a concrete ``total_count``) and constants fold.
    """

    name: str
    treedef: Any
    strategy: Any  # a Strategy, or None for the default
    user_named: bool
    location: str | None
    statics: tuple  # per leaf: its concrete value, or OPERAND
    levels: tuple[Level, ...] = ()  # per level: (in_axes per *operand*, size)
    #: operands after the leaves that belong to the strategy (e.g. a traced baseline)
    n_extra: int = 0
    #: trailing operands that are not leaves but lane anchors of ``ex.vmap`` (see there)
    n_anchors: int = 0
    #: why ``strategy`` was set by the default rather than the program (the differentiability
    #: analysis replaces a reparameterized default that would be biased; see
    #: ``transforms/_smoothness``), or ``None`` when the program chose it
    reason: str | None = None

    def extras(self, operands) -> tuple:
        """The strategy's operands (between the leaves and the anchors)."""
        operands = tuple(operands)
        end = len(operands) - self.n_anchors
        return operands[end - self.n_extra : end]

    def merge(self, operands, fill=None) -> tuple:
        """All leaves: ``operands`` in the OPERAND slots, the statics (or ``fill``) elsewhere.

        The strategy's operands and the lane anchors at the end of ``operands`` are dropped.
        """
        operands = tuple(operands)
        it = iter(operands[: len(operands) - self.n_anchors - self.n_extra])
        out = tuple(next(it) if s is OPERAND else (s if fill is None else fill(s)) for s in self.statics)
        if next(it, OPERAND) is not OPERAND:
            raise ValueError(f"site {self.name!r}: more operands than the distribution has leaves")
        return out

    def merge_tangents(self, tangents) -> tuple:
        """Per-leaf tangents: ``tangents`` for operands, ``None`` for the statics."""
        return self.merge(tangents, fill=lambda s: None)

    def full_axes(self, axes) -> tuple:
        return self.merge(axes, fill=lambda s: None)

    def __repr__(self) -> str:
        strategy = "default" if self.strategy is None else self.strategy.describe()
        lanes = "".join(f"[{size}]" for _, size in reversed(self.levels))
        return f"site({self.name!r}{lanes}, {strategy})"

    def with_level(self, axes, size) -> "SiteSpec":
        return dataclasses.replace(self, levels=self.levels + ((tuple(axes), int(size)),))


def unwrap(d: dist.Distribution) -> dist.Distribution:
    """The innermost distribution under ``Independent`` and ``ExpandedDistribution``."""
    while isinstance(d, (dist.Independent, dist.ExpandedDistribution)):
        d = d.base_dist
    return d


def family_name(d: dist.Distribution) -> str:
    name = type(unwrap(d)).__name__
    for suffix in ("Probs", "Logits"):
        if name.endswith(suffix) and name != suffix:
            return name[: -len(suffix)]
    return name


def describe(d: dist.Distribution, levels=()) -> str:
    """``Normal(lanes=(64, 8), batch=(1,), event=(10,))``: the ``vmap`` lanes the site is
    mapped over (outermost first), then the per-lane distribution's own batch and event
    shapes, as the program wrote it (the value's shape is the three together)."""
    lanes = tuple(size for _, size in reversed(levels))
    text = family_name(d)
    parts = []
    if lanes:
        parts.append(f"lanes={lanes}")
    if d.batch_shape:
        parts.append(f"batch={tuple(d.batch_shape)}")
    if d.event_shape:
        parts.append(f"event={tuple(d.event_shape)}")
    return f"{text}({', '.join(parts)})" if parts else text


class SiteDist:
    """A site's distribution at given leaves, with every operation lifted over its levels."""

    def __init__(self, spec: SiteSpec, operands):
        self.spec = spec
        self.operands = tuple(operands)
        self.leaves = spec.merge(self.operands)
        self.extras = spec.extras(self.operands)

    # -- the per-lane distribution ---------------------------------------------------------
    def base(self, leaves=None) -> dist.Distribution:
        return jax.tree_util.tree_unflatten(self.spec.treedef, leaves if leaves is not None else self.leaves)

    @property
    def lane(self) -> dist.Distribution:
        """The per-lane distribution. For a mapped site its leaves are shape/dtype structs
        with the mapped axes removed (for static questions: support size, value type); for
        an unmapped site, the distribution itself."""
        if not self.spec.levels:
            return self.base()
        shapes = [list(jnp.shape(x)) for x in self.operands]
        for axes, _ in reversed(self.spec.levels):  # the outermost level's axis first
            for shape, ax in zip(shapes, axes, strict=True):
                if ax is not None:
                    del shape[ax]
        structs = [
            jax.ShapeDtypeStruct(tuple(shape), jnp.result_type(x)) for shape, x in zip(shapes, self.operands, strict=True)
        ]
        return self.base(self.spec.merge(structs))

    @property
    def lane_sizes(self) -> tuple[int, ...]:
        """Mapped sizes, outermost first (the leading axes of the value)."""
        return tuple(size for _, size in reversed(self.spec.levels))

    @property
    def value_shape(self) -> tuple[int, ...]:
        d = self.lane
        return self.lane_sizes + tuple(d.batch_shape) + tuple(d.event_shape)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.lane_sizes + tuple(self.lane.batch_shape)

    @property
    def num_coordinates(self) -> int:
        return math.prod(self.batch_shape)

    # -- lifting -------------------------------------------------------------------------
    def lift(self, fn: Callable, *, out_axes=0, split_key=False) -> Callable:
        """``fn(dist, *extra)`` lifted over the levels: ``lifted(leaves, *extra)``.

        ``extra`` arguments are mapped along their leading axis at each level, except a key
        (``split_key=True``, first extra argument) which is split per lane.

        Every ``jax.vmap`` is given the level's size: a level can map none of the leaves
        (an ``ex.vmap`` lane whose distribution is shared by all lanes is mapped only through
        its lane anchor, which is not a leaf), and a lifted function with no ``extra``
        (the support, the natural parameters) then has nothing else to read the size from.
        The result still has one axis per level, so shapes are the same whether the lanes
        share their parameters or not.
        """

        def at_level(k):
            if k < 0:
                return lambda leaves, *extra: fn(self.base(leaves), *extra)
            axes, size = self.spec.levels[k]
            axes = self.spec.full_axes(axes)
            inner = at_level(k - 1)
            if split_key:

                def f(leaves, key, *extra):
                    keys = jax.random.split(key, size)
                    return jax.vmap(
                        inner, in_axes=(axes, 0) + (0,) * len(extra), out_axes=out_axes, axis_size=size
                    )(leaves, keys, *extra)

                return f
            return lambda leaves, *extra: jax.vmap(
                inner, in_axes=(axes,) + (0,) * len(extra), out_axes=out_axes, axis_size=size
            )(leaves, *extra)

        return at_level(len(self.spec.levels) - 1)

    # -- operations ----------------------------------------------------------------------
    def sample(self, key, leaves=None):
        leaves = self.leaves if leaves is None else tuple(leaves)
        return self.lift(lambda d, k: d.sample(k), split_key=True)(leaves, key)

    def log_prob(self, x, leaves=None):
        """Total log density of ``x`` (summed over every batch, event and mapped axis)."""
        leaves = self.leaves if leaves is None else tuple(leaves)
        return jnp.sum(self.lift(log_density)(leaves, x))

    def log_prob_elements(self, x, leaves=None):
        """``(n,)``: the log density of each element along the leading batch axis (lanes
        first), summed over the remaining batch and event axes."""
        leaves = self.leaves if leaves is None else tuple(leaves)
        lp = self.lift(log_density)(leaves, x)
        return jnp.sum(lp.reshape(lp.shape[0], -1), axis=1)

    def lane_map(self, fn: Callable, x, extras: tuple = (), leaves=None):
        """``fn(d_lane, x_lane, *extras_lane)`` (a scalar ``fn``) per lane: shape
        ``lane_sizes``. ``x`` is the site's value (lanes leading), ``extras`` the strategy's
        operands, mapped as the site mapped them (a per-lane baseline computed inside
        ``ex.vmap``, or one shared by all lanes)."""

        def at_level(k):
            if k < 0:
                return lambda leaves, x, ex: fn(self.base(leaves), x, *ex)
            axes, size = self.spec.levels[k]
            inner = at_level(k - 1)
            leaf_axes = self.spec.full_axes(axes)
            extra_axes = tuple(self.spec.extras(axes)) if extras else ()
            return lambda leaves, x, ex: jax.vmap(inner, in_axes=(leaf_axes, 0, extra_axes), axis_size=size)(
                leaves, x, ex
            )

        leaves = self.leaves if leaves is None else tuple(leaves)
        return at_level(len(self.spec.levels) - 1)(leaves, x, tuple(extras))

    def coordinate_support(self):
        """Support values per coordinate: shape ``(K, *batch_shape, *event_shape)``."""
        return self.lift(lambda d: d.enumerate_support(expand=True), out_axes=1)(self.leaves)

    def joint_support_size(self) -> int:
        k = _support_size(self.lane)
        return k ** self.num_coordinates

    def joint_support(self):
        """Every joint configuration: shape ``(K**n, *value_shape)``."""
        support = self.coordinate_support()
        k = support.shape[0]
        n = self.num_coordinates
        event = tuple(self.lane.event_shape)
        flat = support.reshape((k, n) + event)
        idx = jnp.stack(jnp.meshgrid(*[jnp.arange(k)] * n, indexing="ij"), -1).reshape(-1, n) if n else jnp.zeros((1, 0), int)
        values = flat[idx, jnp.arange(n)]  # (C, n, *event)
        return values.reshape((values.shape[0],) + self.value_shape)


def log_density(d: dist.Distribution, x):
    """``d.log_prob(x)``, with derivatives that are right at every parameter value.

    NumPyro writes the logits parameterizations of Bernoulli and Binomial through
    ``max(l, 0) + log1p(exp(-|l|))``, whose JAX derivative at ``l = 0`` is wrong (the two
    kinks' one-sided choices do not cancel: d/dl log p(1) comes out 1.0 instead of 0.5).
    Score-function estimators differentiate this density, and ``l = 0`` is a common
    initialization, so those families use ``softplus`` here.
    """
    if isinstance(d, dist.Independent):
        lp = log_density(d.base_dist, x)
        n = d.reinterpreted_batch_ndims
        return jnp.sum(lp, axis=tuple(range(lp.ndim - n, lp.ndim))) if n else lp
    if isinstance(d, dist.ExpandedDistribution):
        return jnp.broadcast_to(log_density(d.base_dist, x), jnp.broadcast_shapes(jnp.shape(x)[: jnp.ndim(x) - len(d.event_shape)], d.batch_shape))
    if isinstance(d, dist.BernoulliLogits):
        x = jnp.asarray(x, jnp.result_type(d.logits))  # logits may be a Python number
        return x * d.logits - jax.nn.softplus(d.logits)
    if isinstance(d, dist.BinomialLogits):
        n = jnp.asarray(d.total_count, jnp.result_type(d.logits))
        k = jnp.asarray(x, jnp.result_type(d.logits))
        log_comb = jax.scipy.special.gammaln(n + 1) - jax.scipy.special.gammaln(k + 1) - jax.scipy.special.gammaln(n - k + 1)
        return log_comb + k * d.logits - n * jax.nn.softplus(d.logits)
    return d.log_prob(x)


def _support_size(d: dist.Distribution) -> int:
    """Number of support points of one coordinate of ``d``, from static shapes only."""
    leaves, treedef = jax.tree_util.tree_flatten(d)
    traced = [i for i, x in enumerate(leaves) if isinstance(x, (jax.ShapeDtypeStruct, jax.core.ShapedArray))]

    def support(*xs):
        full = list(leaves)
        for i, x in zip(traced, xs, strict=True):
            full[i] = x
        return jax.tree_util.tree_unflatten(treedef, full).enumerate_support(expand=False)

    out = jax.eval_shape(support, *[jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) for i in traced])
    return int(out.shape[0])


def support_size_or_none(d: dist.Distribution) -> int | None:
    if not getattr(d, "has_enumerate_support", False):
        return None
    try:
        return _support_size(d)
    except Exception:  # e.g. a total_count that is not static
        return None
