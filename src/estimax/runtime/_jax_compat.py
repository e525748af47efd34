"""Every touch of JAX internals lives here, each with the JAX versions it serves.

The tested range is pinned in ``pyproject.toml`` (``jax>=0.6.2,<0.11``). Anything that
reads a jaxpr's representation or registers primitive rules goes through this module, so
that a JAX upgrade is a change to one file.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import os
import re
import site
import sysconfig
from typing import Any

import jax
import jax.extend as jex
import jaxlib
import numpy as np
import numpyro
from jax.interpreters import ad, batching, mlir

# --- core objects (public since 0.4.30 through ``jax.extend.core``) -----------------------
Primitive = jex.core.Primitive
Literal = jex.core.Literal
Jaxpr = jex.core.Jaxpr
ClosedJaxpr = jex.core.ClosedJaxpr
jaxpr_as_fun = jex.core.jaxpr_as_fun

_P = jex.core.primitives
cond_p = _P.cond_p
scan_p = _P.scan_p
while_p = _P.while_p
# 0.7.0 renamed ``pjit_p`` to ``jit_p``.
jit_p = getattr(_P, "jit_p", None) or getattr(_P, "pjit_p")
closed_call_p = _P.closed_call_p
custom_jvp_call_p = _P.custom_jvp_call_p
custom_vjp_call_p = _P.custom_vjp_call_p
# ``jax.checkpoint``'s primitive ("remat2"): exported by ``jax.extend`` from 0.7 on.
remat_p = getattr(_P, "remat_p", None)
if remat_p is None:  # JAX 0.6.x
    from jax._src.ad_checkpoint import remat_p  # noqa: E402

float0 = jax.dtypes.float0



@functools.cache
def scan_transposes_linear_consts() -> bool:
    """Whether reverse mode works through a ``lax.scan`` traced inside a ``custom_jvp`` rule
    whose body closes over the rule's tangents. JAX 0.6.2 and 0.7.0 assert against it in
    the scan transpose rule; 0.10.2 supports it. Probed once (a few milliseconds), since the
    version that changed it is not pinned down.
    """

    @jax.custom_jvp
    def g(x):
        return x

    def g_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return x, jax.lax.map(lambda v: v * t + jax.numpy.sin(x) * v, jax.numpy.arange(2.0)).sum()

    g.defjvp(g_jvp)
    try:
        jax.make_jaxpr(jax.grad(g))(1.0)  # staging is enough: the transpose rule runs then
    except AssertionError:
        return False
    return True

# ``SymbolicZero`` is the tangent ``custom_jvp(..., symbolic_zeros=True)`` rules receive for
# inputs that are not being differentiated (public name since 0.4.14).
from jax.custom_derivatives import SymbolicZero  # noqa: E402


def is_symbolic_zero(t: Any) -> bool:
    return isinstance(t, SymbolicZero)


def bind_params(eqn) -> tuple[tuple, dict]:
    """``(subfuns, params)`` to re-bind ``eqn``.

    Before 0.9.2 ``get_bind_params`` returned ``(subfuns, params)``; from 0.9.2 on it
    returns ``params`` only.
    """
    out = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        return tuple(out[0]), out[1]
    return (), out


def rebind(eqn, invals):
    """Apply ``eqn``'s primitive to ``invals``; always returns a list of outputs."""
    subfuns, params = bind_params(eqn)
    out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def aval_of(x):
    """Abstract value of ``x`` (``jax.typeof`` from 0.6; ``get_aval`` deprecated in 0.8.2)."""
    typeof = getattr(jax, "typeof", None)
    if typeof is not None:
        return typeof(x)
    return jax.core.get_aval(x)  # pragma: no cover - JAX < 0.6


def is_float_dtype(dtype) -> bool:
    # jax.numpy's issubdtype: NumPy's does not count bfloat16 and the float8 types (ml_dtypes)
    # as floating point, which would give their leaves float0 tangents (zero gradients)
    return bool(jax.numpy.issubdtype(np.dtype(dtype), jax.numpy.inexact))


def zero_tangent(aval):
    """A dense zero tangent for a value of ``aval`` (``float0`` for ints, bools, keys)."""
    if is_float_dtype(aval.dtype):
        return jax.numpy.zeros(aval.shape, aval.dtype)
    return np.zeros(aval.shape, dtype=float0)


