"""Progress displays: a resumed run's bar starts at its step, a rate counts only the steps run
in this process (a finished run shows none), and nothing but plain lines -- no carriage
returns -- goes to a log or a pipe."""

import io
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import estimax as ex
from estimax.runtime import _progress


def quadratic(p):
    return jnp.sum((p - 1.0) ** 2)


SGD = optax.sgd(0.1)


def states(text: str) -> list[str]:
    """The successive states of a display rewritten in place with carriage returns."""
    return [s for s in text.replace("\n", "\r").split("\r") if s.strip()]


def test_a_resumed_tqdm_bar_starts_at_its_step_without_a_rate():
    tqdm = pytest.importorskip("tqdm").tqdm
    out = io.StringIO()
    bar = _progress.TqdmBar(tqdm, 1000, "fit x", initial=300, file=out)
    first = states(out.getvalue())[0]
    assert "300/1000" in first and "?step/s" in first, first  # no rate before a step runs here
    bar.show(400, average=1.5)
    bar.close()
    last = states(out.getvalue())[-1]
    assert "400/1000" in last and "objective=1.5" in last
    assert all(int(re.search(r"(\d+)/1000", s).group(1)) >= 300 for s in states(out.getvalue()))  # never from 0


def test_a_resumed_line_counts_the_steps_run_here(capsys, monkeypatch):
    clock = iter([0.0, 10.0, 10.0])  # the display's own clock: created, then each line
    monkeypatch.setattr(_progress, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    line = _progress.LinePrinter(1000, "fit x", initial=300)
    line.show(300)
    line.show(400)
    shown = states(capsys.readouterr().err)
    assert shown[0].strip() == "fit x: 300/1000 steps"  # resumed: no rate yet
    assert "400/1000 steps (10 steps/s)" in shown[1]  # 100 steps in 10 s, not 400


def test_log_lines_are_plain_rare_and_end_with_the_state():
    out = io.StringIO()
    log = _progress.LogLines(100, "fit x", initial=40, file=out, interval=3600.0)
    for step in range(41, 101):
        log.show(step, average=0.25)
    assert out.getvalue() == ""  # at most one line an hour here
    log.close("stopped by callback")
    text = out.getvalue()
    assert "\r" not in text and text.count("\n") == 1
    assert text.startswith("fit x: step 100/100 (100%), ") and "steps/s, objective=0.25 [stopped by callback]" in text
    every = io.StringIO()
    log = _progress.LogLines(100, "fit x", initial=100, file=every, interval=0.0)
    log.close()
    assert every.getvalue() == "fit x: step 100/100 (100%)\n"  # no step run here: no rate


def test_fit_resumed_shows_its_bar_from_the_resumed_step_and_a_finished_run_none(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(_progress, "interactive", lambda: True)  # as on a terminal
    run = dict(optimizer=SGD, key=jax.random.key(0), chunk=10, progress=True, checkpoint=tmp_path / "run")
    ex.fit(quadratic, jnp.array([5.0]), steps=100, **run)
    capsys.readouterr()
    ex.fit(quadratic, jnp.array([5.0]), steps=200, **run)
    shown = states(capsys.readouterr().err)
    assert "100/200" in shown[0] and "?step/s" in shown[0], shown[0]
    assert "200/200" in shown[-1]
    ex.fit(quadratic, jnp.array([5.0]), steps=200, **run)  # holds all its steps: runs none, shows nothing
    assert capsys.readouterr().err == ""


def test_default_progress_writes_nothing_to_a_log_and_asked_for_writes_lines(capsys):
    ex.fit(quadratic, jnp.array([5.0]), optimizer=SGD, steps=30, key=jax.random.key(0), chunk=10)
    assert capsys.readouterr().err == ""
    ex.fit(quadratic, jnp.array([5.0]), optimizer=SGD, steps=30, key=jax.random.key(0), chunk=10, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n") and "step 30/30 (100%)" in err


def test_solve_progress_in_a_log_is_plain_lines(capsys):
    def program(x):
        ex.subject_to(eq=jnp.sum(x**2) - 1.0, name="sphere")
        return jnp.sum(x * jnp.arange(1.0, 4.0))

    solution = ex.solve(program, jnp.ones(3), solver=ex.solvers.AugmentedLagrangian(), max_steps=40, progress=True,
                        every=2)
    out = capsys.readouterr().out
    assert "\r" not in out and out.endswith("\n")
    last = out.splitlines()[-1]
    assert last.startswith("program: step ") and int(last.split()[2]) <= solution.steps
    assert np.isfinite(float(last.split()[-1]))
