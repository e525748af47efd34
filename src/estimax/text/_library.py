"""The library of the language: the built-in functions (``FUNCTIONS``) and the values a file
computes with besides numbers and arrays -- its programs (``program f(a) { ... }``), draws of
several random choices, and the distributions ``marginal(...)``/``normalize(...)`` -- with
``_describe_value``, how a message names any value.

The functions raise ``TypeError``/``ValueError`` in the file's words; the lowering (``_lower``)
reports them at the call.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import logsumexp
from lark import Tree

from .._errors import ArgumentError, ProgramError
from ..solvers._argmin import argmin as _argmin
from ..objectives._marginal import Approximate
from ..objectives._marginal import marginal as _marginal
from ..objectives._marginal import normalize as _normalize
from ..dsl._primitives import sample_p as _sample_p
from ..dsl._primitives import stage as _stage
from ..dsl._site import log_density
from ..objectives import LogJoint
from ._vocabulary import DISTRIBUTIONS


def _distribution(d):
    if not isinstance(d, dist.Distribution):
        raise TypeError(f"the first argument must be a distribution; got {_describe_value(d)}")
    return d


def _expand(d):
    def expand(shape):
        if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in shape)):
            raise TypeError(f"the shape must be a list of whole numbers, e.g. expand([3]); got {_describe_value(shape)}")
        return d.expand(shape)

    return expand


def _axis(axis):
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis= must be a whole number written in the file; got {_describe_value(axis)}")
    return axis


def _reduction(fn):
    def reduce(x, axis=None):
        return fn(jnp.asarray(x), axis=_axis(axis))

    return reduce


class _Program:
    """A ``program name(args) { ... }`` of the file: a function whose statements run (and whose
    random choices are drawn) where it is called, seeing what was defined before it."""

    def __init__(self, node: Tree, env: dict, run: Callable):
        # run(stmts, env): the lowering runs the program's block (``_lower.run_block``)
        self.__name__ = str(node.children[0])
        self.args = [str(a) for a in (node.children[1].children if node.children[1] is not None else [])]
        self.node, self.stmts, self._env, self._run = node, node.children[2:], env, run

    def __call__(self, *args, **kwargs):
        takes = f"it takes ({', '.join(self.args)})"
        if len(args) > len(self.args):
            raise TypeError(f"{len(args)} arguments given; {takes}")
        bound = dict(zip(self.args, args))
        for k, v in kwargs.items():
            if k not in self.args:
                raise TypeError(f"no argument named {k!r}; {takes}")
            if k in bound:
                raise TypeError(f"argument {k!r} is given twice")
            bound[k] = v
        missing = [a for a in self.args if a not in bound]
        if missing:
            raise TypeError(f"missing argument{'s' if len(missing) > 1 else ''} {', '.join(missing)}; {takes}")
        env = dict(self._env)
        env.update(bound)
        return self._run(self.stmts, env)

    def returned_site(self) -> str | None:
        """The random choice the program returns, when its ``return`` is just a choice's name."""
        value = self.stmts[-1].children[0]
        drawn = {str(s.children[0]) for s in self.stmts if s.data == "sample_stmt"}
        if isinstance(value, Tree) and value.data == "name" and str(value.children[0]) in drawn:
            return str(value.children[0])
        return None


class _Record:
    """The value of a draw from a distribution over several random choices; ``.name`` reads one."""

    def __init__(self, values: dict):
        self.values = values


class _Drawable:
    """``marginal(...)``/``normalize(...)`` in a file: ``z ~ q`` draws (and keeps the draw's
    density estimate, whose reciprocal is unbiased); ``logp(q, z)`` gives that estimate at the
    drawn value and an unbiased density estimate at any other value."""

    def __init__(self, approx: Approximate, label: str, site_names: Callable[[], tuple]):
        self.approx, self.label, self._site_names = approx, label, site_names
        self._draws: list = []
        self._densities = 0

    def draw(self):
        sites, log_q = self.approx.draw(None)
        value = next(iter(sites.values())) if len(sites) == 1 else _Record(dict(sites))
        self._draws.append((value, log_q))
        return value

    def logp(self, x):
        for value, log_q in self._draws:
            if x is value:
                return log_q
        names = self._site_names()
        if isinstance(x, _Record):
            values = x.values
        elif len(names) == 1:
            values = {names[0]: x}
        else:
            raise TypeError(f"{self.label} is over the random choices {', '.join(names)}: give logp a draw "
                            f"`z ~ {self.label.split('(')[0]}(...)` of it")
        self._densities += 1  # each estimate draws its own auxiliary choices: name them apart
        name = None if self._densities == 1 else f"{self.approx.name}/density{self._densities}"
        return self.approx.log_density(values, None, name=name)


