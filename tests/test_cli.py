"""The ``estimax`` command: check, explain, run (checkpoints, resume, signals), demo, and
that no bad input reaches the user as a Python traceback."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from estimax.runtime._checkpoint import read_record
import pytest

from estimax.cli import _plan as cli  # check and explain: its _stage is patched below
from estimax.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "objectives"
DEMO = ROOT / "src" / "estimax" / "text" / "demos" / "mixture.emx"
DOC = ROOT / "docs" / "objective-language.md"


def cmd(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return code, out, err


def write(tmp_path, text: str, name: str = "objective.emx") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def on_cpu():
    """Runs compared bit for bit are pinned to the CPU (as the subprocess is)."""
    return jax.default_device(jax.devices("cpu")[0])


# --- check and explain -----------------------------------------------------------------------


def test_check_prints_the_plan_and_certificate(capsys):
    code, out, err = cmd(capsys, "check", EXAMPLES / "gaussian_mean.emx")
    assert code == 0, err
    assert "ok: maximize\n  parameters m: real, log_s: real\n  data x: real[N]" in out
    assert "estimator plan for gaussian_mean.emx" in out
    assert re.search(r"^z\s+14:1\s+Normal\s+reparam", out, re.MULTILINE)
    assert out.rstrip().endswith("certificate: unbiased")


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.emx")) + [DEMO], ids=lambda p: p.name)
def test_every_example_passes_check(path, capsys):
    code, out, err = cmd(capsys, "check", path)
    assert code == 0, err
    assert "certificate:" in out


def test_check_takes_the_sizes_from_data(capsys, data):
    code, out, _ = cmd(capsys, "check", EXAMPLES / "regression.emx", "--data", data["regression"])
    assert code == 0
    assert "sizes D=3, N=50" in out and "Normal(event=(3,))" in out
    code, out, _ = cmd(capsys, "check", EXAMPLES / "regression.emx")
    assert code == 0 and "sizes D=2, N=2 (a default" in out


def test_explain_measures_the_variance_per_site(tmp_path, capsys):
    path = write(
        tmp_path,
        "param mu: real = 0.5\nparam l: real = 0.0\n"
        "z ~ Normal(mu, 1.0)\nb ~ Bernoulli(logits=l) @mvd\n"
        "minimize (z - 1.0) ** 2 + float(b)\n",
    )
    code, out, err = cmd(capsys, "explain", path, "--variance", "--seed", "1")
    assert code == 0, err
    assert re.search(r"^z\s+3:1\s+Normal\s+reparam.*\d ± \d", out, re.MULTILINE)
    assert re.search(r"^b\s+4:1\s+Bernoulli\s+mvd.*\d ± \d", out, re.MULTILINE)
    assert "total gradient variance" in out and "certificate: unbiased" in out


def test_check_says_a_site_without_parameters_needs_no_gradient(tmp_path, capsys):
    path = write(tmp_path, "param mu: real = 0.5\nz ~ Normal(mu, 1.0)\neps ~ Normal(0.0, 1.0)\n"
                           "minimize (z - 1.0) ** 2 + eps\n")
    code, out, err = cmd(capsys, "check", path)
    assert code == 0, err
    assert re.search(r"^z\s+2:1\s+Normal\s+reparam", out, re.MULTILINE)
    assert re.search(r"^eps\s+3:1\s+Normal\s+none\s+no parameters: no gradient", out, re.MULTILINE)
    assert out.rstrip().endswith("certificate: unbiased")


def test_explain_at_learned_parameters(tmp_path, capsys, data):
    np.savez(tmp_path / "params.npz", m=np.float32(1.2), log_s=np.float32(-1.0))
    code, out, err = cmd(
        capsys, "explain", EXAMPLES / "gaussian_mean.emx", "--params", tmp_path / "params.npz"
    )
    assert code == 0, err
    assert "parameters from" in out
    np.savez(tmp_path / "wrong.npz", m=np.zeros(3, np.float32), log_s=np.float32(-1.0))
    code, _, err = cmd(capsys, "explain", EXAMPLES / "gaussian_mean.emx", "--params", tmp_path / "wrong.npz")
    assert code == 1 and "'m' has shape [3]; expected []" in err


# --- errors ----------------------------------------------------------------------------------


def test_syntax_error_has_location_caret_and_expected(tmp_path, capsys):
    path = write(tmp_path, "param mu: real = 0.5\nz ~ Normal(mu, 1.0\nminimize z\n")
    code, out, err = cmd(capsys, "check", path)
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert lines[0] == f"{path}:2:19: error: syntax error: unexpected end of line; expected ')' or ','"
    assert lines[1] == "    z ~ Normal(mu, 1.0"
    assert lines[2] == "    " + " " * 18 + "^"


def test_semantic_error_has_location_and_caret(tmp_path, capsys):
    path = write(tmp_path, "param mu: real = 0.5\nz ~ Normal(mu, 1.0)\nminimize (z - y) ** 2\n")
    code, _, err = cmd(capsys, "check", path)
    assert code == 1
    assert err.splitlines()[:3] == [
        f"{path}:3:15: error: unknown name 'y'",
        "    minimize (z - y) ** 2",
        "                  ^",
    ]


def test_error_of_a_strategy_points_at_the_site(tmp_path, capsys):
    path = write(tmp_path, "param l: real = 0.5\nb ~ Bernoulli(logits=l) @reparam\nminimize float(b)\n")
    code, _, err = cmd(capsys, "check", path)
    assert code == 1
    assert err.startswith(f"{path}:2:") and "site 'b'" in err and "^" in err


def test_estimax_error_naming_a_site_points_at_it(tmp_path, monkeypatch, capsys):
    # an error of a pass that the front-end did not locate, naming a site (nested sites are
    # named "expect/<name>")
    from estimax import ProgramError

    def fail(*args, **kwargs):
        raise ProgramError("the site 'expect/z' is wrong somehow.\nA second line.")

    monkeypatch.setattr(cli, "_stage", fail)
    path = write(
        tmp_path,
        "param mu: real = 0.5\nlet a = expect(n=2) {\n  z ~ Normal(mu, 1.0)\n  return z\n}\nminimize a\n",
    )
    code, _, err = cmd(capsys, "check", path)
    assert code == 1
    assert err.splitlines() == [
        f"{path}:3:3: error: the site 'expect/z' is wrong somehow.",
        "      z ~ Normal(mu, 1.0)",
        "      ^",
        "A second line.",
    ]


def test_estimax_error_without_a_site_names_the_file(monkeypatch, capsys):
    from estimax import ProgramError

    def fail(*args, **kwargs):
        raise ProgramError("something about the program\n\nover two lines")

    monkeypatch.setattr(cli, "_stage", fail)
    path = EXAMPLES / "gaussian_mean.emx"
    code, _, err = cmd(capsys, "check", path)
    assert code == 1
    assert err == f"{path}: error: something about the program\nover two lines\n"


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("missing file", 2, "no such file: "),
        ("directory", 2, "is a directory"),
        ("not utf-8", 1, "the file is not UTF-8 text"),
        ("missing data file", 2, "no such data file"),
        ("not an npz", 1, "is not a .npz file"),
        ("a .npy file", 1, "holds a single array (.npy)"),
        ("missing array", 1, "error: no data given for 'x'"),
        ("wrong shape", 1, "error: data 'x' is declared with 1 axes"),
        ("strings", 1, "error: data 'x' holds <U1 values"),
        ("no --data", 2, "declares data (x: real[N]); pass it with --data"),
        ("bad option", 2, "--steps: expected a number >= 1"),
        ("bad optimizer", 2, "invalid choice: 'lbfgs'"),
    ],
)
def test_bad_input_is_a_message_and_an_exit_status(case, code, message, tmp_path, capsys):
    objective = EXAMPLES / "gaussian_mean.emx"
    npz = tmp_path / "data.npz"
    argv = ["check", objective, "--data", npz]
    if case == "missing file":
        argv = ["check", tmp_path / "nope.emx"]
    elif case == "directory":
        argv = ["check", tmp_path]
    elif case == "not utf-8":
        (tmp_path / "binary.emx").write_bytes(b"param mu: real = 0.5\n\xff\xfe\n")
        argv = ["check", tmp_path / "binary.emx"]
    elif case == "missing data file":
        pass
    elif case == "not an npz":
        npz.write_text("x = 1, 2, 3\n")
    elif case == "a .npy file":
        with open(npz, "wb") as f:
            np.save(f, np.ones(3))
    elif case == "missing array":
        np.savez(npz, y=np.ones(3))
    elif case == "wrong shape":
        np.savez(npz, x=np.ones((3, 2)))
    elif case == "strings":
        np.savez(npz, x=np.array(["a", "b"]))
    elif case == "no --data":
        argv = ["run", objective, "--out", tmp_path]
    elif case == "bad option":
        argv = ["run", objective, "--steps", "0"]
    elif case == "bad optimizer":
        argv = ["run", objective, "--optimizer", "lbfgs"]
    got, _, err = cmd(capsys, *argv)
    assert got == code, err
    assert message in err
    if case in ("missing array", "wrong shape", "strings"):  # at the declaration, with a caret
        line = (
            objective.read_text()
            .splitlines()
            .index("data x: real[N]                      # N is read off the data")
            + 1
        )
        assert err.startswith(f"{objective}:{line}:1: error:") and "\n    data x: real[N]  " in err
        assert f"(the data come from {npz})" in err


def test_internal_error_is_one_line_and_debug_shows_it(monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "_stage", fail)
    path = EXAMPLES / "gaussian_mean.emx"
    code, _, err = cmd(capsys, "check", path)
    assert code == 3
    assert err.startswith("estimax: internal error: RuntimeError: boom") and len(err.splitlines()) == 1
    with pytest.raises(RuntimeError, match="boom"):
        main(["check", str(path), "--debug"])
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", "check", str(path)])


def test_keyboard_interrupt_exits_130(monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_stage", interrupt)
    code, _, err = cmd(capsys, "check", EXAMPLES / "gaussian_mean.emx")
    assert code == 130 and "interrupted" in err


# --- run -------------------------------------------------------------------------------------


def run_args(data, out, steps, *extra):
    return (
        "run",
        EXAMPLES / "gaussian_mean.emx",
        "--data",
        data["gaussian_mean"],
        "--steps",
        steps,
        "--chunk",
        10,
        "--lr",
        0.05,
        "--out",
        out,
        "--no-progress",
        *extra,
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data) -> tuple[Path, str]:
    """The folder of a finished 30-step run of gaussian_mean.emx (tests copy it to change
    it), and what the run printed."""
    out = tmp_path_factory.mktemp("run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([str(a) for a in run_args(data, out, 30)]) == 0
    return out, printed.getvalue()


def test_run_writes_parameters_history_and_plot(finished_run):
    out, printed = finished_run
    params = np.load(out / "params.npz")
    assert sorted(params.files) == ["log_s", "m"] and params["m"].shape == ()
    assert np.load(out / "history.npy").shape == (30,)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = read_record(out / "checkpoint")  # the whole run, through orbax (estimax.fit's checkpoint)
    assert record["step"] == 30 and record["optimizer"] == "adam" and record["format"] == "estimax-fit/2"
    assert (out / "checkpoint" / "30" / "state").is_dir()
    # and says what it did
    assert (
        "estimator plan for gaussian_mean.emx" in printed and "training: 30 steps of adam(lr=0.05)" in printed
    )
    assert "learned parameters:\n  m = " in printed and "\n  log_s = " in printed
    assert f"wrote {out / 'params.npz'}, {out / 'history.npy'}, {out / 'loss.png'}" in printed


def test_run_refuses_a_checkpoint_of_another_run(finished_run, capsys, data):
    finished_run, _ = finished_run
    code, _, err = cmd(capsys, *run_args(data, finished_run, 40, "--optimizer", "sgd"))
    assert code == 1 and "another optimizer 'adam' (now 'sgd')" in err and "--fresh" in err
    code, _, err = cmd(capsys, *run_args(data, finished_run, 40, "--seed", "3"))
    assert code == 1 and "another seed 0 (now 3)" in err
    code, _, err = cmd(capsys, *run_args(data, finished_run, 5))
    assert code == 1 and "already holds 30 steps, more than --steps 5" in err
    other = EXAMPLES / "minimize.emx"
    code, _, err = cmd(capsys, "run", other, "--out", finished_run, "--steps", 20)
    assert (
        code == 1
        and "was written for other parameters (m[], log_s[]); minimize.emx declares aim[2], log_spread[]"
        in err
    )
    np.savez(finished_run / "other.npz", x=np.ones(20, np.float32))
    code, _, err = cmd(capsys, *run_args({"gaussian_mean": finished_run / "other.npz"}, finished_run, 40))
    assert code == 1 and "was written by a run on other data" in err
    assert read_record(finished_run / "checkpoint")["step"] == 30  # untouched


def test_run_without_data_and_fresh(finished_run, tmp_path, capsys):
    # a file without `data` needs no --data; --fresh replaces the checkpoint of another run
    shutil.copytree(finished_run[0], tmp_path / "out")
    code, out, err = cmd(
        capsys,
        "run",
        EXAMPLES / "minimize.emx",
        "--steps",
        10,
        "--chunk",
        5,
        "--out",
        tmp_path / "out",
        "--no-progress",
        "--fresh",
    )
    assert code == 0, err
    assert "resuming" not in out
    assert sorted(np.load(tmp_path / "out" / "params.npz").files) == ["aim", "log_spread"]
    assert np.load(tmp_path / "out" / "history.npy").shape == (10,)


def _subprocess_env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT / "src"))


def test_interrupted_run_resumes_to_the_same_parameters(tmp_path, capsys, data):
    # The first run is asked for far more steps than it will get: SIGINT stops it once its
    # first checkpoint is on disk. Step i draws the i-th key whatever the total, so the
    # resumed run, finishing at `total` steps, must match a run of `total` steps exactly.
    out = tmp_path / "interrupted"
    # with progress asked for: stderr is a pipe, so plain lines (and one when interrupted)
    argv = [str(a) for a in run_args(data, out, 100_000) if a != "--no-progress"] + ["--progress"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "estimax", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_subprocess_env(),
    )
    checkpoint = out / "checkpoint"
    deadline = time.monotonic() + 120
    while read_record(checkpoint) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted at step" in stderr
    assert "\r" not in stderr and "steps/s" in stderr and "[interrupted after" in stderr  # no bar redrawn in a pipe
    stopped = read_record(checkpoint)["step"]
    assert 0 < stopped < 100_000 and stopped % 10 == 0
    assert not (out / "params.npz").exists()

    total = stopped + 30
    with on_cpu():
        code, resumed, err = cmd(capsys, *run_args(data, out, total))
        assert code == 0, err
        assert f"resuming from {checkpoint} at step {stopped} of {total}" in resumed
        code, _, err = cmd(capsys, *run_args(data, tmp_path / "whole", total))
        assert code == 0, err
    whole, parts = np.load(tmp_path / "whole" / "params.npz"), np.load(out / "params.npz")
    for name in whole.files:
        np.testing.assert_array_equal(whole[name], parts[name])
    np.testing.assert_array_equal(np.load(tmp_path / "whole" / "history.npy"), np.load(out / "history.npy"))


def test_progress_in_a_log_or_a_pipe(tmp_path, capsys, data):
    """stderr is not a terminal (captured here, as in a file or a pipe): no bar by default;
    --progress writes plain lines, never a carriage return; a run that holds all its steps
    shows nothing (no bar, no rate); a resumed one counts from its step."""
    args = [a for a in run_args(data, tmp_path, 30) if a != "--no-progress"]
    code, _, err = cmd(capsys, *args)
    assert code == 0 and err == ""
    code, out, err = cmd(capsys, *args, "--progress")
    assert code == 0 and "already holds all 30 steps" in out and err == ""
    code, out, err = cmd(capsys, *[50 if a == 30 else a for a in args], "--progress")
    assert code == 0 and "resuming from" in out
    assert "\r" not in err and err.endswith("\n") and "step 50/50 (100%), " in err and "steps/s" in err
    code, _, err = cmd(capsys, *args, "--progress", "--no-progress")
    assert code == 2 and "not allowed with argument" in err


def test_run_average_reaches_the_optimum_stated_in_gaussian_mean(tmp_path, capsys, data):
    """The command documented in gaussian_mean.emx: Adam at lr 0.05 ends with its last
    iterate's m about 7% from sum(x) / (N + 1); the mean of the second half's iterates is within
    1% (three times the 0.35% spread of the averaged m over seeds). The scale's mean carries
    more noise (2.6% over seeds: log_s moves slowly), hence 8% for it."""
    args = ("run", EXAMPLES / "gaussian_mean.emx", "--data", data["gaussian_mean"], "--steps", 2000, "--lr", 0.05,
            "--out", tmp_path, "--no-progress")
    code, out, err = cmd(capsys, *args, "--average", 0.5)
    assert code == 0, err
    said = "learned parameters: the mean of the iterates of the last 1000 steps (--average 0.5; the last iterate: m = "
    assert said in out
    x = np.load(data["gaussian_mean"])["x"].astype(np.float64)
    m_star, s_star = x.sum() / (len(x) + 1), 1 / np.sqrt(len(x) + 1)
    learned = np.load(tmp_path / "params.npz")
    assert abs(learned["m"] - m_star) < 0.01 * m_star, (learned["m"], m_star)
    assert abs(np.exp(learned["log_s"]) - s_star) < 0.08 * s_star
    assert read_record(tmp_path / "checkpoint")["average"] == 0.5
    # continuing with more steps would average from another step; without --average, another run
    code, _, err = cmd(capsys, *args, "--average", 0.5, "--steps", 3000)
    assert code == 1 and "averages the parameters after step 1000, and --average 0.5 of --steps 3000 averages " \
        "after step 1500" in err
    code, _, err = cmd(capsys, *args)
    assert code == 1 and "another --average 0.5 (now None)" in err
    code, _, err = cmd(capsys, *args, "--average", 0)
    assert code == 2 and "expected a fraction of the steps, above 0 and at most 1, got 0" in err
    code, _, err = cmd(capsys, "run", EXAMPLES / "portfolio.emx", "--data", data["portfolio"], "--average", 0.5,
                       "--out", tmp_path / "portfolio")
    assert code == 2 and "has constraints, solved by estimax.solve: --average applies to training" in err


# --- help, the entry point, the demo ---------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["check"], ["explain"], ["run"], ["demo"]])
def test_help_for_every_command(command, capsys):
    code, out, _ = cmd(capsys, *command, "--help")
    assert code == 0
    assert out.startswith("usage: estimax" + (f" {command[0]}" if command else ""))


def test_help_and_docs_agree(capsys):
    """Every exit status is in the help; run's output folder is DIR in its help and in the
    docs' synopsis, which lists every option of run and demo."""
    _, top, _ = cmd(capsys, "--help")
    assert all(f"{status} " in top for status in (0, 1, 2, 3, 130, 143))
    doc = DOC.read_text()
    for command in ("run", "demo"):
        _, out, _ = cmd(capsys, command, "--help")
        assert "OUT" not in out
        block = re.search(r"```\n(estimax check FILE .*?)```", doc, re.S).group(1)  # the synopsis
        synopsis = re.search(rf"^estimax {command} .*?(?=^estimax |\Z)", block, re.S | re.M).group(0)
        options = set(re.findall(r"--[a-z][a-z-]*", out)) - {"--help", "--debug"}
        assert options <= set(re.findall(r"--[a-z][a-z-]*", synopsis)), (command, options)