def source_context(eqn):
    """A context manager that re-enters the user's source location of ``eqn``.

    Errors raised while an interpreter evaluates ``eqn`` then point at the user's line.
    Uses ``jax._src.source_info_util`` (stable since 0.4); falls back to a no-op.
    """
    try:
        from jax._src import source_info_util  # optional: private, absent from some JAX versions

        return source_info_util.user_context(eqn.source_info.traceback)
    except Exception:  # pragma: no cover - layout change in a future JAX
        return contextlib.nullcontext()


_SOURCE_SCOPE = re.compile(r"src=([^/()]+)")


# --- whose code is a frame? ------------------------------------------------------------------
# A location shown to a user is the innermost frame of *their* code: not estimax's, not JAX's,
# NumPyro's or Python's own. Frames are told apart by the package directories the modules were
# loaded from (resolved), never by names in the path: a user's script may well live under a
# directory called ``estimax`` (a clone of this repository, ``.../estimax/examples/x.py``).
_ESTIMAX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # runtime/.. = estimax/


def _package_dir(module) -> str | None:
    f = getattr(module, "__file__", None)
    return os.path.realpath(os.path.dirname(f)) + os.sep if f else None


@functools.cache
def _library_dirs() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """``(package directories, standard-library directories, site-packages directories)``."""
    def resolved(d):
        return os.path.realpath(d) + os.sep

    packages = [resolved(_ESTIMAX_DIR)] + [d for d in map(_package_dir, (jax, jaxlib, numpyro)) if d]
    # Python's standard library (``contextlib``'s wrappers, ``functools``, ``runpy``), as JAX's
    # ``source_info_util`` also excludes it -- but not what is installed in a site-packages
    # directory inside it.
    stdlib = {sysconfig.get_path("stdlib"), os.path.dirname(contextlib.__file__)}
    installed = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *getattr(site, "getsitepackages", list)()}
    return (tuple(packages), tuple(resolved(d) for d in stdlib if d), tuple(resolved(d) for d in installed if d))


@functools.lru_cache(maxsize=4096)
def is_library_file(filename: str) -> bool:
    """Whether ``filename`` (a code object's ``co_filename``) is estimax's, JAX's, NumPyro's
    or the standard library's code rather than the user's. ``<string>``, ``<stdin>`` and
    notebook cells are the user's; ``<frozen ...>`` modules are Python's."""
    if filename.startswith("<"):
        return filename.startswith("<frozen")
    path = os.path.realpath(os.path.abspath(filename))
    packages, stdlib, installed = _library_dirs()
    if path.startswith(packages):
        return True
    return path.startswith(stdlib) and not path.startswith(installed)


def caller_location(frame) -> str | None:
    """``file:line`` of the innermost user frame from ``frame`` outward (a frame object)."""
    while frame is not None:
        code = frame.f_code
        if not is_library_file(code.co_filename):
            return f"{code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def exception_location(error: BaseException) -> tuple[str, int, Any] | None:
    """``(file, line, frame)`` of the innermost user frame in ``error``'s traceback (where a
    user's line called into the code that raised), or ``None``."""
    found = None
    tb = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if not is_library_file(code.co_filename):
            found = (code.co_filename, tb.tb_lineno, tb.tb_frame)
        tb = tb.tb_next
    return found


@functools.lru_cache(maxsize=1024)
def _traceback_user_frame(traceback) -> str | None:
    # jaxlib's ``Traceback.raw_frames()`` (code objects and instruction offsets, innermost
    # first) and ``code_addr2line`` (checked on 0.10.2); without them ``user_frame`` falls
    # back to JAX's own guess, which skips only JAX's and the standard library's frames.
    codes, lastis = traceback.raw_frames()
    for code, lasti in zip(codes, lastis, strict=True):
        if not is_library_file(code.co_filename):
            return f"{code.co_filename}:{traceback.code_addr2line(code, lasti)}"
    return None


def user_frame(eqn) -> str | None:
    """``file:line`` of the user's code that created ``eqn``, if JAX recorded it. A
    ``jax.named_scope("src=<file>:<line>")`` around the code (what the text front-end puts
    around each statement) takes precedence over the Python frame. Frames of estimax, JAX,
    NumPyro and the standard library are skipped (:func:`is_library_file`)."""
    try:
        scopes = _SOURCE_SCOPE.findall(str(eqn.source_info.name_stack))
        if scopes:
            return scopes[-1]
    except Exception:  # pragma: no cover - layout change in a future JAX
        pass
    try:
        traceback = eqn.source_info.traceback
    except Exception:  # pragma: no cover - layout change in a future JAX
        return None
    if traceback is None:
        return None
    try:
        return _traceback_user_frame(traceback)
    except Exception:  # pragma: no cover - a jaxlib without raw_frames: JAX's own guess
        pass
    try:
        from jax._src import source_info_util  # optional: private, absent from some JAX versions

        frame = source_info_util.user_frame(traceback)
        if frame is None:
            return None
        return f"{frame.file_name}:{frame.start_line}"
    except Exception:  # pragma: no cover
        return None


