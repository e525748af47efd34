"""Models given to the objectives: a NumPyro model, or a log joint density (:class:`LogJoint`).

``model_log_density`` evaluates either at the latents a guide drew.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
from numpyro import handlers

from .._errors import ProgramError
from ._site import log_density


@dataclasses.dataclass(frozen=True)
class LogJoint:
    """A model given by its log joint density: ``fn(latents: dict, params, *data) -> scalar``."""

    fn: Callable

    def __call__(self, latents, params, *data):
        return self.fn(latents, params, *data)


def model_log_density(model, latents: dict, params, data) -> Any:
    """``log p(data, latents)`` of a NumPyro model or a :class:`LogJoint`."""
    if isinstance(model, LogJoint):
        return model(latents, params, *data)
    conditioned = handlers.substitute(model, data=latents)
    model_trace = handlers.trace(handlers.seed(conditioned, rng_seed=0)).get_trace(params, *data)
    total = jnp.zeros((), jnp.result_type(float))
    for name, site in model_trace.items():
        if site["type"] != "sample":
            continue
        if not site["is_observed"] and name not in latents:
            raise ProgramError(
                f"the model's latent site {name!r} has no value in the guide's trace (guide sites: "
                f"{sorted(latents)}). Sample it in the guide with ex.sample(..., name={name!r})."
            )
        lp = log_density(site["fn"], site["value"])  # NumPyro's log_prob, with right derivatives at logits 0
        scale = site.get("scale")
        total = total + jnp.sum(lp if scale is None else scale * lp).astype(total.dtype)
    return total


__all__ = ["LogJoint", "model_log_density"]
