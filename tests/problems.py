"""Test problems shared by several test modules, with their exact answers.

The conjugate Gaussian model: ``z ~ N(0, 1)``, ``x_i | z ~ N(z, 1)``; its evidence is
``x ~ N(0, I + 11ᵀ)`` and its posterior ``N(Σx / (n + 1), 1 / (n + 1))``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.scipy.stats import multivariate_normal

import estimax as ex

#: four data points of the conjugate Gaussian model
X = jnp.array([0.8, 1.9, 0.3, 1.2])


def model(params, x):
    """The conjugate Gaussian model as a NumPyro model (``params`` unused)."""
    del params
    z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(params, x):
    """A Gaussian guide ``q(z) = N(m, exp(log_s))`` for :func:`model`."""
    del x
    return ex.sample(dist.Normal(params["m"], jnp.exp(params["log_s"])), name="z")


def log_evidence(x):
    """``log p(x)`` of :func:`model`, ``z`` integrated out."""
    n = x.shape[0]
    return multivariate_normal.logpdf(x, jnp.zeros(n), jnp.eye(n) + jnp.ones((n, n)))


class Compiles:
    """Counts XLA compilations (JAX's backend-compile events) while it is entered."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __enter__(self):
        self.n = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, name, duration, **kwargs):
        del duration, kwargs
        self.n += name == self.EVENT

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)