#: JAX's errors for a traced value used where Python needs a concrete one (``bool(x)``,
#: ``int(x)``, ``range(x)``, ``np.asarray(x)``, a shape); public in ``jax.errors`` since 0.4.
CONCRETIZATION_ERRORS = (
    jax.errors.ConcretizationTypeError,  # TracerBoolConversionError is one
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerArrayConversionError,
)
_CONVERSION = re.compile(r"The problem arose with the `(\w+)` function")


def concretization_kind(error: BaseException) -> str:
    """What a :data:`CONCRETIZATION_ERRORS` error was converting the traced value to:
    ``"bool"``, ``"int"`` (also an index), ``"float"``, ``"array"``, or ``"value"`` (a shape,
    anything else)."""
    if isinstance(error, jax.errors.TracerBoolConversionError):
        return "bool"
    if isinstance(error, jax.errors.TracerIntegerConversionError):
        return "int"
    if isinstance(error, jax.errors.TracerArrayConversionError):
        return "array"
    m = _CONVERSION.search(str(error))  # ``int(x)``, ``float(x)``: the message names the function
    return {"int": "int", "float": "float", "complex": "float", "bool": "bool"}.get(m.group(1) if m else "", "value")


@functools.cache
def records_origins() -> bool:
    """Whether this JAX records which equation produced a tracer while a jaxpr is staged (what
    :func:`traced_origins` reads; there on 0.10.2, not on 0.6.2)."""
    found = []

    def f(x):
        y = jax.numpy.sin(x)
        found.extend(traced_origins(y))
        return y

    jax.make_jaxpr(f)(1.0)
    return bool(found)


def traced_origins(x, stop_at=(), limit: int = 100_000):
    """The ``(primitive, params)`` of the staged equations the traced value ``x`` was computed
    from, nearest first: what a message needs to say "this depends on the random choice 'z'".
    The inputs of an equation whose primitive is in ``stop_at`` are not followed further.

    Reads ``DynamicJaxprTracer.parent`` (the equation that produced a tracer while a jaxpr is
    being staged; there on 0.10.2), through ``BatchTracer.val`` and ``JVPTracer.primal`` for
    values inside ``vmap``/``jvp``. Yields nothing where JAX does not record it.
    """
    seen: set[int] = set()
    queue = collections.deque([x])
    while queue and len(seen) < limit:
        t = queue.popleft()
        if id(t) in seen or not isinstance(t, jax.core.Tracer):
            continue
        seen.add(id(t))
        for inner in ("val", "primal"):  # BatchTracer.val, JVPTracer.primal
            v = getattr(t, inner, None)
            if isinstance(v, jax.core.Tracer):
                queue.append(v)
        parent = getattr(t, "parent", None)
        if parent is None or id(parent) in seen:
            continue
        seen.add(id(parent))
        try:
            prim, params, inputs = parent.primitive, parent.params, list(getattr(parent, "in_tracers", ()))
        except Exception:  # pragma: no cover - layout change in a future JAX
            return
        yield prim, params
        if prim not in stop_at:
            queue.extend(inputs)


def register_rules(prim, *, impl, abstract_eval, batching_rule, jvp_rule, lowering_error=None):
    """Register the rules of an estimax primitive. Without ``lowering_error`` the primitive
    lowers to nothing (a marker with no operands and no results)."""
    prim.def_impl(impl)
    prim.def_abstract_eval(abstract_eval)
    batching.primitive_batchers[prim] = batching_rule
    ad.primitive_jvps[prim] = jvp_rule

    def _lower(ctx, *args, **params):
        del ctx, args
        if lowering_error is None:
            return []
        raise lowering_error(**params)

    mlir.register_lowering(prim, _lower)


not_mapped = None  # ``batching.not_mapped`` is ``None`` in current JAX.


