"""Lowering: a checked file's statements run as the calls a hand-written estimax program makes.

``Lowering`` is a lark ``Interpreter`` with one method per grammar rule. A statement's method
binds a name (``let``, ``~``, ``program``) or states a constraint; ``maximize``, ``minimize``
and ``return`` give the block's value. An expression's method returns its value: a number
written in the file stays a Python number (so that it can be a size or a shape), anything
computed is an array, and the language's other values (distributions, programs, draws) are
what ``_library`` defines. Whatever fails while the program is traced is reported at the
expression that caused it (:meth:`Lowering.eval`), or, when it is Python's recursion limit,
at its statement.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from lark import Tree
from lark.visitors import Interpreter

from .._errors import EstimaxError
from ..dsl._constraints import subject_to as _subject_to
from ..dsl._primitives import expect as _expect
from ..dsl._primitives import sample as _sample
from ..dsl._primitives import source_location
from ..dsl._primitives import vmap as _vmap
from ._errors import TextError, _describe_error, _first_line
from ._imports import opt_in_hint
from ._library import FUNCTIONS, _Drawable, _expand, _is_builtin, _Program, _Record, _describe_value
from ._vocabulary import (
    _BINARY,
    _CHAINS,
    _DIST_METHODS,
    _INT32_MAX,
    _OBJECT_FUNCTIONS,
    _SHAPE_FUNCTIONS,
    _WHOLE_NUMBER_OPS,
    CONSTANTS,
    DISTRIBUTIONS,
    STRATEGIES,
    _arr,
    _in_text_terms,
    _not_numeric,
    _whole,
)

_BLOCK_VALUES = {"maximize", "minimize", "return_stmt"}  # the statements that end a block with its value


def objective_function(text) -> Callable:
    """The objective of ``text`` (a checked ``TextProgram``) as a Python function of
    ``(params, data)``."""
    body = text.body

    def objective(params, data):
        env: dict[str, Any] = dict(text.imports)
        env.update({k: params[k] for k in text.params})
        env.update({k: data[k] for k in text.data})
        for decl in text.data.values():  # named sizes are numbers in the program: plate(n=N)
            for axis, size in enumerate(decl.shape):
                if isinstance(size, str) and size not in env:
                    env[size] = int(jnp.shape(data[decl.name])[axis])
        return Lowering(text, env).run(body)

    objective.__name__ = Path(text.filename).stem if text.filename != "<string>" else "text_objective"
    return objective


def _too_deep(text, stmt) -> TextError:
    return text.error("this statement's expression is nested too deeply to evaluate: hundreds of calls, "
                      "brackets, `-`, `**`, `not` or `if` inside one another", stmt,
                      hint="name the inner parts with `let` (a long sum `a + b + ...` is fine as it is)")


class Lowering(Interpreter):
    """Runs the statements of one block of ``text`` (a checked ``TextProgram``) in ``env``,
    the names it sees. ``block``: "objective" or "expect" (its value is a scalar), "plate"
    (an array), "program" (any value)."""

    def __init__(self, text, env: dict, block: str = "objective"):
        self.text, self.env, self.block = text, env, block

    def visit(self, tree: Tree):
        # lark's dispatch by rule name, called directly: an expression nested n deep takes as
        # much of Python's stack as before, so "nested too deeply" is met where it was
        return getattr(self, tree.data)(tree)

    def __default__(self, tree: Tree):
        raise self.text.error(f"unsupported expression ({tree.data})", tree)

    # -- statements --------------------------------------------------------------------------
    def run(self, stmts):
        """Run a block's statements; its value is that of its last (``maximize``/``minimize``/
        ``return``) statement."""
        for stmt in stmts:
            where = f"{os.path.basename(self.text.filename)}:{stmt.meta.line}"
            with jax.named_scope(f"src={where}"), source_location(where):
                try:
                    value = self.visit(stmt)
                except RecursionError:
                    raise _too_deep(self.text, stmt) from None
            if stmt.data in _BLOCK_VALUES:
                return value
        raise AssertionError("a block without a value")  # excluded by _read / _resolve

    def _run_program(self, stmts, env):
        return Lowering(self.text, env, "program").run(stmts)

    def program_def(self, stmt: Tree):
        self.env[str(stmt.children[0])] = _Program(stmt, dict(self.env), self._run_program)

    def let_stmt(self, stmt: Tree):
        self.env[str(stmt.children[0])] = self.eval(stmt.children[1])

    def sample_stmt(self, stmt: Tree):
        name, d_node, strategy_node = stmt.children
        d = self.eval(d_node)
        if isinstance(d, _Drawable):
            if strategy_node is not None:
                raise self.text.error(f"a strategy does not apply to a draw from {d.label}: its random choices "
                                      "carry their own strategies (write them inside its programs)", strategy_node)
            try:
                self.env[str(name)] = d.draw()
            except TextError:
                raise
            except EstimaxError as e:
                raise self.text.error(_in_text_terms(_first_line(e)), d_node) from None
            except Exception as e:  # noqa: BLE001 -- a value its programs cannot use
                raise self.text.error(_describe_error(e), d_node) from None
            return
        if not isinstance(d, dist.Distribution):
            hint = None
            if (isinstance(d, type) and issubclass(d, dist.Distribution)) or any(d is f for f in DISTRIBUTIONS.values()):
                hint = f"call it with its parameters, e.g. {getattr(d, '__name__', 'Normal')}(...)"
            raise self.text.error(f"the right side of `{name} ~` must be a distribution; got "
                                  f"{_describe_value(d)}", d_node, hint=hint)
        estimator = None if strategy_node is None else self._strategy(strategy_node)
        try:
            self.env[str(name)] = _sample(d, estimator=estimator, name=str(name))
        except TextError:
            raise
        except EstimaxError as e:
            raise self.text.error(_in_text_terms(_first_line(e)), strategy_node or d_node) from None
        except Exception as e:  # noqa: BLE001 -- e.g. a parameter NumPyro cannot use
            raise self.text.error(_describe_error(e), d_node) from None

    def constraint_stmt(self, stmt: Tree):
        name = next(n for n, s in self.text.constraints.items() if s is stmt)
        lhs_node, op, rhs_node = stmt.children[1].children
        lhs = self._num(self.eval(lhs_node), lhs_node, "a constraint")
        rhs = self._num(self.eval(rhs_node), rhs_node, "a constraint")
        self._same_shapes(lhs, rhs, stmt.children[1], "the constraint")
        with jax.numpy_rank_promotion("allow"):
            value = jnp.asarray(lhs, jnp.result_type(float)) - jnp.asarray(rhs, jnp.result_type(float))
        kind = {"==": "eq", "<=": "le", ">=": "ge"}[str(op)]
        try:
            _subject_to(**{kind: value}, name=name)
        except EstimaxError as e:
            raise self.text.error(_first_line(e), stmt.children[1]) from None

    def return_stmt(self, stmt: Tree):
        """The block's value: any value for a program, an array for a plate, else a scalar."""
        value = self.eval(stmt.children[0])
        if self.block == "program":
            return _arr(value)
        what = {"objective": "the objective", "expect": "an `expect` block's value",
                "plate": "a `plate` block's value"}[self.block]
        if _not_numeric(value):
            raise self.text.error(f"{what} must be a number or an array; got {_describe_value(value)}"
                                  if self.block == "plate" else f"{what} must be a number; got {_describe_value(value)}",
                                  stmt.children[0])
        value = _arr(value)
        if self.block == "plate":
            return jnp.asarray(value)
        if jnp.ndim(value) != 0:
            raise self.text.error(f"{what} must be a scalar; this expression has shape {jnp.shape(value)}",
                                  stmt.children[0], hint="reduce it, e.g. with sum(...) or mean(...)")
        return jnp.asarray(value, jnp.result_type(float))

    maximize = minimize = return_stmt  # the objective's value (its direction is the file's ``maximize``)

    def _strategy(self, node: Tree):
        name, kwargs = node.children
        base = STRATEGIES[str(name)]
        if kwargs is None:
            return base
        if not callable(base):
            raise self.text.error(f"@{name} takes no arguments", kwargs)
        values = {}
        for kw in kwargs.children:
            key, value_node = str(kw.children[0]), kw.children[1]
            if key == "learn":
                flag = value_node.data == "true" if value_node.data in ("true", "false") else None
                if flag is None:
                    raise self.text.error("learn= takes true or false", value_node)
                if flag:
                    values["learn"] = "ascent" if self.text.maximize else "descent"
                continue
            values[key] = self.eval(value_node)
            if _is_builtin(values[key]) or isinstance(values[key], (str, dist.Distribution)):
                raise self.text.error(f"@{name}({key}=...) takes a number or an array; got "
                                      f"{_describe_value(values[key])}", value_node)
        try:
            inspect.signature(type(base).__call__).bind(base, **values)
        except TypeError:
            params = [p for p in inspect.signature(type(base).__call__).parameters if p != "self"]
            allowed = ", ".join(f"{p}=" for p in params) or "no arguments"
            raise self.text.error(f"@{name} does not take {', '.join(k + '=' for k in values)}; it takes {allowed}",
                                  kwargs) from None
        try:
            return base(**values)
        except Exception as e:  # noqa: BLE001 -- the strategy's own check of its arguments
            raise self.text.error(_in_text_terms(_describe_error(e)), kwargs) from None

    # -- expressions -------------------------------------------------------------------------
    def eval(self, node):
        """The value of the expression ``node``; what fails in it is reported at it."""
        try:
            return self.visit(node)
        except (TextError, RecursionError):  # too deep: reported at the statement (run)
            raise
        except Exception as e:  # noqa: BLE001 -- whatever the file asked for failed here: say where
            raise self.text.error(_describe_error(e), node) from None

    def _num(self, value, node, what: str):
        """``value`` as an operand of ``what``: a number or an array (a list literal becomes one)."""
        if _not_numeric(value):
            raise self.text.error(f"{what} needs numbers or arrays; got {_describe_value(value)}", node)
        return _arr(value)

    def _same_shapes(self, x, y, node, what: str):
        try:
            np.broadcast_shapes(jnp.shape(x), jnp.shape(y))
        except ValueError:
            raise self.text.error(f"{what} got mismatched shapes {jnp.shape(x)} and {jnp.shape(y)}", node) from None

    def number(self, node: Tree):
        text = str(node.children[0])
        return int(text) if text.isdigit() else float(text)

    def string(self, node: Tree):
        return str(node.children[0])[1:-1]

    def true(self, node: Tree):
        return True

    def false(self, node: Tree):
        return False

    def name(self, node: Tree):
        name = str(node.children[0])
        if name in self.env:
            return self.env[name]
        if name in FUNCTIONS:
            return FUNCTIONS[name]
        if name in DISTRIBUTIONS:
            return DISTRIBUTIONS[name]
        return CONSTANTS[name]

    def array(self, node: Tree):
        items = [self.eval(c) for c in node.children if c is not None]
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in items):
            return items  # a static list (shapes: expand([3]))
        if items and all(isinstance(x, str) for x in items):
            return items  # names: keep=["z", "w"]
        return jnp.stack([jnp.asarray(x) for x in items])

    def neg(self, node: Tree):
        return -self._num(self.eval(node.children[0]), node.children[0], "'-'")

    def binop(self, node: Tree):
        # `a + b + ... + z` is a tree as deep as it is long: its left spine is evaluated in a
        # loop, each operation located at its own node
        spine = [node]
        while isinstance(spine[-1].children[0], Tree) and spine[-1].children[0].data in _CHAINS:
            spine.append(spine[-1].children[0])
        value = self.eval(spine[-1].children[0])
        for step in reversed(spine[1:]):
            try:
                value = self._binary(step, value)
            except (TextError, RecursionError):
                raise
            except Exception as e:  # noqa: BLE001 -- as eval does for this node
                raise self.text.error(_describe_error(e), step) from None
        return self._binary(node, value)

    and_expr = or_expr = binop  # left-associative chains too (``_CHAINS``)

    def pow(self, node: Tree):
        return self._binary(node, self.eval(node.children[0]))

    compare = pow

    def not_expr(self, node: Tree):
        return jnp.logical_not(self._num(self.eval(node.children[0]), node.children[0], "'not'"))

    def if_expr(self, node: Tree):
        cond_node, then_node, else_node = node.children
        cond = self._num(self.eval(cond_node), cond_node, "the condition of `if`")
        if jnp.ndim(cond) == 0:
            return self._cond(cond, then_node, else_node, node)
        x = self._num(self.eval(then_node), then_node, "`then`")
        y = self._num(self.eval(else_node), else_node, "`else`")
        try:
            np.broadcast_shapes(jnp.shape(cond), jnp.shape(x), jnp.shape(y))
        except ValueError:
            raise self.text.error(f"`if ... then ... else ...` got mismatched shapes: the condition "
                                  f"{jnp.shape(cond)}, `then` {jnp.shape(x)}, `else` {jnp.shape(y)}", node) from None
        return jnp.where(cond, x, y)

    def slice(self, node: Tree):
        bounds = [None if c is None else self.eval(c) for c in node.children]
        for b, b_node in zip(bounds, node.children):
            if b is not None and (isinstance(b, bool) or not isinstance(b, int)):
                raise self.text.error(f"the bounds of a slice must be whole numbers written in the file (or sizes); "
                                      f"got {_describe_value(b)}", b_node)
        return slice(*bounds)

    def index(self, node: Tree):
        target, *idx = node.children
        x = jnp.asarray(self._num(self.eval(target), target, "indexing"))
        keys = tuple(self.eval(i) for i in idx)
        if len(keys) > x.ndim:
            raise self.text.error(f"{len(keys)} indices for an array with {x.ndim} axes (shape {x.shape})", node)
        for axis, (k, k_node) in enumerate(zip(keys, idx)):
            if isinstance(k, int) and not isinstance(k, bool) and not -x.shape[axis] <= k < x.shape[axis]:
                raise self.text.error(f"index {k} is out of range for axis {axis} of size {x.shape[axis]}", k_node)
        return x[keys[0] if len(keys) == 1 else keys]

    def attr(self, node: Tree):
        obj, name = self.eval(node.children[0]), str(node.children[1])
        if isinstance(obj, dist.Distribution):
            if name not in _DIST_METHODS:
                raise self.text.error(f"distributions have no attribute {name!r} here; available: "
                                      f"{', '.join(sorted(_DIST_METHODS))}", node.children[1])
            if name == "expand":
                return _expand(obj)
            return getattr(obj, name)
        if isinstance(obj, _Record):
            if name not in obj.values:
                raise self.text.error(f"this draw has no random choice {name!r}; it has {', '.join(obj.values)}",
                                      node.children[1])
            return obj.values[name]
        policy = self.text._policy
        if inspect.ismodule(obj) and hasattr(obj, name):
            value = getattr(obj, name)
            why = policy.refuse_name(obj, name, value)
            if why is not None:
                entry = value.__name__ if inspect.ismodule(value) and not name.startswith("_") else obj.__name__
                raise self.text.error(f"{why}", node.children[1], hint=opt_in_hint(entry))
            if policy.trusted(obj):
                policy.trust(value)
            return value
        if name == "T" and hasattr(obj, "shape"):
            return jnp.transpose(obj)
        raise self.text.error(f"{_describe_value(obj)} has no attribute {name!r}", node.children[1])

    def call(self, node: Tree):
        fn_node, args_node = node.children
        fn = self.eval(fn_node)
        args, kwargs = [], {}
        for a in ([] if args_node is None else args_node.children):
            if isinstance(a, Tree) and a.data == "kwarg":
                if str(a.children[0]) in kwargs:
                    raise self.text.error(f"argument {str(a.children[0])}= is given twice", a.children[0])
                kwargs[str(a.children[0])] = self.eval(a.children[1])
            else:
                args.append(self.eval(a))
        return self._apply(fn, args, kwargs, node, fn_node)

    def expect_block(self, node: Tree):
        kwargs, *stmts = node.children
        n = 1
        if kwargs is not None:
            n_value = self.eval(kwargs.children[0].children[1])
            if isinstance(n_value, bool) or not isinstance(n_value, int) or n_value < 1:
                got = repr(n_value) if isinstance(n_value, (int, float)) else _describe_value(n_value)
                raise self.text.error(f"expect(n=...) needs a positive integer written in the file; got {got}", kwargs)
            n = n_value

        def expect():
            return Lowering(self.text, dict(self.env), "expect").run(stmts)

        return _expect(expect, n=n)()

    def plate_block(self, node: Tree):
        """``plate(n=K) {...}`` or ``plate(a in x, b in y) {...}``: ``ex.vmap`` over ``K`` lanes or
        over the arrays' leading axis; each lane draws its own random choices."""
        spec, *stmts = node.children
        if spec.data == "plate_size":
            n_node = spec.children[0].children[1]
            n = self.eval(n_node)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                got = repr(n) if isinstance(n, (int, float)) else _describe_value(n)
                raise self.text.error(f"plate(n=...) needs a positive integer written in the file or a size; got {got}",
                                      n_node)
            return _vmap(lambda: Lowering(self.text, dict(self.env), "plate").run(stmts), axis_size=n)()
        names, arrays = [], []
        for item in spec.children:
            element, array_node = item.children
            array = self._num(self.eval(array_node), array_node, "plate")
            if jnp.ndim(array) == 0:
                raise self.text.error(f"`{element} in ...` needs an array to take elements from; got a scalar",
                                      array_node)
            if arrays and jnp.shape(array)[0] != jnp.shape(arrays[0])[0]:
                raise self.text.error(f"the arrays of a plate must have the same length: {names[0]} takes "
                                      f"{jnp.shape(arrays[0])[0]} elements, {element} {jnp.shape(array)[0]}",
                                      array_node)
            names.append(str(element))
            arrays.append(jnp.asarray(array))

        def lane(*elements):
            local = dict(self.env)
            local.update(zip(names, elements))
            return Lowering(self.text, local, "plate").run(stmts)

        return _vmap(lane)(*arrays)

    # -- operations ----------------------------------------------------------------------------
    def _binary(self, node, left):
        """A binary operation of ``node`` whose left operand has the value ``left``."""
        kind = node.data
        if kind in ("binop", "compare"):
            a, op, b = node.children
            op = str(op)
        else:
            (a, b), op = node.children, {"pow": "**", "and_expr": "and", "or_expr": "or"}[kind]
        x, y = self._num(left, a, f"'{op}'"), self._num(self.eval(b), b, f"'{op}'")
        if op in _WHOLE_NUMBER_OPS and _whole(x) and _whole(y):
            value = _WHOLE_NUMBER_OPS[op](x, y)  # stays a number written in the file: x[:N - 1]
            if not -_INT32_MAX - 1 <= value <= _INT32_MAX:
                raise self.text.error(f"{x} {op} {y} is too large for a whole number (32-bit integers reach "
                                      f"{_INT32_MAX})", node,
                                      hint="for a real number, write one operand with a decimal point (e.g. 2.0)")
            return value
        self._same_shapes(x, y, node, f"'{op}'")
        with jax.numpy_rank_promotion("allow"):  # the language broadcasts as NumPy does
            return _BINARY[op](x, y)

    def _cond(self, cond, then_node, else_node, node):
        """A scalar condition: ``lax.cond``, only the taken branch's random choices run. The
        branches are brought to one shape and dtype first, as ``where`` would."""
        what = {"then": "`then`", "else": "`else`"}
        branches = {"then": lambda: self._num(self.eval(then_node), then_node, what["then"]),
                    "else": lambda: self._num(self.eval(else_node), else_node, what["else"])}
        shapes = {k: jax.eval_shape(f) for k, f in branches.items()}
        try:
            shape = np.broadcast_shapes(shapes["then"].shape, shapes["else"].shape)
        except ValueError:
            raise self.text.error(f"the branches of `if ... then ... else ...` have mismatched shapes "
                                  f"{shapes['then'].shape} and {shapes['else'].shape}", node) from None
        dtype = jnp.result_type(*(jax.ShapeDtypeStruct((), s.dtype, weak_type=s.weak_type) for s in shapes.values()))

        def branch(k):
            return lambda: jnp.broadcast_to(jnp.asarray(branches[k](), dtype), shape)

        return jax.lax.cond(jnp.asarray(cond, bool), branch("then"), branch("else"))

    def _apply(self, fn, args, kwargs, node, fn_node):
        """``fn(*args, **kwargs)``, a call written at ``node``: a distribution's arguments are
        checked against its signature, a built-in function's are numbers or arrays."""
        label = str(fn_node.children[-1]) if fn_node.data in ("name", "attr") else "the call"
        if any(fn is d for d in DISTRIBUTIONS.values()):
            init = fn.__init__ if isinstance(fn, type) else fn
            sig = inspect.signature(init)
            try:
                bound = sig.bind(*((None,) if isinstance(fn, type) else ()), *args, **kwargs)
            except TypeError as e:
                params = [p for p in sig.parameters if p not in ("self", "validate_args")]
                raise self.text.error(f"{fn.__name__}: {e}; its arguments are ({', '.join(params)})", node) from None
            for arg, value in bound.arguments.items():
                if isinstance(value, str) or _is_builtin(value):
                    raise self.text.error(f"{fn.__name__}: {arg}= must be a number, an array or a distribution; "
                                          f"got {_describe_value(value)}", node)
            args, kwargs = [_arr(a) for a in args], {k: _arr(v) for k, v in kwargs.items()}
        elif not callable(fn):
            what = (f"{str(fn_node.children[0])!r} is {_describe_value(fn)}" if fn_node.data == "name"
                    else _describe_value(fn))
            raise self.text.error(f"{what}, not a function", fn_node)
        elif any(fn is FUNCTIONS[f] for f in FUNCTIONS if f not in _OBJECT_FUNCTIONS):
            for i, value in enumerate([*args, *kwargs.values()]):
                if _not_numeric(value):
                    raise self.text.error(f"{label}: its arguments must be numbers or arrays; argument {i + 1} is "
                                          f"{_describe_value(value)}", node)
            if fn not in (FUNCTIONS[f] for f in _SHAPE_FUNCTIONS):
                args, kwargs = [_arr(a) for a in args], {k: _arr(v) for k, v in kwargs.items()}
        try:
            return fn(*args, **kwargs)
        except TextError:
            raise
        except Exception as e:  # noqa: BLE001 -- name the function that refused its arguments
            raise self.text.error(f"{label}: {_describe_error(e)}", node) from None
