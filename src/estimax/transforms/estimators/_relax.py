"""Relaxations of discrete sites: Gumbel-softmax (Concrete) and straight-through.

Both strategies replace a Bernoulli or Categorical site by a continuous relaxation driven
by the same noise as an exact sample, ``z = logits + g``:

- Categorical: ``g ~ Gumbel(0, 1)^K``; the exact sample is ``one_hot(argmax z)`` (the
  Gumbel-max trick) and the relaxed one ``softmax(z / τ)``, a point of the simplex.
- Bernoulli: ``g ~ Logistic(0, 1)``; the exact sample is ``1[z > 0]`` and the relaxed one
  ``sigmoid(z / τ)`` in ``(0, 1)`` (the binary Concrete distribution).

The gradient is pathwise through the relaxed sample, so neither strategy is unbiased for
the discrete objective: ``explain`` certifies programs that use them ``biased``. Both need
no continuation, so they also work inside ``lax.scan``/``fori_loop`` bodies.

Sharp edges:

- The site's value changes type. A Categorical site's value is a one-hot *float* vector of
  shape ``batch + (K,)`` instead of an integer index, and a Bernoulli site's value is a
  float: write the program for that type (``y @ table`` rather than ``table[x]``).
- The temperature is static, part of the strategy (a Python number). A program staged with
  another temperature is another program: annealing the temperature retraces per value.
- Supported: ``Bernoulli`` and ``Categorical`` (``probs`` or ``logits``), also under
  ``.expand(...)`` and ``.to_event(...)``. Probabilities are clipped away from 0 and 1 (as
  NumPyro does) before taking logits, so a category of probability 0 gets a logit of
  ``log(tiny)``, not ``-inf``.
- Under ``jax.vmap`` the axis mapped over a Categorical's parameters must not be the
  category (last) axis: the relaxed value's ``K`` is read from the parameter's last axis.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from numpyro.distributions.util import clamp_probs

from ..._errors import StrategyError
from ...dsl._site import family_name
from ._base import LocalStrategy, SiteContext

_BERNOULLI = (dist.BernoulliProbs, dist.BernoulliLogits)
_CATEGORICAL = (dist.CategoricalProbs, dist.CategoricalLogits)
_WRAPPERS = (dist.Independent, dist.ExpandedDistribution)


# --- the relaxed distributions ------------------------------------------------------------
def _innermost(d: dist.Distribution) -> dist.Distribution:
    while isinstance(d, _WRAPPERS):
        d = d.base_dist
    return d


def _kind(d: dist.Distribution) -> str | None:
    """``"bernoulli"``, ``"categorical"``, or ``None`` for a family that is not relaxed."""
    base = _innermost(d)
    if isinstance(base, _BERNOULLI):
        return "bernoulli"
    if isinstance(base, _CATEGORICAL):
        return "categorical"
    return None


def _parameter(base: dist.Distribution):
    """The parameter ``base`` was built with (never a lazily derived one)."""
    return base.logits if isinstance(base, (dist.BernoulliLogits, dist.CategoricalLogits)) else base.probs


def _value_dtype(d: dist.Distribution):
    """The relaxed value's dtype: the parameter's floating dtype, else the default float."""
    dtype = jnp.result_type(_parameter(_innermost(d)))
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


def _value_shape(d: dist.Distribution) -> tuple[int, ...]:
    """``batch + event`` for a Bernoulli, ``batch + event + (K,)`` for a Categorical."""
    shape = tuple(d.batch_shape) + tuple(d.event_shape)
    if _kind(d) == "categorical":
        shape += (int(jnp.shape(_parameter(_innermost(d)))[-1]),)
    return shape


def _logits(d: dist.Distribution, dtype):
    """The logits of every coordinate of ``d``, broadcast to :func:`_value_shape`."""
    base = _innermost(d)
    if isinstance(base, (dist.BernoulliLogits, dist.CategoricalLogits)):
        logits = jnp.asarray(base.logits, dtype)
    elif isinstance(base, dist.BernoulliProbs):
        p = clamp_probs(jnp.asarray(base.probs, dtype))
        logits = jnp.log(p) - jnp.log1p(-p)
    else:  # CategoricalProbs: log p is a logit (softmax is invariant to the normalizer)
        logits = jnp.log(clamp_probs(jnp.asarray(base.probs, dtype)))
    # ``.expand`` broadcasts the base's batch shape (right-aligned, as NumPy does);
    # ``.to_event`` only relabels batch axes as event axes.
    return jnp.broadcast_to(logits, _value_shape(d))


def _draw(d: dist.Distribution, key, temperature: float):
    """``(hard, relaxed)`` for one lane: an exact sample of ``d`` as a float (one-hot for a
    Categorical) and the relaxed sample, both from the same noise."""
    dtype = _value_dtype(d)
    logits = _logits(d, dtype)
    if _kind(d) == "bernoulli":
        z = logits + jax.random.logistic(key, logits.shape, dtype)
        hard = (z > 0).astype(dtype)
        relaxed = jax.nn.sigmoid(z / temperature)
    else:
        z = logits + jax.random.gumbel(key, logits.shape, dtype)
        hard = jax.nn.one_hot(jnp.argmax(z, axis=-1), logits.shape[-1], dtype=dtype)
        relaxed = jax.nn.softmax(z / temperature, axis=-1)
    return jax.lax.stop_gradient(hard), relaxed


def _checked_temperature(temperature, where: str) -> float:
    if isinstance(temperature, jax.core.Tracer):
        raise StrategyError(
            f"{where}(temperature=...) got a traced value. The temperature is part of the "
            "strategy, so it must be a Python number, e.g. temperature=0.5; a program staged "
            "with another temperature is staged again."
        )
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise StrategyError(
            f"{where}(temperature=...) expects a positive Python number; got "
            f"{type(temperature).__name__} {temperature!r}."
        )
    value = float(temperature)
    if not (math.isfinite(value) and value > 0.0):
        raise StrategyError(f"{where}(temperature=...) must be a finite number > 0; got {temperature!r}.")
    return value


# --- the strategies ------------------------------------------------------------------------
class Relaxation(LocalStrategy):
    """A strategy that relaxes a Bernoulli or Categorical site (abstract).

    Final subclasses are frozen dataclasses with a ``temperature`` field; they say what the
    site's value is through :meth:`value`.
    """

    temperature: float
    certificate = "biased"
    pathwise_value = True

    @abc.abstractmethod
    def value(self, hard, relaxed):
        """The site's value from the exact sample ``hard`` and the relaxed sample ``relaxed``.

        Its derivative with respect to the parameters must be ``relaxed``'s."""

    def __post_init__(self):
        object.__setattr__(self, "temperature", _checked_temperature(self.temperature, f"ex.{self.name}"))

    def __call__(self, *, temperature: float = 1.0) -> "Relaxation":
        """``ex.gumbel_softmax(temperature=τ)`` / ``ex.straight_through(temperature=τ)``:
        the same strategy at temperature ``τ``."""
        return type(self)(temperature=temperature)

    def describe(self) -> str:
        return f"{self.name}(temperature={self.temperature!r})"

    def check(self, d, site_name):
        if _kind(d) is None:
            raise StrategyError(
                f"site {site_name!r}: ex.{self.name} relaxes Bernoulli and Categorical sites "
                f"(probs or logits, optionally .expand(...) / .to_event(...)); got "
                f"{family_name(d)}. Use ex.reparam for a reparameterizable distribution, and "
                "ex.enum, ex.mvd or ex.reinforce for an unbiased estimator of a discrete site."
            )

    def value_struct(self, d):
        return jax.ShapeDtypeStruct(_value_shape(d), _value_dtype(d))

    def _sample(self, ctx: SiteContext, leaves):
        draw = ctx.site.lift(lambda d, key: _draw(d, key, self.temperature), split_key=True)
        return draw(tuple(leaves), ctx.key)

    def forward(self, ctx: SiteContext):
        if not ctx.has_tangent:
            hard, relaxed = self._sample(ctx, ctx.site.leaves)
            return self.value(hard, relaxed), None, None
        (hard, relaxed), (_, relaxed_dot) = ctx.jvp(lambda leaves: self._sample(ctx, leaves))
        return self.value(hard, relaxed), relaxed_dot, None

    def pathwise(self, ctx: SiteContext):
        hard, relaxed = self._sample(ctx, ctx.site.leaves)
        return self.value(hard, relaxed), None, None


