"""Time per update of the exact EF, iEF and sampled-Fisher methods against AdamW.

The model is a frozen stack of ``--depth`` tanh layers of width ``--width``
over ``--tokens`` tokens (mean-pooled, then a trainable 10-class head),
with a trainable LoRA pair ``A [d, r]``, ``B [r, d]`` on every layer; the
rank is chosen so that the trainable size is near each target of
``--sizes`` (default 10K, 100K and 1M parameters). Batch ``N = 32``.

Timed (jitted, ``block_until_ready``, median over ``--reps`` calls, all in
the same process):

* ``fwd+bwd``: ``jax.value_and_grad`` of the mean loss, the reference;
* ``step``: the full step: AdamW is ``value_and_grad`` + ``optax.adamw``;
  EF/iEF/SF are :func:`~kfac_jax_peft.fisher.per_sample_value_and_grad`
  (per-sample gradients, ``vmap``) + the Woodbury transformation;
* ``update``: the transformation alone, given gradients and extras (for
  EF/iEF/SF the ``N x N`` Gram matrix, its eigendecomposition and two
  ``N x P`` products; for AdamW the moment updates).

The supporting material (its Table 3, a 3070 GPU, prompt tuning with ``N =
32``, ``P = 15,360``) reports EF/iEF update generation of 1.66 ms against
205 ms of forward and backward.

``--kfac-compare`` instead trains the built-in LoRA encoder
(:mod:`kfac_jax_peft.toy`) with K-FAC on empirical-Fisher statistics and on
iEF-rescaled statistics (``fisher_type="ief"``), same batches and
hyperparameters, and prints both loss curves' summaries.

Usage: ``python benchmarks/ef_update.py [--reps 10] [--sizes 1e4,1e5,1e6]``
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from kfac_jax_peft import fisher  # noqa: E402

NUM_CLASSES = 10


def make_problem(width: int, depth: int, tokens: int, target: float, n: int = 32, seed=0):
    """``(trainable, model_fn, loss_fn, args, P)`` for a trainable size near ``target``."""
    head = width * NUM_CLASSES + NUM_CLASSES
    rank = max(1, round((target - head) / (2 * width * depth)))
    rng = np.random.default_rng(seed)
    frozen = [jnp.asarray(rng.normal(size=(width, width)) / np.sqrt(width), jnp.float32)
              for _ in range(depth)]
    trainable = {
        "lora": [{"A": jnp.asarray(rng.normal(size=(width, rank)) / np.sqrt(width),
                                   jnp.float32),
                  "B": jnp.asarray(0.01 * rng.normal(size=(rank, width)), jnp.float32)}
                 for _ in range(depth)],
        "head": {"kernel": jnp.asarray(rng.normal(size=(width, NUM_CLASSES)) / np.sqrt(width),
                                       jnp.float32),
                 "bias": jnp.zeros(NUM_CLASSES, jnp.float32)},
    }
    X = jnp.asarray(rng.normal(size=(n, tokens, width)), jnp.float32)
    y = jnp.asarray(rng.integers(0, NUM_CLASSES, n))

    def model_fn(p, X, y):
        h = X
        for W, ab in zip(frozen, p["lora"]):
            h = jnp.tanh(h @ W + (h @ ab["A"]) @ ab["B"])
        return jnp.mean(h, 1) @ p["head"]["kernel"] + p["head"]["bias"]

    def loss_fn(z, X, y):
        return optax.softmax_cross_entropy_with_integer_labels(z, y)

    P = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    return trainable, model_fn, loss_fn, (X, y), P


def median_time(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_size(width, depth, tokens, target, reps, damping=1e-7):
    params, model_fn, loss_fn, args, P = make_problem(width, depth, tokens, target)
    key = jax.random.key(0)

    def mean_loss(p, *a):
        return jnp.mean(loss_fn(model_fn(p, *a), *a))

    vg = jax.value_and_grad(mean_loss)
    rows = {}
    t_fb = median_time(jax.jit(vg), params, *args, reps=reps)

    adamw = optax.adamw(1e-3)
    a_state = adamw.init(params)

    @jax.jit
    def adam_step(p, s, *a):
        _, g = vg(p, *a)
        u, s = adamw.update(g, s, p)
        return optax.apply_updates(p, u), s

    _, g = jax.jit(vg)(params, *args)
    rows["AdamW"] = (median_time(adam_step, params, a_state, *args, reps=reps),
                     median_time(jax.jit(adamw.update), g, a_state, params, reps=reps))

    for name, kind, make in (("EF", "empirical", fisher.ef_precondition),
                             ("iEF", "ief", fisher.ief_precondition),
                             ("SF(k=1)", "sampled", fisher.sampled_fisher_precondition)):
        tx = optax.chain(make(damping), optax.scale_by_learning_rate(0.1))
        state = tx.init(params)
        psvg = fisher.per_sample_value_and_grad(model_fn, loss_fn, fisher_type=kind)

        @jax.jit
        def step(p, s, rng, *a, psvg=psvg, tx=tx):
            _, g, extras = psvg(p, *a, rng=rng)
            u, s = tx.update(g, s, p, **extras)
            return optax.apply_updates(p, u), s

        _, g, extras = jax.jit(psvg)(params, *args, rng=key)
        upd = jax.jit(lambda g, s, p, ex, tx=tx: tx.update(g, s, p, **ex))
        rows[name] = (median_time(step, params, state, key, *args, reps=reps),
                      median_time(upd, g, state, params, extras, reps=reps))
    return P, t_fb, rows


def run_benchmark(args):
    sizes = [float(s) for s in args.sizes.split(",")]
    print(f"N=32, width {args.width}, depth {args.depth}, tokens {args.tokens}, "
          f"{args.reps} reps, {jax.devices()[0].platform}")
    hdr = (f"{'P':>9} {'method':>8} {'step ms':>9} {'/AdamW':>7} {'update ms':>10} "
           f"{'upd/fwd+bwd':>12}")
    print(hdr)
    print("-" * len(hdr))
    for target in sizes:
        P, t_fb, rows = bench_size(args.width, args.depth, args.tokens, target, args.reps)
        t_adam = rows["AdamW"][0]
        print(f"{P:>9,} {'fwd+bwd':>8} {1e3 * t_fb:>9.2f}")
        for name, (t_step, t_upd) in rows.items():
            print(f"{P:>9,} {name:>8} {1e3 * t_step:>9.2f} {t_step / t_adam:>7.2f} "
                  f"{1e3 * t_upd:>10.3f} {t_upd / t_fb:>12.3f}")


def kfac_compare(args):
    """K-FAC with empirical against iEF-rescaled statistics on the toy task.

    Two measurements, averaged over ``--seeds``:

    * training: one run per kind of statistics, same batches and
      hyperparameters (post-clipping 1.0, weight decay 1e-4); the smoothed
      training loss at a few steps;
    * approximation quality: along the empirical run's trajectory a shadow
      K-FAC fed with iEF-rescaled statistics of the same batches; at a few
      steps ``gamma(u) / gamma(g)`` (exact Fisher products, smaller is
      better) of both K-FAC directions and of the exact EF and iEF updates
      (damping 1e-7) at the same parameters and batch, and the batch's
      gradient-norm imbalance.
    """
    from kfac_jax_peft import clip_by_update_norm, kfac_precondition, kfac_value_and_grad, toy
    from kfac_jax_peft.demo import smooth
    from kfac_jax_peft.peft import merge_trainable, split_trainable

    cfg = toy.ToyConfig()
    model = toy.ToyEncoder(cfg)
    marks = [s for s in (25, 50, 100, 200, 400, 800) if s <= args.steps]
    losses, gammas = {}, []
    for seed in range(args.seeds):
        variables = toy.init(cfg, seed=seed)
        data = toy.make_dataset(cfg, toy.make_teacher(cfg, variables), 1024, seed=seed)
        trainable0, frozen = split_trainable(variables["params"])
        probes = variables["kfac"]

        def model_fn(trainable, probes, batch, frozen=frozen):
            v = {"params": merge_trainable(trainable, frozen)}
            if probes is not None:
                v["kfac"] = probes
            return model.apply(v, batch["ids"], batch["mask"])

        def per_example(logits, batch):
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])

        def loss_fn(logits, batch):
            return jnp.mean(per_example(logits, batch))

        plain_model = lambda p, batch, model_fn=model_fn: model_fn(p, None, batch)  # noqa: E731
        psvg = fisher.per_sample_value_and_grad(plain_model, per_example, fisher_type="ief")
        rest = optax.chain(clip_by_update_norm(1.0), optax.add_decayed_weights(1e-4),
                           optax.scale_by_learning_rate(args.kfac_lr))
        pre = kfac_precondition(args.kfac_damping)
        vgs = {ft: kfac_value_and_grad(model_fn, loss_fn, fisher_type=ft)
               for ft in ("empirical", "ief")}

        def step(p, s, shadow, batch, ft, probes=probes):
            loss, g, stats = vgs[ft](p, probes, batch)
            u, s_pre = pre.update(g, s[0], kfac_stats=stats)
            out = {}
            if shadow is not None:  # iEF statistics of the same batch, not stepped on
                stats_i = vgs["ief"](p, probes, batch)[2]
                u_i, shadow = pre.update(g, shadow, kfac_stats=stats_i)
                out = {"kfac": u, "kfac_ief": u_i, "g": g}
            upd, s_rest = rest.update(u, s[1], p)
            return optax.apply_updates(p, upd), (s_pre, s_rest), shadow, loss, out

        step = jax.jit(step, static_argnames="ft")

        @jax.jit
        def quality(p, batch, dirs):
            _, g, ex = psvg(p, batch)
            fvp = fisher.fisher_vector_product(plain_model, p, batch)
            dirs = dict(dirs)
            for name, tx in (("EF", fisher.ef_precondition(1e-7)),
                             ("iEF", fisher.ief_precondition(1e-7))):
                dirs[name] = tx.update(g, tx.init(p), **ex)[0]
            g = dirs.pop("g")
            out = fisher.gamma_ratios(dirs, g, fvp)
            out["imbalance"] = fisher.gradient_norm_imbalance(ex["per_sample_grads"])
            return out

        for ft in ("empirical", "ief"):
            p = trainable0
            s = (pre.init(p), rest.init(p))
            shadow = pre.init(p) if ft == "empirical" else None
            run = []
            for i, batch in enumerate(toy.batches(data, 32, args.steps, seed)):
                if shadow is not None and i + 1 in marks:  # before the step, at its point
                    _, _, _, _, dirs = step(p, s, shadow, batch, ft)
                    gammas.append((i + 1, jax.device_get(quality(p, batch, dirs))))
                p, s, shadow, loss, _ = step(p, s, shadow, batch, ft)
                run.append(loss)
            losses.setdefault(ft, []).append(np.asarray(jax.device_get(run)))
    print(f"K-FAC on the toy LoRA encoder, {args.steps} steps, {args.seeds} seeds, "
          f"lr {args.kfac_lr}, damping {args.kfac_damping}, post-clip 1.0")
    print(f"{'statistics':>10} " + " ".join(f"{'loss@' + str(m):>9}" for m in marks))
    for ft, runs in losses.items():
        sm = np.mean([smooth(r, 10) for r in runs], 0)
        print(f"{ft:>10} " + " ".join(f"{sm[m - 1]:>9.4f}" for m in marks))
    names = ("kfac", "kfac_ief", "EF", "iEF", "imbalance")
    print("gamma / gamma_SGD along the empirical K-FAC run (geometric mean over seeds)")
    print(f"{'step':>5} " + " ".join(f"{n:>10}" for n in names))
    for m in marks:
        rows = [q for st, q in gammas if st == m]
        vals = [np.exp(np.mean([np.log(float(q[n])) for q in rows])) for n in names]
        print(f"{m:>5} " + " ".join(f"{v:>10.3f}" for v in vals))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--sizes", default="1e4,1e5,1e6")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--kfac-compare", action="store_true")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--kfac-lr", type=float, default=0.1)
    ap.add_argument("--kfac-damping", type=float, default=1e-3)
    args = ap.parse_args(argv)
    if args.kfac_compare:
        kfac_compare(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
