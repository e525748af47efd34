"""The base interpreter every pass over the IR is built on.

A pass is a subclass of :class:`Interpreter`. :meth:`Interpreter.run` walks a jaxpr's
equations with an environment of values (whatever the pass computes: arrays, dual numbers,
abstract values, flags) and hands each equation to :meth:`Interpreter.interpret`, which picks,
in order:

1. the pass's **rule** for the primitive, if it registered one (``@rule(sample_p)`` on a
   method; a subclass inherits its bases' rules and may replace them);
2. for a higher-order primitive the pass **enters** (by default: one holding random
   choices, :meth:`enters`), the method named by the primitive's declared **policy**
   (``dsl._ir.POLICIES``): :meth:`inline` (``jit``, ``closed_call``, ``checkpoint``),
   :meth:`switch` (``cond``), :meth:`loop` (``scan``, ``while``), :meth:`trust`
   (``custom_jvp``/``custom_vjp``) or :meth:`refuse` (anything else);
3. :meth:`default`, which re-binds the primitive to the values (JAX evaluates it).

The base class inlines calls, and refuses random choices in branches, loops and functions
with their own derivative rule with the one message every pass shares
(``dsl._ir.refused_call``, naming the user's line): a pass that supports a construct
overrides that policy's method. State belongs on the instance (set in ``__init__``), never in
module-level variables, so passes nest and run in any order.

Writing a pass: override :meth:`default` (and :meth:`read`/:meth:`write` when the values are
not arrays), register rules for the primitives the pass changes, and override the policy
methods it supports. A pass that counts the random choices a program would draw::

    class CountSites(Interpreter):
        def __init__(self):
            self.count = 0

        def default(self, eqn, ins):          # no values: a structural walk
            return [None] * len(eqn.outvars)

        @rule(sample_p)
        def _sample(self, eqn, ins):
            self.count += 1
            return [None]

        def switch(self, eqn, ins):            # every branch counts
            for branch in eqn.params["branches"]:
                self.run(branch.jaxpr, [None] * len(branch.consts), ins[1:])
            return [None] * len(eqn.outvars)

    counter = CountSites()
    counter.run(jaxpr, [None] * len(jaxpr.constvars), [None] * len(jaxpr.invars))

(``jit`` calls are inlined by the base class; a ``scan`` or a ``custom_jvp`` function with
random choices is refused, as every other pass refuses it.)
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

from ..dsl import _ir as ir
from ..runtime import _jax_compat as compat


def rule(*primitives) -> Callable:
    """Register the decorated method as the pass's rule for ``primitives``:
    ``method(self, eqn, ins) -> list of output values``."""

    def mark(fn):
        fn.rule_for = primitives
        return fn

    return mark


class Interpreter:
    """A pass over jaxprs; see the module docs."""

    #: primitive -> rule (a function of ``(self, eqn, ins)``), merged along the class's MRO
    rules: ClassVar[dict[Any, Callable]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        table: dict = {}
        for klass in reversed(cls.__mro__):
            for fn in vars(klass).values():
                for prim in getattr(fn, "rule_for", ()):
                    table[prim] = fn
        cls.rules = table

    # -- the walk ----------------------------------------------------------------------------
    def run(self, jaxpr, consts, args) -> list:
        """Evaluate ``jaxpr`` with its constvars bound to ``consts`` and invars to ``args``."""
        env: dict = {}
        self.write(env, jaxpr.constvars, consts)
        self.write(env, jaxpr.invars, args)
        for eqn in jaxpr.eqns:
            outs = self.interpret(eqn, [self.read(env, v) for v in eqn.invars])
            self.write(env, eqn.outvars, outs)
        return [self.read(env, v) for v in jaxpr.outvars]

    def read(self, env, v):
        return v.val if isinstance(v, compat.Literal) else env[v]

    def write(self, env, variables, values) -> None:
        for v, x in zip(variables, values, strict=True):
            if not isinstance(v, compat.DropVar):
                env[v] = x

    def interpret(self, eqn, ins) -> list:
        """One equation: its rule, else its policy (where the pass enters it), else the default."""
        fn = self.rules.get(eqn.primitive)
        if fn is not None:
            return fn(self, eqn, ins)
        if self.enters(eqn):
            return getattr(self, ir.policy(eqn))(eqn, ins)
        return self.default(eqn, ins)

    def enters(self, eqn) -> bool:
        """Whether ``eqn`` is handled by its policy: by default, where it holds random choices."""
        return ir.holds_random(eqn)

    def default(self, eqn, ins) -> list:
        """An equation without a rule: re-bind its primitive."""
        return compat.rebind(eqn, ins)

    # -- the policies ------------------------------------------------------------------------
    def constants(self, consts) -> list:
        """The values of a nested jaxpr's constants."""
        return list(consts)

    def inline(self, eqn, ins) -> list:
        jaxpr, consts = compat.called_jaxpr(eqn)
        return self.run(jaxpr, self.constants(consts), ins)

    def switch(self, eqn, ins) -> list:
        return self.refuse(eqn, ins)

    def loop(self, eqn, ins) -> list:
        return self.refuse(eqn, ins)

    def trust(self, eqn, ins) -> list:
        return self.refuse(eqn, ins)

    def refuse(self, eqn, ins) -> list:
        if ir.holds_random(eqn):
            raise ir.refused_call(eqn)
        return self.default(eqn, ins)


__all__ = ["Interpreter", "rule"]