def subjaxprs_of(eqn):
    """The jaxprs nested in ``eqn``'s params, as (open) ``Jaxpr`` objects."""
    out = []
    for v in eqn.params.values():
        vals = v if isinstance(v, (tuple, list)) else (v,)
        for u in vals:
            if isinstance(u, ClosedJaxpr):
                out.append(u.jaxpr)
            elif isinstance(u, Jaxpr):
                out.append(u)
    return out


def called_jaxpr(eqn):
    """``(jaxpr, consts)`` of a call-like equation (``jit``/``closed_call`` carry a closed
    jaxpr under ``jaxpr``/``call_jaxpr``, ``checkpoint`` an open one); the param names hold
    from 0.6.2 to 0.10.2."""
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(sub, ClosedJaxpr):
        return sub.jaxpr, sub.consts
    return sub, ()


def in_scope(eqn, name: str) -> bool:
    """Whether ``eqn`` was traced inside ``jax.named_scope(name)``."""
    try:
        return name in str(eqn.source_info.name_stack)
    except Exception:  # pragma: no cover - layout change in a future JAX
        return False


def map_subjaxprs(eqn, fn):
    """``eqn`` with ``fn`` applied to every (open) ``Jaxpr`` nested in its params (closed ones
    keep their constants); the same object where ``fn`` changes nothing."""
    def one(u):
        if isinstance(u, ClosedJaxpr):
            new = fn(u.jaxpr)
            return u if new is u.jaxpr else ClosedJaxpr(new, u.consts)
        if isinstance(u, Jaxpr):
            return fn(u)
        return u

    params, changed = {}, False
    for k, v in eqn.params.items():
        if isinstance(v, (tuple, list)) and any(isinstance(u, (ClosedJaxpr, Jaxpr)) for u in v):
            new = type(v)(one(u) for u in v)
            changed |= any(a is not b for a, b in zip(new, v))
        else:
            new = one(v)
            changed |= new is not v
        params[k] = new
    return eqn.replace(params=params) if changed else eqn


def core_shaped(struct):
    """A ``ShapedArray`` for a ``ShapeDtypeStruct`` (what abstract-eval rules return)."""
    return jax.core.ShapedArray(struct.shape, struct.dtype, weak_type=getattr(struct, "weak_type", False))


def eval_jaxpr(jaxpr, consts, *args):
    """Evaluate an open ``Jaxpr`` whose constvars are bound to ``consts``."""
    return jaxpr_as_fun(ClosedJaxpr(jaxpr, list(consts)))(*args)


# ``DropVar`` (an outvar whose value is unused) is public in ``jax.extend.core`` from 0.7.
if hasattr(jex.core, "DropVar"):
    DropVar = jex.core.DropVar
else:  # JAX 0.6.x
    from jax._src.core import DropVar  # noqa: E402


