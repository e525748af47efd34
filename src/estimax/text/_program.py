"""Parsing an objective file and lowering it to an estimax program.

A file is parsed with the lark grammar (``grammar.lark``) and checked statically (names,
declarations, the objective's place). Its statements then become a Python function of
``(params, data)`` that calls ``ex.sample``/``ex.expect`` exactly as a hand-written program
would, so staging it gives the same IR as the Python front-end: no pass knows which
front-end wrote a program. Errors while the program is traced (a wrong argument to a
distribution, a strategy that cannot apply, mismatched shapes) are reported at the
expression that caused them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import importlib.util
import inspect
import math
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import logsumexp
from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from .._errors import EstimaxError, ProgramError
from ..transforms.estimators import enum as _enum
from ..transforms.estimators import gumbel_softmax as _gumbel_softmax
from ..transforms.estimators import mvd as _mvd
from ..transforms.estimators import reinforce as _reinforce
from ..transforms.estimators import reparam as _reparam
from ..transforms.estimators import straight_through as _straight_through
from ..dsl._constraints import subject_to as _subject_to
from ..dsl._marginal import Approximate
from ..dsl._marginal import marginal as _marginal
from ..dsl._marginal import normalize as _normalize
from ..dsl._primitives import expect as _expect
from ..dsl._primitives import expect_p as _expect_p
from ..dsl._primitives import sample as _sample
from ..dsl._primitives import source_location
from ..dsl._primitives import stage as _stage
from ..dsl._primitives import sample_p as _sample_p
from ..dsl._primitives import vmap as _vmap
from ..dsl._program import Expectation
from ..dsl._site import log_density
from ..objectives import LogJoint
from ..runtime import _jax_compat as _compat
from ..transforms._certify import collect_sites
from ._errors import TextError
from ._imports import ImportPolicy, module_allowed, opt_in_hint

# --- the vocabulary ------------------------------------------------------------------------
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

    def __init__(self, text: "TextProgram", node: Tree, env: dict, ctx):
        self.__name__ = str(node.children[0])
        self.args = [str(a) for a in (node.children[1].children if node.children[1] is not None else [])]
        self.node, self.stmts, self._text, self._env, self._ctx = node, node.children[2:], text, env, ctx

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
        return self._text._run_block(self.stmts, env, self._ctx, "program")

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
    from ..dsl._argmin import argmin as _argmin

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
    except ProgramError as e:  # in the file's terms
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
CONSTANTS: dict[str, Any] = {"pi": math.pi, "e": math.e, "inf": math.inf}
STRATEGIES: dict[str, Any] = {
    "reparam": _reparam, "reinforce": _reinforce, "enum": _enum, "mvd": _mvd,
    "gumbel_softmax": _gumbel_softmax, "straight_through": _straight_through,
}
_DIST_METHODS = {"to_event", "expand", "mask", "mean", "variance"}
_SHAPE_FUNCTIONS = {"reshape", "zeros", "ones", "transpose"}  # take a list literal as a shape, not an array
#: the statements a block runs, each under its `file.emx:line` (see ``TextProgram._run_block``)
_RUN_STATEMENTS = {"sample_stmt", "let_stmt", "constraint_stmt", "maximize", "minimize", "return_stmt"}
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

_TOKEN_NAMES = {
    "NAME": "a name", "NUMBER": "a number", "INT": "an integer", "STRING": "a string",
    "_NL": "the end of the line", "ADDOP": "'+' or '-'", "MULOP": "'*', '/' or '%'",
    "COMPOP": "a comparison", "$END": "the end of the file",
}
# What may start an expression, and the binary operators: listed as one item each in
# "expected ..." rather than a dozen tokens.
_EXPRESSION_START = {"NAME", "NUMBER", "STRING", "LPAR", "LSQB", "MINUS", "PLUS", "TRUE", "FALSE", "EXPECT", "PLATE"}
_OPERATORS = {"ADDOP", "MULOP", "COMPOP", "AND", "OR"}
_STATEMENT_START = {"DATA", "FROM", "LET", "MAXIMIZE", "MINIMIZE", "PARAM", "RETURN", "NAME", "PROGRAM", "SUBJECT_TO"}


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = (Path(__file__).parent / "grammar.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _token_name(t: str) -> str:
    if t in _TOKEN_NAMES:
        return _TOKEN_NAMES[t]
    try:
        pattern = _parser().get_terminal(t).pattern
    except KeyError:
        return t
    # keywords and punctuation are string terminals: show the text itself
    return repr(pattern.value) if pattern.type == "str" else t


def _describe_expected(expected) -> str:
    expected = set(expected)
    if "_NL" in expected:  # the parser sees a final new line: the end of the file is the end of a line
        expected.discard("$END")
    groups = []
    if _STATEMENT_START <= expected:
        expected -= _STATEMENT_START | {"_NL", "$END"}
        groups.append("a statement")
    if _EXPRESSION_START <= expected:
        expected -= _EXPRESSION_START | {"IF", "NOT"}
        groups.append("an expression")
    if {"ADDOP", "MULOP"} <= expected:
        expected -= _OPERATORS | {"__ANON_0"}
        groups.append("an operator")
    named = sorted({_token_name(t) for t in expected}, key=lambda n: (not n.startswith("'"), n))
    names = groups + named
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _accepted(e: UnexpectedInput, fallback) -> set:
    """The tokens the parser would take at the error: tried one by one (lark's LALR tables
    merge states, so the table's own list can name tokens that would fail one step later)."""
    try:
        return set(e.interactive_parser.accepts())
    except Exception:  # noqa: BLE001 -- older lark, or no parser state at this error
        return set(fallback or ())


def _unclosed_brace(source: str) -> tuple[int, int] | None:
    """Line and column of the last ``{`` that no ``}`` closes (comments and strings skipped)."""
    stack = []
    for lineno, line in enumerate(source.split("\n"), start=1):
        for m in re.finditer(r'#.*|"[^"\n]*"|[{}]', line):
            if m.group() == "{":
                stack.append((lineno, m.start() + 1))
            elif m.group() == "}" and stack:
                stack.pop()
    return stack[-1] if stack else None


# --- declarations --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Declaration:
    """A ``param`` or ``data`` declaration: name, element type and shape (ints or names)."""

    kind: str  # "param" or "data"
    name: str
    dtype: Any
    shape: tuple  # ints, or str for a named size
    init: Any = None  # the init expression's tree, for params
    line: int = 0

    def concrete_shape(self, dims: dict) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims.get(d, _DEFAULT_DIM) for d in self.shape)


@dataclasses.dataclass
class _Ctx:
    """What evaluation needs: the file (for errors) and the objective's direction."""

    filename: str
    source: str
    maximize: bool


class _Return(Exception):
    pass


class _TextExpectation(Expectation):
    """The program of an objective file. Staging also checks the plan (what ``explain`` and
    the estimators check later: e.g. the size of an enumeration), so that an error about a
    site is reported at the site's line in the file."""

    def __init__(self, fn, name, program: "TextProgram"):
        super().__init__(fn, name=name)
        self._text = program
        self._splitting = False

    def stage(self, args):
        try:
            out = super().stage(args)
            self._text._note_staged_sites(out[0].jaxpr)
            collect_sites(out[0].jaxpr)
            if self._text.constraints and not self._splitting:  # the constraints pass's checks, at the file's lines
                from ..transforms._constraints import split

                self._splitting = True
                try:
                    split(self, args)
                finally:
                    self._splitting = False
        except TextError:
            raise
        except EstimaxError as e:
            raise self._text._located(e) from None
        return out

    def _estimate(self, key, *args):
        try:
            return super()._estimate(key, *args)
        except TextError:
            raise
        except EstimaxError as e:
            raise self._text._located(e) from None


