"""Faults of runs, staged for real: checkpoints that know their run (another program of the
same name, an edited objective file, another optimizer; identities that survive a new process),
two runs on one folder, a process killed while holding the folder, a full disk, a read-only
folder, a damaged checkpoint, out-of-range options and bfloat16 parameters.

Each case ends in a non-zero exit (or an exception) with a clear message and no traceback, or
in the answer an uninterrupted run gives, bit for bit. Cases that need a second process or a
kill run one in a subprocess (the cases that only need "another process" share one child)."""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import estimax as ex
from estimax.cli import main
from estimax.runtime import _checkpoint, _folder
from estimax.runtime._checkpoint import read_record

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "objectives"


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``estimax ARGV`` in this process: exit status, stdout, stderr (never a traceback)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err
    return code, out, err


def _env(hash_seed: int | None = None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT / "src"))
    if hash_seed is not None:
        env["PYTHONHASHSEED"] = str(hash_seed)
    return env


def _other_hash_seed() -> int:
    """A ``PYTHONHASHSEED`` under which NumPyro flattens ``Normal(loc, scale)`` in the other
    order than this process does (it flattens a distribution's fields in the order of a Python
    set): an identity must not depend on it."""
    here = dist.Normal.gather_pytree_data_fields()
    probe = "s = set(); s.update(('loc', 'scale')); print(','.join(s))"
    for seed in range(32):
        out = subprocess.run([sys.executable, "-c", probe], env=_env(seed), capture_output=True, text=True).stdout
        if tuple(out.strip().split(",")) != tuple(here):
            return seed
    return 0


def _same_files(a: Path, b: Path, names=("params.npz", "history.npy")) -> None:
    for name in names:
        x, y = np.load(a / name), np.load(b / name)
        if name.endswith(".npz"):
            assert sorted(x.files) == sorted(y.files)
            for k in x.files:
                np.testing.assert_array_equal(x[k], y[k], err_msg=f"{name}:{k}")
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


