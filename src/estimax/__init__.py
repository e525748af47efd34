"""estimax: objectives as programs, compiled to unbiased gradient estimators.

    >>> import jax, numpyro.distributions as dist, estimax as ex
    >>> @ex.expectation
    ... def objective(theta):
    ...     z = ex.sample(dist.Normal(theta, 1.0), name="z")
    ...     return z ** 2
    >>> float(ex.grad(objective)(jax.random.PRNGKey(0), 1.0)) != 0.0
    True
"""

from ._errors import ArgumentError as ArgumentError
from ._errors import CertificateError as CertificateError
from ._errors import EstimaxError as EstimaxError
from ._errors import NoKeyError as NoKeyError
from ._errors import ProgramError as ProgramError
from ._errors import StrategyError as StrategyError
from ._errors import UnsupportedError as UnsupportedError
from .solvers._argmin import argmin as argmin
from .dsl._constraints import subject_to as subject_to
from .objectives._marginal import marginal as marginal
from .objectives._marginal import normalize as normalize
from .dsl._primitives import expect as expect
from .dsl._primitives import log_expect as log_expect
from .dsl._primitives import sample as sample
from .dsl._primitives import vmap as vmap
from .transforms._estimate import Expectation as Expectation
from .transforms._trace import Trace as Trace
from .transforms._trace import trace as trace
from .transforms._estimate import expectation as expectation
from .transforms._grad import grad as grad
from .transforms._grad import value_and_grad as value_and_grad
from . import objectives as objectives
from . import text as text
from .runtime._checkpoint import Checkpoint as Checkpoint
from .runtime._checkpoint import CheckpointError as CheckpointError
from .solvers._fit_result import EarlyStop as EarlyStop
from .runtime._sharding import device_mesh as device_mesh
from .runtime._sharding import shard_batch as shard_batch
from .solvers._fit_result import FitProgress as FitProgress
from .solvers._fit_result import FitResult as FitResult
from .solvers._fit_result import NonFiniteError as NonFiniteError
from .solvers._fit import fit as fit
from . import solvers as solvers
from . import tracking as tracking
from .solvers._lvhba import solve_bilevel as solve_bilevel
from .solvers._multiblock import solve_multiblock as solve_multiblock
from .solvers._solve import solve as solve
from .transforms._certify import Certificate as Certificate
from .transforms._certify import SitePlan as SitePlan
from .transforms._explain import Plan as Plan
from .transforms._explain import explain as explain
from .transforms.estimators import MVD as MVD
from .transforms.estimators import Enum as Enum
from .transforms.estimators import Reinforce as Reinforce
from .transforms.estimators import Reparam as Reparam
from .transforms.estimators import Strategy as Strategy
from .transforms.estimators import ema_update as ema_update
from .transforms.estimators import enum as enum
from .transforms.estimators import gumbel_softmax as gumbel_softmax
from .transforms.estimators import straight_through as straight_through
from .transforms.estimators import mvd as mvd
from .transforms.estimators import register_mvd as register_mvd
from .transforms.estimators import reinforce as reinforce
from .transforms.estimators import reparam as reparam

__version__ = "0.1.0"
