"""Hierarchical variational objectives: a guide with auxiliary latents, marginalized.

A hierarchical guide ``q(z, u)`` (``u`` auxiliary: a mixing variable, a flow's noise, a
latent of the guide's own) has an intractable marginal ``q(z)``. With a reverse model
``r(u | z)`` these bounds on ``log p(x)`` are each one line over :func:`estimax.marginal`:

- HVI (Ranganath et al. 2016): ``E[log p(x, z) − log q(z, u) + log r(u | z)]``
  ``= ELBO(q) − E_q KL(q(u | z) ‖ r(u | z))``;
- IWHVI(m) (Sobolev & Vetrov 2019): ``m`` extra draws ``u_k ~ r`` tighten ``log q(z)``'s
  estimate, ``HVI <= IWHVI(m) <= IWHVI(m + 1) <= ELBO(q)``;
- DIWHVI(n, m): the same inside an IWELBO with ``n`` particles (``<= log p(x)``).

All are ordinary ``@ex.expectation`` programs: each site (of the joint guide, of the
reverse model's draws) keeps its own gradient strategy and ``explain`` lists them.
"""

from __future__ import annotations

from ._marginal import marginal
from ..transforms._estimate import Expectation
from ._vi import elbo, iwelbo


def hvi(model, joint, *, keep, proposal, particles: int = 1) -> Expectation:
    """HVI's bound with the guide ``joint`` marginalized to ``keep`` through ``proposal``
    (``r(u | z)``; see :func:`estimax.marginal`), averaged over ``particles`` draws."""
    q = marginal(joint, keep=keep, proposal=proposal, particles=0)
    return Expectation(elbo(model, q, particles=particles).fn, name="hvi")


def iwhvi(model, joint, *, keep, proposal, m: int, particles: int = 1) -> Expectation:
    """IWHVI(m): HVI with ``m`` extra reverse-model draws in the estimate of ``log q(z)``."""
    q = marginal(joint, keep=keep, proposal=proposal, particles=m)
    return Expectation(elbo(model, q, particles=particles).fn, name=f"iwhvi(m={m})")


def diwhvi(model, joint, *, keep, proposal, n: int, m: int) -> Expectation:
    """DIWHVI(n, m): the IWELBO with ``n`` particles of IWHVI(m)'s marginal guide."""
    q = marginal(joint, keep=keep, proposal=proposal, particles=m)
    return Expectation(iwelbo(model, q, n).fn, name=f"diwhvi(n={n}, m={m})")
