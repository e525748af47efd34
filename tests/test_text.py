"""The textual front-end: objective files parsed with lark and lowered to programs.

- Round trip: each construct of the language, written in a file and as the equivalent
  hand-written Python program, gives the same estimates, gradients and plan for the same keys.
- Golden errors: a catalogue of mistakes under ``tests/golden/text_errors/`` (``NAME.emx`` and
  the exact message ``NAME.txt``); ``ESTIMAX_UPDATE_GOLDEN=1`` rewrites the messages.
- Fuzzing: random programs built from the grammar's constructs, some of them corrupted, either
  run or fail with a located ``TextError`` -- never another exception.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import textwrap
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import estimax as ex

KEYS = [jax.random.PRNGKey(s) for s in (0, 1, 7)]
GOLDEN = Path(__file__).parent / "golden" / "text_errors"


# --- round trip ----------------------------------------------------------------------------
@dataclasses.dataclass
class Case:
    source: str
    python: Callable  # (params, data) -> value, the same ex.sample calls in the same order
    data: dict = dataclasses.field(default_factory=dict)
    files: dict = dataclasses.field(default_factory=dict)  # name -> text, written next to the .emx


def _helpers_module(directory: Path):
    spec = importlib.util.spec_from_file_location("helpers", directory / "helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HELPERS = """
import jax.numpy as jnp

def bump(x, k=2.0):
    return jnp.tanh(x) * k
