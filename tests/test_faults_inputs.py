"""Faults on the input side, staged for real: objective files that try to run code they were not
asked to (imports), inputs that would exhaust memory or never end (crafted ``.npz`` headers,
huge literals and sizes, FIFOs, ``/dev/zero``), very long sums, and data arrays that no
declaration uses. Each ends in a located message (and no traceback), or in the right answer.
The security cases check that the file a payload would create is not created."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
import types
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import estimax as ex
from estimax.cli import main
from estimax.text import _imports
from estimax.runtime import _jax_compat as compat
from estimax.transforms._rao_blackwell import analyze

ROOT = Path(__file__).resolve().parents[1]


def cmd(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return code, out, err


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def located(err: str, path, line: int, column: int | None = None) -> bool:
    """``err`` starts with ``path:line:column: error:`` and shows the line with a caret."""
    head = f"{path}:{line}:" + (f"{column}:" if column is not None else "")
    return err.startswith(head) and "error:" in err.splitlines()[0] and "\n    " in err and "^" in err


# --- imports: nothing runs that the reader did not ask for -----------------------------------

PAYLOAD = """
from pathlib import Path
Path({marker!r}).write_text("ran")

def f(x):
    return x
"""


@pytest.fixture
def folders(tmp_path):
    """``proj/`` holds the objective; ``elsewhere/evil.py`` writes ``MARKER`` when imported."""
    marker = tmp_path / "MARKER"
    evil = write(tmp_path / "elsewhere" / "evil.py", PAYLOAD.format(marker=str(marker)))
    (tmp_path / "proj").mkdir()
    return types.SimpleNamespace(root=tmp_path, proj=tmp_path / "proj", evil=evil, marker=marker)


def test_a_module_outside_the_allow_list_is_refused_before_it_runs(folders, capsys):
    f = write(folders.proj / "p.emx", f"""
        from os import system
        param m: real = 0.5
        let status = system("touch {folders.marker}")
        minimize m ** 2
        """)
    code, _, err = cmd(capsys, "check", f)
    assert code == 1 and located(err, f, 1, 6), err
    assert "importing from module 'os' is not allowed" in err
    assert "--allow-import os" in err and "allow_imports=['os']" in err
    for command in (["explain", f], ["run", f, "--out", folders.root / "out", "--no-progress"]):
        code, _, err = cmd(capsys, *command)
        assert code == 1 and located(err, f, 1, 6) and "--allow-import os" in err, err
    assert not folders.marker.exists()
    with pytest.raises(ex.text.TextError, match="module 'os' is not allowed"):
        ex.text.load(f)
    assert not folders.marker.exists()


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink"])
def test_a_python_file_outside_the_folder_is_refused(folders, capsys, how):
    target = {"relative": "../elsewhere/evil.py", "absolute": str(folders.evil), "symlink": "link.py"}[how]
    if how == "symlink":
        (folders.proj / "link.py").symlink_to(folders.evil)
    f = write(folders.proj / "p.emx", f"""
        from "{target}" import f
        param m: real = 0.5
        minimize f(m) ** 2
        """)
    code, _, err = cmd(capsys, "check", f)
    assert code == 1 and located(err, f, 1, 6), err
    assert "outside the objective file's folder" in err and "importing a Python file runs it" in err
    assert "--allow-import" in err and "evil.py" in err
    if how == "symlink":
        assert f"a link to {folders.evil}" in err
    assert not folders.marker.exists()


def test_the_opt_in_allows_a_file_or_a_module(folders, capsys, monkeypatch):
    monkeypatch.chdir(folders.root)
    f = write(folders.proj / "p.emx", """
        from "../elsewhere/evil.py" import f
        from operator import neg
        param m: real = 0.5
        minimize neg(f(m)) ** 2
        """)
    code, _, err = cmd(capsys, "check", f, "--allow-import", "elsewhere/evil.py")
    assert code == 1 and "module 'operator' is not allowed" in err  # one opt-in does not allow the other
    code, out, err = cmd(capsys, "explain", f, "--allow-import", "elsewhere", "--allow-import", "operator")
    assert code == 0, err
    assert folders.marker.read_text() == "ran"  # the file ran: it was asked for
    prog = ex.text.load(f, allow_imports=[str(folders.evil), "operator"])
    assert float(prog.objective.estimate(jax.random.PRNGKey(0), prog.init_params(), {})) == 0.25


def test_files_in_the_folder_and_below_it_are_imported(tmp_path, capsys):
    write(tmp_path / "helpers.py", "import jax.numpy as jnp\n\ndef double(x):\n    return 2.0 * x\n")
    write(tmp_path / "lib" / "more.py", "def triple(x):\n    return 3.0 * x\n")
    f = write(tmp_path / "p.emx", """
        from "helpers.py" import double
        from "lib/more.py" import triple
        from jax import numpy as jnp
        from jax.scipy.stats import norm
        from math import sqrt as msqrt
        param m: real = 0.5
        minimize double(m) + triple(m) + jnp.abs(m) + 0.0 * norm.logpdf(m) + msqrt(4.0)
        """)
    code, out, err = cmd(capsys, "check", f)
    assert code == 0, err
    prog = ex.text.load(f)
    assert float(prog.objective.estimate(jax.random.PRNGKey(0), prog.init_params(), {})) == pytest.approx(5.0)


def _denied_pairs():
    pairs = []
    for module in _imports.ALLOWED_MODULES:
        m = __import__(module, fromlist=["_"])
        pairs += [(module, n) for n in sorted(_imports.DENIED_NAMES) if n in vars(m)]
    return pairs


def test_the_deny_list_covers_file_io_in_every_allowed_module(tmp_path):
    """Every public name of an allowed module that reads or writes files (or runs other code) is
    on the deny-list, and importing any of them is refused, under its own name or another."""
    risky = re.compile(r"load|save|file|memmap|txt|regex|datasource|pickle|callback|^test$|^open$", re.I)
    pairs = _denied_pairs()
    assert ("numpy", "load") in pairs and ("jax.numpy", "load") in pairs and ("numpy", "memmap") in pairs
    assert ("numpy", "fromfile") in pairs and ("numpy", "save") in pairs and ("numpy", "test") in pairs
    for module in _imports.ALLOWED_MODULES:
        m = __import__(module, fromlist=["_"])
        for name in dir(m):
            if not name.startswith("_") and risky.search(name) and callable(getattr(m, name)):
                assert name in _imports.DENIED_NAMES, f"{module}.{name} looks like file I/O and is not denied"
    for module, name in pairs:
        with pytest.raises(ex.text.TextError, match=f"importing '{name}' is not allowed"):
            ex.text.parse(f"from {module} import {name} as innocent\nparam m: real\nminimize m", "f.emx")


class _Payload:
    """Unpickled, it creates a folder: what `numpy.load(..., allow_pickle=True)` would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_denied_names_are_refused_under_attribute_access_too(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    np.save(tmp_path / "evil.npy", np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    probe = tmp_path / "PROBE"  # the payload works: loading it with pickles allowed runs it
    np.save(tmp_path / "probe.npy", np.array([_Payload(probe)], dtype=object), allow_pickle=True)
    np.load(tmp_path / "probe.npy", allow_pickle=True)
    assert probe.exists()
    f = write(tmp_path / "p.emx", f"""
        from jax import numpy as jnp
        param m: real = 0.5
        minimize m + sum(jnp.load("{tmp_path / 'evil.npy'}", allow_pickle=true))
        """)
    code, _, err = cmd(capsys, "check", f)
    assert code == 1 and located(err, f, 3, 22), err
    assert "jax.numpy.load reads or writes files" in err and "--allow-import jax.numpy" in err
    f = write(tmp_path / "q.emx", f"""
        from numpy import load
        param m: real = 0.5
        minimize m + sum(load("{tmp_path / 'evil.npy'}", allow_pickle=true))
        """)
    code, _, err = cmd(capsys, "check", f)
    assert code == 1 and located(err, f, 1, 19), err
    assert not marker.exists()


@pytest.mark.parametrize(
    "line, column, message",
    [
        ("from numpy import ctypeslib", 19, "numpy.ctypeslib is the module 'numpy.ctypeslib'"),
        ("from numpy import lib", 19, "is the module 'numpy.lib'"),
        ("from numpy.lib import npyio", 6, "module 'numpy.lib' is not allowed"),
        ("from importlib import import_module", 6, "module 'importlib' is not allowed"),
        ("from builtins import eval", 6, "module 'builtins' is not allowed"),
        ("from subprocess import run", 6, "module 'subprocess' is not allowed"),
        ("from math import __loader__", 18, "is private"),
        ("from numpy import __builtins__", 19, "is private"),
        ("from jax import config", 6, "module 'jax' is not allowed"),
        ("from numpyro.distributions import util", 35, "is the module 'numpyro.distributions.util'"),
    ],
)
def test_modules_private_names_and_other_bypasses_are_refused(line, column, message):
    with pytest.raises(ex.text.TextError) as info:
        ex.text.parse(f"{line}\nparam m: real\nminimize m", "f.emx")
    e = info.value
    assert (e.line, e.column) == (1, column) and message in e.message, str(e)
    assert "--allow-import" in str(e)


def test_relative_imports_are_not_in_the_language():
    with pytest.raises(ex.text.TextError, match="syntax error"):
        ex.text.parse("from .helpers import f\nparam m: real\nminimize m", "f.emx")


def test_a_builtin_reexported_by_an_allowed_module_is_refused(monkeypatch):
    fake = types.ModuleType("estimax_fake_numerics")
    fake.run, fake.sq = eval, lambda x: x * x  # an innocent name for a dangerous built-in
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setattr(_imports, "ALLOWED_MODULES", (*_imports.ALLOWED_MODULES, fake.__name__))
    ex.text.parse(f"from {fake.__name__} import sq\nparam m: real\nminimize sq(m)", "f.emx")
    with pytest.raises(ex.text.TextError, match="Python's built-in 'eval'"):
        ex.text.parse(f"from {fake.__name__} import run\nparam m: real\nminimize m", "f.emx")


# --- long sums, deep nesting -----------------------------------------------------------------


def test_a_sum_of_3000_terms_in_a_file_is_right(tmp_path, capsys):
    f = write(tmp_path / "long.emx", "param m: real = 0.25\nminimize " + " + ".join(["m"] * 3000) + "\n")
    prog = ex.text.load(f)
    assert float(prog.objective.estimate(jax.random.PRNGKey(0), prog.init_params(), {})) == 750.0


def test_a_file_with_1000_sites_summed_checks(tmp_path, capsys):
    lines = ["param m: real = 0.0", *(f"z{i} ~ Normal(m, 1.0)" for i in range(1000))]
    lines.append("minimize " + " + ".join(f"z{i}" for i in range(1000)))
    f = write(tmp_path / "sites.emx", "\n".join(lines) + "\n")
    code, out, err = cmd(capsys, "check", f)
    assert code == 0, err
    assert "z999  1001:1" in out and "certificate: unbiased" in out


def test_deep_nesting_is_located_at_its_statement(tmp_path, capsys):
    f = write(tmp_path / "deep.emx", "param m: real = 0.5\nlet a = m\nminimize " + "-" * 3000 + "m\n")
    code, _, err = cmd(capsys, "check", f)
    assert code == 1 and located(err, f, 3, 1), err
    assert "nested too deeply" in err and "`let`" in err


def test_rao_blackwell_analysis_of_10000_terms():
    def program(theta):
        z = ex.sample(dist.Normal(theta, 1.0), name="z")
        b = ex.sample(dist.Bernoulli(probs=0.3), estimator=ex.reinforce, name="b")
        s = 0.0
        for i in range(10_000):
            s = s + theta * (i % 7)
        return s + z + b

    closed = ex.expectation(program).stage((0.5,))[0]
    costs = analyze(closed.jaxpr)
    masks = {spec.name: m for spec, m in costs.masks.items()}
    assert len(costs.terms) >= 10_002
    assert sum(masks["b"]) == 1 and sum(masks["z"]) == 1 and masks["b"] != masks["z"]


def test_rao_blackwell_of_1000_sites_summed_in_a_loop():
    def program(theta):
        s = 0.0
        for i in range(1000):
            s = s + ex.sample(dist.Bernoulli(logits=theta), estimator=ex.reinforce, name=f"b{i}")
        return s

    closed = ex.expectation(program).stage((0.5,))[0]
    costs = analyze(closed.jaxpr)
    masks = {spec.name: m for spec, m in costs.masks.items()}
    assert len(masks) == 1000 and len(costs.terms) >= 1000
    own = [m.index(True) for m in (masks[f"b{i}"] for i in range(1000)) if sum(m) == 1]
    assert len(own) == 1000 and own == sorted(set(own))  # each site's score meets its own term alone


def test_the_reinforce_estimator_of_many_sites_grows_linearly():
    """Each site's score meets the sum of the terms downstream of it: one dot a site over the
    terms stacked once, not one addition a term a site (which made 100 sites take a minute)."""

    def size(n):
        def program(theta):
            s = 0.0
            for i in range(n):
                s = s + ex.sample(dist.Bernoulli(logits=theta), estimator=ex.reinforce, name=f"b{i}")
            return s

        grad = ex.grad(ex.expectation(program))
        return count(jax.make_jaxpr(grad)(jax.random.PRNGKey(0), 0.3).jaxpr)

    def count(jaxpr):  # every equation, those inside jit and custom rules too
        return sum(1 + sum(count(j) for j in compat.subjaxprs_of(e)) for e in jaxpr.eqns)

    small, large = size(40), size(160)
    assert large < 4.5 * small, (small, large)  # quadratic growth would be about 16 times


# --- sizes, numbers, non-regular files --------------------------------------------------------


def _npz_with_header(path: Path, shape, descr="<f8", payload=b"\0" * 64):
    """An .npz whose array header claims ``shape`` but whose data are ``payload``."""
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": descr, "fortran_order": False, "shape": shape})
    member.write(payload)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", member.getvalue())
    return path


OBJECTIVE = """
data x: real[N]
param m: real = 0.0
minimize (m - mean(x)) ** 2
"""


@pytest.mark.parametrize("command", ["check", "explain-params"])
def test_an_npz_header_claiming_1e11_floats_is_refused_before_allocating(tmp_path, capsys, command):
    f = write(tmp_path / "f.emx", OBJECTIVE)
    huge = _npz_with_header(tmp_path / "huge.npz", (100_000_000_000,))
    argv = ["check", f, "--data", huge] if command == "check" else ["explain", f, "--params", huge]
    code, _, err = cmd(capsys, *argv)
    assert code == 1, err
    assert f"{huge} is damaged: the header of array 'x' says shape (100000000000,) of float64 (745 GiB)" in err
    assert "MemoryError" not in err


def test_arrays_larger_than_memory_are_refused(tmp_path, capsys, monkeypatch):
    f = write(tmp_path / "f.emx", OBJECTIVE)
    np.savez(tmp_path / "d.npz", x=np.zeros(4096))
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 1, "SC_PHYS_PAGES": 10_000}.get(name) or real(name))
    code, _, err = cmd(capsys, "check", f, "--data", tmp_path / "d.npz")
    assert code == 1 and "more than this machine's memory" in err and "'x'" in err, err