# --- a jaxpr's content as a hashable key (``Jaxpr``/``Literal``/``eqn.ctx``: 0.6.2–0.10.2) ---
class _ByIdentity:
    """An unhashable object in a key, equal only to itself (the key holds it, so its
    identity cannot be reused while the key lives)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _ByIdentity) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


def _array_key(x) -> tuple:
    a = np.asarray(x)
    data = a.tobytes()
    return ("array", str(a.dtype), a.shape, hashlib.sha256(data).digest() if len(data) > 64 else data)


def _param_key(v):
    if isinstance(v, ClosedJaxpr):
        return ("closed", jaxpr_key(v.jaxpr), tuple(_param_key(c) for c in v.consts))
    if isinstance(v, Jaxpr):
        return ("jaxpr", jaxpr_key(v))
    if isinstance(v, (tuple, list)):
        return (type(v).__name__, tuple(_param_key(u) for u in v))
    if isinstance(v, dict):
        return ("dict", tuple((k, _param_key(u)) for k, u in v.items()))
    if v is None or type(v) in (bool, int, str, bytes):
        return (type(v).__name__, v)
    if type(v) is float:
        return ("float", v.hex())  # -0.0 and 0.0 differ
    if isinstance(v, (np.ndarray, np.generic, jax.Array)):
        try:
            return _array_key(v)
        except Exception:  # a tracer, or a key array: by identity
            return ("identity", _ByIdentity(v))
    try:
        hash(v)
    except TypeError:
        return ("identity", _ByIdentity(v))
    return ("object", v)


def jaxpr_key(jaxpr) -> tuple:
    """A hashable key that is equal for two jaxprs only where they compute the same thing:
    their equations, avals, literal values (by their bytes) and params (nested jaxprs by their
    keys, arrays by their bytes, other objects by equality, unhashable ones by identity);
    variable names, source locations and debug info are left out. Raises ``TypeError`` where
    an aval cannot be hashed."""
    numbers: dict = {}

    def atom(v):
        if isinstance(v, Literal):
            return ("literal", v.aval, _array_key(v.val))
        if isinstance(v, DropVar):
            return ("drop", v.aval)
        if v not in numbers:
            numbers[v] = len(numbers)
        return ("var", numbers[v], v.aval)

    head = (len(jaxpr.constvars), tuple(atom(v) for v in (*jaxpr.constvars, *jaxpr.invars)))
    eqns = tuple((eqn.primitive, tuple(atom(v) for v in eqn.invars),
                  tuple((k, _param_key(u)) for k, u in eqn.params.items()),
                  _param_key(getattr(eqn, "ctx", None)), tuple(atom(v) for v in eqn.outvars))
                 for eqn in jaxpr.eqns)
    key = (head, eqns, tuple(atom(v) for v in jaxpr.outvars), frozenset(jaxpr.effects))
    hash(key)
    return key


# --- dead-code elimination (``pe.dce_jaxpr``: internal, stable signature 0.4.x–0.10) -------
def dce_jaxpr(jaxpr, used_outputs, instantiate=False):
    """``(jaxpr restricted to what ``used_outputs`` need, which inputs it uses)``. With
    ``instantiate=True`` every input is kept (the returned flags still say which are used)."""
    from jax._src.interpreters import partial_eval as pe  # optional: private; only DCE needs it

    _, used_inputs = pe.dce_jaxpr(jaxpr, used_outputs, instantiate=False)
    if instantiate is False:
        return pe.dce_jaxpr(jaxpr, used_outputs, instantiate=False)
    kept, _ = pe.dce_jaxpr(jaxpr, used_outputs, instantiate=instantiate)
    return kept, used_inputs


def with_outputs(jaxpr, outvars, eqns):
    """``jaxpr`` with other equations and outputs (same inputs and constants)."""
    info = jaxpr.debug_info
    if info is not None and hasattr(info, "_replace"):
        info = info._replace(result_paths=None)  # the paths describe the old outputs
    return jaxpr.replace(outvars=list(outvars), eqns=list(eqns), debug_info=info)


# --- meshes (sharding of particles and data) --------------------------------------------------
def abstract_mesh():
    """The mesh set by ``jax.set_mesh`` (``jax.sharding.use_mesh`` before it) around the
    current trace, or ``None``."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = get() if get is not None else None
    return None if mesh is None or mesh.empty else mesh


def set_mesh(mesh):
    """A context manager making ``mesh`` the current mesh (``jax.set_mesh``; ``use_mesh`` on
    older JAX)."""
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    return jax.sharding.use_mesh(mesh)


def make_mesh(devices, axis: str):
    """A one-axis mesh over ``devices`` whose axis is in JAX's automatic (propagated) mode."""
    types = getattr(jax.sharding, "AxisType", None)
    kwargs = {} if types is None else {"axis_types": (types.Auto,)}
    return jax.sharding.Mesh(np.asarray(devices), (axis,), **kwargs)


# --- locating the first NaN (diagnosis replays under jax.debug_nans) ---------------------------
def located_error(error: FloatingPointError, eqn, where_else: str = "") -> FloatingPointError:
    """``error`` (raised by ``jax.debug_nans``/``debug_infs`` while evaluating ``eqn``) with the
    operation and the user's line; ``where_else`` adds context (``"in constraint 'c'"``)."""
    if getattr(error, "estimax_located", False):
        return error
    where = user_frame(eqn)
    extra = f" {where_else}" if where_else else ""
    out = FloatingPointError(
        f"{str(error).splitlines()[0]}: `{eqn.primitive.name}` at {where or 'an unknown location'}{extra}")
    out.estimax_located = True
    out.location = where
    return out


def eval_jaxpr_located(jaxpr, consts, *args, context: str = ""):
    """``eval_jaxpr`` one equation at a time, turning a ``FloatingPointError`` (under
    ``jax.debug_nans``) into one that names the equation's operation and line."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jex.core.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        try:
            outs = rebind(eqn, [read(v) for v in eqn.invars])
        except FloatingPointError as e:
            raise located_error(e, eqn, context) from None
        for v, x in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, DropVar):
                env[v] = x
    return [read(v) for v in jaxpr.outvars]