"""


def _declarations(p, d):
    z = ex.sample(dist.Normal(p["mu"] + jnp.sum(p["w"] * d["k"]), 1.0), name="z")
    return jnp.sum((d["x"] - z) * p["v"]) + jnp.sum(p["m"])


def _let(p, d):
    s = jnp.exp(p["mu"]) * 0.5
    m = 2.0 * p["mu"] - 1.0
    z = ex.sample(dist.Normal(m, s), name="z")
    return z**2 + s


def _default(p, d):
    z = ex.sample(dist.Normal(p["mu"], 1.0), name="z")
    b = ex.sample(dist.Bernoulli(logits=p["l"]), name="b")
    n = ex.sample(dist.Geometric(probs=jax.nn.sigmoid(p["mu"])), name="n")
    return z * b + n


def _reparam(p, d):
    z = ex.sample(dist.Normal(p["mu"], jnp.exp(p["ls"])), estimator=ex.reparam, name="z")
    return -((z - 1.0) ** 2)


def _reinforce(p, d):
    z = ex.sample(dist.Normal(p["mu"], 1.0), estimator=ex.reinforce, name="z")
    return z**2


def _reinforce_baseline(p, d):
    b = ex.sample(dist.Bernoulli(logits=p["l"]), estimator=ex.reinforce(baseline=1.0), name="b")
    return 3.0 * b + p["l"]


def _learned(direction):
    def program(p, d):
        strategy = ex.reinforce(baseline=p["bl"], learn=direction)
        b = ex.sample(dist.Bernoulli(logits=p["l"]), estimator=strategy, name="b")
        return 3.0 * b - p["l"] ** 2

    return program


def _enum(p, d):
    c = ex.sample(dist.Categorical(logits=p["w"]), estimator=ex.enum, name="c")
    return p["v"][c] ** 2


def _mvd(p, d):
    b = ex.sample(dist.Bernoulli(logits=p["l"]), estimator=ex.mvd, name="b")
    z = ex.sample(dist.Normal(p["mu"], 1.0), estimator=ex.mvd, name="z")
    return b * z + z**2


def _gumbel(p, d):
    c = ex.sample(dist.Categorical(logits=p["w"]), estimator=ex.gumbel_softmax(temperature=0.5), name="c")
    return jnp.sum(c * p["v"])


def _straight_through(p, d):
    b = ex.sample(dist.Bernoulli(logits=p["l"]), estimator=ex.straight_through, name="b")
    return b * 2.0 + p["l"]


def _arithmetic(p, d):
    z = ex.sample(dist.Normal(p["mu"], 1.0), name="z")
    return (z + 1.0) * 2.0 - z / 3.0 + z % 2.0 + -(z**2) + (+z) - 2.0**-1 * p["mu"]


def _logic(p, d):
    z = ex.sample(dist.Normal(p["mu"], 1.0), name="z")
    c = jnp.logical_or(jnp.logical_and(z > 0.0, z < 2.0), jnp.logical_not(z >= -1.0))
    f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return f(c) * z + f(z == 0.0) + f(z != 1.0) + f(z <= 3.0)


def _if_scalar(p, d):
    z = ex.sample(dist.Normal(p["mu"], 1.0), name="z")
    b = ex.sample(dist.Bernoulli(logits=p["l"]), name="b")
    return jax.lax.cond(b > 0, lambda: (z - d["x"]) ** 2, lambda: jnp.abs(z))


def _if_array(p, d):
    z = ex.sample(dist.Normal(p["mu"], 1.0), name="z")
    return jnp.sum(jnp.where(p["w"] > 0.0, p["w"] * z, -z))


def _math(p, d):
    z = ex.sample(dist.Normal(p["w"], 1.0).to_event(1), name="z")
    s = jnp.exp(z[0]) + jnp.log(jnp.abs(z[1]) + 1.0) + jnp.sqrt(jnp.square(z[2]) + 1.0) + jnp.tanh(z[0])
    s = s + jax.nn.sigmoid(z[1]) + jax.nn.softplus(z[2]) + jnp.log1p(jnp.abs(z[0]))
    s = s + jnp.sin(z[1]) * jnp.cos(z[2])
    s = s + jax.scipy.special.logsumexp(z) + jnp.sum(jax.nn.softmax(z) * p["w"]) + jnp.mean(z) + jnp.max(z)
    s = s + jnp.sum(jnp.clip(z, -1.0, 1.0)) + jnp.sum(jnp.maximum(z, 0.0)) + jnp.dot(z, p["w"])
    s = s + jax.nn.relu(z[0])
    return s + jnp.sum(jax.nn.log_softmax(z)) + jnp.min(z) + jnp.prod(jnp.tanh(z)) + jnp.pi * jnp.sum(z, axis=0)


def _indexing(p, d):
    c = ex.sample(dist.Categorical(logits=p["m"][0]), name="c")
    return p["m"][1, c] + p["m"][0][2] + p["w"][c] + d["x"][1]


def _arrays(p, d):
    z = ex.sample(dist.Normal(jnp.asarray([0.0, 1.0]), jnp.exp(p["mu"])), name="z")
    a = jnp.stack([p["mu"], 2.0 * p["mu"], jnp.sum(z)])
    return jnp.sum(a * jnp.asarray([1.0, 2.0, 3.0]))


def _dist_methods(p, d):
    z = ex.sample(dist.Normal(p["w"], 1.0).to_event(1), name="z")
    g = ex.sample(dist.Normal(p["mu"], 1.0).expand([3]), name="g")
    f = ex.sample(dist.Bernoulli(logits=p["mu"]).expand([2]).to_event(1), estimator=ex.mvd, name="f")
    return jnp.sum(z * g) + jnp.sum(f * p["mu"])


def _expect(p, d):
    z = ex.sample(dist.Normal(p["mu"], 1.0), name="z")

    def expect():
        u = ex.sample(dist.Normal(z, 1.0), name="u")
        v = u * 2.0
        return jnp.asarray(v**2 - z, jnp.float32)

    y = ex.expect(expect, n=3)()
    return y + z


def _import_file(module):
    def program(p, d):
        z = ex.sample(dist.Normal(module.bump(p["mu"]), 1.0), name="z")
        return module.bump(z, k=3.0) + module.bump(z)

    return program


def _import_dotted(p, d):
    z = ex.sample(dist.Normal(p["mu"], 1.0), name="z")
    return jnp.arctan(z) + jax.nn.softplus(2.0 * z)


def _logp(p, d):
    z = ex.sample(dist.Normal(p["mu"], 1.0), name="z")
    x_term = jnp.sum(dist.Normal(z, 1.0).log_prob(d["x"]))
    return x_term + jnp.sum(dist.Bernoulli(logits=p["mu"]).log_prob(d["k"]))


def _program_call(p, d):
    def step(a, b):  # a `program` is inlined where it is called
        u = ex.sample(dist.Normal(a, 1.0), estimator=ex.reparam, name="u")
        return u * b

    w = step(p["mu"], 2.0)
    return w + jnp.sum(d["x"])


def _hvi_joint(p, d):
    u = ex.sample(dist.Normal(p["m"], 1.0), estimator=ex.reparam, name="u")
    return ex.sample(dist.Normal(u, jnp.exp(p["log_s"])), estimator=ex.reparam, name="z")


def _hvi_reverse(kept, p, d):
    return ex.sample(dist.Normal(p["a"] * kept["z"], jnp.exp(p["log_r"])), estimator=ex.reparam, name="u")


def _marginal_case(particles):
    def program(p, d):
        q = ex.marginal(_hvi_joint, keep="z", proposal=_hvi_reverse, particles=particles)
        sites, log_q = q.draw(p, d)
        z = sites["z"]
        log_lik = jnp.sum(dist.Normal(z, 1.0).log_prob(d["x"]))
        other = q.log_density({"z": 0.5 * z}, p, d)
        return dist.Normal(0.0, 1.0).log_prob(z) + log_lik - log_q + 0.1 * other

    return program


def _normalize_target(latents, p, d):
    z = latents["z"]
    return dist.Normal(0.0, 1.0).log_prob(z) + jnp.sum(dist.Normal(z, 1.0).log_prob(d["x"]))


def _normalize_proposal(p, d):
    return ex.sample(dist.Normal(p["m"], jnp.exp(p["log_s"])), estimator=ex.reparam, name="z")


def _normalize(p, d):
    q = ex.normalize(ex.objectives.LogJoint(_normalize_target), _normalize_proposal, particles=4)
    sites, log_q = q.draw(p, d)
    z = sites["z"]
    return _normalize_target({"z": z}, p, d) - log_q


def _plate_size(p, d):
    def lane():
        z = ex.sample(dist.Normal(p["mu"], 1.0), estimator=ex.reparam, name="z")
        return jnp.stack([z, z**2])

    zs = ex.vmap(lane, axis_size=d["x"].shape[0])()
    return jnp.sum(zs[:, 1]) - jnp.mean(zs[:, 0])


def _plate_over(p, d):
    def lane(xi, ki):
        b = ex.sample(dist.Bernoulli(logits=p["mu"] * xi), name="b")
        return b * xi + ki

    return jnp.sum(ex.vmap(lane)(d["x"], d["k"]))


# hierarchical VI in the file: `marginal` of a two-site joint with a reverse model
_HVI_SOURCE = """
    data x: real[N]
    param m: real = 0.3
    param log_s: real = -1.0
    param a: real = 0.5
    param log_r: real = -0.5
    program joint() {
      u ~ Normal(m, 1.0) @reparam
      z ~ Normal(u, exp(log_s)) @reparam
      return z
    }
    program reverse(z) {
      u ~ Normal(a * z, exp(log_r)) @reparam
      return u
    }
    let q = marginal(joint, proposal=reverse, particles=PARTICLES)
    z ~ q
    maximize logp(Normal(0.0, 1.0), z) + logp(Normal(z, 1.0), x) - logp(q, z) + 0.1 * logp(q, 0.5 * z)
