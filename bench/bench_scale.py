"""Weak and strong scaling of the IWELBO gradient over 1, 2, 4 and 8 devices.

What it measures
----------------
One IWELBO gradient with ``K`` particles, ``ex.value_and_grad(ex.objectives.iwelbo(model,
guide, K))``, jitted and called under a one-axis device mesh (``ex.device_mesh(n)`` and
``jax.set_mesh``). Under the mesh estimax partitions the ``K`` particle lanes over the mesh
axis, ``K / n`` per device, and XLA's SPMD partitioner inserts the reductions. The model:

    z ~ N(0, I_H),   x | z ~ N(decoder(z), 0.5^2 I_D),   decoder: H -> 64 -> D, tanh,

with ``H = 16``, ``D = 64`` and one observation ``x``; the guide ``q(z) = N(mu,
diag(exp(ls))^2)``, reparameterized. The gradient is taken with respect to ``mu``, ``ls``
and the decoder's weights, so each particle does real work (two small matrix products
forward, their transposes backward).

Each row is run two ways in the same process, on the same devices:

* ``estimax``      -- the objective above, ``ex.value_and_grad`` of ``ex.objectives.iwelbo``;
* ``hand-written`` -- the same estimator written directly: ``eps ~ N(0, 1)`` of shape
  ``(K, H)`` from ``jax.random``, ``z = mu + exp(ls) * eps``, ``log w = log p(x, z) - log
  q(z)``, ``value = logsumexp(log w) - log K``, gradients by ``jax.value_and_grad``; under
  the mesh ``eps`` is constrained to be split along its particle axis
  (``jax.lax.with_sharding_constraint(eps, P("devices"))``), which is what the partitioner
  propagates from.

Two experiments:

* **strong scaling**: fixed ``K`` (``--k``, default ``2**14``) over ``n`` devices; speedup
  ``T(1) / T(n)`` and efficiency ``T(1) / (n T(n))``;
* **weak scaling**: ``K = K0 * n`` (``--k0``, default ``2**12``); efficiency ``T(1) / T(n)``
  (1 is perfect: the same work per device, the same time).

A time is the median over ``--repeats`` repeats (default 5) of the mean wall time per call
of ``--calls`` calls (default 20) of the compiled function, ``jax.block_until_ready`` after
each, after ``--warmup`` untimed calls. All rows and both versions are timed in rounds, one
repeat of each per round, the order rotating from round to round, so that a change in the
machine's load falls on every row alike. Reported per row:

* ``estimax ms``, ``hand ms``: the medians, and the range of the repeats;
* ``est/hand``: the ratio estimax / hand-written;
* ``speedup``, ``effic.``: each version's speedup and efficiency against its own one-device
  time;
* ``cores``: this process's CPU time (all its threads) over the wall time while the version
  was timed, i.e. how many cores it kept busy; ``others``: the cores that other processes on
  the machine used meanwhile (from ``/proc/stat``; ``n/a`` elsewhere). On a GPU, ``cores``
  is host time only;
* ``compile s``: trace + lower + XLA compile of each version (information);
* ``split``: whether the compiled executable holds the particles split, i.e. an
  ``f32[K/n,H]`` array and no ``f32[K,H]`` one.

The script never passes or fails on a time; compare ratios from the same run.

Before the timings, an agreement check. With the same key, estimax draws the same particles
whatever the device count (each lane's key derives from its lane index), and so does
``jax.random.normal`` with JAX's default partitionable threefry. So the value and gradient at
``n`` devices must equal those at one device up to the order of floating-point sums: for
each version and each ``K`` of the run, the largest relative discrepancy over the device
counts, ``|v_n - v_1| / |v_1|`` and ``max |g_n - g_1| / max |g_1|`` per parameter, is printed
(float32; about 1e-6, flagged above 1e-5). The two versions draw different particles, so
they are compared with each other only as estimates of the same IWELBO_K. The full run
compiles a one-device reference for every ``K`` of the weak-scaling rows; ``--quick`` checks
only the ``K`` that have a one-device row (the strong-scaling ``K`` and ``K0``).

Devices
-------
On a CPU the devices are forced host devices: the script appends
``--xla_force_host_platform_device_count=8`` to ``XLA_FLAGS`` before JAX is imported (a
count already in ``XLA_FLAGS`` is kept). It does not with ``--no-force``, or when a GPU is
present (a ``/dev/nvidia*`` or ``/dev/kfd`` device and a JAX CUDA/ROCm plugin installed, and
``JAX_PLATFORMS`` not excluding it); it then uses the real devices of JAX's default backend,
as many as exist up to 8, and drops the device counts above that. Forced host devices share
the machine's cores: on a 2-core machine 8 of them run on 2 cores, so no speedup beyond 2
can appear there, and what the rows for 4 and 8 devices show is the cost of the partitioning
(more, smaller computations and the cross-device reductions) at a fixed amount of compute.
XLA:CPU also runs a single device's program on several threads where it can, so the
one-device row may already keep more than one core busy (the ``cores`` column), which lowers
the ceiling further.
The script is meant for real multi-device machines as well. float32 throughout (x64 off).

How to run
----------
    python bench/bench_scale.py                  # full run: 1-1.5 minutes on 2 CPU cores
    python bench/bench_scale.py --quick          # smoke run: 25-40 s (K 8x smaller)
    python bench/bench_scale.py --devices 1,2,4 --k 65536 --k0 8192 --repeats 7
    python bench/bench_scale.py --no-force       # only the devices JAX sees by itself

The script exits 0 whatever the numbers are.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import sys

FORCED_DEVICES = 8
FORCE_FLAG = "--xla_force_host_platform_device_count"


def _gpu_present() -> bool:
    """A GPU that JAX would use: a device node, a JAX GPU plugin, and ``JAX_PLATFORMS`` not
    restricting JAX to other platforms. Checked without importing JAX."""
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    if platforms and not any(p in platforms for p in ("cuda", "gpu", "rocm")):
        return False
    nodes = os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0") or os.path.exists("/dev/kfd")
    if not nodes:
        return False
    plugins = [m.name for m in pkgutil.iter_modules() if m.name.startswith(("jax_cuda", "jax_rocm"))]
    return bool(plugins) or importlib.util.find_spec("jax_plugins") is not None


# The forced host devices must be configured before JAX is imported (estimax imports it).
FORCED = False
if "--no-force" not in sys.argv[1:] and not _gpu_present():
    flags = os.environ.get("XLA_FLAGS", "")
    if FORCE_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FORCE_FLAG}={FORCED_DEVICES}".strip()
    FORCED = True

import argparse  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from jax.scipy.special import logsumexp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import estimax as ex  # noqa: E402
from estimax.runtime import _jax_compat as compat  # noqa: E402

H = 16  # latent dimensions
HIDDEN = 64  # decoder hidden units
D = 64  # observation dimensions
SIGMA = 0.5  # likelihood scale
AXIS = "devices"  # the axis name of ex.device_mesh
FLAG_ABOVE = 1e-5  # agreement: relative discrepancies above this are flagged
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


# ============================================================================================
# Model, parameters, data
# ============================================================================================
def init_params(seed=0):
    rng = np.random.default_rng(seed)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return {
        "mu": f32(0.1 * rng.normal(size=H)),
        "ls": f32(np.full(H, -0.5)),
        "W1": f32(rng.normal(size=(H, HIDDEN)) / np.sqrt(H)),
        "b1": f32(np.zeros(HIDDEN)),
        "W2": f32(rng.normal(size=(HIDDEN, D)) / np.sqrt(HIDDEN)),
        "b2": f32(np.zeros(D)),
    }


def make_observation(params, seed=1):
    """One observation from the model at ``params`` (so the IWELBO is of a sensible size)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=H).astype(np.float32)
    loc = np.asarray(decoder(params, jnp.asarray(z)))
    return jnp.asarray(loc + SIGMA * rng.normal(size=D), jnp.float32)