@pytest.mark.parametrize(
    "source, line, column, message",
    [
        ("param m: real\nminimize m + " + "7" * 400, 2, 14, "the whole number 777777777777... (400 characters) is too large"),
        ("param m: real\nminimize m + " + "7" * 400 + ".0", 2, 14, "is too large: real numbers are 32-bit floats"),
        ("param m: real\nminimize m + 1e39", 2, 14, "the number 1e39 is too large"),
        ("param m: real[100000000000]\nminimize sum(m)", 1, 15, "the size 100000000000 is too large"),
        ("data x: real[100000000000]\nparam m: real\nminimize m", 1, 14, "the size 100000000000 is too large"),
        ("param m: real[" + "9" * 400 + "]\nminimize sum(m)", 1, 15, "(400 digits) is too large"),
        ("param m: real[50000, 50000]\nminimize sum(m)", 1, 10, "declared with 2500000000 entries"),
        ("param m: real\nminimize m + sum(zeros(100000 * 100000))", 2, 24, "100000 * 100000 is too large"),
    ],
)
def test_huge_numbers_and_sizes_are_located(tmp_path, capsys, source, line, column, message):
    f = write(tmp_path / "f.emx", source + "\n")
    code, _, err = cmd(capsys, "check", f)
    assert code == 1 and located(err, f, line, column), err
    assert message in err