"""

X4 = jnp.array([0.5, -1.0, 2.0, 0.25])
CASES = {
    "declarations": Case(
        """
        param mu: real = 0.5
        param w: real[3] = [0.1, -0.2, 0.3]
        param v: real[N] = 0.25
        param m: real[2, N]
        data x: real[N]
        data k: int[3]
        z ~ Normal(mu + sum(w * k), 1.0)
        maximize sum((x - z) * v) + sum(m)
        """,
        _declarations,
        {"x": X4, "k": jnp.array([1, 0, 2], jnp.int32)},
    ),
    "let": Case(
        """
        param mu: real = 0.5
        let s = exp(mu) * 0.5
        let m = 2.0 * mu - 1.0
        z ~ Normal(m, s)
        maximize z ** 2 + s
        """,
        _let,
    ),
    "default_strategies": Case(
        """
        param mu: real = 0.5
        param l: real = -0.3
        z ~ Normal(mu, 1.0)
        b ~ Bernoulli(logits=l)
        n ~ Geometric(probs=sigmoid(mu))
        maximize z * b + n
        """,
        _default,
    ),
    "reparam": Case(
        """
        param mu: real = 0.5
        param ls: real = -0.2
        z ~ Normal(mu, exp(ls)) @reparam
        maximize -(z - 1.0) ** 2
        """,
        _reparam,
    ),
    "reinforce": Case(
        """
        param mu: real = 0.5
        z ~ Normal(mu, 1.0) @reinforce
        minimize z ** 2
        """,
        _reinforce,
    ),
    "reinforce_baseline": Case(
        """
        param l: real = 0.4
        b ~ Bernoulli(logits=l) @reinforce(baseline=1.0)
        maximize 3.0 * b + l
        """,
        _reinforce_baseline,
    ),
    "reinforce_learn_maximize": Case(
        """
        param l: real = 0.4
        param bl: real = 0.7
        b ~ Bernoulli(logits=l) @reinforce(baseline=bl, learn=true)
        maximize 3.0 * b - l ** 2
        """,
        _learned("ascent"),
    ),
    "reinforce_learn_minimize": Case(
        """
        param l: real = 0.4
        param bl: real = 0.7
        b ~ Bernoulli(logits=l) @reinforce(baseline=bl, learn=true)
        minimize 3.0 * b - l ** 2
        """,
        _learned("descent"),
    ),
    "enum": Case(
        """
        param w: real[3] = [0.2, -0.5, 0.9]
        param v: real[3] = [1.0, -2.0, 0.5]
        c ~ Categorical(logits=w) @enum
        maximize v[c] ** 2
        """,
        _enum,
    ),
    "mvd": Case(
        """
        param l: real = 0.4
        param mu: real = -0.3
        b ~ Bernoulli(logits=l) @mvd
        z ~ Normal(mu, 1.0) @mvd
        maximize b * z + z ** 2
        """,
        _mvd,
    ),
    "gumbel_softmax": Case(
        """
        param w: real[3] = [0.2, -0.5, 0.9]
        param v: real[3] = [1.0, -2.0, 0.5]
        c ~ Categorical(logits=w) @gumbel_softmax(temperature=0.5)
        maximize sum(c * v)
        """,
        _gumbel,
    ),
    "straight_through": Case(
        """
        param l: real = 0.4
        b ~ Bernoulli(logits=l) @straight_through
        maximize b * 2.0 + l
        """,
        _straight_through,
    ),
    "arithmetic": Case(
        """
        param mu: real = 0.5
        z ~ Normal(mu, 1.0)
        maximize (z + 1.0) * 2.0 - z / 3.0 + z % 2.0 + -z ** 2 + (+z) - 2.0 ** -1 * mu
        """,
        _arithmetic,
    ),
    "comparisons_and_logic": Case(
        """
        param mu: real = 0.5
        z ~ Normal(mu, 1.0)
        let c = (z > 0.0 and z < 2.0) or not z >= -1.0
        maximize float(c) * z + float(z == 0.0) + float(z != 1.0) + float(z <= 3.0)
        """,
        _logic,
    ),
    "if_scalar_cond": Case(
        """
        param mu: real = 0.3
        param l: real = 0.5
        data x: real
        z ~ Normal(mu, 1.0)
        b ~ Bernoulli(logits=l)
        minimize if b > 0 then (z - x) ** 2 else abs(z)
        """,
        _if_scalar,
        {"x": jnp.float32(1.0)},
    ),
    "if_array_where": Case(
        """
        param mu: real = 0.3
        param w: real[3] = [0.5, -1.0, 2.0]
        z ~ Normal(mu, 1.0)
        maximize sum(if w > 0.0 then w * z else -z)
        """,
        _if_array,
    ),
    "math_functions": Case(
        """
        param w: real[3] = [0.2, -0.5, 0.9]
        z ~ Normal(w, 1.0).to_event(1)
        let s = exp(z[0]) + log(abs(z[1]) + 1.0) + sqrt(square(z[2]) + 1.0) + tanh(z[0])
        let s2 = s + sigmoid(z[1]) + softplus(z[2]) + log1p(abs(z[0])) \\
            + sin(z[1]) * cos(z[2])
        let s3 = s2 + logsumexp(z) + sum(softmax(z) * w) + mean(z) + max(z)
        let s4 = s3 + sum(clip(z, -1.0, 1.0)) + sum(maximum(z, 0.0)) + dot(z, w) \\
            + relu(z[0])
        maximize s4 + sum(log_softmax(z)) + min(z) + prod(tanh(z)) + pi * sum(z, axis=0)
        """,
        _math,
    ),
    "indexing": Case(
        """
        param m: real[2, 3] = [[0.1, 0.2, 0.3], [1.0, -1.0, 2.0]]
        param w: real[3] = [0.2, -0.5, 0.9]
        data x: real[N]
        c ~ Categorical(logits=m[0])
        maximize m[1, c] + m[0][2] + w[c] + x[1]
        """,
        _indexing,
        {"x": X4},
    ),
    "arrays": Case(
        """
        param mu: real = 0.5
        z ~ Normal([0.0, 1.0], exp(mu))
        let a = [mu, 2.0 * mu, sum(z)]
        maximize sum(a * [1.0, 2.0, 3.0])
        """,
        _arrays,
    ),
    "distribution_methods": Case(
        """
        param mu: real = 0.5
        param w: real[3] = [0.2, -0.5, 0.9]
        z ~ Normal(w, 1.0).to_event(1)
        g ~ Normal(mu, 1.0).expand([3])
        f ~ Bernoulli(logits=mu).expand([2]).to_event(1) @mvd
        maximize sum(z * g) + sum(f * mu)
        """,
        _dist_methods,
    ),
    "expect": Case(
        """
        param mu: real = 0.5
        z ~ Normal(mu, 1.0)
        let y = expect(n=3) {
            u ~ Normal(z, 1.0)
            let v = u * 2.0
            return v ** 2 - z
        }
        maximize y + z
        """,
        _expect,
    ),
    "import_file": Case(
        """
        from "helpers.py" import bump
        from "helpers.py" import bump as bump2
        param mu: real = 0.5
        z ~ Normal(bump(mu), 1.0)
        maximize bump(z, k=3.0) + bump2(z)
        """,
        None,  # built from the written module
        files={"helpers.py": HELPERS},
    ),
    "import_dotted_module": Case(
        """
        from jax.numpy import arctan
        from jax.nn import softplus as sp
        param mu: real = 0.5
        z ~ Normal(mu, 1.0)
        maximize arctan(z) + sp(2.0 * z)
        """,
        _import_dotted,
    ),
    "logp": Case(
        """
        param mu: real = 0.5
        data x: real[N]
        data k: int[N]
        z ~ Normal(mu, 1.0)
        maximize logp(Normal(z, 1.0), x) + logp(Bernoulli(logits=mu), k)
        """,
        _logp,
        {"x": X4, "k": jnp.array([1, 0, 0, 1], jnp.int32)},
    ),
    "program_call": Case(
        """
        param mu: real = 0.5
        data x: real[N]
        program step(a, b) {
          u ~ Normal(a, 1.0) @reparam
          return u * b
        }
        let w = step(mu, 2.0)
        maximize w + sum(x)
        """,
        _program_call,
        {"x": X4},
    ),
    "marginal_hvi": Case(_HVI_SOURCE.replace("PARTICLES", "0"), _marginal_case(0), {"x": X4}),
    "marginal_iwhvi": Case(_HVI_SOURCE.replace("PARTICLES", "3"), _marginal_case(3), {"x": X4}),
    "normalize": Case(
        """
        data x: real[N]
        param m: real = 0.3
        param log_s: real = -0.5
        program target(z) {
          return logp(Normal(0.0, 1.0), z) + logp(Normal(z, 1.0), x)
        }
        program proposal() {
          z ~ Normal(m, exp(log_s)) @reparam
          return z
        }
        let q = normalize(target, proposal, particles=4)
        z ~ q
        maximize target(z) - logp(q, z)
        """,
        _normalize,
        {"x": X4},
    ),
    "plate_size": Case(
        """
        param mu: real = 0.5
        data x: real[N]
        let zs = plate(n=N) {
          z ~ Normal(mu, 1.0) @reparam
          return [z, z ** 2]
        }
        maximize sum(zs[:, 1]) - mean(zs[:, 0])
        """,
        _plate_size,
        {"x": X4},
    ),
    "plate_over_data": Case(
        """
        param mu: real = 0.5
        data x: real[N]
        data k: int[N]
        let terms = plate(xi in x, ki in k) {
          b ~ Bernoulli(logits=mu * xi)
          return b * xi + ki
        }
        maximize sum(terms)
        """,
        _plate_over,
        {"x": X4, "k": jnp.array([1, 0, 0, 1], jnp.int32)},
    ),
}


def _plan(plan: ex.Plan):
    # a reason may name the line of the operation it is about: the .emx line or the Python one
    reason = lambda r: re.sub(r" \([^()]*:\d+\)", " (<line>)", r)
    sites = [(s.name, s.distribution, s.strategy.describe(), reason(s.reason), s.context) for s in plan.sites]
    return sites, plan.certificate.kind


def _assert_trees_close(a, b, what):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb, f"{what}: {ta} != {tb}"
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-5, err_msg=what)


def _load_case(name: str, tmp_path: Path):
    case = CASES[name]
    for fname, text in case.files.items():
        (tmp_path / fname).write_text(textwrap.dedent(text))
    path = tmp_path / f"{name}.emx"
    path.write_text(textwrap.dedent(case.source).lstrip())
    prog = ex.text.load(path)
    python = case.python if case.python is not None else _import_file(_helpers_module(tmp_path))
    return prog, ex.expectation(python), case.data


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip(name, tmp_path):
    prog, python, data = _load_case(name, tmp_path)
    params = prog.init_params(prog.dims_from(data))
    data = prog.validate_data(data)

    text_plan, python_plan = ex.explain(prog.objective, params, data), ex.explain(python, params, data)
    assert _plan(text_plan) == _plan(python_plan)
    assert text_plan.sites, "every case has a random choice"

    # value_and_grad's value is `.estimate`'s: one compilation per program gives both
    vg_text, vg_python = ex.value_and_grad(prog.objective), ex.value_and_grad(python)
    for key in KEYS:
        (v_text, g_text), (v_python, g_python) = vg_text(key, params, data), vg_python(key, params, data)
        assert np.isfinite(v_text)
        _assert_trees_close(v_text, v_python, f"{name}: estimate")
        _assert_trees_close(g_text, g_python, f"{name}: gradient")


# Constant folding in Python (`2.0 ** -1`) and estimax's own log density (`logp`, also in the
# marginal and normalize cases) stage a few different equations; every other construct stages exactly the Python program's IR.
_SAME_IR_EXCEPT = {"arithmetic", "logp", "marginal_hvi", "marginal_iwhvi", "normalize"}


@pytest.mark.parametrize("name", sorted(set(CASES) - _SAME_IR_EXCEPT))
def test_same_ir_as_python(name, tmp_path):
    prog, python, data = _load_case(name, tmp_path)
    args = (prog.init_params(prog.dims_from(data)), prog.validate_data(data))
    assert str(prog.objective.stage(args)[0]) == str(python.stage(args)[0])


def test_declarations_shapes_and_sizes(tmp_path):
    prog, _, data = _load_case("declarations", tmp_path)
    assert set(prog.params) == {"mu", "w", "v", "m"} and set(prog.data) == {"x", "k"}
    assert prog.params["m"].shape == (2, "N") and prog.data["k"].dtype == jnp.int32
    dims = prog.dims_from(data)
    assert dims == {"N": 4}
    params = prog.init_params(dims)
    assert {k: v.shape for k, v in params.items()} == {"mu": (), "w": (3,), "v": (4,), "m": (2, 4)}
    np.testing.assert_allclose(params["w"], [0.1, -0.2, 0.3])
    np.testing.assert_allclose(params["v"], 0.25)
    np.testing.assert_allclose(params["m"], 0.0)
    abstract = prog.abstract_data({"N": 5})
    assert abstract["x"] == jax.ShapeDtypeStruct((5,), jnp.float32)
    assert abstract["k"] == jax.ShapeDtypeStruct((3,), jnp.int32)


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_learned_baseline_follows_the_direction(direction, tmp_path):
    prog, _, _ = _load_case(f"reinforce_learn_{direction}", tmp_path)
    assert prog.maximize == (direction == "maximize")
    plan = ex.explain(prog.objective, prog.init_params(), {})
    want = "ascent" if direction == "maximize" else "descent"
    assert plan.site("b").strategy.describe() == f"reinforce(baseline=<learned, {want}>)"


@pytest.mark.parametrize("name,scalar", [("if_scalar_cond", True), ("if_array_where", False)])
def test_if_lowers_to_cond_or_where(name, scalar, tmp_path):
    prog, _, data = _load_case(name, tmp_path)
    params = prog.init_params(prog.dims_from(data))
    jaxpr = str(prog.objective.stage((params, prog.validate_data(data)))[0])
    assert ("cond[" in jaxpr) == scalar
    assert ("name=_where" in jaxpr) == (not scalar)


def test_constraints_round_trip(tmp_path):
    """`subject_to` lowers to `ex.subject_to`: the same constraints, kinds and values as the
    Python program, and `ex.solve` reaches the same solution."""
    from estimax.transforms._constraints import split

    path = tmp_path / "portfolio.emx"
    path.write_text(textwrap.dedent("""
        param w: real[3] = [0.5, 0.3, 0.2]
        data r: real[3]
        subject_to budget: sum(w) == 1.0
        subject_to w >= 0.0
        subject_to cap: w[0] <= 0.4
        minimize sum(w ** 2 * r) - 0.1 * sum(w * r)
    """).lstrip())
    prog = ex.text.load(path)

    def python(p, d):
        w = p["w"]
        ex.subject_to(eq=jnp.sum(w) - 1.0, name="budget")
        ex.subject_to(ge=w - 0.0, name="le_1")
        ex.subject_to(le=w[0] - 0.4, name="cap")
        return jnp.sum(w**2 * d["r"]) - 0.1 * jnp.sum(w * d["r"])

    params, data = prog.init_params(), {"r": jnp.array([1.0, 2.0, 3.0])}
    args = (params, data)
    text_parts, python_parts = split(prog.objective, args), split(python, args)
    assert [(c.name, c.kind, c.shape) for c in text_parts.constraints] == [
        (c.name, c.kind, c.shape) for c in python_parts.constraints
    ] == [("budget", "eq", ()), ("le_1", "le", (3,)), ("cap", "le", ())]
    flat = jax.tree_util.tree_leaves(args)
    for a, b in zip((text_parts.objective, *text_parts.constraints), (python_parts.objective, *python_parts.constraints)):
        np.testing.assert_allclose(a(*flat), b(*flat), rtol=1e-6)
    plan = ex.explain(prog.objective, *args)
    assert [c[0] for c in plan.constraints] == ["budget", "le_1", "cap"] and plan.constraints[0][3] == "portfolio.emx:3"


def test_argmin_round_trip(tmp_path):
    """`argmin(program, init, ...)` lowers to `ex.argmin`: the same hypergradient as the Python
    program, and `explain` lists the inner problem with the file's line."""
    path = tmp_path / "ridge.emx"
    path.write_text(textwrap.dedent("""
        param log_lam: real[3] = 0.0
        data X: real[N, 3]
        data y: real[N]
        program ridge(w, penalty) {
          return 0.5 * mean((dot(X, w) - y) ** 2) + 0.5 * sum(exp(penalty) * w ** 2)
        }
        let w = argmin(ridge, zeros(3), log_lam)
        minimize sum((w - 1.0) ** 2)
    """).lstrip())
    prog = ex.text.load(path)
    rng = np.random.default_rng(0)
    data = {"X": jnp.asarray(rng.normal(size=(10, 3)), jnp.float32), "y": jnp.asarray(rng.normal(size=10), jnp.float32)}
    params = {"log_lam": jnp.array([-1.0, 0.0, 0.5])}

    def python(p, d):
        def ridge(w, penalty):
            return 0.5 * jnp.mean((d["X"] @ w - d["y"]) ** 2) + 0.5 * jnp.sum(jnp.exp(penalty) * w**2)

        return jnp.sum((ex.argmin(ridge, jnp.zeros(3), p["log_lam"]) - 1.0) ** 2)

    text_value, text_grad = ex.value_and_grad(prog.objective)(KEYS[0], params, data)
    py_value, py_grad = ex.value_and_grad(python)(KEYS[0], params, data)
    np.testing.assert_allclose(text_value, py_value, rtol=1e-6)
    np.testing.assert_allclose(text_grad["log_lam"], py_grad["log_lam"], rtol=1e-5, atol=1e-7)
    plan = ex.explain(prog.objective, params, data)
    assert [(a.name, a.location) for a in plan.argmins] == [("ridge", "ridge.emx:7")]


