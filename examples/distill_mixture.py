"""Distill a diffusion model of a 2-D mixture into a one-step generator with f-distill.

1. **Teacher.** A score network ``s(x, t)`` trained by denoising score matching,
   ``ex.objectives.dsm(net, vp(), prediction="eps")``, on samples of a mixture of 8 Gaussians.
2. **Student.** A one-step generator ``G_θ(z)`` (an MLP of a 2-D Gaussian latent), trained
   with ``ex.objectives.fdistill``. Each step updates, in turn:
   - the *fake score* ``s_q(x, t)``: DSM on the student's own samples;
   - the *discriminator* ``d(x, t)``: logistic regression of data against student samples,
     both noised at ``t``, so that its logit estimates ``log p_t(x)/q_t(x)``;
   - the *generator*: the f-distill gradient ``E[h(r)(s_q - s_p) ∂x_t/∂θ]`` with
     ``h = r² f''(r)`` derived from ``f`` (reverse KL: ``h ≡ 1``; Jensen-Shannon:
     ``h = r/(r+1)``), ``r = exp(d)``.

Reported: the energy distance between 2000 generated samples and 2000 data samples for each
``f`` (and for the data against itself, the noise floor), plots of the samples and of the
loss curves, and the time per generator step of the estimax objective against the same loss
written by hand in JAX. The seed paper: "One-step Diffusion Distillation through Score
Implicit Matching with f-divergence" (f-distill).

    python examples/distill_mixture.py            # about 2 minutes on a laptop CPU
    python examples/distill_mixture.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax

import estimax as ex
from estimax.objectives import dsm, fdistill, vp

MODES, RADIUS, SCALE = 8, 2.0, 0.15
SCHEDULE = vp(0.1, 20.0, t_min=1e-3)
STUDENT_T = (0.02, 0.98)  # the noise levels at which the student is matched
STUDENT_SCHEDULE = dataclasses.replace(SCHEDULE, t_min=STUDENT_T[0], t_max=STUDENT_T[1])


def mixture(n, seed):
    rng = np.random.default_rng(seed)
    angle = 2 * np.pi * rng.integers(MODES, size=n) / MODES
    return (RADIUS * np.stack([np.cos(angle), np.sin(angle)], 1) + SCALE * rng.normal(size=(n, 2))).astype(np.float32)


def mlp_init(key, widths):
    layers = []
    for k, (a, b) in zip(jax.random.split(key, len(widths) - 1), zip(widths[:-1], widths[1:])):
        layers.append({"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)})
    return layers


def mlp(layers, h):
    for layer in layers[:-1]:
        h = jax.nn.silu(h @ layer["w"] + layer["b"][None])
    return h @ layers[-1]["w"] + layers[-1]["b"][None]


def features(x, t):
    """The input of the time-conditioned networks: x and a small embedding of t."""
    freqs = jnp.array([1.0, 2.0, 4.0, 8.0])
    ang = t[:, None] * freqs[None]
    return jnp.concatenate([x, jnp.sin(ang), jnp.cos(ang)], axis=1)


def eps_net(params, x, t):  # predicts ε: the score is -ε̂/σ
    return mlp(params, features(x, t))


def score_of(params, x, t):
    return -eps_net(params, x, t) / SCHEDULE.sigma(t)[:, None]


def disc(params, x, t):  # the logit of "data" against "student": log p_t/q_t
    return mlp(params, features(x, t))[:, 0]


def generator(params, z):
    return mlp(params, z)


def energy_distance(a, b):
    def mean_dist(u, v):
        return float(np.mean(np.sqrt(((u[:, None, :] - v[None, :, :]) ** 2).sum(-1) + 1e-12)))

    return 2 * mean_dist(a, b) - mean_dist(a, a) - mean_dist(b, b)


def noised(x, key):
    k1, k2 = jax.random.split(key)
    t = jax.random.uniform(k1, (x.shape[0],), minval=STUDENT_T[0], maxval=STUDENT_T[1])
    eps = jax.random.normal(k2, x.shape)
    return SCHEDULE.alpha(t)[:, None] * x + SCHEDULE.sigma(t)[:, None] * eps, t


def build(f, batch):
    """The three objectives and one jitted training step (fake score, discriminator, generator)."""
    time_dist = dist.Uniform(STUDENT_T[0], STUDENT_T[1])
    fake_dsm = dsm(eps_net, SCHEDULE, prediction="eps", time=time_dist, name="fake_dsm")
    gen_loss = fdistill(
        generator,
        teacher_score=lambda x, t, teacher, fake, d: score_of(teacher, x, t),
        fake_score=lambda x, t, teacher, fake, d: score_of(fake, x, t),
        log_ratio=lambda x, t, teacher, fake, d: disc(d, x, t),
        f=f, latent=dist.Normal(jnp.zeros(2), 1.0).to_event(1), batch=batch,
        schedule=STUDENT_SCHEDULE, name=f"fdistill_{f}",
    )
    opt = optax.adam(1e-3)
    fake_grad = ex.grad(fake_dsm)
    gen_grad = ex.value_and_grad(gen_loss)

    def disc_loss(d, real, fake, key):
        k1, k2 = jax.random.split(key)
        xr, tr = noised(real, k1)
        xf, tf = noised(fake, k2)
        return -jnp.mean(jax.nn.log_sigmoid(disc(d, xr, tr))) - jnp.mean(jax.nn.log_sigmoid(-disc(d, xf, tf)))

    @jax.jit
    def step(state, key, data, teacher):
        g, fake, d, opt_states = state
        k1, k2, k3, k4, k5 = jax.random.split(key, 5)
        z = jax.random.normal(k1, (batch, 2))
        samples = jax.lax.stop_gradient(generator(g, z))
        real = data[jax.random.randint(k2, (batch,), 0, data.shape[0])]
        gf = fake_grad(k3, fake, samples)
        gd = jax.grad(disc_loss)(d, real, samples, k4)
        value, gg = gen_grad(k5, g, teacher, fake, d)
        new = []
        for p, grad, s in zip((g, fake, d), (gg, gf, gd), opt_states):
            u, s = opt.update(grad, s, p)
            new.append((optax.apply_updates(p, u), s))
        (g, sg_), (fake, sf), (d, sd) = new
        return (g, fake, d, (sg_, sf, sd)), value

    return step, gen_loss, opt


def train_teacher(data, steps, key):
    teacher_dsm = dsm(eps_net, SCHEDULE, prediction="eps", name="teacher_dsm")
    params = mlp_init(jax.random.key(0), (2 + 8, 128, 128, 2))
    data = jnp.asarray(data)

    @ex.expectation
    def minibatch(params, data):
        i = ex.sample(dist.DiscreteUniform(0, data.shape[0] - 1).expand([256]), name="batch")
        return teacher_dsm(params, data[i])

    fitted = ex.fit(minibatch, params, data, optimizer=optax.adam(optax.cosine_decay_schedule(2e-3, steps, 0.05)),
                    steps=steps, key=key, chunk=500)
    return fitted.params, fitted.history


def hand_written_generator_step(batch):
    """The reverse-KL generator loss written directly in JAX, for the timing comparison."""
    sg = jax.lax.stop_gradient

    def loss(g, key, teacher, fake, d):
        k1, k2, k3 = jax.random.split(key, 3)
        z = jax.random.normal(k1, (batch, 2))
        x = generator(g, z)
        t = jax.random.uniform(k2, (batch,), minval=STUDENT_T[0], maxval=STUDENT_T[1])
        eps = jax.random.normal(k3, x.shape)
        x_t = SCHEDULE.alpha(t)[:, None] * x + SCHEDULE.sigma(t)[:, None] * eps
        xs = sg(x_t)
        w = jnp.ones_like(disc(d, xs, t))  # h ≡ 1 for reverse KL
        direction = sg(w[:, None] * (score_of(fake, xs, t) - score_of(teacher, xs, t)))
        return jnp.sum(direction * x_t) / batch

    return jax.jit(jax.value_and_grad(loss))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher-steps", type=int, default=6000)
    parser.add_argument("--student-steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join("out", "distill_mixture"))
    args = parser.parse_args(argv)
    if args.quick:
        args.teacher_steps, args.student_steps, args.batch = 300, 100, 64
    os.makedirs(args.out, exist_ok=True)
    data, held_out = mixture(20000, 0), mixture(2000, 1)

    t0 = time.perf_counter()
    teacher, teacher_history = train_teacher(data, args.teacher_steps, jax.random.key(1))
    print(f"teacher: DSM ({args.teacher_steps} steps) in {time.perf_counter() - t0:.1f} s; "
          f"final loss {np.mean(teacher_history[-200:]):.4f}")

    results, curves = {}, {}
    z_eval = jax.random.normal(jax.random.key(99), (2000, 2))
    for f in ("reverse_kl", "jensen_shannon"):
        step, gen_loss, opt = build(f, args.batch)
        g = mlp_init(jax.random.key(2), (2, 128, 128, 2))
        fake = teacher  # the fake score starts at the teacher's
        d = mlp_init(jax.random.key(4), (2 + 8, 64, 64, 1))
        state = (g, fake, d, tuple(opt.init(p) for p in (g, fake, d)))
        values = []
        t0 = time.perf_counter()
        for i, key in enumerate(jax.random.split(jax.random.key(5), args.student_steps)):
            state, value = step(state, key, jnp.asarray(data), teacher)
            values.append(value)
        seconds = time.perf_counter() - t0
        samples = np.asarray(generator(state[0], z_eval))
        results[f] = (energy_distance(samples, held_out), samples, seconds)
        curves[f] = np.asarray(values)
        print(f"{ex.explain(gen_loss, state[0], teacher, state[1], state[2]).certificate}")
        print(f"student, {f}: energy distance to the data {results[f][0]:.4f} ({args.student_steps} steps, {seconds:.1f} s)")
    floor = energy_distance(mixture(2000, 2), held_out)
    print(f"energy distance of fresh data to the data (the noise floor): {floor:.4f}")

    # time per generator step: estimax's objective against the hand-written loss
    step_rkl, gen_loss, _ = build("reverse_kl", args.batch)
    est = jax.jit(ex.value_and_grad(gen_loss))
    hand = hand_written_generator_step(args.batch)
    g, fake, d = state[0], state[1], state[2]
    timing = {}
    for name, fn in (("estimax", lambda k: est(k, g, teacher, fake, d)), ("hand-written", lambda k: hand(g, k, teacher, fake, d))):
        jax.block_until_ready(fn(jax.random.key(0)))
    for name, fn in (("estimax", lambda k: est(k, g, teacher, fake, d)), ("hand-written", lambda k: hand(g, k, teacher, fake, d))):
        reps = 20 if args.quick else 200
        t0 = time.perf_counter()
        for i in range(reps):
            out = fn(jax.random.key(i))
        jax.block_until_ready(out)
        timing[name] = (time.perf_counter() - t0) / reps * 1e3
    print(f"generator step (reverse KL): estimax {timing['estimax']:.3f} ms, hand-written {timing['hand-written']:.3f} ms, "
          f"ratio {timing['estimax'] / timing['hand-written']:.3f}")
    _plot(args.out, held_out, results, curves, teacher_history)
    return {f: r[0] for f, r in results.items()}, floor, timing


def _plot(out, data, results, curves, teacher_history):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    axes[0].scatter(data[:, 0], data[:, 1], s=1, alpha=0.5)
    axes[0].set_title("data")
    for ax, (f, (ed, samples, _)) in zip(axes[1:3], results.items()):
        ax.scatter(samples[:, 0], samples[:, 1], s=1, alpha=0.5, color="C1")
        ax.set_title(f"student, {f}: ED {ed:.3f}")
    for ax in axes[:3]:
        ax.set_xlim(-3.5, 3.5)
        ax.set_ylim(-3.5, 3.5)
        ax.set_aspect("equal")
    axes[3].plot(np.convolve(teacher_history, np.ones(50) / 50, "valid"), label="teacher DSM loss")
    for f, c in curves.items():
        axes[3].plot(np.convolve(c, np.ones(50) / 50, "valid"), label=f"generator surrogate, {f}")
    axes[3].legend()
    axes[3].set_title("losses (moving average of 50 steps)")
    fig.tight_layout()
    path = os.path.join(out, "distill_mixture.png")
    fig.savefig(path, dpi=80)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
