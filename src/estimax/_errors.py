"""Errors estimax raises for user mistakes. Each names the site or argument at fault."""

from __future__ import annotations


class EstimaxError(Exception):
    """Base class of every error estimax raises about a user's program or arguments."""


class StrategyError(EstimaxError, ValueError):
    """A gradient strategy cannot apply to a site's distribution."""


class ArgumentError(EstimaxError, ValueError, TypeError):
    """An argument or option of an estimax function has a wrong value or type.

    Raised the same way by every entry point (``fit``, ``solve``, ``argmin``, the objectives,
    the strategies): the message names the function, the argument, what was expected and what
    was given. It is both a ``ValueError`` and a ``TypeError`` so that code written against
    either keeps working."""


class ProgramError(EstimaxError, TypeError):
    """A program has the wrong shape for what was asked of it (e.g. a non-scalar to grad)."""


class UnsupportedError(EstimaxError, NotImplementedError):
    """A construct that a pass refuses, with the reason and the alternative."""


class NoKeyError(EstimaxError, RuntimeError):
    """A random choice was evaluated outside an estimator, where there is no key."""


class CertificateError(EstimaxError, ValueError):
    """An estimator's certificate is weaker than the caller required (``require=``).

    ``plan`` is the program's plan (what ``ex.explain`` returns), with the reasons."""

    def __init__(self, message: str, plan=None):
        super().__init__(message)
        self.plan = plan
