"""The IWAE of ``iwae_digits.py`` trained on several devices, with checkpoints and progress.

The objective is the per-digit IWELBO-8 on minibatches of 64 digits, written once; running
it on N devices is one argument of ``ex.fit``: ``devices=N``. The minibatch's 64 digits are
the outermost ``ex.vmap`` of the program, so each device takes 64/N of them (and their
K = 8 particles); XLA inserts the sums across devices. Nothing else changes -- the random
draws are the same as on one device, so the two runs agree up to the order of
floating-point sums, which the script checks before training.

On a machine without accelerators, N CPU devices are forced with ``XLA_FLAGS`` (set here
before JAX is imported); they share the CPU's cores, so expect no speed-up beyond the core
count -- the point on CPU is that the same script runs unchanged on N GPUs.

The run saves its whole state to ``OUT/checkpoint/`` every ``--every`` steps. Stop it with
Ctrl-C (it finishes the current chunk and saves) and run the same command again: it resumes
and ends where an uninterrupted run would have ended. Progress is reported every
``--every`` steps from inside the compiled loop (host callbacks the device does not wait for).

Run:

    python examples/iwae_devices.py                    # 8 devices, 5000 steps
    python examples/iwae_devices.py --devices 4 --steps 20000 --out results/
    python examples/iwae_devices.py --quick            # smoke test: 200 steps
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=8, help="devices to train on (default: 8)")
    parser.add_argument("--steps", type=int, default=5000, help="training steps (default: 5000)")
    parser.add_argument("--every", type=int, default=500, help="steps between checkpoints and reports (default: 500)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 200 steps, a report every 50")
    parser.add_argument("--out", default="out", help="directory for the checkpoint (default: out/)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam step size (default: 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization and the estimator")
    parser.add_argument("--skip-check", action="store_true", help="skip the 1-device against N-device check")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.every = 200, 50
    if args.devices < 1 or 64 % args.devices:
        parser.error("--devices must divide the minibatch of 64 digits (1, 2, 4, 8, 16, 32 or 64)")
    return args


def main(argv=None):
    args = parse(argv)
    # N host (CPU) devices; this changes nothing on a GPU or TPU backend. It must be set
    # before JAX is imported.
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

    import jax
    import numpy as np
    import optax

    import estimax as ex

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from iwae_digits import K, make_minibatch_objective
    from vae_digits import guide, init_params, load_binary_digits, model

    data = load_binary_digits()
    objective = make_minibatch_objective(ex.objectives.iwelbo(model, guide, K), data.shape[0])
    params = init_params(args.seed)
    fit_key, eval_key = jax.random.split(jax.random.PRNGKey(args.seed))
    optimizer = optax.adam(args.lr)
    print(ex.explain(objective, params, data))
    devices = jax.devices()[: args.devices]
    print(f"\n{len(devices)} device(s): {devices[0].platform} ({os.cpu_count()} CPU cores)")

    # 1. The same 20 steps on one device and on N: equal up to the order of the sums.
    if not args.skip_check:
        check = dict(optimizer=optimizer, steps=20, key=fit_key, maximize=True, chunk=20)
        one = ex.fit(objective, params, data, **check)
        many = ex.fit(objective, params, data, devices=args.devices, **check)
        gap = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(many.params)))
        print(f"20 steps on 1 device and on {args.devices}: largest parameter difference {gap:.2e} (float32 sums)")

    # 2. Training, checkpointed and reporting from inside the compiled loop.
    folder = os.path.abspath(os.path.join(args.out, f"iwae_devices_{args.devices}", "checkpoint"))

    def report(step, value):
        print(f"  step {step:6d}: IWELBO-{K} estimate {value:9.3f} per digit", flush=True)

    t0 = time.perf_counter()
    try:
        result = ex.fit(objective, params, data, optimizer=optimizer, steps=args.steps, key=fit_key, maximize=True,
                        chunk=args.every, devices=args.devices, checkpoint=ex.Checkpoint(folder, every=args.every),
                        progress=report, progress_every=args.every)
    except KeyboardInterrupt:
        print(f"interrupted; {folder} holds the run: run the same command to resume it")
        return 130
    seconds = time.perf_counter() - t0
    # the minibatch objective is already per digit: average 16 independent estimates of it
    estimates = np.array([float(objective.estimate(k, result.params, data)) for k in jax.random.split(eval_key, 16)])
    bound, se = estimates.mean(), estimates.std(ddof=1) / np.sqrt(len(estimates))
    print(f"{result.steps_run} steps in all ({seconds:.1f} s in this call) on {args.devices} device(s); "
          f"IWELBO-{K} on minibatches: {bound:.2f} +- {se:.2f} nats per digit")
    print(f"checkpoint: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