@dataclasses.dataclass(frozen=True)
class GumbelSoftmax(Relaxation):
    r"""Gumbel-softmax (Concrete) relaxation of a Bernoulli or Categorical site.

    The site's value is a sample of the relaxed distribution: for a Categorical the point
    of the simplex ``y = softmax((logits + g) / τ)``, ``g ~ Gumbel(0, 1)^K``, of shape
    ``batch + (K,)``; for a Bernoulli ``y = sigmoid((logits + ℓ) / τ) ∈ (0, 1)``,
    ``ℓ ~ Logistic(0, 1)``. The gradient is the pathwise gradient of that sample
    (Maddison, Mnih & Teh 2017; Jang, Gu & Poole 2017):

        ∇θ E_{q_θ,τ}[f(y)] = E_g[∇θ f(softmax((logits_θ + g) / τ))]

    **Bias.** The estimate and its gradient are unbiased for the *relaxed* objective
    ``E_{q_τ}[f(y)]``, not for the discrete one ``E_{p_θ}[f(x)]``: ``E[y] ≠ p`` in general,
    so even a linear ``f`` is biased. As ``τ → 0`` the samples tend to the exact one-hot
    samples ``one_hot(argmax(logits + g))`` and the relaxed objective to the discrete one
    (for a Bernoulli and a smooth ``f`` the gradient's bias is ``O(τ)``), while the
    gradient's variance grows like ``1/τ``. ``f`` must be defined and differentiable
    between the discrete values.

    **Arguments:** ``temperature`` (``τ``, a Python number > 0; default 1.0).

        >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, estimax as ex
        >>> @ex.expectation
        ... def objective(logits):
        ...     y = ex.sample(dist.Categorical(logits=logits),
        ...                   estimator=gumbel_softmax(temperature=0.5), name="c")
        ...     return jnp.sum(y * jnp.array([1.0, 2.0, 3.0]))  # y: relaxed one-hot, (3,)
        >>> ex.grad(objective)(jax.random.PRNGKey(0), jnp.zeros(3)).shape
        (3,)
        >>> ex.explain(objective, jnp.zeros(3)).certificate.kind
        'biased'
    """

    temperature: float = 1.0

    name = "gumbel_softmax"
    identity = "∇θ E_q[f(y)] = E_g[∇θ f(softmax((logits_θ + g)/τ))], g ~ Gumbel; biased for E_p[f(x)]"

    def value(self, hard, relaxed):
        del hard
        return relaxed