def test_printed_values_show_no_negative_zero():
    from estimax.cli._run import _format_value

    assert _format_value(np.array([-1e-12, 0.5, -0.0])) == "[0. , 0.5, 0. ]"
    assert _format_value(-0.0) == "0"


def test_no_command_prints_the_usage(capsys):
    code, _, err = cmd(capsys)
    assert code == 2 and "usage: estimax" in err


def test_entry_point_is_installed():
    script = Path(sys.executable).with_name("estimax")
    if not script.exists():
        pytest.skip("the package is not installed with its entry point (pip install -e .)")
    proc = subprocess.run(
        [str(script), "run", "--help"], check=False, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: estimax run") and "--optimizer" in proc.stdout


def test_demo_trains_and_reports(tmp_path, capsys):
    code, out, err = cmd(
        capsys, "demo", "--steps", 20, "--chunk", 10, "--n", 40, "--out", tmp_path, "--no-progress"
    )
    assert code == 0, err
    assert "estimator plan for mixture.emx" in out and "reinforce(baseline=<learned, ascent>)" in out
    assert "the fitted mixture:" in out and "estimax run" in out
    assert (tmp_path / "mixture.emx").read_text() == DEMO.read_text()
    assert np.load(tmp_path / "params.npz")["phi"].shape == (40,)


# --- the documentation -----------------------------------------------------------------------


def test_the_documented_examples_are_the_example_files():
    text = DOC.read_text()
    shown = re.findall(r"<!-- file: (\S+) -->\n```[a-z]*\n(.*?)```", text, re.DOTALL)
    assert len(shown) >= 8
    for name, body in shown:
        assert (ROOT / name).read_text() == body, f"{name} differs from its copy in {DOC.name}"


@pytest.mark.parametrize("document", [DOC, ROOT / "README.md"], ids=lambda p: p.name)
def test_the_documented_objectives_pass_check(document, tmp_path, capsys):
    blocks = re.findall(r"```emx\n(.*?)```", document.read_text(), re.DOTALL)
    complete = [b for b in blocks if re.search(r"^(maximize|minimize) ", b, re.MULTILINE)]
    assert complete
    for i, block in enumerate(complete):
        path = write(tmp_path, block, name=f"block{i}.emx")
        if "from " in block:  # imports are relative to the example's folder
            continue
        code, _, err = cmd(capsys, "check", path)
        assert code == 0, f"{document.name}, block {i}:\n{block}\n{err}"


@pytest.mark.slow
def test_end_to_end_in_a_subprocess(tmp_path, data):
    """check, explain and a short run of an example file, as a user runs them."""
    example = EXAMPLES / "iwae_bound.emx"
    npz = data["iwae_bound"]

    def estimax(*argv):
        proc = subprocess.run(
            [sys.executable, "-m", "estimax", *map(str, argv)],
            capture_output=True, text=True, timeout=300, env=_subprocess_env(), cwd=tmp_path,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    check = estimax("check", example, "--data", npz)
    assert check.returncode == 0 and "certificate: unbiased" in check.stdout, check.stdout + check.stderr  # a plate mean
    explain = estimax("explain", example, "--data", npz)
    assert explain.returncode == 0 and "estimator plan" in explain.stdout
    run = estimax("run", example, "--data", npz, "--steps", 20, "--chunk", 10, "--out", tmp_path / "run")
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "run" / "params.npz").exists() and (tmp_path / "run" / "history.npy").exists()
    bad = tmp_path / "bad.emx"
    bad.write_text("param mu: real\nz ~ Normal(mu, 1.0\nminimize z\n")
    failed = estimax("check", bad)
    assert failed.returncode == 1 and "bad.emx:2:" in failed.stderr and "^" in failed.stderr


def test_run_solves_a_file_with_constraints(data, tmp_path, capsys):
    """`run` on a file with `subject_to`: ex.solve, the solution and the multipliers; the bound
    multipliers are >= 0 and the budget holds; a second run resumes from the finished checkpoint."""
    args = ("run", EXAMPLES / "portfolio.emx", "--data", data["portfolio"], "--steps", 200, "--chunk", 20,
            "--out", tmp_path, "--no-progress")
    code, out, err = cmd(capsys, *args)
    assert code == 0, err
    assert "long_only" in out and "μ[long_only] >= 0" in out  # the constraints table
    assert "successful: converged" in out and "multipliers:" in out
    weights = np.load(tmp_path / "params.npz")["w"]
    assert abs(weights.sum() - 1.0) < 1e-3 and (weights > -1e-3).all()
    history = np.load(tmp_path / "history.npy")
    assert history.ndim == 2 and history.shape[1] == 3
    assert (tmp_path / "solve-checkpoint").is_dir()
    code, again, err = cmd(capsys, *args)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "params.npz")["w"], weights)