class TextProgram:
    """A parsed, checked objective file; ``objective`` is its ``@ex.expectation`` program.

    - ``objective(params, data)``: ``params`` and ``data`` are dicts of arrays keyed by the
      declared names; ``maximize`` says the direction.
    - ``init_params(dims)``, ``abstract_data(dims)``: declared initial values and data
      shapes (``dims`` maps named sizes to numbers; see :meth:`dims_from`).
    - ``sites``: the random choices' names and where they are written, ``(line, column)``;
      once the objective is staged, also under their full names in the program
      (``"expect/z"``, ``"marginal/u"``, ``"normalize/index"``), at the statement that draws
      each (a program's choices where the program is written; a ``marginal``'s or
      ``normalize``'s resampling index at the `~` that draws from it).
    """

    def __init__(self, source: str, filename: str = "<string>", allow_imports=()):
        self.source, self.filename = source, filename
        self.directory = os.path.dirname(os.path.abspath(filename)) if os.path.exists(filename) else os.getcwd()
        self._policy = ImportPolicy(self.directory, allow_imports)
        try:
            tree = _parser().parse(source if source.endswith("\n") else source + "\n")
        except UnexpectedInput as e:
            raise self._syntax_error(e) from None
        except RecursionError:
            raise TextError("an expression is nested too deeply to read", filename=filename, source=source,
                            line=1, column=1) from None
        self._at = None  # the statement being read (for an error that has no better place)
        try:
            self._build(tree)
        except RecursionError:
            if self._at is None:
                raise TextError("an expression is nested too deeply to check", filename=filename, source=source,
                                line=1, column=1) from None
            raise self.error("this statement is nested too deeply to check: hundreds of blocks or expressions "
                             "inside one another", self._at, hint="name the inner parts with `let`") from None

    def _build(self, tree):
        source, filename = self.source, self.filename
        self.imports: dict[str, Any] = {}
        self.params: dict[str, Declaration] = {}
        self.data: dict[str, Declaration] = {}
        self.body: list[Tree] = []
        self.sites: dict[str, tuple[int, int]] = {}
        self._size_tokens: dict[tuple[str, str], Token] = {}  # (declared name, size name) -> the size
        self._site_tokens: dict[str, Any] = {}  # full site name ("expect/z") -> its strategy or name in the file
        self._site_names: dict[str, Token] = {}  # full site name -> its name in the file
        self._program_sites: dict[str, Any] = {}  # a program's site name -> its strategy or name (first program wins)
        self.programs: dict[str, Tree] = {}
        self.constraints: dict[str, Tree] = {}  # name -> the `subject_to` statement
        self.maximize = True
        self._objective_node: Tree | None = None
        self._read(tree)
        self._check_names()
        # the statement on each line (one per line), preferring a random choice's: a site's
        # location is the `file.emx:line` of the statement that ran ``ex.sample``
        self._statements: dict[int, Tree] = {}
        for stmt in tree.iter_subtrees_topdown():
            line = getattr(stmt.meta, "line", None)
            if stmt.data in _RUN_STATEMENTS and line is not None and (
                    stmt.data == "sample_stmt" or line not in self._statements):
                self._statements[line] = stmt
        self._staged_tokens: dict[str, Any] = {}  # full site name -> its strategy or name, once staged
        self._ctx = _Ctx(filename, source, self.maximize)
        name = Path(filename).stem if filename != "<string>" else "text_objective"
        self.objective = _TextExpectation(self._function(), name=name, program=self)

    # -- errors ------------------------------------------------------------------------------
    def error(self, message: str, node=None, *, hint: str | None = None, line=None, column=None, end_column=None) -> TextError:
        if node is not None:
            meta = node.meta if isinstance(node, Tree) else None
            if meta is not None and not getattr(meta, "empty", True):
                line, column = meta.line, meta.column
                end_column = meta.end_column if meta.end_line == meta.line else self._line_end(line)
            elif isinstance(node, Token):
                line, column = node.line, node.column
                end_column = node.end_column if node.end_line == node.line else None
        return TextError(message, filename=self.filename, source=_shown(self.source), line=line or 1,
                         column=column or 1, end_column=end_column, hint=hint)

    def _statement_hint(self, accepted: set, line: int) -> str | None:
        """After a statement's first word the parser wants only `~`: the word was meant as a keyword,
        or the statement is a random choice missing its `~`."""
        if accepted != {"TILDE"}:
            return None
        lines = self.source.split("\n")
        m = re.match(r"\s*([A-Za-z_]\w*)", lines[line - 1] if 0 < line <= len(lines) else "")
        if m is None:
            return None
        close = difflib.get_close_matches(m.group(1), _STATEMENT_KEYWORDS, n=1)
        if close:
            return f"did you mean {close[0]!r}?"
        return f"a statement that starts with a name is a random choice: `{m.group(1)} ~ <distribution>`"

    def _too_deep(self, stmt) -> TextError:
        return self.error("this statement's expression is nested too deeply to evaluate: hundreds of calls, "
                          "brackets, `-`, `**`, `not` or `if` inside one another", stmt,
                          hint="name the inner parts with `let` (a long sum `a + b + ...` is fine as it is)")

    def _line_end(self, line: int) -> int:
        lines = _shown(self.source).split("\n")
        return len(lines[line - 1].rstrip()) + 1 if 0 < line <= len(lines) else 1

    def _syntax_error(self, e: UnexpectedInput) -> TextError:
        line, column = getattr(e, "line", 1), getattr(e, "column", 1)
        if isinstance(e, UnexpectedToken):
            tok = e.token
            if tok.type == "$END" and (brace := _unclosed_brace(self.source)) is not None:
                return self.error("syntax error: this `{` is never closed; expected '}' before the end of the file",
                                  line=brace[0], column=brace[1])
            what = "end of line" if tok.type == "_NL" else ("end of file" if tok.type == "$END" else f"{tok.value!r}")
            accepted = _accepted(e, e.expected)
            msg = f"syntax error: unexpected {what}; expected {_describe_expected(accepted)}"
            end = tok.end_column if tok.type not in ("_NL", "$END") and tok.end_line == tok.line else None
            return self.error(msg, line=line, column=column, end_column=end, hint=self._statement_hint(accepted, line))
        if isinstance(e, UnexpectedCharacters):
            char = self.source[e.pos_in_stream] if e.pos_in_stream < len(self.source) else "?"
            if char == '"':
                return self.error("syntax error: this string is not closed on its line; expected '\"'",
                                  line=line, column=column)
            accepted = _accepted(e, e.allowed)
            allowed = _describe_expected(accepted) if accepted else "a statement"
            msg = f"syntax error: unexpected character {char!r}; expected {allowed}"
            return self.error(msg, line=line, column=column, hint=self._statement_hint(accepted, line))
        if isinstance(e, UnexpectedEOF):
            return self.error(f"syntax error: the file ends too early; expected {_describe_expected(e.expected)}",
                              line=max(1, self.source.count("\n")), column=1)
        return self.error(f"syntax error: {e}", line=line, column=column)

    def _located(self, e: EstimaxError) -> EstimaxError:
        """An error an estimator pass raised about a site (``site 'z': ...``), at the site's
        strategy (or name) in the file; other errors (about the caller's arguments) unchanged."""
        c = re.match(r"constraint '([^']+)' \(at [^)]*\) (.*)", str(e))
        if c is not None and c.group(1) in self.constraints:
            why = c.group(2).replace(" (the program's first argument)", "")
            return self.error(f"constraint {c.group(1)!r} {why}",
                              self.constraints[c.group(1)].children[1])
        m = re.match(r"site '([^']+)'|two random choices are named '([^']+)'", str(e))
        full = (m.group(1) or m.group(2)) if m else None
        token = None
        if full is not None:  # a program's choices are named where the program is called: match the last part
            token = (self._staged_tokens.get(full) or self._site_tokens.get(full)
                     or self._program_sites.get(full.rsplit("/", 1)[-1]))
        if token is None:
            return e
        if m.group(2) is not None and full not in self._site_tokens:
            # a program (or a marginal/normalize) drawn twice in one objective
            return self.error(f"the random choice {full!r} is drawn twice: a program that draws random choices "
                              "(or a marginal or normalize) can run once in an objective", token,
                              hint="for several independent draws, run it inside `plate(n=...) { ... }`")
        return self.error(_in_text_terms(_first_line(e)), token)

    def _note_staged_sites(self, jaxpr):
        """Record where each random choice of the staged objective is written, under its full
        name (as ``explain`` names it): the statement its location (``file.emx:line``, set
        while the statement ran) names. A site's short name is ambiguous -- the reverse model
        of a ``marginal`` draws ``marginal/u`` under the joint's name ``u`` -- and some sites
        have none in the file (``normalize/index``)."""
        base = os.path.basename(self.filename)
        tokens: dict[str, Any] = {}

        def walk(jaxpr, prefix):
            for eqn in jaxpr.eqns:
                if eqn.primitive is _sample_p:
                    spec = eqn.params["spec"]
                    file, _, line = (spec.location or "").rpartition(":")
                    stmt = self._statements.get(int(line)) if file == base and line.isdigit() else None
                    if stmt is not None and prefix + spec.name not in tokens:
                        tokens[prefix + spec.name] = stmt
                elif eqn.primitive is _expect_p:
                    walk(eqn.params["spec"].jaxpr, f"{prefix}{eqn.params['spec'].name}/")
                else:
                    for sub in _compat.subjaxprs_of(eqn):
                        walk(sub, prefix)

        walk(jaxpr, "")
        self._staged_tokens = {}
        for full, stmt in tokens.items():
            if stmt.data == "sample_stmt":
                name, strategy = stmt.children[0], stmt.children[2]
                self.sites[full] = (name.line, name.column)
                self._staged_tokens[full] = strategy or name
            else:  # e.g. a Python function of the file's imports that samples, called in a `let`
                self.sites[full] = (stmt.meta.line, stmt.meta.column)
                self._staged_tokens[full] = stmt

    # -- reading the statements ------------------------------------------------------------------
    def _read(self, tree: Tree):
        stmts = list(tree.children)
        for i, stmt in enumerate(stmts):
            kind = stmt.data
            self._at = stmt
            if self._objective_node is not None:
                raise self.error("statements after the objective: `maximize`/`minimize` must come last",
                                 stmt, hint=f"the objective is on line {self._objective_node.meta.line}")
            if kind == "import_stmt":
                self._import(stmt)
            elif kind in ("param_decl", "data_decl"):
                self._declare(stmt)
            elif kind in ("let_stmt", "sample_stmt"):
                self._note_binding(stmt)
                self.body.append(stmt)
            elif kind == "program_def":
                self.programs[str(stmt.children[0])] = stmt
                self.body.append(stmt)
            elif kind == "constraint_stmt":
                self._note_constraint(stmt)
                self.body.append(stmt)
            elif kind in ("maximize", "minimize"):
                self.maximize = kind == "maximize"
                self._objective_node = stmt
                self.body.append(stmt)
            elif kind == "return_stmt":
                raise self.error("`return` is only allowed at the end of an `expect { ... }` block; "
                                 "the objective is stated with `maximize` or `minimize`", stmt)
        if self._objective_node is None:
            lines = self.source.split("\n")
            line = max((i + 1 for i, t in enumerate(lines) if t.strip()), default=1)
            raise self.error("the file states no objective", line=line, column=1,
                             hint="end it with `maximize <expression>` or `minimize <expression>`")

    def _note_constraint(self, stmt: Tree):
        name_tok, value = stmt.children
        if not (isinstance(value, Tree) and value.data == "compare" and str(value.children[1]) in ("==", "<=", ">=")):
            what = f"`{value.children[1]}`" if isinstance(value, Tree) and value.data == "compare" else "an expression"
            raise self.error(f"a constraint is a comparison with ==, <= or >=; this is {what}", value,
                             hint="e.g. `subject_to budget: sum(w) == 1.0` or `subject_to cap: x <= 2.0`")
        name = str(name_tok) if name_tok is not None else f"{'eq' if str(value.children[1]) == '==' else 'le'}_{len(self.constraints)}"
        if name in self.constraints:
            prev = self.constraints[name]
            raise self.error(f"another constraint is named {name!r} (line {prev.meta.line}); constraint names must be unique",
                             name_tok or stmt)
        self.constraints[name] = stmt

    def _defined(self) -> dict[str, str]:
        out = {n: "an import" for n in self.imports}
        out.update({n: "a parameter" for n in self.params})
        out.update({n: "a data array" for n in self.data})
        for d in self.data.values():
            out.update({n: "a size" for n in d.shape if isinstance(n, str) and n not in out})
        return out

    def _check_new_name(self, token: Token, what: str, defined: dict[str, str]):
        name = str(token)
        if name in defined:
            raise self.error(f"{name!r} is already defined (as {defined[name]}); {what} needs a new name", token)
        if name in _KEYWORDS:
            raise self.error(f"{name!r} is a keyword; {what} needs another name", token)
        if name in FUNCTIONS or name in DISTRIBUTIONS or name in CONSTANTS:
            raise self.error(f"{name!r} is a built-in name; {what} needs another name", token)

    def _import(self, stmt: Tree):
        """``from "file.py" import name`` or ``from module import name``, under the import policy
        (``_imports``): nothing runs before the import is known to be allowed."""
        module_node, name, alias = stmt.children
        target = str(alias or name)
        self._check_new_name(alias or name, "an import", self._defined())
        policy = self._policy
        if module_node.data == "file_module":
            path = str(module_node.children[0])[1:-1]
            full = path if os.path.isabs(path) else os.path.join(self.directory, path)
            if not os.path.exists(full):
                raise self.error(f"no such file: {path!r}", module_node,
                                 hint=f"looked for {_relative(full)}; a relative path is read from the objective file's folder")
            why = policy.refuse_file(full)
            if why is not None:
                raise self.error(f"importing {path!r} is not allowed: {why}", module_node,
                                 hint=opt_in_hint(_relative(os.path.realpath(full))))
            spec = importlib.util.spec_from_file_location(Path(full).stem, full)
            if spec is None or spec.loader is None or not os.path.isfile(full):
                raise self.error(f"cannot import {path!r}: not a Python file", module_node)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except (Exception, SystemExit) as e:  # noqa: BLE001 -- the user's module failed to import
                raise self.error(f"importing {path!r} failed: {type(e).__name__}: {_first_line(e)}",
                                 module_node) from None
            policy.trust(module)  # the file's own code: what it defines may be used freely
            where = repr(path)
        else:
            dotted = ".".join(str(t) for t in module_node.children)
            submodule = f"{dotted}.{name}"
            if policy.module_opted_in(dotted):
                module = self._import_module(dotted, module_node, search_folder=True)
                policy.trust(module)
            elif module_allowed(dotted):
                module = self._import_module(dotted, module_node)
            elif module_allowed(submodule) or policy.module_opted_in(submodule):
                # `from jax import numpy`: the module jax.numpy itself
                self.imports[target] = self._import_module(submodule, name)
                if policy.module_opted_in(submodule):
                    policy.trust(self.imports[target])
                return
            else:
                raise self.error(f"importing from module {dotted!r} is not allowed: importing a module runs its code, "
                                 "and an objective file imports by default only from numerical modules (math, numpy, "
                                 "jax.numpy, jax.nn, jax.lax, jax.scipy, numpyro.distributions; the list is "
                                 "ex.text.ALLOWED_MODULES)", module_node, hint=opt_in_hint(dotted))
            where = f"module {dotted!r}"
        if not hasattr(module, str(name)):
            if module_node.data == "dotted_module" and (module_allowed(submodule) or policy.module_opted_in(dotted)):
                value = self._import_module(submodule, name)  # a submodule not imported by its package
            else:
                names = [n for n in dir(module) if not n.startswith("_")]
                close = difflib.get_close_matches(str(name), names, n=1)
                raise self.error(f"{where} has no name {str(name)!r}", name,
                                 hint=f"did you mean {close[0]!r}?" if close else None)
        else:
            value = getattr(module, str(name))
        why = policy.refuse_name(module, str(name), value)
        if why is not None:
            entry = getattr(value, "__name__", None) if inspect.ismodule(value) and not str(name).startswith("_") else None
            raise self.error(f"importing {str(name)!r} is not allowed: {why}", name,
                             hint=opt_in_hint(entry or getattr(module, "__name__", "?")))
        if policy.trusted(module):
            policy.trust(value)
        self.imports[target] = value

    def _import_module(self, dotted: str, node, search_folder: bool = False):
        """The module ``dotted``; with ``search_folder`` (an opted-in module), the objective file's
        folder is searched too."""
        added = search_folder and self.directory not in sys.path
        if added:  # modules next to the objective file, for this import only
            sys.path.insert(0, self.directory)
        try:
            return importlib.import_module(dotted)
        except (Exception, SystemExit) as e:  # noqa: BLE001 -- not found, or the module's own code failed
            what = _first_line(e) if isinstance(e, ImportError) else f"{type(e).__name__}: {_first_line(e)}"
            raise self.error(f"cannot import module {dotted!r}: {what}", node) from None
        finally:
            if added and self.directory in sys.path:
                sys.path.remove(self.directory)

    def _declare(self, stmt: Tree):
        kind = "param" if stmt.data == "param_decl" else "data"
        name, type_node = stmt.children[0], stmt.children[1]
        init = stmt.children[2] if kind == "param" else None
        self._check_new_name(name, f"a {kind} declaration", self._defined())
        type_name = type_node.children[0]
        if str(type_name) not in _TYPES:
            raise self.error(f"unknown type {str(type_name)!r}; expected 'real' or 'int'", type_name)
        if kind == "param" and str(type_name) != "real":
            raise self.error(f"parameter {str(name)!r} must be real (parameters are optimized)", type_name)
        shape = []
        for d in type_node.children[1:]:
            tok = d.children[0]
            if d.data == "int_dim":
                if _too_large(str(tok)):
                    shown = str(tok) if len(str(tok)) <= 24 else f"{str(tok)[:12]}... ({len(str(tok))} digits)"
                    raise self.error(f"the size {shown} is too large: an axis has at most {_INT32_MAX} entries", tok)
                if int(tok) < 1:
                    raise self.error("a size must be at least 1", tok)
                shape.append(int(tok))
            else:
                shape.append(str(tok))
                self._size_tokens.setdefault((str(name), str(tok)), tok)
        decl = Declaration(kind, str(name), _TYPES[str(type_name)], tuple(shape), init, stmt.meta.line)
        static = [s for s in shape if isinstance(s, int)]
        if math.prod(static) > _INT32_MAX:
            raise self.error(f"{kind} {str(name)!r} is declared with {math.prod(static)} entries; an array has at most "
                             f"{_INT32_MAX}", type_node)
        (self.params if kind == "param" else self.data)[str(name)] = decl

    def _note_binding(self, stmt: Tree):
        name = stmt.children[0]
        if stmt.data == "sample_stmt":
            self.sites[str(name)] = (name.line, name.column)

    # -- static name resolution ----------------------------------------------------------------
    def _check_names(self):
        known = dict(self._defined())
        for decl in self.params.values():
            if decl.init is not None:
                self._resolve(decl.init, {})  # built-ins only
        for d in (*self.params.values(), *self.data.values()):
            for size in d.shape:
                if isinstance(size, str) and d.kind == "param" and not any(size in x.shape for x in self.data.values()):
                    raise self.error(f"parameter {d.name!r} has a size {size!r} that no data declaration has",
                                     self._size_tokens.get((d.name, size)),
                                     line=d.line, column=1, hint="give the size as a number, or declare data with it")
        self._resolve_block(self.body, known)

    def _resolve_block(self, stmts, known: dict[str, str], prefix: str = "", program: bool = False):
        for stmt in stmts:
            self._at = stmt
            if stmt.data == "program_def":
                self._resolve_program(stmt, known)
            elif stmt.data in ("let_stmt", "sample_stmt"):
                name, value = stmt.children[0], stmt.children[1]
                self._resolve(value, known, prefix)
                if stmt.data == "sample_stmt" and stmt.children[2] is not None:
                    self._resolve_strategy(stmt.children[2], known, prefix)
                what = "a let-binding" if stmt.data == "let_stmt" else "a random choice"
                self._check_new_name(name, what, known)
                known[str(name)] = "a random choice" if stmt.data == "sample_stmt" else "a let-binding"
                if stmt.data == "sample_stmt":
                    if program:
                        self._program_sites.setdefault(str(name), stmt.children[2] or name)
                        self.sites.setdefault(str(name), (name.line, name.column))
                    else:
                        self._note_site(prefix + str(name), name, stmt.children[2])
            elif stmt.data == "constraint_stmt":
                if prefix or program:
                    raise self.error("constraints are stated at the top level of the file", stmt)
                self._resolve(stmt.children[1], known, prefix)
            else:  # maximize, minimize, return
                self._resolve(stmt.children[0], known, prefix)

    def _resolve_program(self, stmt: Tree, known: dict[str, str]):
        name, args_node, *body = stmt.children
        self._check_new_name(name, "a program", known)
        inner = dict(known)
        for a in ([] if args_node is None else args_node.children):
            self._check_new_name(a, "a program's argument", inner)
            inner[str(a)] = "an argument"
        self._check_block(stmt, body, "a `program`", "programs")
        # the program sees what is defined before it; not itself (no recursion)
        self._resolve_block(body, inner, program=True)
        known[str(name)] = "a program"

    def _check_block(self, node: Tree, stmts: list, what: str, plural: str):
        for i, s in enumerate(stmts[:-1]):
            if s.data == "return_stmt":
                raise self.error(f"statements after `return`: it must be the last statement of {what} block",
                                 stmts[i + 1], hint=f"the block's `return` is on line {s.meta.line}")
        if not stmts or stmts[-1].data != "return_stmt":
            raise self.error(f"{what} block must end with `return <expression>`", node)
        for s in stmts[:-1]:
            if s.data == "program_def":
                raise self.error(f"programs are defined at the top level of the file, not inside {what} block", s)
            if s.data == "constraint_stmt":
                raise self.error(f"constraints are stated at the top level of the file, not inside {what} block", s)
            if s.data not in ("let_stmt", "sample_stmt"):
                raise self.error(f"only `let`, `~` and a final `return` are allowed inside {plural}", s)

    def _note_site(self, full: str, name: Token, strategy):
        # Blocks do not scope names of random choices (every `expect` block's function is
        # `expect`; a plate's choices keep their names), so two blocks' random choices of one
        # name would be the same site ("expect/u").
        if full in self._site_names:
            prev = self._site_names[full]
            raise self.error(f"another block has a random choice named {str(name)!r} (line {prev.line}); "
                             "random choices in `expect` and `plate` blocks need distinct names", name)
        self._site_names[full] = name
        self._site_tokens[full] = strategy or name  # errors about the site point at its strategy, else its name

    def _note_block_sites(self, stmts):
        for s in stmts:
            if s.data == "sample_stmt":
                n = s.children[0]
                self.sites.setdefault(str(n), (n.line, n.column))

    def _resolve_strategy(self, node: Tree, known, prefix: str = ""):
        name = node.children[0]
        if str(name) not in STRATEGIES:
            close = difflib.get_close_matches(str(name), list(STRATEGIES), n=1)
            raise self.error(f"unknown strategy @{name}; expected one of {', '.join('@' + s for s in STRATEGIES)}",
                             name, hint=f"did you mean @{close[0]}?" if close else None)
        if node.children[1] is not None:
            for kw in node.children[1].children:
                if not (str(kw.children[0]) == "learn" and kw.children[1].data in ("true", "false")):
                    self._resolve(kw.children[1], known, prefix)

    def _resolve(self, node, known: dict[str, str], prefix: str = ""):
        """Check the names of an expression, left to right. A loop over a stack, not a recursion:
        a sum of 10^4 terms is a tree 10^4 deep."""
        stack = [node]
        while stack:
            node = stack.pop()
            if not isinstance(node, Tree):
                continue
            if node.data == "number":
                self._check_number(node)
            elif node.data == "name":
                self._resolve_name(node.children[0], known)
            elif node.data in ("expect_block", "plate_block"):
                self._resolve_scope(node, known, prefix)
            elif node.data == "kwarg":
                stack.append(node.children[1])
            elif node.data == "attr":
                stack.append(node.children[0])
            else:
                stack.extend(reversed(node.children))

    def _resolve_name(self, tok: Token, known: dict[str, str]):
        name = str(tok)
        if name in known or name in FUNCTIONS or name in DISTRIBUTIONS or name in CONSTANTS:
            return
        candidates = list(known) + list(FUNCTIONS) + list(DISTRIBUTIONS) + list(CONSTANTS)
        close = difflib.get_close_matches(name, candidates, n=1)
        later = name in self.sites or any(
            s.data == "let_stmt" and str(s.children[0]) == name for s in self.body
        )
        hint = f"did you mean {close[0]!r}?" if close else None
        if later:
            hint = f"{name!r} is defined further down; statements run in order"
        raise self.error(f"unknown name {name!r}", tok, hint=hint)

    def _check_number(self, node: Tree):
        """A number literal must fit its type: whole numbers are 32-bit integers, others 32-bit
        floats (a larger one would overflow, or silently become infinity)."""
        tok = node.children[0]
        text = str(tok)
        shown = text if len(text) <= 24 else f"{text[:12]}... ({len(text)} characters)"
        if text.isdigit():
            if _too_large(text):
                raise self.error(f"the whole number {shown} is too large: whole numbers are 32-bit integers "
                                 f"(at most {_INT32_MAX})", tok,
                                 hint="for a real number, write it with a decimal point or an exponent (e.g. 1e11)")
        elif float(text) > _FLOAT32_MAX:
            raise self.error(f"the number {shown} is too large: real numbers are 32-bit floats (at most about 3.4e38)",
                             tok)

    def _resolve_scope(self, node: Tree, known: dict[str, str], prefix: str):
        """An ``expect { ... }`` or ``plate(...) { ... }`` block in an expression."""
        if node.data == "expect_block":
            kwargs, *stmts = node.children
            if kwargs is not None:
                for kw in kwargs.children:
                    if str(kw.children[0]) != "n":
                        raise self.error(f"expect takes only n=...; got {str(kw.children[0])}=", kw.children[0])
                    self._resolve(kw.children[1], known, prefix)
            self._check_block(node, stmts, "an `expect { ... }`", "`expect`")
            self._note_block_sites(stmts)
            self._resolve_block(stmts, dict(known), prefix + "expect/")  # the block's function is `expect`
        elif node.data == "plate_block":
            spec, *stmts = node.children
            inner = dict(known)
            if spec.data == "plate_size":
                key = spec.children[0].children[0]
                if str(key) != "n":
                    raise self.error(f"plate takes n=... or `name in array`; got {str(key)}=", key)
                self._resolve(spec.children[0].children[1], known, prefix)
            else:
                for item in spec.children:
                    element, array = item.children
                    self._resolve(array, known, prefix)
                    self._check_new_name(element, "a plate's element", inner)
                    inner[str(element)] = "a plate's element"
            self._check_block(node, stmts, "a `plate { ... }`", "`plate`")
            self._note_block_sites(stmts)
            self._resolve_block(stmts, inner, prefix)  # a plate's random choices keep their names

    # -- lowering ------------------------------------------------------------------------------
    def dims_from(self, data: dict | None) -> dict[str, int]:
        """Named sizes read off the data's shapes (``_DEFAULT_DIM`` where no data is given)."""
        dims: dict[str, int] = {}
        for decl in self.data.values():
            if data is None or decl.name not in data:
                continue
            shape = np.shape(data[decl.name])
            if len(shape) != len(decl.shape):
                raise self.error(f"data {decl.name!r} is declared with {len(decl.shape)} axes "
                                 f"{_fmt_shape(decl.shape)}; the given array has shape {shape}",
                                 line=decl.line, column=1)
            for want, got in zip(decl.shape, shape):
                if isinstance(want, str):
                    if dims.setdefault(want, got) != got:
                        raise self.error(f"size {want!r} is {dims[want]} in one data array and {got} in "
                                         f"{decl.name!r}", line=decl.line, column=1)
                elif want != got:
                    raise self.error(f"data {decl.name!r} is declared with shape {_fmt_shape(decl.shape)}; "
                                     f"the given array has shape {shape}", line=decl.line, column=1)
        return dims

    def init_params(self, dims: dict | None = None) -> dict:
        """The parameters' initial values (the declared ``= value``, else zeros)."""
        dims = dims or {}
        out = {}
        for decl in self.params.values():
            shape = decl.concrete_shape(dims)
            self._check_entries(decl, shape)
            if decl.init is None:
                out[decl.name] = jnp.zeros(shape, decl.dtype)
                continue
            try:
                value = self._eval(decl.init, {}, self._ctx)
            except RecursionError:
                raise self._too_deep(decl.init) from None
            if _not_numeric(value):
                raise self.error(f"the initial value of {decl.name!r} must be a number or an array; got "
                                 f"{_describe_value(value)}", decl.init)
            try:
                out[decl.name] = jnp.broadcast_to(jnp.asarray(value, decl.dtype), shape)
            except (TypeError, ValueError):
                raise self.error(f"the initial value of {decl.name!r} has shape {np.shape(value)}, which does "
                                 f"not fit the declared shape {shape}", decl.init) from None
        return out

    def _check_entries(self, decl: Declaration, shape: tuple):
        """One array has at most ``_INT32_MAX`` entries (XLA's and the language's indices are 32-bit)."""
        if math.prod(shape) > _INT32_MAX:
            named = {s: v for s, v in zip(decl.shape, shape) if isinstance(s, str)}
            sizes = ", ".join(f"{s}={v}" for s, v in named.items())
            what = "parameter" if decl.kind == "param" else "data"
            raise self.error(f"{what} {decl.name!r} would have {math.prod(shape)} entries (shape {shape}"
                             f"{', with ' + sizes if sizes else ''}); an array has at most {_INT32_MAX}",
                             line=decl.line, column=1)

    def abstract_data(self, dims: dict | None = None) -> dict:
        dims = dims or {}
        for d in self.data.values():
            self._check_entries(d, d.concrete_shape(dims))
        return {d.name: jax.ShapeDtypeStruct(d.concrete_shape(dims), d.dtype) for d in self.data.values()}

    def validate_data(self, data: dict) -> dict:
        """``data`` as arrays of the declared types; errors name the missing or extra array."""
        missing = [n for n in self.data if n not in data]
        if missing:
            decl = self.data[missing[0]]
            raise self.error(f"no data given for {missing[0]!r}", line=decl.line, column=1,
                             hint=f"the data file has {sorted(data)}")
        self.dims_from(data)
        for n, d in self.data.items():
            kind = np.asarray(data[n]).dtype.kind
            if kind not in "biuf":
                what = {"c": "complex numbers", "U": "text", "S": "bytes", "O": "Python objects"}.get(kind, f"dtype {np.asarray(data[n]).dtype}")
                raise self.error(f"data {n!r} holds {what}; it is declared {'real' if d.dtype == jnp.float32 else 'int'}",
                                 line=d.line, column=1)
        return {n: jnp.asarray(data[n], d.dtype) for n, d in self.data.items()}

    def _function(self) -> Callable:
        body, ctx = self.body, self._ctx

        def objective(params, data):
            env: dict[str, Any] = dict(self.imports)
            env.update({k: params[k] for k in self.params})
            env.update({k: data[k] for k in self.data})
            for decl in self.data.values():  # named sizes are numbers in the program: plate(n=N)
                for axis, size in enumerate(decl.shape):
                    if isinstance(size, str) and size not in env:
                        env[size] = int(jnp.shape(data[decl.name])[axis])
            return self._run_block(body, env, ctx)

        objective.__name__ = Path(self.filename).stem if self.filename != "<string>" else "text_objective"
        return objective

    def _run_block(self, stmts, env, ctx, block: str = "objective"):
        """Run a block's statements; its value is that of its last (``maximize``/``minimize``/
        ``return``) statement. ``block``: "objective" or "expect" (a scalar), "plate" (an
        array), "program" (any value)."""
        for stmt in stmts:
            where = f"{os.path.basename(self.filename)}:{stmt.meta.line}"
            with jax.named_scope(f"src={where}"), source_location(where):
                try:
                    done, value = self._run_statement(stmt, env, ctx, block)
                except RecursionError:
                    raise self._too_deep(stmt) from None
            if done:
                return value
        raise AssertionError("a block without a value")  # excluded by _read / _resolve

    def _run_statement(self, stmt, env, ctx, block):
        kind = stmt.data
        if kind == "program_def":
            env[str(stmt.children[0])] = _Program(self, stmt, dict(env), ctx)
        elif kind == "constraint_stmt":
            self._constrain(stmt, env, ctx)
        elif kind == "let_stmt":
            env[str(stmt.children[0])] = self._eval(stmt.children[1], env, ctx)
        elif kind == "sample_stmt":
            name, d_node, strategy_node = stmt.children
            d = self._eval(d_node, env, ctx)
            if isinstance(d, _Drawable):
                if strategy_node is not None:
                    raise self.error(f"a strategy does not apply to a draw from {d.label}: its random choices "
                                     "carry their own strategies (write them inside its programs)", strategy_node)
                try:
                    env[str(name)] = d.draw()
                except TextError:
                    raise
                except EstimaxError as e:
                    raise self.error(_in_text_terms(_first_line(e)), d_node) from None
                except Exception as e:  # noqa: BLE001 -- a value its programs cannot use
                    raise self.error(_describe_error(e), d_node) from None
                return False, None
            if not isinstance(d, dist.Distribution):
                hint = None
                if (isinstance(d, type) and issubclass(d, dist.Distribution)) or any(d is f for f in DISTRIBUTIONS.values()):
                    hint = f"call it with its parameters, e.g. {getattr(d, '__name__', 'Normal')}(...)"
                raise self.error(f"the right side of `{name} ~` must be a distribution; got "
                                 f"{_describe_value(d)}", d_node, hint=hint)
            estimator = None if strategy_node is None else self._strategy(strategy_node, env, ctx)
            try:
                env[str(name)] = _sample(d, estimator=estimator, name=str(name))
            except TextError:
                raise
            except EstimaxError as e:
                raise self.error(_in_text_terms(_first_line(e)), strategy_node or d_node) from None
            except Exception as e:  # noqa: BLE001 -- e.g. a parameter NumPyro cannot use
                raise self.error(_describe_error(e), d_node) from None
        else:  # maximize / minimize / return: the block's value
            value = self._eval(stmt.children[0], env, ctx)
            if block == "program":
                return True, _arr(value)
            what = {"objective": "the objective", "expect": "an `expect` block's value",
                    "plate": "a `plate` block's value"}[block]
            if _not_numeric(value):
                raise self.error(f"{what} must be a number or an array; got {_describe_value(value)}"
                                 if block == "plate" else f"{what} must be a number; got {_describe_value(value)}",
                                 stmt.children[0])
            value = _arr(value)
            if block == "plate":
                return True, jnp.asarray(value)
            if jnp.ndim(value) != 0:
                raise self.error(f"{what} must be a scalar; this expression has shape {jnp.shape(value)}",
                                 stmt.children[0], hint="reduce it, e.g. with sum(...) or mean(...)")
            return True, jnp.asarray(value, jnp.result_type(float))
        return False, None

    def _constrain(self, stmt: Tree, env, ctx):
        name = next(n for n, s in self.constraints.items() if s is stmt)
        lhs_node, op, rhs_node = stmt.children[1].children
        lhs = self._num(self._eval(lhs_node, env, ctx), lhs_node, "a constraint")
        rhs = self._num(self._eval(rhs_node, env, ctx), rhs_node, "a constraint")
        self._same_shapes(lhs, rhs, stmt.children[1], "the constraint")
        with jax.numpy_rank_promotion("allow"):
            value = jnp.asarray(lhs, jnp.result_type(float)) - jnp.asarray(rhs, jnp.result_type(float))
        kind = {"==": "eq", "<=": "le", ">=": "ge"}[str(op)]
        try:
            _subject_to(**{kind: value}, name=name)
        except EstimaxError as e:
            raise self.error(_first_line(e), stmt.children[1]) from None

    def _strategy(self, node: Tree, env, ctx):
        name, kwargs = node.children
        base = STRATEGIES[str(name)]
        if kwargs is None:
            return base
        if not callable(base):
            raise self.error(f"@{name} takes no arguments", kwargs)
        values = {}
        for kw in kwargs.children:
            key, value_node = str(kw.children[0]), kw.children[1]
            if key == "learn":
                flag = value_node.data == "true" if value_node.data in ("true", "false") else None
                if flag is None:
                    raise self.error("learn= takes true or false", value_node)
                if flag:
                    values["learn"] = "ascent" if ctx.maximize else "descent"
                continue
            values[key] = self._eval(value_node, env, ctx)
            if _is_builtin(values[key]) or isinstance(values[key], (str, dist.Distribution)):
                raise self.error(f"@{name}({key}=...) takes a number or an array; got {_describe_value(values[key])}",
                                 value_node)
        try:
            inspect.signature(type(base).__call__).bind(base, **values)
        except TypeError:
            params = [p for p in inspect.signature(type(base).__call__).parameters if p != "self"]
            allowed = ", ".join(f"{p}=" for p in params) or "no arguments"
            raise self.error(f"@{name} does not take {', '.join(k + '=' for k in values)}; it takes {allowed}",
                             kwargs) from None
        try:
            return base(**values)
        except Exception as e:  # noqa: BLE001 -- the strategy's own check of its arguments
            raise self.error(_in_text_terms(_describe_error(e)), kwargs) from None

    # -- expressions -----------------------------------------------------------------------------
    def _eval(self, node, env, ctx):
        try:
            return self._eval_inner(node, env, ctx)
        except (TextError, RecursionError):  # too deep: reported at the statement (_run_block)
            raise
        except Exception as e:  # noqa: BLE001 -- whatever the file asked for failed here: say where
            raise self.error(_describe_error(e), node) from None

    def _num(self, value, node, what: str):
        """``value`` as an operand of ``what``: a number or an array (a list literal becomes one)."""
        if _not_numeric(value):
            raise self.error(f"{what} needs numbers or arrays; got {_describe_value(value)}", node)
        return _arr(value)

    def _same_shapes(self, x, y, node, what: str):
        try:
            np.broadcast_shapes(jnp.shape(x), jnp.shape(y))
        except ValueError:
            raise self.error(f"{what} got mismatched shapes {jnp.shape(x)} and {jnp.shape(y)}", node) from None

    def _eval_inner(self, node, env, ctx):
        kind = node.data
        ev = lambda n: self._eval(n, env, ctx)  # noqa: E731
        if kind == "number":
            text = str(node.children[0])
            return int(text) if text.isdigit() else float(text)
        if kind == "string":
            return str(node.children[0])[1:-1]
        if kind in ("true", "false"):
            return kind == "true"
        if kind == "name":
            name = str(node.children[0])
            if name in env:
                return env[name]
            if name in FUNCTIONS:
                return FUNCTIONS[name]
            if name in DISTRIBUTIONS:
                return DISTRIBUTIONS[name]
            return CONSTANTS[name]
        if kind == "array":
            items = [ev(c) for c in node.children if c is not None]
            if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in items):
                return items  # a static list (shapes: expand([3]))
            if items and all(isinstance(x, str) for x in items):
                return items  # names: keep=["z", "w"]
            return jnp.stack([jnp.asarray(x) for x in items])
        if kind == "neg":
            return -self._num(ev(node.children[0]), node.children[0], "'-'")
        if kind in _CHAINS:
            # `a + b + ... + z` is a tree as deep as it is long: its left spine is evaluated in a
            # loop, each operation located at its own node
            spine = [node]
            while isinstance(spine[-1].children[0], Tree) and spine[-1].children[0].data in _CHAINS:
                spine.append(spine[-1].children[0])
            value = ev(spine[-1].children[0])
            for step in reversed(spine[1:]):
                try:
                    value = self._binary(step, value, ev)
                except (TextError, RecursionError):
                    raise
                except Exception as e:  # noqa: BLE001 -- as _eval does for this node
                    raise self.error(_describe_error(e), step) from None
            return self._binary(node, value, ev)
        if kind in ("pow", "compare"):
            return self._binary(node, ev(node.children[0]), ev)
        if kind == "not_expr":
            return jnp.logical_not(self._num(ev(node.children[0]), node.children[0], "'not'"))
        if kind == "if_expr":
            cond_node, then_node, else_node = node.children
            cond = self._num(ev(cond_node), cond_node, "the condition of `if`")
            if jnp.ndim(cond) == 0:
                return self._cond(cond, then_node, else_node, node, ev)
            x = self._num(ev(then_node), then_node, "`then`")
            y = self._num(ev(else_node), else_node, "`else`")
            try:
                np.broadcast_shapes(jnp.shape(cond), jnp.shape(x), jnp.shape(y))
            except ValueError:
                raise self.error(f"`if ... then ... else ...` got mismatched shapes: the condition {jnp.shape(cond)}, "
                                 f"`then` {jnp.shape(x)}, `else` {jnp.shape(y)}", node) from None
            return jnp.where(cond, x, y)
        if kind == "slice":
            bounds = [None if c is None else ev(c) for c in node.children]
            for b, b_node in zip(bounds, node.children):
                if b is not None and (isinstance(b, bool) or not isinstance(b, int)):
                    raise self.error(f"the bounds of a slice must be whole numbers written in the file (or sizes); "
                                     f"got {_describe_value(b)}", b_node)
            return slice(*bounds)
        if kind == "index":
            target, *idx = node.children
            x = jnp.asarray(self._num(ev(target), target, "indexing"))
            keys = tuple(ev(i) for i in idx)
            if len(keys) > x.ndim:
                raise self.error(f"{len(keys)} indices for an array with {x.ndim} axes (shape {x.shape})", node)
            for axis, (k, k_node) in enumerate(zip(keys, idx)):
                if isinstance(k, int) and not isinstance(k, bool) and not -x.shape[axis] <= k < x.shape[axis]:
                    raise self.error(f"index {k} is out of range for axis {axis} of size {x.shape[axis]}", k_node)
            return x[keys[0] if len(keys) == 1 else keys]
        if kind == "attr":
            obj, name = ev(node.children[0]), str(node.children[1])
            if isinstance(obj, dist.Distribution):
                if name not in _DIST_METHODS:
                    raise self.error(f"distributions have no attribute {name!r} here; available: "
                                     f"{', '.join(sorted(_DIST_METHODS))}", node.children[1])
                if name == "expand":
                    return _expand(obj)
                return getattr(obj, name)
            if isinstance(obj, _Record):
                if name not in obj.values:
                    raise self.error(f"this draw has no random choice {name!r}; it has {', '.join(obj.values)}",
                                     node.children[1])
                return obj.values[name]
            if inspect.ismodule(obj) and hasattr(obj, name):
                value = getattr(obj, name)
                why = self._policy.refuse_name(obj, name, value)
                if why is not None:
                    entry = value.__name__ if inspect.ismodule(value) and not name.startswith("_") else obj.__name__
                    raise self.error(f"{why}", node.children[1], hint=opt_in_hint(entry))
                if self._policy.trusted(obj):
                    self._policy.trust(value)
                return value
            if name == "T" and hasattr(obj, "shape"):
                return jnp.transpose(obj)
            raise self.error(f"{_describe_value(obj)} has no attribute {name!r}", node.children[1])
        if kind == "call":
            fn_node, args_node = node.children
            fn = ev(fn_node)
            args, kwargs = [], {}
            for a in ([] if args_node is None else args_node.children):
                if isinstance(a, Tree) and a.data == "kwarg":
                    if str(a.children[0]) in kwargs:
                        raise self.error(f"argument {str(a.children[0])}= is given twice", a.children[0])
                    kwargs[str(a.children[0])] = ev(a.children[1])
                else:
                    args.append(ev(a))
            return self._call(fn, args, kwargs, node, fn_node)
        if kind == "expect_block":
            return self._expect(node, env, ctx)
        if kind == "plate_block":
            return self._plate(node, env, ctx)
        raise self.error(f"unsupported expression ({kind})", node)

    def _binary(self, node, left, ev):
        """A binary operation of ``node`` whose left operand has the value ``left``."""
        kind = node.data
        if kind in ("binop", "compare"):
            a, op, b = node.children
            op = str(op)
        else:
            (a, b), op = node.children, {"pow": "**", "and_expr": "and", "or_expr": "or"}[kind]
        x, y = self._num(left, a, f"'{op}'"), self._num(ev(b), b, f"'{op}'")
        if op in _WHOLE_NUMBER_OPS and _whole(x) and _whole(y):
            value = _WHOLE_NUMBER_OPS[op](x, y)  # stays a number written in the file: x[:N - 1]
            if not -_INT32_MAX - 1 <= value <= _INT32_MAX:
                raise self.error(f"{x} {op} {y} is too large for a whole number (32-bit integers reach {_INT32_MAX})",
                                 node, hint="for a real number, write one operand with a decimal point (e.g. 2.0)")
            return value
        self._same_shapes(x, y, node, f"'{op}'")
        with jax.numpy_rank_promotion("allow"):  # the language broadcasts as NumPy does
            return _BINARY[op](x, y)

    def _cond(self, cond, then_node, else_node, node, ev):
        """A scalar condition: ``lax.cond``, only the taken branch's random choices run. The
        branches are brought to one shape and dtype first, as ``where`` would."""
        what = {"then": "`then`", "else": "`else`"}
        branches = {"then": lambda: self._num(ev(then_node), then_node, what["then"]),
                    "else": lambda: self._num(ev(else_node), else_node, what["else"])}
        shapes = {k: jax.eval_shape(f) for k, f in branches.items()}
        try:
            shape = np.broadcast_shapes(shapes["then"].shape, shapes["else"].shape)
        except ValueError:
            raise self.error(f"the branches of `if ... then ... else ...` have mismatched shapes "
                             f"{shapes['then'].shape} and {shapes['else'].shape}", node) from None
        dtype = jnp.result_type(*(jax.ShapeDtypeStruct((), s.dtype, weak_type=s.weak_type) for s in shapes.values()))

        def branch(k):
            return lambda: jnp.broadcast_to(jnp.asarray(branches[k](), dtype), shape)

        return jax.lax.cond(jnp.asarray(cond, bool), branch("then"), branch("else"))

    def _call(self, fn, args, kwargs, node, fn_node):
        label = str(fn_node.children[-1]) if fn_node.data in ("name", "attr") else "the call"
        if any(fn is d for d in DISTRIBUTIONS.values()):
            init = fn.__init__ if isinstance(fn, type) else fn
            sig = inspect.signature(init)
            try:
                bound = sig.bind(*((None,) if isinstance(fn, type) else ()), *args, **kwargs)
            except TypeError as e:
                params = [p for p in sig.parameters if p not in ("self", "validate_args")]
                raise self.error(f"{fn.__name__}: {e}; its arguments are ({', '.join(params)})", node) from None
            for arg, value in bound.arguments.items():
                if isinstance(value, str) or _is_builtin(value):
                    raise self.error(f"{fn.__name__}: {arg}= must be a number, an array or a distribution; "
                                     f"got {_describe_value(value)}", node)
            args, kwargs = [_arr(a) for a in args], {k: _arr(v) for k, v in kwargs.items()}
        elif not callable(fn):
            what = f"{str(fn_node.children[0])!r} is {_describe_value(fn)}" if fn_node.data == "name" else _describe_value(fn)
            raise self.error(f"{what}, not a function", fn_node)
        elif any(fn is FUNCTIONS[f] for f in FUNCTIONS if f not in _OBJECT_FUNCTIONS):
            for i, value in enumerate([*args, *kwargs.values()]):
                if _not_numeric(value):
                    raise self.error(f"{label}: its arguments must be numbers or arrays; argument {i + 1} is "
                                     f"{_describe_value(value)}", node)
            if fn not in (FUNCTIONS[f] for f in _SHAPE_FUNCTIONS):
                args, kwargs = [_arr(a) for a in args], {k: _arr(v) for k, v in kwargs.items()}
        try:
            return fn(*args, **kwargs)
        except TextError:
            raise
        except Exception as e:  # noqa: BLE001 -- name the function that refused its arguments
            raise self.error(f"{label}: {_describe_error(e)}", node) from None

    def _expect(self, node, env, ctx):
        kwargs, *stmts = node.children
        n = 1
        if kwargs is not None:
            n_value = self._eval(kwargs.children[0].children[1], env, ctx)
            if isinstance(n_value, bool) or not isinstance(n_value, int) or n_value < 1:
                got = repr(n_value) if isinstance(n_value, (int, float)) else _describe_value(n_value)
                raise self.error(f"expect(n=...) needs a positive integer written in the file; got {got}", kwargs)
            n = n_value

        def expect():
            return self._run_block(stmts, dict(env), ctx, "expect")

        return _expect(expect, n=n)()

    def _plate(self, node, env, ctx):
        """``plate(n=K) {...}`` or ``plate(a in x, b in y) {...}``: ``ex.vmap`` over ``K`` lanes or
        over the arrays' leading axis; each lane draws its own random choices."""
        spec, *stmts = node.children
        if spec.data == "plate_size":
            n_node = spec.children[0].children[1]
            n = self._eval(n_node, env, ctx)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                got = repr(n) if isinstance(n, (int, float)) else _describe_value(n)
                raise self.error(f"plate(n=...) needs a positive integer written in the file or a size; got {got}",
                                 n_node)
            return _vmap(lambda: self._run_block(stmts, dict(env), ctx, "plate"), axis_size=n)()
        names, arrays = [], []
        for item in spec.children:
            element, array_node = item.children
            array = self._num(self._eval(array_node, env, ctx), array_node, "plate")
            if jnp.ndim(array) == 0:
                raise self.error(f"`{element} in ...` needs an array to take elements from; got a scalar", array_node)
            if arrays and jnp.shape(array)[0] != jnp.shape(arrays[0])[0]:
                raise self.error(f"the arrays of a plate must have the same length: {names[0]} takes "
                                 f"{jnp.shape(arrays[0])[0]} elements, {element} {jnp.shape(array)[0]}", array_node)
            names.append(str(element))
            arrays.append(jnp.asarray(array))

        def lane(*elements):
            local = dict(env)
            local.update(zip(names, elements))
            return self._run_block(stmts, local, ctx, "plate")

        return _vmap(lane)(*arrays)