@dataclasses.dataclass(frozen=True)
class StraightThrough(Relaxation):
    r"""Straight-through Gumbel-softmax: exact samples forward, relaxed gradient backward.

    The site's value is the exact discrete sample as a float (one-hot for a Categorical,
    ``0.``/``1.`` for a Bernoulli), taken from the same noise as the relaxed sample ``y`` of
    :class:`GumbelSoftmax`; its derivative is ``y``'s (Bengio et al. 2013; Jang et al. 2017):

        x = hard(z) + (y − stop_gradient(y)),   z = logits + g,   y = softmax(z / τ)

    **Bias.** The estimate is unbiased for the discrete objective ``E_{p_θ}[f(x)]`` (the
    values are exact samples), but the gradient estimate ``∇f(x) · ∂y/∂θ`` -- ``f``'s
    derivative at the discrete value times the relaxed sample's Jacobian -- is biased, and
    in general the bias does not vanish as ``τ → 0``: for a Bernoulli the mean tends to
    ``½(f'(0) + f'(1)) p(1 − p)`` instead of ``(f(1) − f(0)) p(1 − p)`` (equal only when
    ``f`` is at most quadratic). ``f`` must be differentiable at the discrete values.

    **Arguments:** ``temperature`` (``τ`` of the relaxation used for the gradient, a Python
    number > 0; default 1.0).

        >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, estimax as ex
        >>> @ex.expectation
        ... def objective(logit):
        ...     b = ex.sample(dist.Bernoulli(logits=logit), estimator=straight_through, name="b")
        ...     return (b - 0.25) ** 2   # b is 0.0 or 1.0
        >>> float(objective.estimate(jax.random.PRNGKey(0), 0.0)) in (0.0625, 0.5625)
        True
    """

    temperature: float = 1.0

    name = "straight_through"
    identity = "x = hard(z) + y − sg(y), y = softmax((logits_θ + g)/τ); ∇ ≈ E[∇f(x) ∂y/∂θ]"

    def value(self, hard, relaxed):
        # ``relaxed - stop_gradient(relaxed)`` is exactly zero, so the value is exactly ``hard``.
        return hard + (relaxed - jax.lax.stop_gradient(relaxed))


gumbel_softmax = GumbelSoftmax()
straight_through = StraightThrough()

__all__ = ["Relaxation", "GumbelSoftmax", "StraightThrough", "gumbel_softmax", "straight_through"]
