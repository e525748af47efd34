"""The runtime: checkpoints and resume (in-process and by killing a process), non-finite
stops that name the step and the term, progress through host callbacks, sharding of particles
and data over devices (8 forced CPU devices, in a subprocess), determinism."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import jax
import jax.numpy as jnp

import estimax as ex
from estimax.runtime import _progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


@ex.expectation
def _elbo(params, x):
    q = dist.Normal(params["m"], jnp.exp(params["log_s"]))
    z = ex.sample(q, name="z")
    return dist.Normal(0.0, 1.0).log_prob(z) + jnp.sum(dist.Normal(z, 1.0).log_prob(x)) - q.log_prob(z)


_X = np.array([1.0, 2.0, 3.0])
_OPT = optax.adam(1e-2)


def _params():
    return {"m": jnp.array(0.0), "log_s": jnp.array(0.0)}


def _same_run(a, b, exact=True):
    check = np.testing.assert_array_equal if exact else (lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-12))
    jax.tree.map(lambda u, v: check(np.asarray(u), np.asarray(v)), (a.params, a.opt_state), (b.params, b.opt_state))
    check(jax.random.key_data(a.key), jax.random.key_data(b.key))
    check(a.history, b.history)
    assert a.steps_run == b.steps_run


def test_fit_checkpoint_interrupted_by_a_signal_resumes_to_the_uninterrupted_result(tmp_path):
    run = dict(optimizer=_OPT, steps=300, key=jax.random.key(0), maximize=True, chunk=40)
    plain = ex.fit(_elbo, _params(), _X, **run)
    every = ex.Checkpoint(tmp_path / "a", every=100)
    saved = ex.fit(_elbo, _params(), _X, checkpoint=every, **run)
    _same_run(plain, saved)  # checkpointing changes nothing
    np.testing.assert_array_equal(saved.average_steps, [40, 80, 100, 140, 180, 200, 240, 280, 300])  # cut at 100s

    def ctrl_c(info):  # Ctrl-C after step 150: the chunk (to 180) finishes and is saved
        if info.step >= 150:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="signal 2") as stop:
        ex.fit(_elbo, _params(), _X, checkpoint=ex.Checkpoint(tmp_path / "b", every=100), callback=ctrl_c, **run)
    assert stop.value.signum == signal.SIGINT
    assert sorted(int(d) for d in os.listdir(tmp_path / "b") if d.isdigit()) == [100, 180]
    resumed = ex.fit(_elbo, _params(), _X, checkpoint=ex.Checkpoint(tmp_path / "b", every=100), **run)
    _same_run(saved, resumed)
    np.testing.assert_array_equal(saved.averages, resumed.averages)
    # a finished run returns at once; more steps continue it as one longer run would go
    again = ex.fit(_elbo, _params(), _X, checkpoint=ex.Checkpoint(tmp_path / "b", every=100), **run)
    _same_run(saved, again)
    longer = ex.fit(_elbo, _params(), _X, **dict(run, steps=400))
    more = ex.fit(_elbo, _params(), _X, checkpoint=ex.Checkpoint(tmp_path / "b", every=100), **dict(run, steps=400))
    _same_run(longer, more)


def test_fit_checkpoint_of_another_run_is_refused(tmp_path):
    run = dict(optimizer=_OPT, steps=20, maximize=True, chunk=10, checkpoint=tmp_path / "run")
    ex.fit(_elbo, _params(), _X, key=jax.random.key(0), **run)
    with pytest.raises(ex.CheckpointError, match="its key is"):
        ex.fit(_elbo, _params(), _X, key=jax.random.key(1), **run)
    with pytest.raises(ex.CheckpointError, match="its data is"):
        ex.fit(_elbo, _params(), _X + 1.0, key=jax.random.key(0), **run)
    with pytest.raises(ex.CheckpointError, match="another structure"):
        ex.fit(_elbo, _params(), _X, key=jax.random.key(0), **dict(run, optimizer=optax.sgd(1e-2)))
    with pytest.raises(ex.ArgumentError, match="holds 20 steps, more than steps=10"):
        ex.fit(_elbo, _params(), _X, key=jax.random.key(0), **dict(run, steps=10))
    (tmp_path / "file").write_text("")
    with pytest.raises(ex.CheckpointError, match="is a file"):
        ex.fit(_elbo, _params(), _X, key=jax.random.key(0), **dict(run, checkpoint=tmp_path / "file"))
    with pytest.raises(TypeError, match="checkpoint must be a folder path"):
        ex.fit(_elbo, _params(), _X, key=jax.random.key(0), **dict(run, checkpoint=3))
    with pytest.raises(ValueError, match="every must be a positive integer"):
        ex.Checkpoint(tmp_path, every=0)


_CHILD = textwrap.dedent(
    """
    import sys, time, jax, jax.numpy as jnp, numpy as np, optax, numpyro.distributions as dist
    jax.config.update("jax_enable_x64", True)
    import estimax as ex

    @ex.expectation
    def elbo(params, x):
        q = dist.Normal(params["m"], jnp.exp(params["log_s"]))
        z = ex.vmap(lambda: ex.sample(q, name="z"), axis_size=64)()
        return jnp.mean(dist.Normal(0.0, 1.0).log_prob(z) + jnp.sum(dist.Normal(z[:, None], 1.0).log_prob(x), -1)
                        - q.log_prob(z))

    def run(folder, steps, slow):
        params = {"m": jnp.array(0.0), "log_s": jnp.array(0.0)}
        x = jnp.linspace(-1.0, 3.0, 200)
        # `slow`: a pause after each chunk (it changes nothing else), so that the parent can
        # kill the run while it goes
        return ex.fit(elbo, params, x, optimizer=optax.adam(1e-3), steps=steps, key=jax.random.key(7),
                      maximize=True, chunk=25, checkpoint=ex.Checkpoint(folder, every=100),
                      callback=(lambda info: time.sleep(0.05)) if slow else None)

    if __name__ == "__main__":
        folder, steps, slow = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "slow"
        try:
            result = run(folder, steps, slow)
        except KeyboardInterrupt as stop:
            sys.exit(128 + stop.signum)
        np.savez(folder + ".npz", m=result.params["m"], log_s=result.params["log_s"], history=result.history,
                 key=jax.random.key_data(result.key))
    """
)


def test_fit_killed_in_a_subprocess_resumes_to_the_uninterrupted_result(tmp_path):
    """A child process trains with a checkpoint every 100 steps; it is killed by SIGKILL once a
    checkpoint is on disk: it dies where it is, perhaps while writing, and the last complete
    checkpoint is what remains. A second child resumes; the result equals an uninterrupted
    child's. (SIGINT and SIGTERM, which let the chunk finish and save, are the in-process test
    above and the ``estimax run`` test.)"""
    sig = signal.SIGKILL
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), JAX_PLATFORMS="cpu")
    steps = 2000
    folder = str(tmp_path / "run")
    child = subprocess.Popen([sys.executable, str(script), folder, str(steps), "slow"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while child.poll() is None and time.monotonic() < deadline:
        if os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder)):
            break
        time.sleep(0.05)
    assert child.poll() is None, child.communicate()[1].decode()[-2000:]
    child.send_signal(sig)
    _, err = child.communicate(timeout=240)
    assert child.returncode == -sig, err.decode()[-2000:]
    stopped = max(int(d) for d in os.listdir(folder) if d.isdigit())
    assert 0 < stopped < steps
    resumed = subprocess.run([sys.executable, str(script), folder, str(steps), "fast"], env=env, capture_output=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    whole = str(tmp_path / "whole")
    plain = subprocess.run([sys.executable, str(script), whole, str(steps), "fast"], env=env, capture_output=True, timeout=600)
    assert plain.returncode == 0, plain.stderr.decode()[-2000:]
    a, b = np.load(folder + ".npz"), np.load(whole + ".npz")
    for name in ("m", "log_s", "history", "key"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


_SHARDED = textwrap.dedent(
    """
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np, optax, numpyro, numpyro.distributions as dist
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    import estimax as ex
    from estimax.runtime import _jax_compat as compat

    out = {"devices": len(jax.devices())}
    H, D, K = 3, 6, 64
    rng = np.random.default_rng(0)

    def model(params, x):
        z = numpyro.sample("z", dist.Normal(jnp.zeros(H), 1.0).to_event(1))
        numpyro.sample("x", dist.Normal(jnp.tanh(z @ params["W"]), 0.5).to_event(1), obs=x)

    def guide(params, x):
        return ex.sample(dist.Normal(params["mu"], jnp.exp(params["ls"])).to_event(1), name="z")

    params = {"W": jnp.asarray(rng.normal(size=(H, D)) * 0.3), "mu": jnp.zeros(H), "ls": jnp.full(H, -0.5)}
    x = jnp.asarray(rng.normal(size=D))
    key = jax.random.key(3)

    # 1. the IWELBO gradient with K particles: 8 devices against 1, jit against no jit
    vg = ex.value_and_grad(ex.objectives.iwelbo(model, guide, K))
    v1, g1 = jax.jit(vg)(key, params, x)
    v0, g0 = vg(key, params, x)
    mesh = ex.device_mesh(8)
    with compat.set_mesh(mesh):
        f8 = jax.jit(vg)
        hlo = f8.lower(key, params, x).compile().as_text()
        v8, g8 = f8(key, params, x)
        v8b, g8b = f8(key, params, x)
    diff = lambda a, b: max(float(np.max(np.abs(np.asarray(u) - np.asarray(w)))) for u, w in
                            zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    out["iwelbo"] = dict(value_8_vs_1=abs(float(v8 - v1)), grad_8_vs_1=diff(g8, g1),
                         value_jit_vs_eager=abs(float(v1 - v0)), grad_jit_vs_eager=diff(g1, g0),
                         repeat_8=diff((v8, g8), (v8b, g8b)),
                         per_device_lanes=f"f64[{K // 8},{H}]" in hlo, whole_lanes=f"f64[{K},{H}]" in hlo)

    # 2. ex.fit over 8 devices: per-point latents (an ex.vmap over the data) and the data's batch
    #    axis split; against one device
    N = 64
    xs = jnp.asarray(rng.normal(size=(N, D)))

    @ex.expectation
    def elbo(p, xs):
        def point(xi):
            q = dist.Normal(p["mu"], jnp.exp(p["ls"])).to_event(1)
            z = ex.sample(q, name="z")
            log_p = dist.Normal(jnp.zeros(H), 1.0).to_event(1).log_prob(z) + \\
                dist.Normal(jnp.tanh(z @ p["W"]), 0.5).to_event(1).log_prob(xi)
            return log_p - q.log_prob(z)
        return jnp.mean(ex.vmap(point)(xs))

    opt = optax.adam(1e-2)
    run = dict(optimizer=opt, steps=60, key=jax.random.key(5), maximize=True, chunk=20)
    one = ex.fit(elbo, params, xs, **run)
    eight = ex.fit(elbo, params, xs, devices=8, shard_data=(0,), **run)
    again = ex.fit(elbo, params, xs, devices=8, shard_data=(0,), **run)
    out["fit"] = dict(params_8_vs_1=diff(eight.params, one.params),
                      history_8_vs_1=float(np.max(np.abs(eight.history - one.history))),
                      repeat_8=diff((eight.params, eight.history), (again.params, again.history)),
                      sharding=str(eight.params["W"].sharding.mesh.shape))

    # 3. a checkpoint written on one device, resumed on eight
    folder = sys.argv[1]
    half = ex.fit(elbo, params, xs, checkpoint=ex.Checkpoint(folder, every=20), **dict(run, steps=40))
    resumed = ex.fit(elbo, params, xs, checkpoint=ex.Checkpoint(folder, every=20), devices=8, shard_data=(0,), **run)
    out["resume"] = dict(params_vs_1=diff(resumed.params, one.params),
                         history_vs_1=float(np.max(np.abs(resumed.history - one.history))))

    # 4. errors that name the mistake
    errors = {}
    for name, call in {
        "too_many": lambda: ex.fit(elbo, params, xs, devices=16, **run),
        "bad_batch": lambda: ex.fit(elbo, params, xs[:60], devices=8, shard_data=(0,), **run),
        "bad_position": lambda: ex.fit(elbo, params, xs, devices=8, shard_data=(1,), **run),
        "no_devices": lambda: ex.fit(elbo, params, xs, shard_data=(0,), **run),
    }.items():
        try:
            call()
            errors[name] = None
        except (ex.ProgramError, ex.ArgumentError) as e:
            errors[name] = str(e)
    out["errors"] = errors

    # 5. ex.solve over 8 devices: the draws of a stochastic objective split; against one device
    @ex.expectation
    def spread(y):
        def draw(i):
            z = ex.sample(dist.Normal(0.0, 1.0), name="z")
            return jnp.sum((y - z - 0.01 * i) ** 2)
        ex.subject_to(eq=y[0] - 0.2, name="pin")
        return jnp.mean(ex.vmap(draw)(jnp.arange(16.0)))

    solve = dict(solver=ex.solvers.StochasticLagrangian(max_steps=40), key=jax.random.PRNGKey(1))
    s1 = ex.solve(spread, jnp.array([0.5, 0.5]), **solve)
    s8 = ex.solve(spread, jnp.array([0.5, 0.5]), devices=8, **solve)
    out["solve"] = dict(params_8_vs_1=diff(s8.params, s1.params), steps=[s1.steps, s8.steps],
                        value_8_vs_1=abs(s8.value - s1.value))
    print("RESULT" + json.dumps(out))
    """
)


def test_sharded_over_8_devices_equals_one_device(tmp_path):
    """One child process with 8 forced CPU devices runs every multi-device check (one test, so
    that parallel test workers do not each start it)."""
    import json

    script = tmp_path / "sharded.py"
    script.write_text(_SHARDED)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt")], env=env, capture_output=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    line = [ln for ln in proc.stdout.decode().splitlines() if ln.startswith("RESULT")][-1]
    sharded = json.loads(line[len("RESULT"):])
    assert sharded["devices"] == 8

    # the IWELBO gradient with K particles
    r = sharded["iwelbo"]
    assert r["per_device_lanes"] and not r["whole_lanes"]  # each device holds K/8 particles
    assert r["value_8_vs_1"] < 1e-12 and r["grad_8_vs_1"] < 1e-12  # reassociation only
    assert r["value_jit_vs_eager"] < 1e-12 and r["grad_jit_vs_eager"] < 1e-12
    assert r["repeat_8"] == 0.0  # same key, same inputs: the same bits

    # ex.fit on 8 devices, and a one-device checkpoint resumed on 8
    r = sharded["fit"]
    assert "('devices', 8)" in r["sharding"]  # the parameters live on the 8-device mesh
    assert r["params_8_vs_1"] < 1e-10 and r["history_8_vs_1"] < 1e-10
    assert r["repeat_8"] == 0.0
    assert sharded["resume"]["params_vs_1"] < 1e-10 and sharded["resume"]["history_vs_1"] < 1e-10

    # errors that name the mistake
    e = sharded["errors"]
    assert "devices=16, but JAX sees 8 device(s)" in e["too_many"] and "xla_force_host_platform_device_count" in e["too_many"]
    assert "fit: data argument 0 has shape (60, 6)" in e["bad_batch"] and "multiple of the 8 device(s)" in e["bad_batch"]
    assert "shard_data=(1,) names argument(s) [1]" in e["bad_position"]
    assert "give devices= as well" in e["no_devices"]

    # ex.solve on 8 devices (devices= as in ex.fit)
    r = sharded["solve"]
    assert r["steps"][0] == r["steps"][1]
    assert r["params_8_vs_1"] < 1e-10 and r["value_8_vs_1"] < 1e-10


_HOST = textwrap.dedent(
    """
    import sys, json
    import jax
    jax.config.update("jax_enable_x64", True)
    pid, port = int(sys.argv[1]), int(sys.argv[2])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               coordinator_bind_address=f"127.0.0.1:{port}", initialization_timeout=60)
    import numpy as np
    import estimax as ex
    sys.path.insert(0, sys.argv[3])
    from runtime_problem import elbo, params, data, RUN

    xs = data()
    half = len(xs) // 2
    mine = xs[pid * half:(pid + 1) * half]  # this process's part of the batch
    result = ex.fit(elbo, params(), mine, devices="all", shard_data=(0,), **RUN)
    out = {"devices": len(jax.devices()), "processes": jax.process_count(),
           "params": {k: np.asarray(v.addressable_data(0)).tolist() for k, v in result.params.items()},
           "history": result.history.tolist()}
    print("RESULT" + json.dumps(out), flush=True)
    jax.distributed.shutdown()
    """
)

_PROBLEM = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax, numpyro.distributions as dist
    import estimax as ex

    H, D, N = 3, 5, 32

    @ex.expectation
    def elbo(p, xs):
        def point(xi):
            q = dist.Normal(p["mu"], jnp.exp(p["ls"])).to_event(1)
            z = ex.sample(q, name="z")
            log_p = (dist.Normal(jnp.zeros(H), 1.0).to_event(1).log_prob(z)
                     + dist.Normal(jnp.tanh(z @ p["W"]), 0.5).to_event(1).log_prob(xi))
            return log_p - q.log_prob(z)
        return jnp.mean(ex.vmap(point)(xs))

    def params():
        rng = np.random.default_rng(1)
        return {"W": jnp.asarray(rng.normal(size=(H, D)) * 0.3), "mu": jnp.zeros(H), "ls": jnp.full(H, -0.5)}

    def data():
        return np.random.default_rng(2).normal(size=(N, D))

    RUN = dict(optimizer=optax.adam(1e-2), steps=30, key=jax.random.key(4), maximize=True, chunk=10)
    """
)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fit_on_two_processes_over_loopback_equals_one_process(tmp_path):
    """Two processes (``jax.distributed`` on loopback, one CPU device each, gloo collectives)
    each pass their half of the batch; the result equals one process on the whole batch."""
    import json

    (tmp_path / "host.py").write_text(_HOST)
    (tmp_path / "runtime_problem.py").write_text(_PROBLEM)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    outputs = None
    for _ in range(3):  # a port taken between choosing and binding it: try another
        port = str(_free_port())
        procs = [subprocess.Popen([sys.executable, str(tmp_path / "host.py"), str(i), port, str(tmp_path)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
        try:
            outs = [p.communicate(timeout=300) for p in procs]
        except subprocess.TimeoutExpired:
            outs = None
        finally:
            for p in procs:  # a peer left alone would wait for the other in a collective
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if outs is not None and all(p.returncode == 0 for p in procs):
            outputs = [json.loads([ln for ln in o.decode().splitlines() if ln.startswith("RESULT")][-1][6:])
                       for o, _ in outs]
            break
        errors = "" if outs is None else outs[0][1].decode()[-1500:] + outs[1][1].decode()[-1500:]
        if "Failed to start RPC server" not in errors and "Failed to add port" not in errors:
            pytest.fail(f"the two processes failed:\n{errors}")
    assert outputs is not None, "no free port could be bound in three tries"
    sys.path.insert(0, str(tmp_path))
    try:
        from runtime_problem import RUN, data, elbo, params
    finally:
        sys.path.remove(str(tmp_path))
    one = ex.fit(elbo, params(), data(), **RUN)
    for out in outputs:
        assert out["devices"] == 2 and out["processes"] == 2
        for k, v in one.params.items():
            np.testing.assert_allclose(out["params"][k], np.asarray(v), rtol=0, atol=1e-10, err_msg=k)
        np.testing.assert_allclose(out["history"], one.history, rtol=0, atol=1e-10)


def _line_of(text: str) -> int:
    with open(__file__) as f:
        return next(i + 1 for i, line in enumerate(f) if text in line and "_line_of" not in line)


@ex.expectation
def _goes_negative(p):
    z = ex.sample(dist.Normal(0.0, 1.0), name="z")
    return z * 0.0 - jnp.log(p["s"])  # NaN once a step takes s below 0  # LOG-LINE


@ex.expectation
def _kink(p):
    z = ex.sample(dist.Normal(0.0, 1.0), name="z")
    return z * 0.0 + jnp.sqrt(p["a"] ** 2)  # its derivative is 0 * inf = NaN at a = 0  # SQRT-LINE


def test_nonfinite_names_the_step_the_leaf_and_the_line():
    # minimizing log(s) by SGD moves s by -lr/s: from 0.5 with lr 1 it jumps below 0
    @ex.expectation
    def shrink(p):
        return -_goes_negative(p)

    with pytest.warns(RuntimeWarning, match="non-finite objective at step 1"):
        result = ex.fit(shrink, {"s": jnp.array(0.5)}, optimizer=optax.sgd(1.0), steps=10, key=jax.random.key(0))
    # step 0: s = 0.5 - 1/0.5 = -1.5; step 1 evaluates log(-1.5)
    assert result.nonfinite_step == 1 and result.steps_run == 1
    assert float(result.params["s"]) == -1.5
    where = result.nonfinite_where
    assert where is not None and "`log`" in where, where
    assert where.endswith(f"test_runtime.py:{_line_of('# LOG-LINE')}"), where
    assert where in result.reason

    with pytest.warns(RuntimeWarning, match=r"non-finite gradient at step 0 .* in params\['a'\]"):
        kinked = ex.fit(_kink, {"a": jnp.array(0.0), "b": jnp.array(1.0)}, optimizer=optax.sgd(0.1), steps=5,
                        key=jax.random.key(0))
    assert kinked.nonfinite_step == 0 and "params['b']" not in kinked.reason
    assert kinked.nonfinite_where is not None and "`sqrt`" in kinked.nonfinite_where
    assert kinked.nonfinite_where.endswith(f"test_runtime.py:{_line_of('# SQRT-LINE')}")

    with pytest.raises(ex.NonFiniteError, match=r"non-finite gradient at step 0 .* in params\['a'\]") as err:
        ex.fit(_kink, {"a": jnp.array(0.0), "b": jnp.array(1.0)}, optimizer=optax.sgd(0.1), steps=5,
               key=jax.random.key(0), throw=True)
    assert err.value.result.nonfinite_step == 0 and float(err.value.result.params["a"]) == 0.0


def test_progress_every_k_steps_from_inside_the_compiled_loop():
    """``progress_every=k``: a host callback on every k-th step of a 100-step chunk; the values
    are those steps' estimates; the result is the same as without reports."""
    seen = []
    run = dict(optimizer=_OPT, steps=230, key=jax.random.key(2), maximize=True, chunk=100)
    result = ex.fit(_elbo, _params(), _X, progress=lambda step, value: seen.append((step, value)),
                    progress_every=20, **run)
    steps = [s for s, _ in seen]
    assert steps == list(range(20, 231, 20)), steps
    # that step's estimate (XLA may fuse the reported copy differently: rounding apart)
    np.testing.assert_allclose([v for _, v in seen], result.history[np.array(steps) - 1], rtol=1e-6)
    _same_run(result, ex.fit(_elbo, _params(), _X, **run))
    # without progress_every, a function hears the running objective after each chunk
    chunks = []
    ex.fit(_elbo, _params(), _X, progress=lambda step, value: chunks.append((step, value)), **run)
    assert [s for s, _ in chunks] == [100, 200, 230]
    with pytest.raises(ValueError, match="progress_every"):
        ex.fit(_elbo, _params(), _X, progress_every=0, **run)
    with pytest.raises(TypeError, match="progress must be True, False, None or a function"):
        ex.fit(_elbo, _params(), _X, progress="yes", **run)


def test_solve_progress_from_inside_one_compiled_loop(capsys, monkeypatch):
    monkeypatch.setattr(_progress, "_terminal", lambda stream: True)  # every report shown, as on a terminal

    def program(x):
        ex.subject_to(eq=jnp.sum(x**2) - 1.0, name="sphere")
        return jnp.sum(x * jnp.arange(1.0, 4.0))

    quiet = ex.solve(program, jnp.ones(3), solver=ex.solvers.AugmentedLagrangian(), max_steps=40)
    loud = ex.solve(program, jnp.ones(3), solver=ex.solvers.AugmentedLagrangian(), max_steps=40, progress=True, every=2)
    out = capsys.readouterr().out
    lines = [ln for ln in out.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines and all(ln.startswith("program: step ") for ln in lines)
    assert {int(ln.split()[2]) for ln in lines} <= set(range(2, loud.steps + 1, 2))
    np.testing.assert_array_equal(loud.params, quiet.params)  # reports change nothing
    assert loud.steps == quiet.steps


def _log_barrier(x):
    ex.subject_to(eq=x[0] + x[1] - 1.0, name="sum")
    return -jnp.log(x[0]) + x[1] ** 2  # NaN once a step takes x[0] below 0  # SOLVE-LOG-LINE


def test_solve_nonfinite_names_the_step_the_piece_and_the_line():
    sol = ex.solve(_log_barrier, jnp.array([0.05, 1.0]),
                   solver=ex.solvers.StochasticLagrangian(optimizer=optax.sgd(1.0)), max_steps=50)
    assert sol.result == ex.solvers.RESULTS.nonfinite and not sol.success
    assert f"step {sol.steps + 1} produced non-finite values" in sol.message
    assert "`log` at" in sol.message and "in the objective" in sol.message, sol.message
    assert f"test_runtime.py:{_line_of('# SOLVE-LOG-LINE')}" in sol.message
    assert bool(jnp.all(jnp.isfinite(sol.params)))  # the last finite iterate