def _can_mount() -> bool:
    """Whether this machine lets a process mount in a namespace of its own (``unshare -rm``):
    a small tmpfs, a read-only bind mount."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


# --- programs ---------------------------------------------------------------------------------


def _elbo_with_prior_scale(scale):
    @ex.expectation
    def elbo(p, x):  # the same name each time: only what it computes differs
        q = dist.Normal(p["m"], jnp.exp(p["log_s"]))
        z = ex.sample(q, name="z")
        return dist.Normal(0.0, scale).log_prob(z) + jnp.sum(dist.Normal(z, 1.0).log_prob(x)) - q.log_prob(z)

    return elbo


_X = jnp.array([1.0, 2.0, 3.0])


def _p0(dtype=jnp.float32):
    return {"m": jnp.array(0.0, dtype), "log_s": jnp.array(0.0, dtype)}


def _same_fit(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_array_equal(np.asarray(u), np.asarray(v)),
                 (a.params, a.opt_state), (b.params, b.opt_state))
    np.testing.assert_array_equal(a.history, b.history)


# --- 1. a checkpoint knows its run --------------------------------------------------------------


def test_a_checkpoint_is_refused_to_another_program_optimizer_or_start_and_resume_false_starts_over(tmp_path):
    elbo, other = _elbo_with_prior_scale(1.0), _elbo_with_prior_scale(2.0)
    opt = optax.adam(1e-2)
    run = dict(steps=20, key=jax.random.key(0), maximize=True, chunk=10)
    folder = tmp_path / "run"
    ex.fit(elbo, _p0(), _X, optimizer=opt, checkpoint=folder, **run)

    with pytest.raises(ex.CheckpointError, match="the program differs") as refused:
        ex.fit(other, _p0(), _X, optimizer=opt, checkpoint=folder, **run)
    assert refused.value.differences == ("program",) and "resume=False" in str(refused.value)
    with pytest.raises(ex.CheckpointError, match=r"the optimizer differs: .*step_size was -0\.01, now -5\.0"):
        ex.fit(elbo, _p0(), _X, optimizer=optax.adam(5.0), checkpoint=folder, **run)
    with pytest.raises(ex.CheckpointError, match="the starting point differs"):
        ex.fit(elbo, {"m": jnp.array(1.0), "log_s": jnp.array(0.0)}, _X, optimizer=opt, checkpoint=folder, **run)
    with pytest.raises(ex.CheckpointError, match=r"options differ: early_stop None"):
        ex.fit(elbo, _p0(), _X, optimizer=opt, checkpoint=folder, early_stop=ex.EarlyStop(3), **run)
    # the same run, written again (another optax object with the same hyperparameters): resumes
    same = ex.fit(elbo, _p0(), _X, optimizer=optax.adam(1e-2), checkpoint=folder, **dict(run, steps=30))
    _same_fit(same, ex.fit(elbo, _p0(), _X, optimizer=opt, **dict(run, steps=30)))

    # resume=False: the other program starts over in the folder, as an uninterrupted run
    fresh = ex.fit(other, _p0(), _X, optimizer=opt, checkpoint=ex.Checkpoint(folder, resume=False), **run)
    _same_fit(fresh, ex.fit(other, _p0(), _X, optimizer=opt, **run))
    assert read_record(folder)["step"] == 20

    # a folder of the previous format is refused as such
    for path in glob.glob(str(folder / "*" / "record" / "metadata")):
        record = json.loads(Path(path).read_text())
        Path(path).write_text(json.dumps(dict(record, format="estimax-fit/1")))
    for path in glob.glob(str(folder / "*" / "estimax-files.json")):
        os.unlink(path)
    with pytest.raises(ex.CheckpointError, match=r"older format \('estimax-fit/1'.*resume=False"):
        ex.fit(other, _p0(), _X, optimizer=opt, checkpoint=folder, **run)


_CHILD = textwrap.dedent(
    """
    import json, os, sys
    import jax, jax.numpy as jnp, numpy as np, optax, numpyro.distributions as dist
    import estimax as ex
    from estimax.cli import main

    out = sys.argv[1]
    report = {"order": list(dist.Normal.gather_pytree_data_fields())}

    @ex.expectation
    def constrained(w):
        z = ex.sample(dist.Normal(0.0, 1.0), name="z")
        ex.subject_to(eq=jnp.sum(w) - 1.0)
        return jnp.sum((w - z) ** 2)

    @ex.expectation
    def elbo(p, x):
        q = dist.Normal(p["m"], jnp.exp(p["log_s"]))
        inner = ex.expect(lambda q: ex.sample(q, name="u") ** 2, n=2)(q)   # a distribution passed to a nested expectation
        z = ex.sample(q, name="z")
        return dist.Normal(0.0, 1.0).log_prob(z) + jnp.sum(dist.Normal(z, 1.0).log_prob(x)) - q.log_prob(z) - 0.1 * inner

    # (a) ex.solve with an optax optimizer in its solver: 30 of 60 steps
    ex.solve(constrained, jnp.zeros(3), solver=ex.solvers.StochasticLagrangian(optimizer=optax.adam(0.01)),
             max_steps=30, checkpoint=os.path.join(out, "solve"), every=10)
    # (b) ex.fit of a program with a nested expectation over a distribution: 20 of 40 steps
    ex.fit(elbo, {"m": jnp.array(0.0), "log_s": jnp.array(0.0)}, jnp.array([1.0, 2.0, 3.0]),
           optimizer=optax.adam(1e-2), steps=20, key=jax.random.key(0), maximize=True, chunk=10,
           checkpoint=os.path.join(out, "fit"))
    # (c) estimax run --solver stochastic: 40 of 80 steps
    report["cli"] = main(["run", sys.argv[2], "--data", sys.argv[3], "--solver", "stochastic", "--steps", "40",
                          "--chunk", "20", "--out", os.path.join(out, "cli"), "--no-progress"])
    # (d) a damaged checkpoint that orbax reads (no list of files to check it against): refused;
    #     nothing may be printed at exit
    ex.fit(elbo, {"m": jnp.array(0.0), "log_s": jnp.array(0.0)}, jnp.array([1.0, 2.0, 3.0]),
           optimizer=optax.adam(1e-2), steps=20, key=jax.random.key(1), maximize=True, chunk=10,
           checkpoint=ex.Checkpoint(os.path.join(out, "damaged"), every=10))
    step = os.path.join(out, "damaged", "20")
    os.unlink(os.path.join(step, "estimax-files.json"))
    for root, _, names in os.walk(os.path.join(step, "state")):
        for name in names:
            if len(name) == 32:  # tensorstore's data files
                open(os.path.join(root, name), "wb").write(os.urandom(64))
    try:
        ex.fit(elbo, {"m": jnp.array(0.0), "log_s": jnp.array(0.0)}, jnp.array([1.0, 2.0, 3.0]),
               optimizer=optax.adam(1e-2), steps=30, key=jax.random.key(1), maximize=True, chunk=10,
               checkpoint=ex.Checkpoint(os.path.join(out, "damaged"), every=10))
    except ex.CheckpointError as e:
        report["damaged"] = str(e)
    json.dump(report, open(os.path.join(out, "report.json"), "w"))
    """
)


def test_identities_are_stable_across_processes(tmp_path, data, capsys):
    """What a child process (under another hash seed: NumPyro flattens distributions in
    another order there) wrote is resumed here, and ends where an uninterrupted run ends: an
    ``ex.solve`` whose solver holds an optax optimizer, an ``ex.fit`` of a program passing a
    distribution to a nested expectation, ``estimax run --solver stochastic`` resumed with a
    larger ``--steps``. The child also meets a damaged checkpoint that orbax reads: a clear
    error, and nothing printed at exit."""
    portfolio, npz = EXAMPLES / "portfolio.emx", data["portfolio"]
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    child = subprocess.run([sys.executable, str(script), str(tmp_path), str(portfolio), npz],
                           env=_env(_other_hash_seed()), capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert "Traceback" not in child.stderr and "Event loop is closed" not in child.stderr, child.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["cli"] in (0, 1)  # 1: the stochastic solver ends at its budget, not converged
    assert "(step 20) is damaged" in report["damaged"] and "step 10, is intact" in report["damaged"]

    @ex.expectation
    def constrained(w):
        z = ex.sample(dist.Normal(0.0, 1.0), name="z")
        ex.subject_to(eq=jnp.sum(w) - 1.0)
        return jnp.sum((w - z) ** 2)

    solver = ex.solvers.StochasticLagrangian(optimizer=optax.adam(0.01))
    resumed = ex.solve(constrained, jnp.zeros(3), solver=solver, max_steps=60, checkpoint=tmp_path / "solve", every=10)
    whole = ex.solve(constrained, jnp.zeros(3), solver=solver, max_steps=60)
    assert resumed.steps == whole.steps == 60
    np.testing.assert_array_equal(resumed.params, whole.params)
    for k in whole.history:
        np.testing.assert_array_equal(resumed.history[k], whole.history[k])

    @ex.expectation
    def elbo(p, x):
        q = dist.Normal(p["m"], jnp.exp(p["log_s"]))
        inner = ex.expect(lambda q: ex.sample(q, name="u") ** 2, n=2)(q)
        z = ex.sample(q, name="z")
        return dist.Normal(0.0, 1.0).log_prob(z) + jnp.sum(dist.Normal(z, 1.0).log_prob(x)) - q.log_prob(z) - 0.1 * inner

    run = dict(optimizer=optax.adam(1e-2), steps=40, key=jax.random.key(0), maximize=True, chunk=10)
    _same_fit(ex.fit(elbo, _p0(), _X, checkpoint=tmp_path / "fit", **run), ex.fit(elbo, _p0(), _X, **run))

    argv = ("run", portfolio, "--data", npz, "--solver", "stochastic", "--steps", 80, "--chunk", 20, "--no-progress")
    code, out, err = run_cli(capsys, *argv, "--out", tmp_path / "cli")
    assert code in (0, 1), err  # 1: the stochastic solver ends at its budget, not converged
    assert "resuming from" in out and "at step 40 (at most 80 steps)" in out
    code_whole, _, err = run_cli(capsys, *argv, "--out", tmp_path / "cli-whole")
    assert code_whole == code, err
    _same_files(tmp_path / "cli", tmp_path / "cli-whole")


def test_an_edited_objective_file_is_refused_before_anything_resumes(tmp_path, data, capsys):
    path = tmp_path / "gaussian.emx"
    path.write_text((EXAMPLES / "gaussian_mean.emx").read_text())
    out = tmp_path / "out"
    argv = ("run", path, "--data", data["gaussian_mean"], "--chunk", 10, "--out", out, "--no-progress")
    assert run_cli(capsys, *argv, "--steps", 20)[0] == 0
    umask = _folder._umask()
    for name in ("params.npz", "history.npy", "loss.png", "checkpoint/20/record/metadata"):  # one mode for all
        assert os.stat(out / name).st_mode & 0o777 == 0o666 & ~umask, name

    path.write_text(path.read_text() + "\n# a comment changes nothing that is computed\n")
    code, printed, err = run_cli(capsys, *argv, "--steps", 30)
    assert code == 0, err
    assert "resuming from" in printed and "has changed since the checkpoint was written, but not the program" in printed

    path.write_text(path.read_text().replace("Normal(0.0, 1.0)", "Normal(0.0, 3.0)"))
    code, printed, err = run_cli(capsys, *argv, "--steps", 40)
    assert code == 1 and "gaussian.emx has changed since" in err and "--fresh" in err
    assert "resuming" not in printed  # refused first
    path.write_text(path.read_text().replace("param m: real = 0.0", "param m: real = 0.5").replace("3.0)", "1.0)"))
    code, printed, err = run_cli(capsys, *argv, "--steps", 40)
    assert code == 1 and "has changed since" in err and "resuming" not in printed
    code, printed, err = run_cli(capsys, *argv, "--steps", 40, "--fresh")
    assert code == 0 and "resuming" not in printed, err
    assert read_record(out / "checkpoint")["step"] == 40


# --- 2. two runs on one folder; a killed run's lock --------------------------------------------


def test_a_second_run_on_a_folder_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, data, capsys):
    out = tmp_path / "out"
    argv = ["run", str(EXAMPLES / "gaussian_mean.emx"), "--data", data["gaussian_mean"], "--chunk", "10",
            "--out", str(out), "--no-progress"]
    first = subprocess.Popen([sys.executable, "-m", "estimax", *argv, "--steps", "1000000"], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while first.poll() is None and time.monotonic() < deadline and read_record(out / "checkpoint") is None:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1][-2000:]
        # the command, and estimax.fit on its checkpoint folder, are refused while it runs
        code, printed, err = run_cli(capsys, *argv, "--steps", "50")
        assert code == 1 and f"in use by another run (process {first.pid} on host" in err and "--out" in err
        assert "resuming" not in printed and "estimator plan" not in printed  # refused before anything else
        with pytest.raises(ex.CheckpointError, match=f"in use by another run \\(process {first.pid}"):
            ex.fit(_elbo_with_prior_scale(1.0), _p0(), _X, optimizer=optax.adam(1e-2), steps=5,
                   key=jax.random.key(0), checkpoint=out / "checkpoint")
    finally:
        first.send_signal(signal.SIGKILL)  # killed while it holds the folder, perhaps while saving
        _, err = first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL, err[-2000:]
    assert (out / ".estimax-lock").exists()  # left behind by the killed run: stale
    stopped = read_record(out / "checkpoint")["step"]
    total = stopped + 20
    code, printed, err = run_cli(capsys, *argv, "--steps", total)
    assert code == 0, err
    assert f"resuming from {out / 'checkpoint'} at step {stopped} of {total}" in printed
    assert not (out / ".estimax-lock").exists()  # released when the run ended
    argv[argv.index("--out") + 1] = str(tmp_path / "whole")
    assert run_cli(capsys, *argv, "--steps", total)[0] == 0
    _same_files(out, tmp_path / "whole")


def test_without_flock_the_lock_is_an_exclusive_file_and_a_dead_holders_is_taken_over(tmp_path, monkeypatch):
    """On a file system without ``flock`` (some network file systems) the lock file is created
    exclusively; the lock of a process that no longer runs on this host is taken over."""

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(_folder.fcntl, "flock", no_flock)
    first = _folder.FolderLock(str(tmp_path)).acquire()
    with pytest.raises(ex.CheckpointError, match=f"in use by another run \\(process {os.getpid()} on host"):
        _folder.FolderLock(str(tmp_path)).acquire()
    first.release()
    assert not (tmp_path / ".estimax-lock").exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {"pid": int(gone.stdout), "host": __import__("socket").gethostname()}
    (tmp_path / ".estimax-lock").write_text(json.dumps(dead))
    taken = _folder.FolderLock(str(tmp_path)).acquire()
    assert taken.stale == dead
    taken.release()


# --- 3. a full disk, a read-only folder --------------------------------------------------------

_FULL_DISK = textwrap.dedent(
    """
    set -u
    T="$1"; shift
    mount -t tmpfs -o size=4m tmpfs "$T" || exit 97
    python -m estimax "$@" --steps 1000000 --out "$T/o" > "$T/../first.out" 2> "$T/../first.err" &
    pid=$!
    while [ -z "$(ls "$T/o/checkpoint" 2>/dev/null | grep -E '^[0-9]+$')" ]; do sleep 0.05; done
    head -c 8000000 /dev/zero > "$T/fill" 2>/dev/null   # fill the disk while the run goes
    wait $pid; echo "$?" > "$T/../first.code"
    ls "$T/o/checkpoint" > "$T/../left.txt"
    last=$(ls "$T/o/checkpoint" | grep -E '^[0-9]+$' | sort -n | tail -1)
    rm "$T/fill"
    python -m estimax "$@" --steps $((last + 20)) --out "$T/o" > "$T/../second.out" 2> "$T/../second.err"
    echo "$?" > "$T/../second.code"
    echo "$last" > "$T/../last.txt"
    cp "$T/o/params.npz" "$T/o/history.npy" "$T/.."
    """
)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, data, capsys):
    """On a small tmpfs (in a mount namespace of the test's own) the disk fills while the run
    saves: the run stops with a clear message, the previous checkpoint stays, and once space is
    freed the run resumes to the uninterrupted result. Where no tmpfs can be mounted, the same
    is staged in this process by making the save's writes fail with ENOSPC."""
    argv = ["run", str(EXAMPLES / "gaussian_mean.emx"), "--data", data["gaussian_mean"], "--chunk", "10",
            "--no-progress"]
    if not _can_mount():
        _full_disk_in_process(tmp_path, argv, capsys)
        return
    (tmp_path / "mnt").mkdir()
    script = tmp_path / "full.sh"
    script.write_text(_FULL_DISK)
    proc = subprocess.run(["unshare", "-rm", "sh", str(script), str(tmp_path / "mnt"), *argv], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first_err = (tmp_path / "first.err").read_text()
    assert (tmp_path / "first.code").read_text().strip() == "1", first_err
    assert "Traceback" not in first_err and "the disk is full" in first_err, first_err
    last = int((tmp_path / "last.txt").read_text())
    assert f"the previous checkpoint (step {last}) is kept" in first_err
    assert "orbax-checkpoint-tmp" not in (tmp_path / "left.txt").read_text(), first_err  # the partial save removed
    second_err = (tmp_path / "second.err").read_text()
    assert (tmp_path / "second.code").read_text().strip() == "0", second_err
    assert f"resuming from {tmp_path / 'mnt' / 'o' / 'checkpoint'} at step {last}" in (tmp_path / "second.out").read_text()
    code, _, err = run_cli(capsys, *argv, "--steps", last + 20, "--out", tmp_path / "whole")
    assert code == 0, err
    _same_files(tmp_path, tmp_path / "whole")


def _full_disk_in_process(tmp_path, argv, capsys):
    out = tmp_path / "o"
    calls = []
    real_write = _checkpoint.write_atomically

    def full_after_two(path, write):  # the third checkpoint's list of files cannot be written
        if path.endswith("estimax-files.json"):
            calls.append(path)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, write)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_checkpoint, "write_atomically", full_after_two)
        code, _, err = run_cli(capsys, *argv, "--steps", 100, "--out", out)
    assert code == 1 and "the disk is full" in err and "the previous checkpoint (step 20) is kept" in err, err
    assert not any("tmp" in name for name in os.listdir(out / "checkpoint"))
    code, printed, err = run_cli(capsys, *argv, "--steps", 40, "--out", out)
    assert code == 0 and "at step 20 of 40" in printed, err
    assert run_cli(capsys, *argv, "--steps", 40, "--out", tmp_path / "whole")[0] == 0
    _same_files(out, tmp_path / "whole")