def decoder(params, z):
    h = jnp.tanh(z @ params["W1"] + params["b1"])
    return h @ params["W2"] + params["b2"]


# --- estimax: a NumPyro model and an estimax guide -----------------------------------------
def model(params, x):
    z = numpyro.sample("z", dist.Normal(jnp.zeros(H), 1.0).to_event(1))
    numpyro.sample("x", dist.Normal(decoder(params, z), SIGMA).to_event(1), obs=x)


def guide(params, x):
    return ex.sample(dist.Normal(params["mu"], jnp.exp(params["ls"])).to_event(1), name="z")


def estimax_version(k):
    return ex.value_and_grad(ex.objectives.iwelbo(model, guide, k))


# --- hand-written: the same estimator with jax.random and jax.value_and_grad ----------------
def normal_logpdf(x, loc, scale):
    return -0.5 * jnp.square((x - loc) / scale) - jnp.log(scale) - _HALF_LOG_2PI


def hand_version(k, sharded):
    def iwelbo(params, key, x):
        eps = jax.random.normal(key, (k, H))
        if sharded:
            eps = jax.lax.with_sharding_constraint(eps, P(AXIS))
        scale = jnp.exp(params["ls"])
        z = params["mu"] + scale * eps
        log_q = jnp.sum(normal_logpdf(z, params["mu"], scale), axis=-1)
        log_prior = jnp.sum(normal_logpdf(z, 0.0, 1.0), axis=-1)
        log_lik = jnp.sum(normal_logpdf(x, decoder(params, z), SIGMA), axis=-1)
        return logsumexp(log_prior + log_lik - log_q) - math.log(k)

    vg = jax.value_and_grad(iwelbo)
    return lambda key, params, x: vg(params, key, x)