def test_a_named_size_that_makes_a_parameter_huge_is_located(tmp_path, capsys):
    f = write(tmp_path / "f.emx", "data x: real[N]\nparam w: real[N, N]\nminimize sum(w) + sum(x)\n")
    np.savez(tmp_path / "d.npz", x=np.zeros(50_000, np.float32))
    code, _, err = cmd(capsys, "check", f, "--data", tmp_path / "d.npz")
    assert code == 1 and located(err, f, 2, 1), err
    assert "parameter 'w' would have 2500000000 entries (shape (50000, 50000), with N=50000)" in err


def test_a_single_npy_and_an_oversized_file_are_refused(tmp_path, capsys):
    f = write(tmp_path / "f.emx", OBJECTIVE)
    np.save(tmp_path / "one.npy", np.zeros(3))
    code, _, err = cmd(capsys, "check", f, "--data", tmp_path / "one.npy")
    assert code == 1 and "holds a single array (.npy), not named arrays" in err
    big = tmp_path / "big.emx"
    with open(big, "wb") as handle:
        handle.truncate(17 * 2**20)  # sparse: nothing is written
    code, _, err = cmd(capsys, "check", big)
    assert code == 2 and "larger than 16 MiB" in err


def test_unused_data_arrays_are_named_in_a_warning(tmp_path, capsys):
    f = write(tmp_path / "f.emx", OBJECTIVE)
    np.savez(tmp_path / "d.npz", x=np.ones(3), x_test=np.ones(2), labels=np.ones(2))
    code, out, err = cmd(capsys, "check", f, "--data", tmp_path / "d.npz")
    assert code == 0, err
    assert "warning: " in err and "uses: labels, x_test (ignored; declared: x)" in err


