"""End-to-end training benchmark: ``ex.fit`` vs NumPyro's ``SVI.run`` vs a hand-written loop.

What it measures
----------------
The wall time of a *whole training run*, as a user experiences it: from the call that trains
to the trained parameters and the per-step objective estimates in hand, compilation
included. The model is ``bench_vi.py``'s VAE on scikit-learn's 1797 8x8 digits (binarized
at ``pixel > 7``): ``z ~ N(0, I_10)``, ``x ~ Bernoulli(decoder(z))``, MLP encoder and decoder
(hidden 128, tanh), one reparameterized sample per digit, minibatches of 64 digits, Adam
1e-3, the same initial parameters, ``--steps`` steps (default 2000). Three versions:

* ``estimax ex.fit``: ``ex.fit(objective, params, data, optimizer=optax.adam(1e-3),
  steps=..., key=..., maximize=True, progress=True)`` with the default chunk (100 steps
  fused in one ``lax.scan``, the progress bar updated between chunks). The objective is
  ``ex.objectives.elbo`` of a minibatch drawn inside the program (``ex.sample`` of 64
  uniform indices, as in ``examples/vae_digits.py``), divided by 64: nats per digit.
* ``numpyro SVI.run``: ``SVI(model, guide, optax_to_numpyro(optax.adam(1e-3)),
  Trace_ELBO()).run(key, steps, data, progress_bar=True)``: one jitted step per Python
  iteration, the progress bar updated every ``steps // 20`` steps. The minibatch is
  NumPyro's own, ``numpyro.plate("digits", 1797, subsample_size=64)`` in the model and the
  guide. Its indices are drawn without replacement (on CPU a 64-step Fisher-Yates scan);
  estimax and the hand-written loop draw with replacement. The plate scales the batch's log
  density by 1797/64, so the loss is the whole data set's; the script divides it by 1797.
* ``hand-written``: ``bench_vi.py``'s hand-written VAE estimator (``jax.random`` and
  ``jax.value_and_grad``) in a ``jax.jit`` step that draws the minibatch
  (``jax.random.randint``) and applies the Adam update, called from a Python loop; the step
  carries the key and the estimates stay on the device until the end. No progress display.

In every version the minibatch is drawn inside the step, from that step's key.

Each run is a fresh Python process (this script with ``--child``), as a user's script would
be: nothing compiled by an earlier run is reused, and JAX's persistent compilation cache is
off. Before its timer starts, the process imports everything, loads the data, and compiles
one tiny function (JAX's own first-use costs, the same for every version). Reported per
version, as the median over ``--repeats`` runs:

* ``total``: wall time of the training call, compile included;
* ``compile``: the part of it JAX spent tracing, lowering and compiling, read from
  ``jax.monitoring``'s compile events (the union of their time spans, so nested traces are
  not counted twice), and its parts: ``trace`` (for ex.fit this includes estimax's own work:
  staging the program and the estimator pass), ``lower`` (to MLIR) and ``XLA`` (the backend
  compile). For SVI.run it includes ``svi.init``, which runs the model and guide once op by
  op, compiling each op on first use;
* ``run``: ``total - compile``, and ``ms/step``: ``run / steps``;
* ``rerun``: the same call again in the same process. For ex.fit, with the same objective
  and optimizer objects, so nothing is compiled (its chunk function is cached): a direct
  measurement of the run without compile. For the hand-written loop, the loop with the step
  already compiled. ``SVI.run`` builds a new jitted step at each call, so a second call
  compiles again: not measured;
* ``final``: the mean per-digit objective estimate over the last 100 steps (the ELBO per
  digit; noisy, each run draws its own minibatches and noise) and, in the full run, the
  ELBO per digit of the first repeat's trained parameters on all 1797 digits
  (``bench_vi.py``'s shared evaluator: mean of 16 estimates with the same noise for every
  version, +- its standard error), so the runs can be compared;
* ratios: SVI.run / ex.fit and hand-written / ex.fit, of ``total``, ``compile`` and ``run``.

The versions take turns, the first one rotating between repeats. The issue's target -- a
full ``ex.fit`` run at least 1.5x faster end to end than ``SVI.run`` with its progress bar --
is printed as information. The script exits 0 whatever the numbers are.

``--quick`` is a smoke run, not a measurement: 50 steps, one run per version, the three in
one process one after another (``--one-process``: the later ones find JAX's shared caches
warm), no evaluation, and ``jax_threefry_partitionable`` off, which cuts XLA:CPU's compile
time of the samplers several-fold (``--threefry-partitionable``; the full run keeps JAX's
default).

How to run
----------
    python bench/bench_fit.py              # full run: 2000 steps, 3 runs per version (2-4 minutes)
    python bench/bench_fit.py --quick      # smoke run (30-40 s on 2 CPU cores)
    python bench/bench_fit.py --steps 10000 --repeats 5
    python bench/bench_fit.py --threefry-partitionable off

Set ``JAX_PLATFORMS=cpu`` to force the CPU. The progress bars of ex.fit and SVI.run go to
stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import optax  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO  # noqa: E402
from numpyro.optim import optax_to_numpyro  # noqa: E402

import bench_vi as vi  # noqa: E402  (bench/ is not a package: imported from this directory)
import estimax as ex  # noqa: E402

TARGET = 1.5  # SVI.run total / ex.fit total (information only)
LR = vi.LR["vae"]
LAST = 100  # steps averaged into the final objective
VERSIONS = ("estimax ex.fit", "numpyro SVI.run", "hand-written")


# ============================================================================================
# The three versions. ``build(data, init)`` returns ``(train, rerun)``: ``train(steps, key)``
# -> (trained params, per-step objective estimates per digit, NumPy), and ``rerun`` the same
# call again without compiling anything (None where the library offers no such call).
# ============================================================================================
def build_estimax(data, init):
    n_data = data.shape[0]
    elbo = ex.objectives.elbo(vi.vae_model, vi.vae_guide)

    @ex.expectation
    def minibatch_elbo(params, data):
        idx = ex.sample(dist.DiscreteUniform(0, n_data - 1).expand([vi.BATCH]), name="minibatch")
        return elbo(params, data[idx]) / vi.BATCH  # nats per digit

    optimizer = optax.adam(LR)

    def train(steps, key):
        r = ex.fit(minibatch_elbo, init, data, optimizer=optimizer, steps=steps, key=key, maximize=True,
                   progress=True)
        return r.params, np.asarray(r.history)

    return train, train  # the same objective and optimizer objects: the compiled chunk is reused


def build_numpyro(data, init):
    n_data = data.shape[0]

    def model(data):
        dec = numpyro.param("dec", init["dec"])
        with numpyro.plate("digits", n_data, subsample_size=vi.BATCH) as idx:
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([vi.LATENT]).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=vi.mlp(dec, z)).to_event(1), obs=data[idx])

    def guide(data):
        enc = numpyro.param("enc", init["enc"])
        with numpyro.plate("digits", n_data, subsample_size=vi.BATCH) as idx:
            loc, log_scale = vi.encode(enc, data[idx])
            numpyro.sample("z", dist.Normal(loc, jnp.exp(log_scale)).to_event(1))

    svi = SVI(model, guide, optax_to_numpyro(optax.adam(LR)), Trace_ELBO())

    def train(steps, key):
        r = svi.run(key, steps, data, progress_bar=True)
        # the loss is minus the ELBO of the whole data set (the plate scales the batch by n/64)
        return r.params, -np.asarray(r.losses) / n_data

    return train, None  # SVI.run jits a new step function at every call


def build_hand(data, init):
    n_data = data.shape[0]
    estimator = vi.hand_version("vae")  # (key, params, x) -> (batch ELBO, gradient of -ELBO)
    optimizer = optax.adam(LR)

    @jax.jit
    def step(params, opt_state, key, data):
        key, k_batch, k_est = jax.random.split(key, 3)
        idx = jax.random.randint(k_batch, (vi.BATCH,), 0, n_data)
        value, grads = estimator(k_est, params, data[idx])
        grads = jax.tree.map(lambda g: g / vi.BATCH, grads)  # nats per digit, as the others
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, value / vi.BATCH

    def train(steps, key):
        params, opt_state, values = init, optimizer.init(init), []
        for _ in range(steps):
            params, opt_state, key, value = step(params, opt_state, key, data)
            values.append(value)
        return params, np.asarray(jax.device_get(values))

    return train, train  # the second call finds the step compiled


BUILDERS = {"estimax ex.fit": build_estimax, "numpyro SVI.run": build_numpyro, "hand-written": build_hand}


# ============================================================================================
# Compile time, from JAX's own events
# ============================================================================================
_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "XLA",
}
KINDS = tuple(_EVENTS.values())


def _union(spans):
    total, cur = 0.0, None
    for a, b in sorted(spans):
        if cur is None or a > cur[1]:
            total += 0.0 if cur is None else cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    return total + (0.0 if cur is None else cur[1] - cur[0])


class CompileClock:
    """Records the time spans of JAX's trace / lower / compile events. ``seconds(t0, t1)``:
    the length of their union within ``[t0, t1]`` (``time.time``), in all and per kind."""

    def __init__(self):
        self.spans: list[tuple[str, float, float]] = []
        register = getattr(jax.monitoring, "register_event_time_span_listener", None)
        self.available = register is not None
        if register is not None:
            register(self._on_span)

    def _on_span(self, event, start, end, **kwargs):
        del kwargs
        if event in _EVENTS:
            self.spans.append((_EVENTS[event], start, end))

    def seconds(self, t0, t1):
        if not self.available:
            return {k: float("nan") for k in ("compile", *KINDS)}
        inside = [(k, max(a, t0), min(b, t1)) for k, a, b in self.spans if b > t0 and a < t1]
        out = {"compile": _union([(a, b) for _, a, b in inside])}
        for kind in KINDS:
            out[kind] = _union([(a, b) for k, a, b in inside if k == kind])
        return out


def timed(clock, fn):
    """``(result, wall seconds, compile seconds by kind)`` of ``fn()``."""
    gc.collect()
    w0, t0 = time.time(), time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - t0
    return out, elapsed, clock.seconds(w0, time.time())


# ============================================================================================
# One run, in its own process
# ============================================================================================
def child(versions, steps, seed, eval_estimates):
    """Runs ``versions`` in turn in this process; prints one ``RESULT {json}`` line each."""
    clock = CompileClock()
    data = vi.load_binary_digits()
    init = vi.init_vae_params()
    key = jax.random.PRNGKey(seed)
    jax.block_until_ready(jax.jit(lambda a: jnp.sin(a) @ a)(jnp.ones((4, 4))))  # JAX's first-use costs
    for version in versions:
        train, rerun = BUILDERS[version](data, init)  # plain Python: closures and objects, nothing traced
        (params, history), total, comp = timed(clock, lambda: train(steps, key))
        final = float(np.mean(history[-LAST:]))
        result = dict(version=version, total=total, **comp, final=final, rerun=None)
        if rerun is not None:
            _, again, again_comp = timed(clock, lambda: rerun(steps, key))
            result.update(rerun=again, rerun_compile=again_comp["compile"])
        if eval_estimates:
            evaluate = vi.make_evaluator("vae", data.shape[0])
            result["eval"] = evaluate(params, data, eval_estimates)
            result["eval_initial"] = evaluate(init, data, eval_estimates)
        print("RESULT " + json.dumps(result), flush=True)


def run_child(versions, steps, seed, eval_estimates, threefry):
    """``child(versions, ...)`` in a fresh Python process; its results, one dict per version."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", ",".join(versions), "--steps", str(steps),
           "--seed", str(seed), "--eval-estimates", str(eval_estimates)]
    env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")
    if threefry != "default":
        env["JAX_THREEFRY_PARTITIONABLE"] = "true" if threefry == "on" else "false"
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)  # stderr: the progress bars
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    results = [json.loads(line[len("RESULT ") :]) for line in lines]
    if proc.returncode != 0 or len(results) != len(versions):
        raise RuntimeError(f"the run of {versions} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    return results


# ============================================================================================
# The report
# ============================================================================================
def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 50 steps, 1 run per version, no evaluation")
    parser.add_argument("--steps", type=int, help="training steps per run (default 2000; 50 with --quick)")
    parser.add_argument("--repeats", type=int, help="runs per version (default 3; 1 with --quick)")
    parser.add_argument("--eval-estimates", type=int,
                        help="estimates in the final evaluation (default 16; 0 with --quick: none)")
    parser.add_argument("--seed", type=int, default=0, help="key of the first repeat (then seed + 1, ...)")
    parser.add_argument("--threefry-partitionable", choices=("default", "on", "off"),
                        help="jax_threefry_partitionable in the runs (default: JAX's own; off with --quick)")
    parser.add_argument("--one-process", action=argparse.BooleanOptionalAction,
                        help="the three versions of a repeat in one process, in turn (default with --quick)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # comma-separated versions to run in this process
    args = parser.parse_args(argv)
    defaults = dict(steps=(50, 2000), repeats=(1, 3), eval_estimates=(0, 16),
                    threefry_partitionable=("off", "default"), one_process=(True, False))
    for name, (quick_value, full_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick_value if args.quick else full_value)
    if args.steps < 1 or args.repeats < 1 or args.eval_estimates < 0:
        parser.error("--steps and --repeats must be at least 1, --eval-estimates at least 0")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if args.child:
        versions = args.child.split(",")
        unknown = sorted(set(versions) - set(VERSIONS))
        if unknown:
            parser.error(f"--child: unknown version(s) {unknown}")
        child(versions, args.steps, args.seed, args.eval_estimates)
        return 0

    t_start = time.perf_counter()
    dev = jax.devices()[0]
    load = " | load avg %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    print(f"estimax {ex.__version__} | jax {jax.__version__} | numpyro {numpyro.__version__} | "
          f"optax {optax.__version__} | python {platform.python_version()} | "
          f"device {dev.platform}:{getattr(dev, 'device_kind', '')} | {os.cpu_count()} CPUs{load}")
    print(f"VAE on the 8x8 digits, batch {vi.BATCH}, Adam {LR:g}: {args.steps} steps per run, "
          f"{args.repeats} run(s) per version, "
          + ("the three in one process per repeat" if args.one_process else "each in a fresh process")
          + f"; jax_threefry_partitionable: {args.threefry_partitionable}")

    results = {m: [] for m in VERSIONS}
    order = list(VERSIONS)
    for rep in range(args.repeats):
        turn = order[rep % len(order) :] + order[: rep % len(order)]
        groups = [turn] if args.one_process else [[m] for m in turn]
        for group in groups:
            for r in run_child(group, args.steps, args.seed + rep, args.eval_estimates if rep == 0 else 0,
                               args.threefry_partitionable):
                m = r["version"]
                results[m].append(r)
                rerun = "" if r["rerun"] is None else f"  rerun {r['rerun']:6.2f} s"
                print(f"[run {rep + 1}/{args.repeats}] {m:<16} total {r['total']:6.2f} s  compile "
                      f"{r['compile']:6.2f} s{rerun}  final objective {r['final']:.3f}", flush=True)
                if r["rerun"] is not None and r["rerun_compile"] > 0.05 * r["rerun"]:
                    print(f"  note: the rerun spent {r['rerun_compile']:.2f} s compiling")

    steps = args.steps
    print(f"\n=== a full training run of {steps} steps, seconds (median of {args.repeats}) ===")
    print("(total: the training call, compile included; compile: JAX's tracing, lowering and XLA compile "
          "within it; run = total - compile; rerun: the same call again, nothing compiled)")
    cols = ("version", "total", "compile", "trace", "lower", "XLA", "run", "ms/step", "rerun",
            f"final({min(LAST, steps)})", "ELBO/digit, all digits")
    fmt = "{:<16} {:>7} {:>8} {:>6} {:>6} {:>6} {:>6} {:>8} {:>6} {:>10} {:>22}"
    header = fmt.format(*cols)
    print(header)
    print("-" * len(header))
    summary = {}
    for m in VERSIONS:
        rs = results[m]
        s = {k: med([r[k] for r in rs]) for k in ("total", "compile", *KINDS, "rerun", "final")}
        s["run"] = med([r["total"] - r["compile"] for r in rs])
        summary[m] = s
        seconds = [f"{s[k]:.2f}" for k in ("total", "compile", *KINDS, "run")]
        rerun = "-" if s["rerun"] is None else f"{s['rerun']:.2f}"
        ev = rs[0].get("eval")
        ev = "-" if ev is None else f"{ev[0]:.3f} +- {ev[1]:.3f}"
        print(fmt.format(m, *seconds, f"{s['run'] / steps * 1e3:.3f}", rerun, f"{s['final']:.3f}", ev))
    initial = results[VERSIONS[0]][0].get("eval_initial")
    if initial is not None:
        print(f"(ELBO per digit on all digits at the initial parameters: {initial[0]:.3f} +- "
              f"{initial[1]:.3f}; the trained ones are each version's first run)")
    reruns = [f"{m} {s['rerun'] / steps * 1e3:.3f}" for m, s in summary.items() if s["rerun"] is not None]
    print(f"(rerun ms/step: {', '.join(reruns)})")

    print("\n=== ratios other / estimax ex.fit (above 1: ex.fit takes less time) ===")
    est = summary["estimax ex.fit"]
    fmt = "{:<16} {:>8} {:>8} {:>8}"
    print(fmt.format("version", "total", "compile", "run"))
    for m in VERSIONS[1:]:
        s = summary[m]
        print(fmt.format(m, *(vi.fmt_ratio(s[k], est[k]) for k in ("total", "compile", "run"))))

    ratio = summary["numpyro SVI.run"]["total"] / est["total"]
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(f"\n=== target: a full ex.fit run >= {TARGET}x faster end to end than SVI.run with its progress "
          f"bar (information) ===\nSVI.run total / ex.fit total = {ratio:.2f}x: {verdict}")
    load = " (load avg now %.1f)" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f} s{load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