# ============================================================================================
# Compiling and timing
# ============================================================================================
class Config:
    """Both versions compiled for ``n`` devices and ``K`` particles, with their arguments
    placed on the mesh (replicated)."""

    def __init__(self, n, k):
        self.n, self.k = n, k
        self.mesh = ex.device_mesh(n)
        replicated = NamedSharding(self.mesh, P())
        params = init_params()
        x = make_observation(params)
        self.args = jax.device_put((jax.random.key(0), params, x), replicated)
        builders = {"estimax": lambda: estimax_version(k), "hand-written": lambda: hand_version(k, n > 1)}
        self.fns, self.compile_s, self.split = {}, {}, {}
        for name, build in builders.items():
            with compat.set_mesh(self.mesh):
                t0 = time.perf_counter()
                compiled = jax.jit(build()).trace(*self.args).lower().compile()
                self.compile_s[name] = time.perf_counter() - t0
            self.fns[name] = compiled
            if n > 1:
                hlo = compiled.as_text()
                self.split[name] = f"f32[{k // n},{H}]" in hlo and f"f32[{k},{H}]" not in hlo

    def call(self, name, key=None):
        key_, params, x = self.args
        with compat.set_mesh(self.mesh):
            return self.fns[name](key_ if key is None else key, params, x)


