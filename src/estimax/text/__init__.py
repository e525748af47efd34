"""The textual front-end: objective files parsed with lark and lowered to estimax programs.

    >>> import jax, estimax as ex
    >>> prog = ex.text.parse('''
    ... param mu: real = 0.5
    ... z ~ Normal(mu, 1.0)
    ... minimize (z - 2.0) ** 2
    ... ''')
    >>> float(ex.grad(prog.objective)(jax.random.PRNGKey(0), prog.init_params(), {})["mu"]) != 0.0
    True
"""

from ._check import Declaration as Declaration
from ._errors import TextError as TextError
from ._imports import ALLOWED_MODULES as ALLOWED_MODULES
from ._imports import DENIED_NAMES as DENIED_NAMES
from ._program import TextProgram as TextProgram
from ._program import load as load
from ._program import parse as parse

__all__ = ["ALLOWED_MODULES", "DENIED_NAMES", "Declaration", "TextError", "TextProgram", "load", "parse"]