_READ_ONLY = textwrap.dedent(
    """
    import contextlib, io, json, sys
    import jax, jax.numpy as jnp, optax, numpyro.distributions as dist
    import estimax as ex
    from estimax.cli import main

    folder, argv = sys.argv[1], sys.argv[2:]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([*argv, "--out", folder])

    @ex.expectation
    def objective(m):
        return (ex.sample(dist.Normal(m, 1.0), name="z") - 1.0) ** 2

    steps = []
    try:
        ex.fit(objective, jnp.array(0.0), optimizer=optax.adam(1e-2), steps=5, key=jax.random.key(0),
               checkpoint=folder + "/run", callback=lambda info: steps.append(info.step))
        refused = None
    except ex.CheckpointError as e:
        refused = str(e)
    print(json.dumps({"code": code, "err": err.getvalue(), "refused": refused, "steps": steps}))
    """
)


def test_a_read_only_folder_is_refused_before_training(tmp_path, data):
    """The output folder of ``estimax run`` and the checkpoint folder of ``ex.fit`` cannot be
    written: a clear error before the first step. Made read-only by ``chmod`` or, for root
    (whom ``chmod`` does not stop), by a read-only bind mount in a mount namespace."""
    argv = ["run", str(EXAMPLES / "gaussian_mean.emx"), "--data", data["gaussian_mean"], "--steps", "20",
            "--no-progress"]
    locked = tmp_path / "locked"
    locked.mkdir()
    script = tmp_path / "child.py"
    script.write_text(_READ_ONLY)
    child = [sys.executable, str(script), str(locked), *argv]
    if os.geteuid() == 0:
        if not _can_mount():
            pytest.skip("running as root, where chmod does not stop writes, and this machine allows no mount "
                        "namespace for a read-only bind mount")
        bind = f'mount --bind "{locked}" "{locked}" && mount -o remount,bind,ro "{locked}" && exec "$@"'
        child = ["unshare", "-rm", "sh", "-c", bind, "sh", *child]
    else:
        locked.chmod(0o555)
    try:
        proc = subprocess.run(child, env=_env(), capture_output=True, text=True, timeout=120)
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    why = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    assert report["code"] == 2 and f"cannot write in the output folder {locked}: {why}" in report["err"], report
    assert "Traceback" not in report["err"]
    assert report["refused"] and f"{locked}/run: {why}" in report["refused"] and report["steps"] == [], report


