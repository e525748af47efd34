"""Solvers, all subclasses of one abstract :class:`Solver` (init / step / terminate), all run
by one device driver (:mod:`estimax.solvers._driver`) and one host runner
(:mod:`estimax.solvers._runner`): the constrained solvers, the bilevel ones, ``ex.argmin``'s
inner solvers, and ``ex.fit``'s optax step. Every loop ends with a :class:`RESULTS` code.

- :class:`ExactAL`: exact augmented Lagrangian with a randomized sketching Newton solver
  (equality constraints; exact derivatives; matrix-free).
- :class:`AugmentedLagrangian`: the classical method of multipliers for equalities,
  inequalities and bounds, with inner solves by L-BFGS and infeasibility detection.
- :class:`StochasticLagrangian`: stochastic gradient descent–ascent on the augmented
  Lagrangian (optax updates) for objectives and constraints that are expectations.

Unconstrained solvers (the inner solvers of ``ex.argmin``): :class:`Newton` (dense or
conjugate-gradient Newton steps, Armijo line search), :class:`LBFGS` (``optax.lbfgs``) and
:class:`GradientDescent` (``optax.sgd``; differentiable steps, for unrolled hypergradients).

``estimax.solve(program, params, *data, solver=...)`` runs one; see its documentation.
"""

from ._al import AugmentedLagrangian as AugmentedLagrangian
from ._lvhba import LVHBA as LVHBA
from ._multiblock import BSVRB as BSVRB
from ._base import Solver as Solver
from ._solution import RESULTS as RESULTS
from ._solution import Solution as Solution
from ._solution import SolverError as SolverError
from ._exact_al import ExactAL as ExactAL
from ._stochastic_al import StochasticLagrangian as StochasticLagrangian
from ._unconstrained import LBFGS as LBFGS
from ._unconstrained import GradientDescent as GradientDescent
from ._unconstrained import Newton as Newton