def test_sites_report_the_file_line(tmp_path):
    prog, _, _ = _load_case("expect", tmp_path)
    plan = ex.explain(prog.objective, prog.init_params(), {})
    assert plan.site("z").location == "expect.emx:2"
    assert plan.site("expect/u").location == "expect.emx:4"
    assert plan.site("expect/u").context == "expect 'expect' (n=3)"


# --- golden error messages -----------------------------------------------------------------
GOLDEN_CASES = sorted(p.stem for p in GOLDEN.glob("*.emx"))
_LOCATED = re.compile(r"^[^\n:]+\.emx:\d+:\d+: error: \S")


def _raise_text_error(path: str):
    """Everything a user's first run does with the file: parse, check, stage, estimate."""
    prog = ex.text.load(path)
    dims = {"N": 2}
    params, abstract = prog.init_params(dims), prog.abstract_data(dims)
    ex.explain(prog.objective, params, abstract)
    data = {k: jnp.ones(v.shape, v.dtype) for k, v in abstract.items()}
    ex.value_and_grad(prog.objective)(KEYS[0], params, data)


def test_golden_catalogue_is_large():
    assert len(GOLDEN_CASES) >= 20


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden_error(name, monkeypatch):
    monkeypatch.chdir(GOLDEN)  # errors name the file as given: "NAME.emx:line:col"
    with pytest.raises(ex.text.TextError) as info:
        _raise_text_error(f"{name}.emx")
    got = str(info.value)
    expected_file = GOLDEN / f"{name}.txt"
    if os.environ.get("ESTIMAX_UPDATE_GOLDEN") == "1":
        expected_file.write_text(got + "\n")
    assert _LOCATED.match(got), got
    assert got == expected_file.read_text().rstrip("\n")


