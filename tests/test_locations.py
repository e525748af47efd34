"""Where estimax says things happen.

- Sites, compositions and errors name the user's file and line, wherever that file lives: a
  script under a directory called ``estimax`` (a clone of this repository, or its tests) is
  the user's, and estimax's, JAX's and NumPyro's own files never are.
- A Python ``if`` (or ``int``, ``range``) on a random value is a ``ProgramError`` at the
  user's line that names the random choice and the fix, from every entry point.
- In an objective file every site is located at the statement that draws it: a
  ``marginal``'s reverse-model draws at the reverse model's line, a ``normalize``'s
  resampling index at the `~` that draws from it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import pytest

import estimax as ex
from estimax import cli
from estimax.runtime import _jax_compat as compat

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = ROOT / "examples" / "objectives"
KEY = jax.random.PRNGKey(0)


def _line_of(text: str, marker: str) -> int:
    (line,) = [i + 1 for i, t in enumerate(text.splitlines()) if t.rstrip().endswith(marker)]
    return line


# --- which frames are the user's --------------------------------------------------------------
def test_library_files_are_told_apart_by_package_not_by_name(tmp_path):
    for module in (ex, compat, jax, numpyro, contextlib):
        assert compat.is_library_file(module.__file__), module.__file__
    for path in (
        tmp_path / "estimax" / "examples" / "user.py",
        tmp_path / "estimax" / "tests" / "test_user.py",
        tmp_path / "jax" / "numpyro" / "user.py",
        ROOT / "examples" / "ebm_ring.py",
        Path(__file__),
    ):
        assert not compat.is_library_file(str(path)), path
    assert not compat.is_library_file("<string>") and not compat.is_library_file("<stdin>")
    assert compat.is_library_file("<frozen runpy>")


# --- a user's script under a directory named `estimax` ---------------------------------------
USER_SCRIPT = '''\
import jax.numpy as jnp
import numpyro.distributions as dist
import estimax as ex


@ex.expectation
def nested(m):
    z = ex.sample(dist.Normal(m, 1.0), name="z")  # SITE-Z
    y = ex.expect(lambda: ex.sample(dist.Normal(z, 1.0), name="w"), n=2, name="inner")()  # EXPECT
    return jnp.log(jnp.abs(y) + 1.0)  # LOG


@ex.expectation
def chained(m):
    a = ex.expect(lambda: ex.sample(dist.Normal(m, 1.0), name="u"), name="first")()
    return ex.expect(lambda t: ex.sample(dist.Normal(t, 1.0), name="v"), name="second")(a)  # CHAINED


def joint(p):
    u = ex.sample(dist.Normal(0.0, 1.0), name="u")  # JOINT-U
    return ex.sample(dist.Normal(u, 1.0), name="z")  # JOINT-Z


def reverse(kept, p):
    return ex.sample(dist.Normal(kept["z"], 1.0), name="u")  # REVERSE-U


q = ex.marginal(joint, keep="z", proposal=reverse, particles=2)


@ex.expectation
def hierarchical(p):
    z, log_q = q.draw(p)
    return -log_q


def proposal(p):
    return ex.sample(dist.Normal(p, 1.0), name="z")  # PROPOSAL-Z


r = ex.normalize(ex.objectives.LogJoint(lambda latents, p: -0.5 * latents["z"] ** 2), proposal, particles=3)


@ex.expectation
def resampled(p):
    z, log_r = r.draw(p)  # DRAW-R
    return -log_r


@ex.expectation
def duplicate(m):
    z = ex.sample(dist.Normal(m, 1.0), name="z")  # FIRST-Z
    return z + ex.sample(dist.Normal(m, 1.0), name="z")  # SECOND-Z


@ex.expectation
def branches(m):
    z = ex.sample(dist.Normal(m, 1.0), name="z")
    if z > 0:  # IF-Z
        return z
    return -z
'''


@pytest.fixture(scope="module", params=["examples", "tests"])
def user(request, tmp_path_factory):
    """The script, imported from ``<tmp>/estimax/<examples or tests>/user.py``."""
    folder = tmp_path_factory.mktemp("clone") / "estimax" / request.param
    folder.mkdir(parents=True)
    path = folder / "user.py"
    path.write_text(USER_SCRIPT)
    spec = importlib.util.spec_from_file_location(f"estimax_user_{request.param}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.at = lambda marker: f"{path}:{_line_of(USER_SCRIPT, marker)}"
    assert f"{os.sep}estimax{os.sep}" in str(path)
    return module


def test_sites_and_compositions_name_the_users_line(user):
    plan = ex.explain(user.nested, 0.3)
    assert plan.site("z").location == user.at("# SITE-Z")
    assert plan.site("inner/w").location == user.at("# EXPECT")
    assert [where for _, _, where in plan.compositions] == [user.at("# EXPECT")]
    assert f"`log` applied to ex.expect('inner') (at {user.at('# LOG')})" in str(plan.certificate)
    # an equation estimax binds for the user (an ex.expect) is located at the user's call
    plan = ex.explain(user.chained, 0.3)
    assert f"ex.expect('second') depend on ex.expect('first') (at {user.at('# CHAINED')})" in str(plan.certificate)


def test_marginal_and_normalize_sites_name_the_users_line(user):
    plan = ex.explain(user.hierarchical, 0.3)
    assert {s.name: s.location for s in plan.sites} == {
        "u": user.at("# JOINT-U"), "z": user.at("# JOINT-Z"), "marginal/u": user.at("# REVERSE-U")}
    plan = ex.explain(user.resampled, 0.3)
    assert {s.name: s.location for s in plan.sites} == {
        "normalize/z": user.at("# PROPOSAL-Z"), "normalize/index": user.at("# DRAW-R")}


def test_errors_name_the_users_line(user):
    with pytest.raises(ex.ProgramError) as e:
        ex.explain(user.duplicate, 0.3)
    assert f"(at {user.at('# FIRST-Z')} and {user.at('# SECOND-Z')})" in str(e.value)
    with pytest.raises(ex.ProgramError, match=re.escape(f"`if z > 0:` (at {user.at('# IF-Z')})")):
        ex.grad(user.branches)(KEY, 0.3)


# --- Python control flow on a random value ------------------------------------------------------
HERE = Path(__file__).read_text()


@ex.expectation
def branch_on_z(m):
    z = ex.sample(dist.Normal(m, 1.0), name="z")
    if z > 0:  # BRANCH-ON-Z
        return z
    return -z


@pytest.mark.parametrize("entry", ["estimate", "grad", "explain"])
def test_if_on_a_random_value_is_a_program_error_at_the_users_line(entry):
    call = {
        "estimate": lambda: branch_on_z.estimate(KEY, 0.3),
        "grad": lambda: ex.grad(branch_on_z)(KEY, 0.3),
        "explain": lambda: ex.explain(branch_on_z, 0.3),
    }[entry]
    with pytest.raises(ex.ProgramError) as e:
        call()
    message = str(e.value)
    assert message.startswith(f"program 'branch_on_z': `if z > 0:` (at {__file__}:{_line_of(HERE, '# BRANCH-ON-Z')}) "
                              "uses a traced value as a Python bool."), message
    if compat.records_origins():  # else this JAX does not say where a traced value came from
        assert "random choice 'z'" in message and "ex.sample are traced arrays" in message
    assert "jax.lax.cond(pred, " in message and "jnp.where(pred, a, b)" in message
    assert isinstance(e.value.__cause__, jax.errors.TracerBoolConversionError)


@ex.expectation
def count_from_n(m):
    n = ex.sample(dist.Poisson(3.0), name="n")
    total = 0.0
    for _ in range(int(n)):  # INT-OF-N
        total = total + m
    return total


@ex.expectation
def derived_in_lanes(m):
    zs = ex.vmap(lambda: ex.sample(dist.Normal(m, 1.0), name="lane_z"), axis_size=3)()

    def fold(z):
        w = 2.0 * z + 1.0
        return w if w > 0 else -w  # DERIVED

    return jnp.sum(ex.vmap(fold)(zs))


@ex.expectation
def branch_on_argument(m):
    if m > 0:  # ARGUMENT
        return ex.sample(dist.Normal(m, 1.0), name="z")
    return m


@ex.expectation
def branch_inside_expect(m):
    def inner():
        u = ex.sample(dist.Normal(m, 1.0), name="u")
        return u if u > 0 else 0.0 * u  # IN-EXPECT

    return ex.expect(inner, n=2, name="positive")()


@pytest.mark.parametrize("program, marker, expected, cause", [
    (count_from_n, "# INT-OF-N", ["program 'count_from_n'", "as a Python int", "random choice 'n'",
                                   "jax.lax.fori_loop"], jax.errors.ConcretizationTypeError),
    (derived_in_lanes, "# DERIVED", ["as a Python bool", "random choice 'lane_z'", "jnp.where"],
     jax.errors.TracerBoolConversionError),
    (branch_on_argument, "# ARGUMENT", ["as a Python bool", "its arguments", "jax.lax.cond"],
     jax.errors.TracerBoolConversionError),
    (branch_inside_expect, "# IN-EXPECT", ["ex.expect('positive')", "random choice 'u'"],
     jax.errors.TracerBoolConversionError),
], ids=["int", "derived-in-vmap", "argument", "in-expect"])
def test_traced_values_used_as_python_values(program, marker, expected, cause):
    with pytest.raises(ex.ProgramError) as e:
        ex.grad(program)(KEY, 0.3)
    message = str(e.value)
    assert f"(at {__file__}:{_line_of(HERE, marker)})" in message, message
    for fragment in expected:
        if fragment.startswith("random choice") and not compat.records_origins():
            continue  # this JAX does not record where a traced value came from: the line only
        assert fragment in message, (fragment, message)
    if program is branch_on_argument:
        assert "random choice" not in message
    assert isinstance(e.value.__cause__, cause)


# --- objective files ----------------------------------------------------------------------------
def _explain_file(path):
    program = ex.text.load(path)
    dims = {"N": 2}
    data = {k: jnp.zeros(v.shape, v.dtype) for k, v in program.abstract_data(dims).items()}
    return program, ex.explain(program.objective, program.init_params(dims), data)


def _line_starting(path, start: str, nth: int = 0) -> int:
    lines = [i + 1 for i, t in enumerate(Path(path).read_text().splitlines()) if t.strip().startswith(start)]
    return lines[nth]


def test_marginal_sites_are_at_the_statements_that_draw_them(capsys):
    path = OBJECTIVES / "hierarchical.emx"
    joint_u, reverse_u = _line_starting(path, "u ~", 0), _line_starting(path, "u ~", 1)
    joint_z = _line_starting(path, "z ~ Normal")
    program, plan = _explain_file(path)
    expected = {"u": joint_u, "z": joint_z, "marginal/u": reverse_u}
    assert {s.name: s.location for s in plan.sites} == {k: f"hierarchical.emx:{v}" for k, v in expected.items()}
    assert {k: program.sites[k] for k in expected} == {k: (v, 3) for k, v in expected.items()}
    assert cli.main(["explain", str(path)]) == 0
    out = capsys.readouterr().out
    for name, line in expected.items():
        assert re.search(rf"^{re.escape(name)}\s+{line}:3\s", out, re.M), (name, out)


def test_normalize_sites_are_at_the_statements_that_draw_them():
    path = OBJECTIVES / "resampling.emx"
    proposal_z, draw = _line_starting(path, "z ~ Normal"), _line_starting(path, "z ~ q")
    program, plan = _explain_file(path)
    assert {s.name: s.location for s in plan.sites} == {
        "normalize/z": f"resampling.emx:{proposal_z}", "normalize/index": f"resampling.emx:{draw}"}
    assert program.sites["normalize/z"] == (proposal_z, 3)
    assert program.sites["normalize/index"] == (draw, 1)
    table = cli._plan_table(program, plan)
    assert re.search(rf"^normalize/index\s+{draw}:1\s", table, re.M), table


MARGINAL_ENUM = """\
data x: real[N]
param a: real = 0.5

program joint() {
  u ~ Categorical(logits=zeros(40)) @enum
  z ~ Normal(a * float(u), 1.0) @reparam
  return z
}

program reverse(z) {
  u ~ Categorical(logits=zeros(40)) @enum
  return u
}

let q = marginal(joint, proposal=reverse, particles=6)
z ~ q
maximize logp(Normal(z, 1.0), x) - logp(q, z)
"""


def test_an_error_about_a_reverse_model_site_points_at_the_reverse_model(tmp_path):
    path = tmp_path / "enum.emx"
    path.write_text(MARGINAL_ENUM)
    with pytest.raises(ex.text.TextError) as e:
        _explain_file(path)
    assert "site 'marginal/u'" in e.value.message
    assert (e.value.line, e.value.text.strip()) == (11, "u ~ Categorical(logits=zeros(40)) @enum")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        assert cli.main(["check", str(path)]) != 0
    assert f"{path}:11:" in err.getvalue()