# --- compositions: what `run` says it estimates, and --tracking ------------------------------


def _tilted_optimum(x, y, t=-1.0):
    """The full-data minimizer of tilted_regression.emx's objective, by BFGS on all the data."""
    import scipy.optimize
    from scipy.special import logsumexp

    def risk(w):
        return (logsumexp(t * (y - w[0] - w[1] * x) ** 2 / 2) - np.log(len(x))) / t

    return scipy.optimize.minimize(risk, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x


def test_run_names_how_each_composition_is_estimated(tmp_path, capsys, data):
    """tilted_regression.emx: `log` of an expectation over a data point. `run` tracks it by
    SCGD (auto) and says so in the plan, reaching the full-data optimum (the plug-in of a
    mean of 8 draws would not be consistent); `--tracking none` says plug-in."""
    npz = data["tilted_regression"]
    args = ("run", EXAMPLES / "tilted_regression.emx", "--data", npz, "--steps", 2000, "--lr", 0.05,
            "--no-progress")
    code, out, err = cmd(capsys, *args, "--out", tmp_path / "auto")
    assert code == 0, err
    assert re.search(r"^ex\.expect\('expect'\)\s+19\s+tracked by SCGD\(beta=0\.1\): one running estimate$", out, re.M), out
    arrays = np.load(npz)
    exact = _tilted_optimum(arrays["x"].astype(float), arrays["y"].astype(float))
    learned = np.load(tmp_path / "auto" / "params.npz")["w"]
    assert np.abs(learned - exact).max() < 0.1, (learned, exact)  # least squares: [1.96, 3.58]
    code, out, err = cmd(capsys, *args, "--steps", 10, "--tracking", "none", "--out", tmp_path / "none")
    assert code == 0, err
    assert "plug-in: the estimate in the function, biased (--tracking none)" in out
    # the checkpoint records the method: resuming with another is refused, naming both
    code, _, err = cmd(capsys, *args, "--steps", 20, "--tracking", "msvr", "--out", tmp_path / "none")
    assert code == 1 and "--tracking none (now msvr)" in err


def test_tracking_for_a_file_without_compositions_is_refused(tmp_path, capsys, data):
    code, _, err = cmd(capsys, "run", EXAMPLES / "iwae_bound.emx", "--data", data["iwae_bound"], "--tracking", "scgd",
                       "--out", tmp_path)
    assert code == 2 and "--tracking scgd: " in err and "nothing to track" in err
    code, out, _ = cmd(capsys, "check", EXAMPLES / "tilted_regression.emx", "--data", data["tilted_regression"])
    assert code == 0 and "`run`: tracked by SCGD(beta=0.1) (one running estimate); --tracking chooses" in out


def test_an_exactly_summed_expectation_is_no_composition(tmp_path, capsys):
    """An expectation whose choices are all enumerated is exact: `log` of it is exact, certified
    unbiased, and nothing is tracked; the same with draws is a composition."""
    body = ("param w: real = 0.5\nlet mean_w = expect(n=2) {{\n  i ~ Categorical(logits=[0.0, 1.0, 2.0]){strategy}\n"
            "  return exp(w * float(i))\n}}\nminimize log(mean_w)\n")
    code, out, err = cmd(capsys, "check", write(tmp_path, body.format(strategy="")))
    assert code == 0 and "certificate: unbiased" in out and "compositions" not in out, out + err
    code, out, err = cmd(capsys, "check", write(tmp_path, body.format(strategy=" @reinforce"), name="drawn.emx"))
    assert code == 0 and "certificate: biased" in out and "compositions" in out, out + err


@pytest.mark.parametrize("seed", [0, 1])
def test_iwae_bound_trains_to_the_posterior(seed, data):
    """iwae_bound.emx (the log of a plate mean of 8 weights) reaches the exact posterior of its
    conjugate model, where the bound equals log p(x). (Written as `log(expect ...)` it would be
    log p(x) itself, which does not depend on the guide: m drifted to 0.32, not 1.25.)"""
    import optax

    import estimax as ex

    x = np.load(data["iwae_bound"])["x"]
    n = len(x)
    program = ex.text.load(EXAMPLES / "iwae_bound.emx")
    steps = 20000  # the bound is flat in the guide's scale: SGD with a decaying rate, long
    result = ex.fit(program.objective, program.init_params({"N": n}), {"x": x}, maximize=True, steps=steps,
                    optimizer=optax.sgd(optax.exponential_decay(0.02, steps, 0.01)), key=jax.random.key(seed),
                    chunk=2000, progress=False)
    m_star, log_s_star = x.sum() / (n + 1), -0.5 * np.log(n + 1)  # posterior N(Σx/(n+1), 1/(n+1))
    posterior_sd = np.exp(log_s_star)  # 0.22
    assert abs(float(result.params["m"]) - m_star) < 0.1 * posterior_sd, (result.params, m_star)
    assert abs(float(result.params["log_s"]) - log_s_star) < 0.05, (result.params, log_s_star)
    cov = np.eye(n) + np.ones((n, n))  # x ~ N(0, I + 11ᵀ)
    log_evidence = -0.5 * (x @ np.linalg.solve(cov, x) + np.linalg.slogdet(cov)[1] + n * np.log(2 * np.pi))
    tail = result.history[-2000:]
    # near the posterior every weight is near p(x): the bound (below log p(x)) closes the gap
    se = tail.std(ddof=1) / np.sqrt(len(tail))  # the parameters barely move over the tail: independent draws
    assert -5 * se < log_evidence - tail.mean() < 0.01 + 5 * se, (tail.mean(), log_evidence, se)