def _shown(source: str) -> str:
    """``source`` as the error shows it: lines split where the parser splits them (at
    ``\\n``); other characters that Python counts as line breaks shown as U+FFFD, so the
    line and the caret are the ones the parser meant."""
    return re.sub(r"[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]", "\ufffd", source.replace("\r\n", "\n"))


def _relative(path: str) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive
        return path
    return path if rel.startswith(".." + os.sep) else rel


def _arr(x):
    return jnp.asarray(x) if isinstance(x, list) else x


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


def _is_builtin(x) -> bool:
    """A distribution or function of the language used as a value."""
    return any(x is v for v in DISTRIBUTIONS.values()) or any(x is v for v in FUNCTIONS.values())


_STRATEGY_NAMES = "|".join(STRATEGIES)


def _in_text_terms(message: str) -> str:
    """An estimax message about strategies, with the file's spelling: ``ex.enum`` -> ``@enum``."""
    message = re.sub(r"\bex\.(marginal|normalize)\(", r"\1(", message)
    return re.sub(rf"(?:estimator=)?ex\.({_STRATEGY_NAMES})\b", r"@\1", message)


def _describe_error(e: BaseException) -> str:
    if isinstance(e, (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError,
                      jax.errors.TracerArrayConversionError)):
        return ("this needs a number written in the file, not a value computed from parameters, "
                "data or random choices")
    text = _first_line(e)
    if isinstance(e, (EstimaxError, TypeError, ValueError, IndexError, ArithmeticError)):
        return text
    return f"{type(e).__name__}: {text}"


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]" if shape else "scalar"


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def parse(source: str, filename: str = "<string>", allow_imports=()) -> TextProgram:
    """Parse and check an objective given as text. ``allow_imports``: the modules (by name) and
    Python files or folders (by path) that it may import beyond the defaults (see ``load``);
    relative ``from "file.py"`` imports are read from ``filename``'s folder, or the current
    directory when there is no such file."""
    return TextProgram(source, filename, allow_imports)