def _program_arg(value, what: str) -> _Program:
    if not isinstance(value, _Program):
        raise TypeError(f"{what} must be a program defined with `program name(...) {{ ... }}`; got "
                        f"{_describe_value(value)}")
    return value


def _sites_of(fn: Callable, *args) -> tuple:
    closed, _, _ = _stage(fn, args, "a program", fresh_names=True, float_outputs=False)
    return tuple(e.params["spec"].name for e in closed.jaxpr.eqns if e.primitive is _sample_p)


def _text_marginal(joint, keep=None, proposal=None, particles=0, name="marginal"):
    joint = _program_arg(joint, "the joint (first argument)")
    if joint.args:
        raise TypeError(f"the joint program {joint.__name__} must take no arguments; it takes ({', '.join(joint.args)})")
    if proposal is None:
        raise TypeError("give the reverse model as proposal=<program>, a program of the kept random choices")
    proposal = _program_arg(proposal, "proposal=")
    if keep is None:
        keep = joint.returned_site()
        if keep is None:
            raise TypeError(f"say which random choices the marginal is over: keep=\"z\", or end {joint.__name__} "
                            "with `return z` for a random choice z")
    keep = [keep] if isinstance(keep, str) else keep
    if not (isinstance(keep, list) and keep and all(isinstance(k, str) for k in keep)):
        raise TypeError(f"keep= takes the name of a random choice as a string, or a list of them; got {_describe_value(keep)}")
    if sorted(proposal.args) != sorted(keep):
        raise TypeError(f"the proposal takes the kept random choices as its arguments, by name: "
                        f"{proposal.__name__}({', '.join(keep)}); it takes ({', '.join(proposal.args)})")
    if isinstance(particles, bool) or not isinstance(particles, int):
        raise TypeError(f"particles= must be a whole number written in the file; got {_describe_value(particles)}")
    if not isinstance(name, str):
        raise TypeError(f"name= must be a string; got {_describe_value(name)}")

    def joint_fn(params, *data):
        return joint()

    def proposal_fn(kept, params, *data):
        return proposal(**kept)

    joint_fn.__name__, proposal_fn.__name__ = joint.__name__, proposal.__name__
    approx = _marginal(joint_fn, keep=keep, proposal=proposal_fn, particles=particles, name=name)
    return _Drawable(approx, f"marginal({joint.__name__})", lambda: tuple(keep))


def _text_normalize(target, proposal=None, particles=None, name="normalize"):
    target = _program_arg(target, "the target (first argument)")
    if proposal is None:
        raise TypeError("give the proposal as proposal=<program> (or the second argument)")
    proposal = _program_arg(proposal, "proposal=")
    if proposal.args:
        raise TypeError(f"the proposal {proposal.__name__} must take no arguments; it takes ({', '.join(proposal.args)})")
    if particles is None:
        raise TypeError("give the number of proposal draws as particles=K")
    if isinstance(particles, bool) or not isinstance(particles, int):
        raise TypeError(f"particles= must be a whole number written in the file; got {_describe_value(particles)}")
    if not isinstance(name, str):
        raise TypeError(f"name= must be a string; got {_describe_value(name)}")

    def log_target(latents, params, *data):
        unknown = [a for a in target.args if a not in latents]
        if unknown or len(latents) != len(target.args):
            raise ProgramError(f"normalize: the target {target.__name__}({', '.join(target.args)}) takes the "
                               f"proposal's random choices as its arguments, by name; {proposal.__name__} draws "
                               f"{', '.join(sorted(latents))}")
        return jnp.sum(jnp.asarray(target(**latents)))

    def proposal_fn(params, *data):
        return proposal()

    log_target.__name__, proposal_fn.__name__ = target.__name__, proposal.__name__
    approx = _normalize(LogJoint(log_target), proposal_fn, particles=particles, name=name)
    return _Drawable(approx, f"normalize({target.__name__})", functools.partial(_sites_of, proposal))


