"""``fit(average_from=)``: Polyak-Ruppert averaging of the iterates -- the mean computed by the
compiled loop against one computed by hand, the noise it removes on a variational problem
with a closed-form optimum, checkpoints (bit-identical after a resume; another averaging
refused) and the option's errors."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import estimax as ex
from estimax.testing import key_from


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


# --- the mean, exactly -------------------------------------------------------------------


CURVATURE = np.array([1.0, 0.25, 3.0])
CENTER = np.array([1.0, -2.0, 0.5])
LR = 0.1


def quadratic(p):
    """Deterministic: each SGD step is p - LR * 2 * CURVATURE * (p - CENTER), no randomness."""
    return jnp.sum(CURVATURE * (p["w"] - CENTER) ** 2) + (p["b"] - 3.0) ** 2


def by_hand(p0: dict, steps: int) -> list[dict]:
    """The iterates of SGD on ``quadratic``, in float64 NumPy: entry ``i`` after step ``i``."""
    w, b = np.asarray(p0["w"], np.float64), float(p0["b"])
    out = [{"w": w, "b": b}]
    for _ in range(steps):
        w, b = w - LR * 2 * CURVATURE * (w - CENTER), b - LR * 2 * (b - 3.0)
        out.append({"w": w, "b": b})
    return out


P0 = {"w": np.array([5.0, 5.0, -4.0]), "b": np.array(0.0)}  # float64 (the tests run under x64)
SGD = optax.sgd(LR)  # one object: the compiled loop is reused across the tests


@pytest.mark.parametrize("average_from, first", [(20, 21), (0.5, 31), (0, 1), (0.99, 60)])
def test_averaged_params_are_the_mean_of_the_iterates(average_from, first):
    """The mean of the parameters after steps ``first .. 60`` (``average_from`` a step, or a
    fraction of the 60 steps rounded to the nearest), whatever the chunking."""
    iterates = by_hand(P0, 60)
    for chunk in (7, 100):
        result = ex.fit(quadratic, P0, optimizer=SGD, steps=60, key=jax.random.key(0), chunk=chunk,
                        average_from=average_from)
        np.testing.assert_allclose(result.params["w"], iterates[-1]["w"], rtol=1e-13)
        assert result.averaged_steps == 61 - first
        for name in ("w", "b"):
            expected = np.mean([it[name] for it in iterates[first:]], axis=0)
            np.testing.assert_allclose(result.averaged_params[name], expected, rtol=1e-13, atol=1e-13)
            assert np.asarray(result.averaged_params[name]).dtype == np.float64


def test_without_averaging_and_before_it_starts():
    plain = ex.fit(quadratic, P0, optimizer=SGD, steps=10, key=jax.random.key(0))
    assert plain.averaged_params is None and plain.averaged_steps == 0
    # a run stopped (here by its callback, after 14 steps) before step average_from + 1 has
    # nothing to average: the "mean" is the current parameters
    early = ex.fit(quadratic, P0, optimizer=SGD, steps=60, key=jax.random.key(0), chunk=7, average_from=20,
                   callback=lambda info: info.step >= 14)
    assert early.steps_run == 14 and early.averaged_steps == 0
    np.testing.assert_array_equal(early.averaged_params["w"], early.params["w"])


@pytest.mark.parametrize(
    "average_from, match",
    [
        (60, r"average_from=60 is not a step of this run.*between 0 and steps - 1 = 59"),
        (-1, r"average_from=-1 is not a step of this run"),
        (1.0, r"average_from=1\.0 is not a fraction of steps in \[0, 1\).*for a step index pass an integer"),
        (float("nan"), r"average_from=nan is not a fraction"),
        (True, r"average_from must be a step index.*got bool True"),
        ("half", r"average_from must be a step index.*got str 'half'"),
    ],
)
def test_average_from_errors_name_the_value(average_from, match):
    with pytest.raises(ex.ArgumentError, match=match):
        ex.fit(quadratic, P0, optimizer=SGD, steps=60, key=jax.random.key(0), average_from=average_from)


# --- the noise it removes ----------------------------------------------------------------

# gaussian_mean.emx's model: z ~ N(0, 1), x_i ~ N(z, 1); guide N(m, exp(log_s)). The optimum is
# the exact posterior: m* = sum(x) / (N + 1).
X = np.random.default_rng(0).normal(1.5, 1.0, size=20)
M_STAR = X.sum() / (len(X) + 1)
ADAM = optax.adam(0.05)


@ex.expectation
def elbo(params, x):
    q = dist.Normal(params["m"], jnp.exp(params["log_s"]))
    z = ex.sample(q, name="z")
    return dist.Normal(0.0, 1.0).log_prob(z) + jnp.sum(dist.Normal(z, 1.0).log_prob(x)) - q.log_prob(z)


def test_averaging_removes_the_fluctuation_of_the_last_iterate():
    """Adam at a constant step size 0.05 reaches the optimum in about 50 steps, then fluctuates
    around it: the last iterate's m is one draw of that fluctuation. Over 64 runs (keys from
    the test's inputs) the squared error of the mean of the second half's iterates is smaller
    than the last iterate's by more than 3 standard errors of their difference, and the
    averaged m is unbiased: its mean error is within 5 standard errors of 0 (the gradient in m
    is linear in m, so the fluctuation averages to the optimum)."""
    steps, runs = 1000, 64
    keys = jax.random.split(key_from("fit average_from", steps, runs), runs)
    last, averaged = [], []
    for key in keys:
        result = ex.fit(elbo, {"m": jnp.array(0.0), "log_s": jnp.array(0.0)}, X, optimizer=ADAM, steps=steps,
                        key=key, maximize=True, chunk=steps, average_from=0.5)
        last.append(float(result.params["m"]) - M_STAR)
        averaged.append(float(result.averaged_params["m"]) - M_STAR)
    last, averaged = np.array(last), np.array(averaged)
    gain = last**2 - averaged**2
    assert gain.mean() > 3 * gain.std(ddof=1) / np.sqrt(runs), (last, averaged)
    assert abs(averaged.mean()) < 5 * averaged.std(ddof=1) / np.sqrt(runs), averaged


# --- checkpoints -------------------------------------------------------------------------


def _run(folder, **kwargs):
    run = dict(optimizer=ADAM, steps=300, key=jax.random.key(3), maximize=True, chunk=40, average_from=100)
    run.update(kwargs)
    return ex.fit(elbo, {"m": jnp.array(0.0), "log_s": jnp.array(0.0)}, X,
                  checkpoint=None if folder is None else ex.Checkpoint(folder, every=100), **run)


def test_a_resumed_run_holds_the_mean_of_an_uninterrupted_one(tmp_path):
    whole = _run(None)

    def ctrl_c(info):  # Ctrl-C after step 150: the chunk (to 180) finishes and is saved
        if info.step >= 150:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "run", callback=ctrl_c)
    resumed = _run(tmp_path / "run")
    assert resumed.averaged_steps == whole.averaged_steps == 200
    for name in ("m", "log_s"):
        np.testing.assert_array_equal(resumed.averaged_params[name], whole.averaged_params[name])
        np.testing.assert_array_equal(resumed.params[name], whole.params[name])
    # another averaging is another run: refused, naming it
    with pytest.raises(ex.CheckpointError, match=r"average_from 100 \(now 150\)"):
        _run(tmp_path / "run", average_from=150)
    with pytest.raises(ex.CheckpointError, match=r"average_from 100 \(now None\)"):
        _run(tmp_path / "run", average_from=None)
    # a fraction of a larger `steps` averages from another step: refused too
    with pytest.raises(ex.CheckpointError, match=r"average_from 100 \(now 200\)"):
        _run(tmp_path / "run", steps=600, average_from=1 / 3)
    # a step index continues the run with the same averaging, as one longer run would go
    longer, more = _run(None, steps=400), _run(tmp_path / "run", steps=400)
    assert more.averaged_steps == 300
    np.testing.assert_array_equal(more.averaged_params["m"], longer.averaged_params["m"])


def test_a_run_without_averaging_resumes_a_checkpoint_written_without_it(tmp_path):
    """Averaging adds to a checkpoint only when it is on: a run without it saves and identifies
    itself as before, and refuses to resume into an averaged one."""
    _run(tmp_path / "plain", steps=100, average_from=None)
    again = _run(tmp_path / "plain", steps=200, average_from=None)
    assert again.steps_run == 200 and again.averaged_params is None
    with pytest.raises(ex.CheckpointError, match=r"average_from None \(now 50\)"):
        _run(tmp_path / "plain", steps=200, average_from=50)