# --- fuzzing -------------------------------------------------------------------------------
_FUZZ_FILE = "fuzz.emx"
_NUMBERS = ["0.5", "2", "-1.0", "1e-3", "3.0", "0", "0.25"]
_UNARY = ["exp", "log", "sum", "mean", "sigmoid", "softplus", "tanh", "abs", "sqrt", "float", "logsumexp",
          "softmax", "relu", "square", "stop_gradient", "max"]
_BINARY = ["+", "-", "*", "/", "%", "**", "==", "<", ">=", "!=", "and", "or"]
# (family, number of arguments, their keywords)
_DISTRIBUTIONS = [
    ("Normal", 2, ""), ("Normal", 2, "loc=,scale="), ("Bernoulli", 1, "logits="), ("Bernoulli", 1, "probs="),
    ("Categorical", 1, "logits="), ("Poisson", 1, ""), ("Gamma", 2, ""), ("Beta", 2, ""),
    ("Exponential", 1, ""), ("Geometric", 1, "probs="), ("LogNormal", 2, ""), ("Uniform", 2, ""),
    ("Dirichlet", 1, ""), ("Normale", 2, ""), ("Laplace", 2, ""), ("Binomial", 2, "total_count=,logits="),
]
_METHODS = ["", "", "", "", ".to_event(1)", ".expand([3])", ".expand([2]).to_event(1)", ".expand(2)"]
_STRATEGIES = [
    "", "", "", "@reparam", "@reinforce", "@reinforce(baseline={E})", "@reinforce(baseline={P}, learn=true)",
    "@reinforce(baseline=1.0, learn=false)", "@enum", "@enum(max_size=4)", "@mvd",
    "@gumbel_softmax(temperature={E})", "@straight_through", "@reparm", "@mvd(foo=1)",
]
_JUNK = [*"()[]{}~@=,\"$.#+*-/\\:<>!%&?'`;|^", "\n", " ", "\t", "x", "1", "é", "\x0c", "\r", "if ", " then "]
_IMPORTS = [
    ("from jax.numpy import arctan", "arctan"), ("from jax.numpy import no_such_name", "no_such_name"),
    ('from "no_such_file.py" import f', "f"), ("from jax import numpy as jnp2", "jnp2"),
    ("from math import sqrt as msqrt", "msqrt"), ("from no_such_module import g", "g"),
]


