"""``fit``: convergence to a closed-form optimum, the fused loop (one compile, partial
chunks, determinism, resume), the stopping rules, progress output and argument errors."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import estimax as ex
from estimax.runtime import _progress
from estimax.solvers import _fit
from estimax.solvers._fit import EarlyStop, FitProgress, FitResult, fit

KEY = jax.random.PRNGKey(0)
X = jnp.array([1.0, 2.0, 3.0, 0.5])  # n = 4, sum = 6.5
N = X.shape[0]
POST_MEAN = float(X.sum()) / (N + 1)  # 1.3
POST_LOG_SD = -0.5 * np.log(N + 1)  # log sqrt(1 / (n + 1))
INIT = {"m": jnp.float32(0.0), "log_s": jnp.float32(0.0)}
# Shared optimizer objects: fit reuses its compiled chunk function for the same objective,
# optimizer object, argnums, chunk and maximize, which keeps this file fast.
ADAM = optax.adam(0.05)
SGD = optax.sgd(0.1)


@ex.expectation
def neg_elbo(params, x):
    """-(log p(z) + log p(x | z) - log q(z)) for p(z) = N(0, 1), p(x_i | z) = N(z, 1), q = N(m, s)."""
    q = dist.Normal(params["m"], jnp.exp(params["log_s"]))
    z = ex.sample(q, name="z")
    return -(dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(x).sum() - q.log_prob(z))


@ex.expectation
def elbo(params, x):
    return -neg_elbo(params, x)


def log_evidence(x) -> float:
    """log p(x) with z integrated out: x ~ N(0, I + 11^T)."""
    x = np.asarray(x, np.float64)
    cov = np.eye(len(x)) + 1.0
    _, logdet = np.linalg.slogdet(cov)
    return float(-0.5 * (x @ np.linalg.solve(cov, x) + logdet + len(x) * np.log(2 * np.pi)))


def same_tree(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# --- convergence -------------------------------------------------------------------------


def test_converges_to_the_conjugate_posterior():
    lr, steps = 5e-4, 8000
    result = fit(neg_elbo, INIT, X, optimizer=optax.sgd(lr), steps=steps, key=KEY, chunk=1000)
    # Tolerance. The reparameterized gradient of -ELBO is linear around the optimum:
    #   d/dm     = (n+1)(m - m*) + (n+1) s eps             curvature n+1, noise var (n+1)
    #   d/dlog_s ~ 2 (log_s - log_s*) + (eps^2 - 1)        curvature 2,   noise var 2
    # (at s = s* = 1/sqrt(n+1)). SGD with step lr on a quadratic of curvature h with gradient
    # noise variance v is an AR(1) process with stationary variance lr^2 v / (1 - (1 - lr h)^2)
    # ~= lr v / (2h) = lr / 2 for both coordinates. The initial error has decayed by
    # exp(-lr h steps) <= exp(-8) by the end (h = 2 is the slower one), so the last iterate
    # is within 5 stationary standard deviations of the optimum: 5 sqrt(lr / 2) ~= 0.079.
    tol = 5 * np.sqrt(lr / 2)
    assert abs(float(result.params["m"]) - POST_MEAN) < tol
    assert abs(float(result.params["log_s"]) - POST_LOG_SD) < tol
    # At the optimum q is the exact posterior, log p(x, z) - log q(z) = log p(x) for every z,
    # so the estimates have (almost) no noise and -ELBO = -log p(x). Off the optimum by d_m and
    # d_log_s (each below tol) the gap is KL(q || posterior) ~= (n+1) d_m^2 / 2 + d_log_s^2,
    # below 3.5 tol^2 ~= 0.022 for n = 4 (its stationary mean is 3.5 lr / 2 ~= 0.001).
    assert abs(result.averages[-1] - (-log_evidence(X))) < 3.5 * tol**2
    assert not result.stopped_early and result.reason == f"completed {steps} steps"


# --- the fused loop ----------------------------------------------------------------------


def counting_sgd(lr, counter):
    """optax.sgd whose ``update`` counts how often it is traced (one per chunk-function trace)."""
    inner = optax.sgd(lr)

    def update(updates, state, params=None):
        counter["update"] += 1
        return inner.update(updates, state, params)

    return optax.GradientTransformation(inner.init, update)


def test_chunk_function_compiles_once_including_the_partial_chunk():
    counter = {"update": 0, "objective": 0}

    @ex.expectation
    def objective(params, x):
        counter["objective"] += 1  # counts Python traces of the program
        return neg_elbo(params, x)

    opt = counting_sgd(1e-2, counter)
    # 3 chunks: 100, 100 and a partial 50 that reuses the compiled scan with 50 steps masked.
    result = fit(objective, INIT, X, optimizer=opt, steps=250, key=KEY, chunk=100)
    assert result.steps_run == 250
    # The optimizer update is traced once: by the single trace of the chunk function (the
    # scan traces its body once). A retrace per chunk or for the partial chunk would add 1.
    assert counter["update"] == 1
    # The program is staged once (estimax caches the staged program per signature, so this
    # alone would not reveal a retrace of the chunk function; the count above does).
    assert counter["objective"] == 1
    # Continuing with the same objective and optimizer objects reuses the compiled function,
    # also for a run shorter than one chunk.
    state = dict(opt_state=result.opt_state, key=result.key)
    more = fit(objective, result.params, X, optimizer=opt, steps=30, chunk=100, **state)
    assert more.steps_run == 30
    assert counter == {"update": 1, "objective": 1}
    # Another optimizer object is another function to compile.
    fit(objective, INIT, X, optimizer=counting_sgd(1e-2, counter), steps=10, key=KEY, chunk=100)
    assert counter["update"] == 2


def test_history_partial_last_chunk_and_chunk_size():
    """Step i always uses the i-th key and masked steps change nothing: any chunk size gives
    the same run, bit for bit."""
    result = fit(neg_elbo, INIT, X, optimizer=ADAM, steps=250, key=KEY, chunk=100, window=40)
    assert isinstance(result, FitResult)
    assert result.steps_run == 250 and not result.stopped_early
    assert result.history.shape == (250,) and isinstance(result.history, np.ndarray)
    assert np.all(np.isfinite(result.history))
    # one running average per chunk, the last one after the partial chunk of 50
    np.testing.assert_array_equal(result.average_steps, [100, 200, 250])
    for avg, at in zip(result.averages, result.average_steps, strict=True):
        np.testing.assert_allclose(avg, result.history[at - 40 : at].mean(), rtol=1e-6)
    # the objective went down
    assert result.history[-50:].mean() < result.history[:10].mean()
    assert "steps_run=250" in repr(result)

    whole = fit(neg_elbo, INIT, X, optimizer=ADAM, steps=250, key=KEY, chunk=50)
    same_tree(result.params, whole.params)
    same_tree(result.opt_state, whole.opt_state)
    same_tree(result.key, whole.key)
    np.testing.assert_array_equal(result.history, whole.history)
    # fewer steps than one chunk: a single partial chunk
    short = fit(neg_elbo, INIT, X, optimizer=ADAM, steps=30, key=KEY, chunk=100)
    np.testing.assert_array_equal(short.history, whole.history[:30])
    np.testing.assert_array_equal(short.average_steps, [30])


def test_determinism_and_resume():
    opt = ADAM
    a = fit(neg_elbo, INIT, X, optimizer=opt, steps=150, key=KEY, chunk=50)
    b = fit(neg_elbo, INIT, X, optimizer=opt, steps=150, key=KEY, chunk=50)
    same_tree(a.params, b.params)
    np.testing.assert_array_equal(a.history, b.history)
    other = fit(neg_elbo, INIT, X, optimizer=opt, steps=150, key=jax.random.PRNGKey(1), chunk=50)
    assert not np.array_equal(a.history, other.history)
    # 100 steps, then 50 more from (params, opt_state, key) of the first run == 150 steps
    first = fit(neg_elbo, INIT, X, optimizer=opt, steps=100, key=KEY, chunk=50)
    rest = fit(
        neg_elbo, first.params, X, optimizer=opt, steps=50, key=first.key, opt_state=first.opt_state, chunk=50
    )
    same_tree(rest.params, a.params)
    np.testing.assert_array_equal(np.concatenate([first.history, rest.history]), a.history)


def test_maximize_flips_the_direction_not_the_reported_sign():
    lo = fit(neg_elbo, INIT, X, optimizer=ADAM, steps=100, key=KEY, chunk=50)
    hi = fit(elbo, INIT, X, optimizer=ADAM, steps=100, key=KEY, chunk=50, maximize=True)
    # maximizing the ELBO is minimizing -ELBO, step for step; the history is the ELBO itself
    same_tree(hi.params, lo.params)
    np.testing.assert_allclose(hi.history, -lo.history, rtol=1e-6)
    np.testing.assert_allclose(hi.averages, -lo.averages, rtol=1e-6)


def test_params_at_another_position():
    @ex.expectation
    def data_first(x, params):
        return neg_elbo(params, x)

    a = fit(data_first, INIT, X, argnums=1, optimizer=ADAM, steps=60, key=KEY, chunk=50)
    b = fit(neg_elbo, INIT, X, optimizer=ADAM, steps=60, key=KEY, chunk=50)
    same_tree(a.params, b.params)


# --- stopping rules ----------------------------------------------------------------------


def quadratic(p):
    """A plain (deterministic) function: fit makes it a program. Minimum 0 at p = 1."""
    return jnp.sum((p - 1.0) ** 2)


def test_early_stop_on_a_plateau():
    # SGD with step 0.1 on (p - 1)^2 contracts the error by 0.8 per step: after a few chunks
    # of 10 steps the running average improves by far less than min_delta.
    stop = EarlyStop(patience=2, min_delta=1e-4)
    result = fit(quadratic, jnp.array([5.0]), optimizer=SGD, steps=10_000, key=KEY, chunk=10,
                 early_stop=stop)
    assert result.stopped_early
    assert result.reason.startswith("plateau") and "2 chunk(s)" in result.reason
    assert result.steps_run < 100 and result.steps_run % 10 == 0
    assert len(result.history) == result.steps_run
    # the rule as documented: the last `patience` averages did not beat the best before them by min_delta
    best_before = result.averages[:-2].min()
    assert np.all(result.averages[-2:] >= best_before - 1e-4)
    np.testing.assert_allclose(result.params, [1.0], atol=1e-3)
    # the same rule given as a dict
    again = fit(quadratic, jnp.array([5.0]), optimizer=SGD, steps=10_000, key=KEY, chunk=10,
                early_stop={"patience": 2, "min_delta": 1e-4})
    assert again.steps_run == result.steps_run


def test_no_early_stop_while_improving():
    # the error shrinks by 0.8^10 per chunk: every chunk improves on the last
    result = fit(quadratic, jnp.array([5.0]), optimizer=SGD, steps=60, key=KEY, chunk=10,
                 early_stop=EarlyStop(patience=1, min_delta=0.0))
    assert not result.stopped_early and result.steps_run == 60
    assert np.all(np.diff(result.averages) < 0)


@ex.expectation
def nan_value(p):
    # value p (gradient 1) while p >= 0; the value is NaN once p < 0
    z = ex.sample(dist.Normal(0.0, 1.0), name="z")
    return jnp.sum(p + 0.0 * jnp.sqrt(p)) + 0.0 * z


@ex.expectation
def nan_gradient(p):
    # value p (finite everywhere); once p < 0 the gradient of sqrt(max(p, 0)) is 0 * inf = NaN
    z = ex.sample(dist.Normal(0.0, 1.0), name="z")
    return jnp.sum(p + 0.0 * jnp.sqrt(jnp.maximum(p, 0.0))) + 0.0 * z


@pytest.mark.parametrize("objective, what", [(nan_value, "objective"), (nan_gradient, "gradient")])
def test_non_finite_stops_names_the_step_and_keeps_the_last_finite_params(objective, what):
    # SGD with step 0.1 on gradient 1: p_k = 1.05 - 0.1 k, so p_11 = -0.05 < 0 and step 11
    # (0-based) is the first whose objective/gradient is non-finite. Chunks of 4: it is the
    # fourth step of the third chunk.
    p0 = jnp.array([1.05])
    with pytest.warns(RuntimeWarning, match=rf"non-finite {what} at step 11"):
        result = fit(objective, p0, optimizer=SGD, steps=100, key=KEY, chunk=4)
    assert result.stopped_early and result.nonfinite_step == 11
    assert f"non-finite {what} at step 11" in result.reason
    assert result.steps_run == 11 and result.history.shape == (11,)
    assert np.all(np.isfinite(result.history))
    np.testing.assert_allclose(result.params, [-0.05], atol=1e-5)  # finite: the params at step 11
    # the state is exactly that of an 11-step run (params, optimizer state and key)
    clean = fit(objective, p0, optimizer=SGD, steps=11, key=KEY, chunk=4)
    same_tree(result.params, clean.params)
    same_tree(result.key, clean.key)
    np.testing.assert_array_equal(result.average_steps, [4, 8, 11])


def test_callback_sees_each_chunk_and_can_stop():
    seen = []

    def callback(info):
        assert isinstance(info, FitProgress)
        seen.append((info.step, info.estimates.shape, info.average))
        return info.step >= 30

    result = fit(quadratic, jnp.array([5.0]), optimizer=SGD, steps=200, key=KEY, chunk=10, callback=callback)
    assert [s for s, _, _ in seen] == [10, 20, 30]
    assert all(shape == (10,) for _, shape, _ in seen)
    assert result.stopped_early and result.steps_run == 30 and "callback" in result.reason


# --- progress ----------------------------------------------------------------------------


def test_progress_is_off_by_default_when_stderr_is_not_a_terminal(capsys):
    fit(quadratic, jnp.array([5.0]), optimizer=SGD, steps=30, key=KEY, chunk=10)
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""


def test_progress_without_tqdm_prints_one_line(capsys, monkeypatch):
    monkeypatch.setattr(_progress, "interactive", lambda: True)  # as on a terminal
    monkeypatch.setattr(_progress, "_import_tqdm", lambda: None)
    fit(quadratic, jnp.array([5.0]), optimizer=SGD, steps=30, key=KEY, chunk=10, progress=True)
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1  # one line, rewritten with \r
    last = err.split("\r")[-1]
    assert "30/30 steps" in last and "objective=" in last


def test_progress_with_tqdm(capsys, monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.setattr(_progress, "interactive", lambda: True)  # as on a terminal
    fit(quadratic, jnp.array([5.0]), optimizer=SGD, steps=30, key=KEY, chunk=10, progress=True)
    err = capsys.readouterr().err
    assert "30/30" in err and "objective=" in err


def test_progress_asked_for_in_a_log_is_plain_lines(capsys):
    """progress=True with stderr not a terminal: lines ending in a newline, no carriage return."""
    fit(quadratic, jnp.array([5.0]), optimizer=SGD, steps=30, key=KEY, chunk=10, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n")
    assert "step 30/30 (100%)" in err.splitlines()[-1] and "objective=" in err


# --- errors naming the argument ----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(steps=0), ValueError, r"steps must be >= 1.*steps=0"),
        (dict(steps=2.5), ValueError, r"steps must be an integer"),
        (dict(chunk=0), ValueError, r"chunk must be >= 1"),
        (dict(window=-3), ValueError, r"window must be >= 1"),
        (dict(optimizer=optax.adam), TypeError, r"optimizer must be an optax Gradient.*call it"),
        (dict(optimizer="adam"), TypeError, r"optimizer must be an optax Gradient.*got str"),
        (dict(key=0), ex.ArgumentError, r"key must be a single PRNG key"),
        (dict(key=jax.random.split(KEY, 3)), ex.ArgumentError, r"single PRNG key.*uint32\[3, 2\]"),
        (dict(argnums=(0,)), ex.ArgumentError, r"argnums must be one integer"),
        (dict(argnums=2), ex.ArgumentError, r"argnums=2 is out of range.*between 0 and 1"),
        (dict(early_stop=5), TypeError, r"early_stop must be None, an EarlyStop"),
        (dict(early_stop={"patience": 2, "delta": 0.1}), ValueError, r"unknown field\(s\) \['delta'\]"),
        (dict(callback="print"), TypeError, r"callback must be callable"),
    ],
)
def test_argument_errors(kwargs, error, match):
    call = dict(optimizer=optax.adam(0.1), steps=10, key=KEY)
    call.update(kwargs)
    with pytest.raises(error, match=match):
        fit(neg_elbo, INIT, X, **call)


def test_objective_and_params_errors():
    with pytest.raises(ex.ProgramError, match=r"objective must be a program.*got int"):
        fit(3, INIT, X, optimizer=optax.adam(0.1), steps=10, key=KEY)
    with pytest.raises(ex.ProgramError, match=r"params leaf \['n'\] has dtype int32"):
        fit(neg_elbo, {"m": 0.0, "log_s": 0.0, "n": 3}, X, optimizer=optax.adam(0.1), steps=10, key=KEY)
    with pytest.raises(ex.ProgramError, match=r"needs a single scalar"):
        fit(lambda p: (p - 1.0) ** 2, jnp.zeros(3), optimizer=optax.adam(0.1), steps=10, key=KEY)
    with pytest.raises(ValueError, match=r"EarlyStop: patience must be an integer >= 1"):
        EarlyStop(patience=0)


def test_docstring_examples_run():
    result = doctest.testmod(_fit, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_fit_and_solve_word_the_same_option_mistakes_alike():
    """``fit`` and ``ex.solve`` check their shared options in one place: the same mistake, the
    same ``ArgumentError`` and wording."""

    def constrained(x):
        ex.subject_to(eq=jnp.sum(x) - 1.0, name="sum")
        return jnp.sum(x**2)

    run = dict(optimizer=optax.adam(0.1), steps=10, key=KEY)
    cases = [
        (dict(key=0), dict(key=0), r"key must be a single PRNG key \(jax.random.key\(0\) or jax.random.PRNGKey\(0\)\)"),
        (dict(checkpoint=3), dict(checkpoint=3), r"checkpoint must be a folder path or an estimax.Checkpoint; got int"),
        (dict(progress="yes"), dict(progress="yes"), r"progress must be True, False, None"),
        (dict(steps=0), dict(max_steps=0), r"steps must be >= 1 \("),
        (dict(chunk=2.5), dict(every=2.5), r"must be an integer >= 1 \("),
    ]
    for fit_kw, solve_kw, match in cases:
        with pytest.raises(ex.ArgumentError, match=match) as from_fit:
            fit(neg_elbo, INIT, X, **{**run, **fit_kw})
        with pytest.raises(ex.ArgumentError, match=match) as from_solve:
            ex.solve(constrained, jnp.ones(2), **solve_kw)
        assert str(from_fit.value).startswith("fit: ") and str(from_solve.value).startswith("ex.solve: ")
    assert str(from_fit.value)[len("fit: "):].split("(")[0].replace("chunk", "X") == \
        str(from_solve.value)[len("ex.solve: "):].split("(")[0].replace("every", "X")


def test_fit_result_carries_the_results_code():
    done = fit(neg_elbo, INIT, X, optimizer=ADAM, steps=20, key=KEY, chunk=10)
    assert done.result == ex.solvers.RESULTS.successful
    stopped = fit(neg_elbo, INIT, X, optimizer=ADAM, steps=50, key=KEY, chunk=10, callback=lambda info: True)
    assert stopped.result == ex.solvers.RESULTS.stopped_by_callback and stopped.stopped_early
    assert isinstance(_fit.Step(None, ADAM, 0, False), ex.solvers.Solver)
