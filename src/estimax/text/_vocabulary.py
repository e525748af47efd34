"""The language's vocabulary: distribution names, strategies, constants, keywords, types and
the operators, with the limits a number written in a file must keep (32-bit integers and
floats). The built-in functions (``FUNCTIONS``) are in ``_library``, with what they compute.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from ..transforms.estimators import enum as _enum
from ..transforms.estimators import gumbel_softmax as _gumbel_softmax
from ..transforms.estimators import mvd as _mvd
from ..transforms.estimators import reinforce as _reinforce
from ..transforms.estimators import reparam as _reparam
from ..transforms.estimators import straight_through as _straight_through

# NumPyro's distributions by name: the classes, and the factories that pick a class by
# keyword (Bernoulli(probs=...) / Bernoulli(logits=...), Categorical, Binomial, ...).
DISTRIBUTIONS: dict[str, Any] = {
    name: getattr(dist, name)
    for name in dist.__all__
    if name[:1].isupper()
    and (
        (isinstance(getattr(dist, name), type) and issubclass(getattr(dist, name), dist.Distribution))
        or inspect.isfunction(getattr(dist, name))
    )
}

CONSTANTS: dict[str, Any] = {"pi": math.pi, "e": math.e, "inf": math.inf}
STRATEGIES: dict[str, Any] = {
    "reparam": _reparam, "reinforce": _reinforce, "enum": _enum, "mvd": _mvd,
    "gumbel_softmax": _gumbel_softmax, "straight_through": _straight_through,
}
_DIST_METHODS = {"to_event", "expand", "mask", "mean", "variance"}
_SHAPE_FUNCTIONS = {"reshape", "zeros", "ones", "transpose"}  # take a list literal as a shape, not an array
_OBJECT_FUNCTIONS = {"logp", "marginal", "normalize", "argmin"}  # take distributions, programs or names, not only numbers
_TYPES = {"real": jnp.float32, "int": jnp.int32}
# The grammar's keywords. lark's contextual lexer reads a keyword as a name where no keyword
# can stand (`let then = 1`), so declarations check for them.
_KEYWORDS = {"from", "import", "as", "param", "data", "let", "maximize", "minimize", "return", "if", "then",
             "else", "and", "or", "not", "true", "false", "expect", "program", "plate", "in", "subject_to"}
_STATEMENT_KEYWORDS = ["param", "data", "let", "maximize", "minimize", "from", "return", "program", "subject_to"]
_INT32_MAX = 2**31 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_DEFAULT_DIM = 2  # the size given to a named dimension when no data fixes it (check, explain)


_BINARY = {
    "+": jnp.add, "-": jnp.subtract, "*": jnp.multiply, "/": jnp.true_divide, "%": jnp.mod, "**": jnp.power,
    "==": jnp.equal, "!=": jnp.not_equal, "<": jnp.less, "<=": jnp.less_equal, ">": jnp.greater,
    ">=": jnp.greater_equal, "and": jnp.logical_and, "or": jnp.logical_or,
}


_CHAINS = {"binop", "and_expr", "or_expr"}  # left-associative: `a + b + c` is binop(binop(a, b), c)
_WHOLE_NUMBER_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


def _too_large(digits: str) -> bool:
    """Whether a whole number written with ``digits`` exceeds 32 bits (read without converting
    thousands of digits)."""
    digits = digits.lstrip("0")
    return len(digits) > 10 or int(digits or "0") > _INT32_MAX


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _not_numeric(x) -> bool:
    """Whether ``x`` is something other than a number, a boolean, an array or a list of numbers."""
    if isinstance(x, list):
        return any(_not_numeric(v) for v in x)
    return not isinstance(x, (bool, int, float, np.ndarray, np.generic, jax.Array))


def _arr(x):
    return jnp.asarray(x) if isinstance(x, list) else x


_STRATEGY_NAMES = "|".join(STRATEGIES)


def _in_text_terms(message: str) -> str:
    """An estimax message about strategies, with the file's spelling: ``ex.enum`` -> ``@enum``."""
    message = re.sub(r"\bex\.(marginal|normalize)\(", r"\1(", message)
    return re.sub(rf"(?:estimator=)?ex\.({_STRATEGY_NAMES})\b", r"@\1", message)