def _rare(draw, percent: int) -> bool:
    return draw(st.integers(0, 99)) >= 100 - percent  # the simplest draws (zeros) are the usual case


@st.composite
def _expressions(draw, names, depth=0):
    """An expression over ``names``; now and then an unknown name or a value of the wrong kind."""
    if depth >= 3 or draw(st.integers(0, 9)) < 4:
        if _rare(draw, 6):
            return draw(st.sampled_from(["pi", "true", '"text"', "undefined_name", "Normal", "exp"]))
        if names and draw(st.booleans()):
            return draw(st.sampled_from(names))
        return draw(st.sampled_from(_NUMBERS))
    sub = lambda: draw(_expressions(names, depth + 1))  # noqa: E731
    kind = draw(st.integers(0, 14))
    if kind in (0, 1):
        return f"{sub()} {draw(st.sampled_from(_BINARY))} {sub()}"
    if kind == 2:
        return f"{draw(st.sampled_from(_UNARY))}({sub()})"
    if kind == 3:
        return f"if {sub()} then {sub()} else {sub()}"
    if kind == 4:
        return f"{sub()}[{draw(st.sampled_from(['0', '1', '-1', '0.5']))}]"
    if kind == 5:
        return "[" + ", ".join(sub() for _ in range(draw(st.integers(1 if depth else 0, 3)))) + "]"
    if kind == 6:
        return f"-({sub()})" if draw(st.booleans()) else f"not {sub()}"
    if kind == 7:
        return f"logp({draw(_distribution(names, depth + 1))}, {sub()})"
    if kind == 8:
        fn = draw(st.sampled_from(["maximum", "minimum", "dot", "clip", "one_hot", "where"]))
        return f"{fn}({sub()}, {sub()})"
    if kind == 9:
        return f"{draw(st.sampled_from(['zeros', 'ones']))}({draw(st.sampled_from(['2', '3', 'mu', '-1']))})"
    if kind == 10:
        inner = draw(st.sampled_from(["u", "v"]))
        n = draw(st.sampled_from(["", "(n=2)", "(n=2)", "(n=0)", "(m=2)"]))
        dist_text = draw(_distribution(names, depth + 1))
        strategy = draw(st.sampled_from(["", "", "@reinforce", "@enum", "@mvd", "@reparam"]))
        value = draw(_expressions([*names, inner], depth + 1))
        return f"expect{n} {{\n    {inner} ~ {dist_text} {strategy}\n    return {value}\n}}"
    if kind == 11:
        if "jnp2" in names and draw(st.booleans()):
            return f"jnp2.{draw(st.sampled_from(['tanh', 'exp', 'nothing']))}({sub()})"
        attribute = draw(st.sampled_from(["mean", "variance", "mean", "foo"]))
        return f"{draw(_distribution(names, depth + 1))}.{attribute}"
    if kind == 13:
        lanes = draw(st.sampled_from(["n=2", "n=N", "n=0", "e in [1.0, 2.0]", "e in x", "e in mu", "e in x, f in x"]))
        inner = draw(st.sampled_from(["p", "q"]))
        dist_text = draw(_distribution([*names, "e"], depth + 1))
        value = draw(_expressions([*names, inner, "e"], depth + 1))
        return f"plate({lanes}) {{\n    {inner} ~ {dist_text}\n    return {value}\n}}"
    if kind == 14:
        lo, hi = (draw(st.sampled_from(["", "0", "1", "-1", "mu", "N"])) for _ in range(2))
        return f"{sub()}[{lo}:{hi}]"
    return f"sum({sub()}, axis={draw(st.sampled_from(['0', '0', '1', 'mu']))})"