FIFO_SCRIPT = """
import os, sys
from estimax.cli import main
import estimax as ex
fifo, dev, objective = sys.argv[1:]
print("file", main(["check", fifo]))
print("data", main(["check", objective, "--data", fifo]))
print("zero", main(["check", dev]))
print("zero-data", main(["check", objective, "--data", dev]))
try:
    ex.text.load(fifo)
except ex.EstimaxError as e:
    print("load", e)
"""


# a platform without FIFOs or /dev/zero (Windows) cannot stage these files at all
@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="needs FIFOs and /dev/zero")
def test_fifos_and_devices_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.emx"
    os.mkfifo(fifo)
    objective = write(tmp_path / "f.emx", OBJECTIVE)
    run = subprocess.run([sys.executable, "-c", FIFO_SCRIPT, str(fifo), "/dev/zero", str(objective)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "Traceback" not in run.stderr, run.stderr
    assert run.stdout.splitlines()[:4] == ["file 2", "data 2", "zero 2", "zero-data 2"], run.stdout + run.stderr
    assert f"{fifo} is a FIFO (named pipe), not an objective file" in run.stderr
    assert f"{fifo} is a FIFO (named pipe), not a data file (.npz)" in run.stderr
    assert "/dev/zero is a device, not an objective file" in run.stderr
    assert f"load {fifo} is a FIFO (named pipe), not an objective file (a regular file)" in run.stdout
