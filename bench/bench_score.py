"""Score-matching and f-distill losses: estimax programs against the same losses by hand.

Each case runs ``steps`` optimizer steps fused in one ``jax.lax.scan`` (Adam 1e-3), once
with the estimax objective (``ex.value_and_grad`` of ``ex.objectives.dsm`` or ``fdistill``)
and once with the same loss written directly with ``jax.random`` and
``jax.value_and_grad``; the networks and batch sizes are those of
``examples/distill_mixture.py`` (MLPs of width 128, batch 256). Reported: the median over
``--repeats`` runs of the time per step after compilation, and the ratio estimax / hand
(target <= 1.05). The versions take turns, the first one alternating between repeats.

``dsm``      the teacher's loss: VP schedule, ``ε``-prediction, weighting ``σ²`` (weight 1).
``fdistill`` the generator's reverse-KL loss at noise levels ``t ~ U(0.02, 0.98)``, with the
             teacher score, the fake score and the discriminator as data.

    python bench/bench_score.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax

import estimax as ex

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import distill_mixture as M  # noqa: E402

sg = jax.lax.stop_gradient


def scan_train(value_and_grad, params, steps, opt, data):
    def body(carry, key):
        p, s = carry
        v, g = value_and_grad(key, p, *data)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), v

    @jax.jit
    def run(p, key):
        return jax.lax.scan(body, (p, opt.init(p)), jax.random.split(key, steps))

    return run


def dsm_cases(batch):
    x = jnp.asarray(M.mixture(batch, 0))
    objective = ex.objectives.dsm(M.eps_net, M.SCHEDULE, prediction="eps")
    est = ex.value_and_grad(objective)

    def hand_loss(p, key, x):
        k1, k2 = jax.random.split(key)
        t = jax.random.uniform(k1, (x.shape[0],), minval=M.SCHEDULE.t_min, maxval=M.SCHEDULE.t_max)
        eps = jax.random.normal(k2, x.shape)
        x_t = M.SCHEDULE.alpha(t)[:, None] * x + M.SCHEDULE.sigma(t)[:, None] * eps
        return jnp.mean(jnp.sum((M.eps_net(p, x_t, t) - eps) ** 2, axis=1))

    hand = jax.value_and_grad(hand_loss)
    params = M.mlp_init(jax.random.key(0), (10, 128, 128, 2))
    return params, (x,), est, lambda key, p, x: hand(p, key, x)


def fdistill_cases(batch):
    teacher = M.mlp_init(jax.random.key(1), (10, 128, 128, 2))
    fake = M.mlp_init(jax.random.key(2), (10, 128, 128, 2))
    d = M.mlp_init(jax.random.key(3), (10, 64, 64, 1))
    objective = ex.objectives.fdistill(
        M.generator,
        teacher_score=lambda x, t, te, fa, di: M.score_of(te, x, t),
        fake_score=lambda x, t, te, fa, di: M.score_of(fa, x, t),
        log_ratio=lambda x, t, te, fa, di: M.disc(di, x, t),
        f="reverse_kl", latent=dist.Normal(jnp.zeros(2), 1.0).to_event(1), batch=batch,
        schedule=M.STUDENT_SCHEDULE,
    )
    est = ex.value_and_grad(objective)

    def hand_loss(g, key, te, fa, di):
        k1, k2, k3 = jax.random.split(key, 3)
        x = M.generator(g, jax.random.normal(k1, (batch, 2)))
        t = jax.random.uniform(k2, (batch,), minval=M.STUDENT_T[0], maxval=M.STUDENT_T[1])
        x_t = M.SCHEDULE.alpha(t)[:, None] * x + M.SCHEDULE.sigma(t)[:, None] * jax.random.normal(k3, x.shape)
        xs = sg(x_t)
        w = jnp.ones_like(M.disc(di, xs, t))  # h ≡ 1 (reverse KL); the ratio is evaluated, as estimax does
        direction = sg(w[:, None] * (M.score_of(fa, xs, t) - M.score_of(te, xs, t)))
        return jnp.sum(direction * x_t) / batch

    hand = jax.value_and_grad(hand_loss)
    params = M.mlp_init(jax.random.key(4), (2, 128, 128, 2))
    return params, (teacher, fake, d), est, lambda key, p, *data: hand(p, key, *data)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    opt = optax.adam(1e-3)
    print(f"time per training step after compilation (median of {args.repeats} runs of {args.steps} steps, batch {args.batch})")
    for name, build in (("dsm", dsm_cases), ("fdistill", fdistill_cases)):
        params, data, est, hand = build(args.batch)
        runs = {"estimax": scan_train(est, params, args.steps, opt, data),
                "hand-written": scan_train(hand, params, args.steps, opt, data)}
        for run in runs.values():
            jax.block_until_ready(run(params, jax.random.key(0)))
        times = {k: [] for k in runs}
        for r in range(args.repeats):
            for k, run in (runs.items() if r % 2 == 0 else reversed(list(runs.items()))):
                t0 = time.perf_counter()
                jax.block_until_ready(run(params, jax.random.key(r + 1)))
                times[k].append((time.perf_counter() - t0) / args.steps * 1e3)
        e, h = np.median(times["estimax"]), np.median(times["hand-written"])
        print(f"  {name:<9} estimax {e:.4f} ms/step, hand-written {h:.4f} ms/step: ratio {e / h:.3f}")


if __name__ == "__main__":
    main()