# Sub-programs and distributions built from them: (text, the name of a scalar they define).
_PROGRAM_BLOCKS = [
    ("program g{i}(a) {{\n  t{i} ~ Normal(a, 1.0) @reparam\n  return t{i} * 2.0\n}}\nlet a{i} = g{i}({s})", "a{i}"),
    ("program g{i}(a, b) {{\n  return a * b\n}}\nlet a{i} = g{i}({s}, b=2.0)", "a{i}"),
    ("program g{i}(a) {{\n  return a\n}}\nlet a{i} = g{i}()", "a{i}"),
    ("program j{i}() {{\n  u{i} ~ Normal({s}, 1.0) @reparam\n  y{i} ~ Normal(u{i}, 0.5) @reparam\n  return y{i}\n}}\n"
     "program r{i}(y{i}) {{\n  u{i} ~ Normal(y{i}, 1.0) @reparam\n  return u{i}\n}}\n"
     "let q{i} = marginal(j{i}, proposal=r{i}, particles={m}, name=\"m{i}\")\na{i} ~ q{i}\nlet c{i} = logp(q{i}, a{i})", "c{i}"),
    ("program t{i}(y{i}) {{\n  return logp(Normal(0.0, 1.0), y{i})\n}}\n"
     "program p{i}() {{\n  y{i} ~ Normal({s}, 1.0) @reparam\n  return y{i}\n}}\n"
     "let q{i} = normalize(t{i}, p{i}, particles={m}, name=\"n{i}\")\na{i} ~ q{i}\nlet c{i} = t{i}(a{i}) - logp(q{i}, a{i})", "c{i}"),
    ("program j{i}() {{\n  y{i} ~ Normal({s}, 1.0) @reparam\n  return y{i}\n}}\n"
     "program r{i}(w) {{\n  return w\n}}\nlet q{i} = marginal(j{i}, proposal=r{i})\na{i} ~ q{i}", "a{i}"),
]


@st.composite
def _distribution(draw, names, depth=0):
    family, arity, keywords = draw(st.sampled_from(_DISTRIBUTIONS))
    keywords = keywords.split(",") if keywords else [""] * arity
    count = arity - 1 if _rare(draw, 5) else arity
    args = ", ".join(k + draw(_expressions(names, depth + 1)) for k in keywords[:count])
    return f"{family}({args}){draw(st.sampled_from(_METHODS))}"


# Random choices that apply: (family, arguments over a scalar {s}, strategies that fit it).
_WELL_FORMED = [
    ("Normal", "{s}, exp({t})", ["", "@reparam", "@reinforce", "@mvd", "@reinforce(baseline=0.5)",
                                 "@reinforce(baseline={P}, learn=true)"]),
    ("Bernoulli", "logits={s}", ["", "@enum", "@mvd", "@reinforce", "@gumbel_softmax(temperature=0.5)",
                                 "@straight_through"]),
    ("Categorical", "logits=[{s}, 0.0, {t}]", ["", "@enum", "@mvd", "@reinforce"]),
    ("Poisson", "exp({s})", ["", "@reinforce", "@mvd"]),
    ("Gamma", "exp({s}), 2.0", ["", "@reparam", "@reinforce"]),
    ("Normal", "{s}, 1.0).expand([2]).to_event(1", ["", "@reparam", "@reinforce"]),
]


@st.composite
def _well_formed_sample(draw, name, scalars, params):
    family, arguments, strategies = draw(st.sampled_from(_WELL_FORMED))
    s, t = (draw(st.sampled_from(scalars or ["0.5"])) for _ in range(2))
    strategy = draw(st.sampled_from(strategies)).format(P=draw(st.sampled_from(params or ["0.5"])))
    return f"{name} ~ {family}({arguments.format(s=s, t=t)}) {strategy}".rstrip()


@st.composite
def _programs(draw):
    """A program from the grammar's constructs: declarations, lets, random choices with
    strategies, an objective. Most statements are well formed (so that programs run); the
    others, a few mistakes of every kind, and sometimes corrupted text."""
    lines, names, params, scalars = [], [], [], []
    if _rare(draw, 10):
        line, name = draw(st.sampled_from(_IMPORTS))
        lines.append(line)
        names.append(name)
    for name in draw(st.lists(st.sampled_from(["mu", "w", "s"]), max_size=3, unique=not _rare(draw, 5))):
        bad_shapes, bad_inits = _rare(draw, 5), _rare(draw, 10)
        shape = draw(st.sampled_from(["", "", "[3]", "[N]", "[2, 3]", *(["[K]", "[0]"] if bad_shapes else [])]))
        kind = "real" if not _rare(draw, 4) else draw(st.sampled_from(["int", "float"]))
        init = draw(st.sampled_from(["", " = 0.5", " = -0.3", " = [0.1, 0.2, 0.3]", *([" = mu"] * bad_inits)]))
        lines.append(f"param {name}: {kind}{shape}{init}")
        names.append(name)
        params.append(name)
        if shape == "" and kind == "real":
            scalars.append(name)
    data = draw(st.lists(st.sampled_from(["x", "k"]), max_size=2, unique=True))
    if any("[N]" in line for line in lines) and "x" not in data and not _rare(draw, 10):
        data.append("x")  # declares the size N
    for name in data:
        shape = "[N]" if name == "x" and "x" not in names else draw(st.sampled_from(["", "[N]", "[3]"]))
        lines.append(f"data {name}: {'real' if name == 'x' else 'int'}{shape}")
        names.append(name)
    for i in range(draw(st.integers(0, 4))):
        if _rare(draw, 5):
            lines.append(draw(st.sampled_from(["", "# a comment", "   ", "let a9 = 1.0 + \\\n  2.0  # more"])))
        well_formed = not _rare(draw, 40)
        if _rare(draw, 15):
            block, value = draw(st.sampled_from(_PROGRAM_BLOCKS))
            m = draw(st.sampled_from(["0", "2", "1", "-1", "mu"]))
            lines.append(block.format(i=i, s=draw(st.sampled_from(scalars or ["0.5"])), m=m))
            scalars.append(value.format(i=i))
            name = value.format(i=i)
        elif draw(st.booleans()):
            name = f"a{i}" if not _rare(draw, 5) else draw(st.sampled_from(["exp", "mu", "a0"]))
            if well_formed and draw(st.booleans()):
                inner = draw(_well_formed_sample("u", scalars, params))
                n = draw(st.sampled_from(["", "(n=2)"]))
                lines.append(f"let {name} = expect{n} {{\n    {inner}\n    return sum(u * 1.0)\n}}")
                scalars.append(name)
            else:
                lines.append(f"let {name} = {draw(_expressions(names))}")
        else:
            name = f"z{i}" if not _rare(draw, 5) else draw(st.sampled_from(["z0", "mu", "e"]))
            if well_formed:
                lines.append(draw(_well_formed_sample(name, scalars, params)))
                scalars.append(f"sum({name} * 1.0)")
            else:
                strategy = draw(st.sampled_from(_STRATEGIES)).format(
                    E=draw(_expressions(names)), P=draw(st.sampled_from(params or ["mu"]))
                )
                lines.append(f"{name} ~ {draw(_distribution(names))} {strategy}".rstrip())
        names.append(name)
    if scalars and not _rare(draw, 40):
        terms = draw(st.lists(st.sampled_from(scalars), min_size=1, max_size=4))
        objective = " + ".join(f"{draw(st.sampled_from(['', '-', 'tanh', 'square']))}({t})" for t in terms)
    else:
        objective = draw(_expressions(names))
        if draw(st.booleans()):
            objective = f"sum({objective})"
    keyword = "return" if _rare(draw, 3) else draw(st.sampled_from(["maximize", "minimize"]))
    lines.append(f"{keyword} {objective}")
    if _rare(draw, 3):
        lines.append("let late = 1.0")
    source = "\n".join(lines) + draw(st.sampled_from(["\n", "\n", "", "\n\n"]))
    if _rare(draw, 3):
        source = source.replace("\n", "\r\n")
    if _rare(draw, 30):  # corruptions: characters deleted, inserted, replaced
        for _ in range(draw(st.integers(1, 3))):
            pos = draw(st.integers(0, len(source)))
            junk = draw(st.sampled_from(_JUNK))
            edit = draw(st.integers(0, 2))
            source = source[:pos] + ("" if edit == 0 else junk) + source[pos + (edit != 1):]
    return source


