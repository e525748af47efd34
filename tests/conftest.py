"""Test-process settings: strict JAX, and hypothesis profiles.

Profiles: ``ci`` (few, derandomized examples; selected when ``CI`` is set), ``dev`` (the
default), ``thorough`` (many examples; ``HYPOTHESIS_PROFILE=thorough``).
"""

import os

import jax
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_rank_promotion", "raise")
# Strict dtype promotion is not enabled: NumPyro's own samplers mix Python ints with bools
# (Bernoulli.sample raises TypePromotionError under "strict").

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=4, derandomize=True, **_common)
settings.register_profile("dev", max_examples=8, derandomize=True, **_common)
settings.register_profile("thorough", max_examples=50, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