#: The largest objective file read (a file is a program of a few hundred lines).
MAX_SOURCE_BYTES = 16 * 2**20


def read_source(path: str) -> str:
    """The text of the objective file at ``path``: a regular file (not a FIFO or a device, which
    could block or never end) of at most ``MAX_SOURCE_BYTES``, in UTF-8."""
    try:
        info = os.stat(path)
    except OSError as e:
        raise EstimaxError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise EstimaxError(f"{path} is {_file_kind(info.st_mode)}, not an objective file (a regular file)")
    if info.st_size > MAX_SOURCE_BYTES:
        raise EstimaxError(f"{path} is {info.st_size / 2**20:.0f} MiB; objective files are at most "
                           f"{MAX_SOURCE_BYTES // 2**20} MiB (is it the right file?)")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SOURCE_BYTES + 1)
    except OSError as e:
        raise EstimaxError(f"cannot read {path}: {e.strerror}") from None
    if len(raw) > MAX_SOURCE_BYTES:
        raise EstimaxError(f"{path} is larger than {MAX_SOURCE_BYTES // 2**20} MiB; objective files are at most that")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise EstimaxError(f"{path}:{line}: the file is not UTF-8 text (byte {raw[e.start]:#04x})") from None


def not_a_regular_file(path: str) -> str | None:
    """What ``path`` is when it is not a regular file ("a FIFO (named pipe)", "a device", ...):
    reading one could block forever or never end. ``None`` for a regular file (or a link to
    one) and for a path that cannot be examined (reading it then says why)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else _file_kind(mode)


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def load(path: str | os.PathLike, allow_imports=()) -> TextProgram:
    """Parse and check the objective file at ``path``.

    Importing runs code, so a file may import by default only from the numerical modules of
    ``ex.text.ALLOWED_MODULES`` and only Python files in its own folder (or below it);
    ``allow_imports`` lists what else it may import: module names (a module and its
    submodules, every name in them) and paths (a ``.py`` file, or a folder), relative to the
    current directory. See docs/objective-language.md, "Imports"."""
    path = os.fspath(path)
    return TextProgram(read_source(path), path, allow_imports)
