"""Hypothesis strategies for distribution families and their parameters.

    >>> from hypothesis import given
    >>> from estimax.testing import strategies as exst
    >>> @given(exst.params("Normal"))
    ... def test_something(p):
    ...     d = exst.build("Normal", p)

Parameters are drawn from ranges where Monte Carlo tests are well conditioned (scales away
from zero, rates and concentrations of moderate size) and rounded to 3 decimals, so the
printed falsifying example reproduces exactly.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpyro.distributions as dist
from hypothesis import strategies as st

from .._errors import ArgumentError as _ArgumentError

#: family -> {parameter: (low, high, shape)}
FAMILIES: dict[str, dict[str, tuple[float, float, tuple[int, ...]]]] = {
    "Normal": {"loc": (-1.5, 1.5, ()), "scale": (0.4, 1.5, ())},
    "Exponential": {"rate": (0.5, 2.5, ())},
    "Gamma": {"concentration": (0.8, 4.0, ()), "rate": (0.6, 3.0, ())},
    "Beta": {"concentration1": (0.8, 4.0, ()), "concentration0": (0.8, 4.0, ())},
    "Dirichlet": {"concentration": (0.8, 4.0, (3,))},
    "Bernoulli": {"logits": (-2.0, 2.0, ())},
    "Categorical": {"logits": (-2.0, 2.0, (3,))},
    "Poisson": {"rate": (0.3, 3.0, ())},
}


def _float(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False).map(lambda x: round(x, 3))


def params(family: str) -> st.SearchStrategy[dict]:
    """Parameter dicts (floats or lists of floats) for ``family``."""
    try:
        spec = FAMILIES[family]
    except KeyError:
        raise _ArgumentError(f"unknown family {family!r}; known: {sorted(FAMILIES)}") from None
    fields = {}
    for name, (lo, hi, shape) in spec.items():
        if shape == ():
            fields[name] = _float(lo, hi)
        else:
            fields[name] = st.lists(_float(lo, hi), min_size=shape[0], max_size=shape[0])
    return st.fixed_dictionaries(fields)


def distributions(families=None) -> st.SearchStrategy[tuple[str, dict]]:
    """``(family, params)`` pairs over ``families`` (default: all of :data:`FAMILIES`)."""
    families = sorted(FAMILIES) if families is None else list(families)
    return st.sampled_from(families).flatmap(lambda f: params(f).map(lambda p: (f, p)))


def build(family: str, p: dict) -> dist.Distribution:
    """The NumPyro distribution for ``family`` at parameters ``p`` (arrays or floats)."""
    p = {k: jnp.asarray(v) for k, v in p.items()}
    if family in ("Bernoulli", "Categorical"):
        return getattr(dist, family)(logits=p["logits"])
    return getattr(dist, family)(**p)