def _text_argmin(inner, init, *args, method="implicit", linear_solver="auto", steps=None, truncate=None,
                 max_steps=None, tol=None, name=None):
    """``argmin(inner, init, a, ...)``: ``ex.argmin`` of a program of the file, whose first argument
    is the inner variables and whose others are given after ``init``."""
    inner = _program_arg(inner, "the inner objective (first argument)")
    if not inner.args:
        raise TypeError(f"the inner program {inner.__name__} must take the inner variables as its first argument; "
                        "it takes none")
    if len(args) != len(inner.args) - 1:
        raise TypeError(f"{inner.__name__}({', '.join(inner.args)}) takes {len(inner.args) - 1} argument(s) after "
                        f"the inner variables {inner.args[0]}; argmin passes {len(args)} after init")
    for key, value in (("method", method), ("linear_solver", linear_solver)):
        if not isinstance(value, str):
            raise TypeError(f"{key}= must be a string such as \"implicit\"; got {_describe_value(value)}")
    for key, value in (("steps", steps), ("truncate", truncate), ("max_steps", max_steps)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{key}= must be a whole number written in the file; got {_describe_value(value)}")
    if tol is not None and not isinstance(tol, (int, float)):
        raise TypeError(f"tol= must be a number written in the file; got {_describe_value(tol)}")
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name= must be a string; got {_describe_value(name)}")

    def objective(y, *a):
        return inner(y, *a)

    objective.__name__ = inner.__name__
    init = jnp.asarray(init, jnp.result_type(float))
    try:
        return _argmin(objective, init, *[jnp.asarray(a) for a in args], method=method, linear_solver=linear_solver,
                       steps=steps, truncate=truncate, max_steps=max_steps, tol=tol,
                       name=name if name is not None else inner.__name__)
    except (ProgramError, ArgumentError) as e:  # in the file's terms
        message = re.sub(r"^ex\.argmin\('[^']*'\): ", "", str(e))
        message = message.replace("random choices (ex.sample)", "random choices (`~` statements)")
        message = message.replace(" Average the randomness out (a fixed sample passed as an argument), or state the "
                                  "bilevel problem for a stochastic bilevel solver.", "")
        raise TypeError(message.rstrip(".")) from None


def _logp(d, x):
    if isinstance(d, _Drawable):
        return d.logp(x)
    return jnp.sum(log_density(_distribution(d), x))


FUNCTIONS: dict[str, Callable] = {
    "exp": jnp.exp, "log": jnp.log, "log1p": jnp.log1p, "expm1": jnp.expm1, "sqrt": jnp.sqrt,
    "abs": jnp.abs, "sin": jnp.sin, "cos": jnp.cos, "tan": jnp.tan, "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid, "softplus": jax.nn.softplus, "relu": jax.nn.relu,
    "square": jnp.square, "erf": jax.scipy.special.erf, "lgamma": jax.scipy.special.gammaln,
    "digamma": jax.scipy.special.digamma, "floor": jnp.floor, "ceil": jnp.ceil, "sign": jnp.sign,
    "maximum": jnp.maximum, "minimum": jnp.minimum, "clip": jnp.clip, "where": jnp.where,
    "dot": jnp.dot, "matmul": jnp.matmul, "outer": jnp.outer, "transpose": jnp.transpose,
    "reshape": lambda x, shape: jnp.reshape(x, tuple(shape)),
    "sum": _reduction(jnp.sum), "mean": _reduction(jnp.mean), "max": _reduction(jnp.max),
    "min": _reduction(jnp.min), "prod": _reduction(jnp.prod),
    "logsumexp": lambda x, axis=None: logsumexp(jnp.asarray(x), axis=_axis(axis)),
    "softmax": lambda x, axis=-1: jax.nn.softmax(x, axis=_axis(axis)),
    "log_softmax": lambda x, axis=-1: jax.nn.log_softmax(x, axis=_axis(axis)),
    "one_hot": lambda i, n: jax.nn.one_hot(i, int(n)),
    "stop_gradient": jax.lax.stop_gradient,
    "zeros": lambda *shape: jnp.zeros(tuple(int(s) for s in shape)),
    "ones": lambda *shape: jnp.ones(tuple(int(s) for s in shape)),
    "float": lambda x: jnp.asarray(x, jnp.result_type(float)),
    "logp": _logp,
    "marginal": _text_marginal,
    "normalize": _text_normalize,
    "argmin": _text_argmin,
}


def _is_builtin(x) -> bool:
    """A distribution or function of the language used as a value."""
    return any(x is v for v in DISTRIBUTIONS.values()) or any(x is v for v in FUNCTIONS.values())


def _describe_value(x) -> str:
    if isinstance(x, dist.Distribution):
        return f"the distribution {type(x).__name__}"
    if (isinstance(x, type) and issubclass(x, dist.Distribution)) or any(x is f for f in DISTRIBUTIONS.values()):
        return f"the distribution family {x.__name__} (not called)"
    if isinstance(x, _Program):
        return f"the program {x.__name__}"
    if isinstance(x, _Drawable):
        return f"the distribution {x.label}"
    if isinstance(x, _Record):
        return f"a draw of the random choices {', '.join(x.values)}"
    if isinstance(x, type):
        return f"the class {x.__name__}"
    if inspect.ismodule(x):
        return f"the module {x.__name__}"
    if callable(x):
        return f"the function {getattr(x, '__name__', type(x).__name__)}"
    if isinstance(x, bool):
        return "a boolean"
    if isinstance(x, (int, float)):
        return f"the number {x!r}"
    if isinstance(x, str):
        return f"the string {x!r}"
    if isinstance(x, list):
        return f"a list of {len(x)}"
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
        return f"an array of shape {tuple(jnp.shape(x))}"
    return f"a {type(x).__name__}"