def machine_busy_s():
    """CPU seconds spent so far by all processes on the machine (``/proc/stat``: user, nice,
    system, irq, softirq), or ``None`` where there is no ``/proc/stat``."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        ticks = sum(int(fields[i]) for i in (1, 2, 3, 6, 7))
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def time_rows(configs, rows, repeats, calls, warmup):
    """Seconds per call of each version of each row: the median over ``repeats`` of the mean
    of ``calls`` blocked calls. The rows and versions are timed in rounds, one repeat of each
    per round, the order rotating from round to round, so that a change in the machine's load
    falls on all rows alike. Also, per row: the cores this process used while timing each
    version, and the cores other processes used meanwhile (``None`` without ``/proc/stat``)."""
    segments = [(nk, name) for nk in rows for name in configs[nk].fns]
    for nk, name in segments:
        for _ in range(warmup):
            jax.block_until_ready(configs[nk].call(name))
    per_call = {seg: [] for seg in segments}
    wall = {seg: 0.0 for seg in segments}
    cpu = {seg: 0.0 for seg in segments}
    busy = {seg: 0.0 for seg in segments}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            shift = (r * len(segments)) // max(repeats, 1)
            order = segments[shift:] + segments[:shift]
            if r % 2:
                order = order[::-1]
            for nk, name in order:
                b0, c0, t0 = machine_busy_s(), time.process_time(), time.perf_counter()
                for _ in range(calls):
                    jax.block_until_ready(configs[nk].call(name))
                t1, c1, b1 = time.perf_counter(), time.process_time(), machine_busy_s()
                seg = (nk, name)
                per_call[seg].append((t1 - t0) / calls)
                wall[seg] += t1 - t0
                cpu[seg] += c1 - c0
                busy[seg] = None if b0 is None or b1 is None or busy[seg] is None else busy[seg] + (b1 - b0)
    finally:
        if gc_was_enabled:
            gc.enable()
    times = {nk: {} for nk in rows}
    others = {}
    for nk in rows:
        for name in configs[nk].fns:
            ts = per_call[nk, name]
            times[nk][name] = (statistics.median(ts), min(ts), max(ts), cpu[nk, name] / wall[nk, name])
        segs = [(nk, name) for name in configs[nk].fns]
        if any(busy[seg] is None for seg in segs):
            others[nk] = None
        else:
            other_cpu = sum(busy[seg] - cpu[seg] for seg in segs)
            others[nk] = max(0.0, other_cpu) / sum(wall[seg] for seg in segs)
    return times, others


def rel_discrepancy(out, ref):
    """``|v - v_ref| / |v_ref|`` and the largest ``max |g - g_ref| / max |g_ref|`` over the
    parameters."""
    (v, g), (v0, g0) = out, ref
    dv = abs(float(v) - float(v0)) / abs(float(v0))
    dg = 0.0
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        dg = max(dg, float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)))
    return dv, dg


# ============================================================================================
# Main
# ============================================================================================
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="smaller K, fewer repeats (smoke run)")
    add("--devices", default="1,2,4,8", help="comma-separated device counts (default 1,2,4,8)")
    add("--k", type=int, help="particles in the strong-scaling rows (default 2**14; 2**11 with --quick)")
    add("--k0", type=int, help="particles per device in the weak-scaling rows (default 2**12; 2**9 with --quick)")
    add("--repeats", type=int, help="timed repeats per row and version (default 5; 3 with --quick)")
    add("--calls", type=int, help="calls per repeat (default 20; 5 with --quick)")
    add("--warmup", type=int, help="untimed calls before timing (default 3; 2 with --quick)")
    add("--no-force", action="store_true",
        help=f"do not force {FORCED_DEVICES} host devices on CPU (use the devices JAX sees)")
    args = parser.parse_args(argv)
    defaults = dict(k=(2**11, 2**14), k0=(2**9, 2**12), repeats=(3, 5), calls=(5, 20), warmup=(2, 3))
    for name, (quick_value, full_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick_value if args.quick else full_value)
    try:
        counts = sorted({int(c) for c in args.devices.split(",") if c.strip()})
    except ValueError:
        parser.error(f"--devices {args.devices!r}: expected comma-separated integers")
    if not counts or counts[0] < 1:
        parser.error("--devices: counts must be at least 1")
    if 1 not in counts:
        counts = [1] + counts  # the reference of every speedup
    bad = [n for n in counts if args.k % n]
    if bad:
        parser.error(f"--k {args.k} is not a multiple of the device count(s) {bad}")

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    t_start = time.perf_counter()
    devices = jax.devices()
    available = min(len(devices), FORCED_DEVICES)
    dropped = [n for n in counts if n > available]
    counts = [n for n in counts if n <= available]
    dev = devices[0]
    load = " | load avg %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    print(f"estimax {ex.__version__} | jax {jax.__version__} | numpyro {numpyro.__version__} | "
          f"python {platform.python_version()} | platform {dev.platform}:{getattr(dev, 'device_kind', '')} | "
          f"{len(devices)} devices | {os.cpu_count()} CPUs{load}")
    if dev.platform == "cpu":
        how = (f"forced host devices (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})" if FORCED
               else "host devices as configured (--no-force or XLA_FLAGS)")
        print(f"devices: {how}; they share the {os.cpu_count()} CPU cores")
    else:
        print(f"devices: the {len(devices)} real {dev.platform} device(s)")
    if dropped:
        print(f"device counts {dropped} skipped: only {available} device(s) available")
    print(f"model: H={H}, decoder {H}->{HIDDEN}->{D} (tanh), one observation; float32 "
          f"(x64 {'on' if jax.config.jax_enable_x64 else 'off'}); strong K={args.k}, weak K0={args.k0}; "
          f"{args.repeats} repeats x {args.calls} calls, {args.warmup} warm-up calls", flush=True)

    # --- compile every (n, K) needed once: the rows and the one-device references (with
    # --quick, only those that are rows: the agreement check then covers fewer K) ----------
    strong = [(n, args.k) for n in counts]
    weak = [(n, args.k0 * n) for n in counts]
    references = set() if args.quick else {(1, k) for _, k in strong + weak}
    needed = sorted(set(strong) | set(weak) | references)
    configs = {}
    for n, k in needed:
        t0 = time.perf_counter()
        configs[n, k] = Config(n, k)
        print(f"  compiled n={n} K={k}  [{time.perf_counter() - t0:.1f} s]", flush=True)

    # --- agreement: each version against itself on one device, the same key ---------------
    print("\n=== agreement: value and gradient at n devices vs 1 device, same key, per version ===")
    print(f"(relative: |v_n - v_1| / |v_1|, and max over parameters of max|g_n - g_1| / max|g_1|; "
          f"flagged above {FLAG_ABOVE:g})")
    fmt = "{:>7} {:<13} {:>10} {:>14} {:>18} {:>14}"
    print(fmt.format("K", "version", "value (1)", "n compared", "max value rel", "max grad rel"))
    worst = {"estimax": [0.0, 0.0], "hand-written": [0.0, 0.0]}
    values = {}
    for k in sorted({k for n, k in needed if n == 1}):
        ns = [n for n, kk in needed if kk == k and n > 1]
        for name in ("estimax", "hand-written"):
            ref = jax.device_get(configs[1, k].call(name))
            values[name, k] = float(ref[0])
            dv = dg = 0.0
            for n in ns:
                a, b = rel_discrepancy(jax.device_get(configs[n, k].call(name)), ref)
                dv, dg = max(dv, a), max(dg, b)
            for i, d in enumerate((dv, dg)):
                worst[name][i] = max(worst[name][i], d)
            flag = "  <-- above" if max(dv, dg) > FLAG_ABOVE else ""
            print(fmt.format(k, name, f"{values[name, k]:.4f}", ",".join(map(str, ns)) or "-",
                             f"{dv:.2e}" if ns else "-", f"{dg:.2e}" if ns else "-") + flag)
    for name, (dv, dg) in worst.items():
        print(f"  {name}: largest discrepancy, value {dv:.2e}, gradient {dg:.2e}")
    print("  (estimax and hand-written draw different particles; their values differ by Monte "
          "Carlo noise only)", flush=True)

    # --- timings ---------------------------------------------------------------------------
    rows = sorted(set(strong) | set(weak))
    t0 = time.perf_counter()
    times, others = time_rows(configs, rows, args.repeats, args.calls, args.warmup)
    print(f"  timed {len(rows)} rows x 2 versions in {args.repeats} rounds  [{time.perf_counter() - t0:.1f} s]",
          flush=True)

    ms = lambda s: f"{s * 1e3:.2f}"  # noqa: E731
    cols = ("n", "K", "estimax ms", "range", "hand ms", "range", "est/hand", "speedup e/h",
            "effic. e/h", "cores e/h", "others", "compile s e/h", "split e/h")
    fmt = "{:>2} {:>6} {:>10} {:>13} {:>8} {:>13} {:>8} {:>11} {:>11} {:>9} {:>6} {:>13} {:>9}"
    header = fmt.format(*cols)
    for title, rows, weak_rows in (("strong scaling: fixed K", strong, False),
                                   ("weak scaling: K = K0 * n", weak, True)):
        print(f"\n=== {title} (ms per gradient call: median of {args.repeats} repeats, range of the repeats) ===")
        print(header)
        print("-" * len(header))
        base = {name: times[rows[0]][name][0] for name in ("estimax", "hand-written")}
        for n, k in rows:
            t = times[n, k]
            cfg = configs[n, k]
            speed = {name: base[name] / t[name][0] for name in base}
            eff = {name: speed[name] if weak_rows else speed[name] / n for name in base}
            split = ("/".join("yes" if cfg.split[m] else "NO" for m in ("estimax", "hand-written"))
                     if n > 1 else "-")
            print(fmt.format(
                n, k,
                ms(t["estimax"][0]), f"{ms(t['estimax'][1])}-{ms(t['estimax'][2])}",
                ms(t["hand-written"][0]), f"{ms(t['hand-written'][1])}-{ms(t['hand-written'][2])}",
                f"{t['estimax'][0] / t['hand-written'][0]:.2f}x",
                "-" if weak_rows else f"{speed['estimax']:.2f}/{speed['hand-written']:.2f}",
                f"{eff['estimax']:.2f}/{eff['hand-written']:.2f}",
                f"{t['estimax'][3]:.1f}/{t['hand-written'][3]:.1f}",
                "n/a" if others[n, k] is None else f"{others[n, k]:.1f}",
                f"{cfg.compile_s['estimax']:.1f}/{cfg.compile_s['hand-written']:.1f}",
                split))
    print("(speedup T(1)/T(n) and efficiency -- T(1)/(n T(n)) strong, T(1)/T(n) weak -- per version "
          "against its own one-device time; cores = this process's CPU time / wall time while timing "
          "the version, all threads; others = cores used by other processes meanwhile, from /proc/stat; "
          "compile = trace + lower + XLA compile)")

    load = " (load avg now %.2f)" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    print(f"\ntotal wall time {time.perf_counter() - t_start:.1f} s{load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