def _check_located(error: ex.text.TextError, source: str):
    text = str(error)
    lines = text.split("\n")
    assert re.match(rf"^{re.escape(_FUZZ_FILE)}:\d+:\d+: error: \S", lines[0]), text
    assert lines[0].startswith(f"{_FUZZ_FILE}:{error.line}:{error.column}: error: "), text
    if error.message.startswith("syntax error"):
        assert "; expected " in error.message, text
    shown = source.replace("\r\n", "\n").split("\n")
    assert 1 <= error.line <= max(1, len(shown)), text
    if error.text:
        assert lines[1] == "    " + error.text, text
        assert re.fullmatch(r" {4,}\^~*", lines[2]) and lines[2].index("^") == 4 + error.column - 1, text
        assert len(error.text) == len(shown[error.line - 1]), text  # the line the parser meant
    else:
        assert not shown[error.line - 1].strip(), f"no source line shown for a line with text:\n{text}"


def _fuzz_one(source: str):
    """Parse, check, stage and estimate: success, or a located TextError -- nothing else."""
    try:
        prog = ex.text.parse(source, _FUZZ_FILE)
        dims = {"N": 2}
        params, abstract = prog.init_params(dims), prog.abstract_data(dims)
        ex.explain(prog.objective, params, abstract)
        data = {k: jnp.ones(v.shape, v.dtype) for k, v in abstract.items()}
        value = prog.objective.estimate(KEYS[0], params, data)
        assert jnp.shape(value) == ()
    except ex.text.TextError as e:
        _check_located(e, source)


@given(source=_programs())
def test_fuzz_programs_run_or_fail_located(source):
    _fuzz_one(source)


@pytest.mark.slow
@settings(max_examples=250, derandomize=True, deadline=None)
@given(source=_programs())
def test_fuzz_programs_run_or_fail_located_sweep(source):
    _fuzz_one(source)


@pytest.mark.parametrize(
    "source, message",
    [
        ('from "exits.py" import f\nparam mu: real\nminimize mu', "importing 'exits.py' failed: SystemExit"),
        ("param mu: real = Normal(0.0, 1.0)\nminimize mu", "must be a number or an array; got the distribution"),
        ("param mu: real\nminimize " + "-" * 3000 + "mu", "nested too deeply"),
        ("param mu: real\nz ~ Normal(mu, scale=1.0, scale=2.0)\nminimize z", "argument scale= is given twice"),
        ("param mu: real[2]\nminimize mu[5]", "index 5 is out of range for axis 0 of size 2"),
        ("param mu: real[2]\nminimize mu[0, 1]", "2 indices for an array with 1 axes"),
    ],
)
def test_more_mistakes_are_located(source, message, tmp_path, monkeypatch):
    (tmp_path / "exits.py").write_text("raise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ex.text.TextError, match=re.escape(message)):
        prog = ex.text.parse(source, "f.emx")
        prog.objective.estimate(KEYS[0], prog.init_params(), {})


def test_data_and_file_mistakes(tmp_path):
    prog = ex.text.parse("data x: real[N]\nparam mu: real\nminimize mu + sum(x)", "f.emx")
    with pytest.raises(ex.text.TextError, match="data 'x' holds text; it is declared real"):
        prog.validate_data({"x": np.array(["a", "b"])})
    bad = tmp_path / "bad.emx"
    bad.write_bytes(b"param mu: real\n\xff minimize mu\n")
    with pytest.raises(ex.EstimaxError, match=r"bad.emx:2: the file is not UTF-8 text"):
        ex.text.load(bad)


@given(st.text(max_size=300))
def test_random_text_raises_only_estimax_errors(source):
    try:
        prog = ex.text.parse(source, _FUZZ_FILE)
        prog.objective.estimate(KEYS[0], prog.init_params({"N": 2}), {k: jnp.ones(v.shape, v.dtype) for k, v in prog.abstract_data({"N": 2}).items()})
    except ex.text.TextError as e:
        _check_located(e, source)


@given(st.binary(max_size=300))
def test_random_bytes_files_raise_only_estimax_errors(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("bytes") / "random.emx"
    path.write_bytes(blob)
    try:
        ex.text.load(path)
    except ex.EstimaxError:
        pass