# --- 4. a damaged checkpoint --------------------------------------------------------------------


def test_a_damaged_latest_checkpoint_is_refused_and_the_previous_one_offered(tmp_path, capsys):
    elbo = _elbo_with_prior_scale(1.0)
    run = dict(optimizer=optax.adam(1e-2), key=jax.random.key(0), maximize=True, chunk=10)
    folder = tmp_path / "run"
    ex.fit(elbo, _p0(), _X, steps=30, checkpoint=ex.Checkpoint(folder, every=10), **run)
    latest = folder / "30"
    victim = max((p for p in latest.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[::-1])  # same size, other contents
    with pytest.raises(ex.CheckpointError) as refused:
        ex.fit(elbo, _p0(), _X, steps=40, checkpoint=ex.Checkpoint(folder, every=10), **run)
    message = str(refused.value)
    assert f"the latest checkpoint {latest} (step 30) is damaged" in message and "not what was written" in message
    assert "The previous checkpoint, step 20, is intact" in message and f"mv {latest} {latest}.damaged" in message
    assert "Event loop is closed" not in capsys.readouterr().err
    os.rename(latest, f"{latest}.damaged")  # as the message says
    resumed = ex.fit(elbo, _p0(), _X, steps=40, checkpoint=ex.Checkpoint(folder, every=10), **run)
    _same_fit(resumed, ex.fit(elbo, _p0(), _X, steps=40, **run))


# --- 5. options and parameter types ------------------------------------------------------------


def test_a_chunk_beyond_32_bits_is_refused_clearly(tmp_path, data, capsys):
    with pytest.raises(ValueError, match=r"chunk=2147483648 is too large: .*32-bit"):
        ex.fit(_elbo_with_prior_scale(1.0), _p0(), _X, optimizer=optax.adam(1e-2), steps=10,
               key=jax.random.key(0), chunk=2**31)
    code, _, err = run_cli(capsys, "run", EXAMPLES / "gaussian_mean.emx", "--data", data["gaussian_mean"],
                           "--chunk", 2**31, "--out", tmp_path / "o", "--no-progress")
    assert code == 2 and "--chunk 2147483648 is too large" in err
    assert not (tmp_path / "o").exists()


def test_bfloat16_parameters_train_checkpoint_and_resume(tmp_path):
    elbo = _elbo_with_prior_scale(1.0)
    x = _X.astype(jnp.bfloat16)
    g = ex.grad(elbo)(jax.random.key(0), _p0(jnp.bfloat16), x)
    assert g["m"].dtype == jnp.bfloat16 and float(g["m"]) != 0.0  # a real gradient, not a float0 zero
    run = dict(optimizer=optax.adam(0.05), key=jax.random.key(0), maximize=True, chunk=10)
    ex.fit(elbo, _p0(jnp.bfloat16), x, steps=20, checkpoint=tmp_path / "run", **run)
    resumed = ex.fit(elbo, _p0(jnp.bfloat16), x, steps=40, checkpoint=tmp_path / "run", **run)
    whole = ex.fit(elbo, _p0(jnp.bfloat16), x, steps=40, **run)
    assert resumed.params["m"].dtype == jnp.bfloat16
    _same_fit(resumed, whole)
    assert abs(float(whole.params["m"]) - 0.0) > 0.1  # it moved towards the posterior mean
