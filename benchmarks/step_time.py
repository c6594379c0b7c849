"""Step time of the K-FAC chain relative to AdamW, same process, model and batch.

The model is the built-in LoRA encoder (LoRA on query and value, classifier
head trainable). Default size: 4 layers, hidden 256, 4 heads, MLP 1024, LoRA
rank 8, batch 16 x 64 tokens, which runs in minutes on 2 CPU cores;
``--size base`` is RoBERTa-base-like (12 layers, hidden 768, 12 heads, MLP
3072, batch 32 x 128) for a GPU.

Three kinds of K-FAC step are timed separately (median over ``--reps``
calls each, after compilation; EKFAC, whose decompositions need
``invert_every >= 2``, times its inversion steps as the even calls of a run
with ``invert_every=2``):

* ``plain``: ``kfac_stats=None``, multiply by the stored inverse;
* ``stats``: statistics captured and folded into the factors, no inversion;
* ``invert``: statistics and an inversion.

For an inversion interval ``k`` the expected time per step is then
``(t_invert + (k - 1) t_stats) / k`` with statistics every step and
``(t_invert + (k - 1) t_plain) / k`` with statistics only on inversion steps
(the training loop picks the jitted step on the host). The table prints
these divided by AdamW's median step (gradient clipping + ``optax.adamw``).

On CPU, jaxlib's LAPACK kernels (Cholesky, eigh) run on scipy's OpenBLAS,
whose worker threads spin against XLA's own thread pool: measured on 2
cores, an inversion step took 219 ms instead of 146 ms. The script sets
``OPENBLAS_NUM_THREADS=1`` (unless already set) before anything loads
OpenBLAS; do the same in CPU training jobs.

``--adaptive`` also times the options of :mod:`kfac_jax_peft.adaptive` on
a plain K-FAC step (exact damping, Newton-step clip): adaptive damping
(one more forward pass for the loss after the step, one Fisher-vector
product), the quadratic-model step with momentum (two products) and both.
Each is timed with the rule running on every call (``every=1``) and on
none after the first (``every`` huge), so that for a rule interval ``k``
the time per step is ``(t_due + (k - 1) t_skip) / k``; printed for ``k`` = 1
and 10, divided by AdamW's step.

Usage: ``python benchmarks/step_time.py [--size small|base] [--reps 30] [--adaptive]``
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

import kfac_jax_peft as kp  # noqa: E402
from kfac_jax_peft import demo, toy  # noqa: E402
from kfac_jax_peft.peft import split_trainable  # noqa: E402

SIZES = {
    "small": (toy.ToyConfig(vocab_size=1000, hidden=256, heads=4, layers=4, mlp=1024, rank=8,
                            alpha=16.0, max_len=64), 16),
    "base": (toy.ToyConfig(vocab_size=30000, hidden=768, heads=12, layers=12, mlp=3072, rank=8,
                           alpha=16.0, max_len=128), 32),
}
MODES = {
    "exact/eigh": dict(damping_mode="exact"),
    "factored/cholesky": dict(damping_mode="factored", inverse_method="cholesky"),
    "factored/cholesky-solve": dict(damping_mode="factored", inverse_method="cholesky_solve"),
    "factored/newton-schulz": dict(damping_mode="factored", inverse_method="newton_schulz"),
    "ekfac": dict(damping_mode="ekfac"),
}


def _median_time(step, tr, state, batches, reps, every=1):
    """Median wall time of ``step`` over ``reps`` calls of a real run: the
    parameters and optimizer state are carried, the batches rotate (so the
    factors, and the warm starts of iterative inverses, change as in
    training). ``every=2``: over the calls ``2, 4, ...`` only (the inversion
    steps of ``invert_every=2``)."""
    tr, state, _ = jax.block_until_ready(step(tr, state, batches[0]))  # compile, warm up
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        tr, state, _ = jax.block_until_ready(step(tr, state, batches[(i + 1) % len(batches)]))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[every - 1::every]), tr, state


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--adaptive", action="store_true",
                    help="also time adaptive damping and the quadratic-model step")
    args = ap.parse_args(argv)
    cfg, batch_size = SIZES[args.size]

    variables = toy.init(cfg, batch_shape=(batch_size, cfg.max_len))
    trainable, frozen = split_trainable(variables["params"])
    trainable = jax.tree_util.tree_map(lambda x: x + 0.01, trainable)  # non-zero LoRA B
    probes = variables["kfac"]
    rng = np.random.default_rng(0)

    def make_batch():
        lengths = rng.integers(cfg.max_len // 2, cfg.max_len + 1, batch_size)
        mask = (np.arange(cfg.max_len)[None] < lengths[:, None]).astype(np.float32)
        ids = rng.integers(0, cfg.vocab_size, (batch_size, cfg.max_len))
        return {"ids": jnp.asarray(ids), "mask": jnp.asarray(mask),
                "labels": jnp.asarray(rng.integers(0, 2, batch_size))}

    batches = [make_batch() for _ in range(8)]

    def steps(tx, prepare=None):
        return demo.make_steps(cfg, frozen, probes, tx, prepare)

    adamw = optax.chain(kp.clipped(optax.identity(), "pre", 1.0),
                        optax.adamw(1e-3, weight_decay=1e-4))
    t_adamw, _, _ = _median_time(steps(adamw)[1], trainable, adamw.init(trainable),
                                 batches, args.reps)
    n_train = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    print(f"backend {jax.default_backend()}, size {args.size}: {cfg.layers} layers, hidden "
          f"{cfg.hidden}, LoRA rank {cfg.rank} on query/value, batch {batch_size} x "
          f"{cfg.max_len}, {n_train} trainable parameters")
    print(f"AdamW median step: {1e3 * t_adamw:.2f} ms "
          f"(OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')})")

    header = (f"{'mode':24s} {'plain':>7s} {'stats':>7s} {'invert':>7s}   "
              + " ".join(f"{'k=' + str(k):>7s}" for k in (1, 10, 100, 500)) + "   (x AdamW)")
    rows = []
    for name in [m for m in args.modes.split(",") if m]:  # --modes "": AdamW (and --adaptive)
        ekfac = MODES[name]["damping_mode"] == "ekfac"

        def make(invert_every, name=name, ekfac=ekfac):
            pre = kp.kfac_precondition(1e-3, invert_every=invert_every, **MODES[name])
            tx = optax.chain(kp.clipped(pre, "post", 1.0), optax.add_decayed_weights(1e-4),
                             optax.scale_by_learning_rate(0.05))
            return (tx, *steps(tx, kp.ekfac_probes if ekfac else None))

        every = 2 if ekfac else 1
        tx1, inv_step, _ = make(every)  # every (second) statistics step inverts
        t_inv, _, _ = _median_time(inv_step, trainable, tx1.init(trainable), batches,
                                   every * args.reps, every)

        txk, stats_step, plain_step = make(10**9)  # inverts once, then never
        t_stats, tr, sk = _median_time(stats_step, trainable, txk.init(trainable), batches,
                                       args.reps)
        t_plain, _, _ = _median_time(plain_step, tr, sk, batches, args.reps)

        every = [(t_inv + (k - 1) * t_stats) / k / t_adamw for k in (1, 10, 100, 500)]
        only = [(t_inv + (k - 1) * t_plain) / k / t_adamw for k in (1, 10, 100, 500)]
        rows.append((name, t_plain, t_stats, t_inv, every, only))

    print()
    print("median ms per step kind; expected time per step / AdamW for interval k")
    print(header)
    for name, tp, ts, ti, every, only in rows:
        cells = " ".join(f"{r:7.2f}" for r in every)
        print(f"{name:24s} {1e3 * tp:7.2f} {1e3 * ts:7.2f} {1e3 * ti:7.2f}   {cells}"
              "   statistics every step")
        cells = " ".join(f"{r:7.2f}" for r in only)
        print(f"{'':24s} {'':7s} {'':7s} {'':7s}   {cells}   statistics on inversion steps")
    if args.adaptive:
        _adaptive_table(cfg, frozen, probes, trainable, batches, args.reps, t_adamw)


def _adaptive_steps(cfg, frozen, probes, tx):
    """``(stats_step, plain_step)`` passing the extra arguments of
    :mod:`kfac_jax_peft.adaptive` (loss, gradient, loss function on the
    batch, exact Fisher-vector product through the logits)."""
    from kfac_jax_peft import fisher
    from kfac_jax_peft.peft import merge_trainable

    model = toy.ToyEncoder(cfg)

    def logits_fn(trainable, pr, batch):
        variables = {"params": merge_trainable(trainable, frozen)}
        if pr is not None:
            variables["kfac"] = pr
        return model.apply(variables, batch["ids"], batch["mask"])

    def loss_fn(trainable, pr, batch):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
            logits_fn(trainable, pr, batch), batch["labels"]))

    grad_stats = kp.kfac_value_and_grad(loss_fn)

    def update(trainable, opt_state, batch, loss, grads, **kw):
        fvp_fn = lambda v: fisher.fisher_vector_product(  # noqa: E731
            lambda p, b: logits_fn(p, None, b), trainable, batch)(v)
        updates, opt_state = tx.update(grads, opt_state, trainable, loss=loss, grads=grads,
                                       value_fn=lambda p: loss_fn(p, None, batch),
                                       fvp_fn=fvp_fn, **kw)
        return optax.apply_updates(trainable, updates), opt_state, loss

    @jax.jit
    def stats_step(trainable, opt_state, batch):
        loss, grads, stats = grad_stats(trainable, probes, batch)
        return update(trainable, opt_state, batch, loss, grads, kfac_stats=stats)

    @jax.jit
    def plain_step(trainable, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, None, batch)
        return update(trainable, opt_state, batch, loss, grads)

    return stats_step, plain_step


def _adaptive_table(cfg, frozen, probes, trainable, batches, reps, t_adamw):
    from kfac_jax_peft import adaptive

    def chain(damp, step, every):
        pre = kp.kfac_precondition(1e-3, invert_every=10**9)
        last = (adaptive.scale_by_quadratic_model(1.0, every=every, damping=None if damp
                                                  else 1e-3)
                if step else optax.scale_by_learning_rate(0.05))
        tx = optax.chain(kp.clipped(pre, "post", 1.0), optax.add_decayed_weights(1e-4), last)
        # omega fixed: the default (19/20)^every underflows for the huge "never" interval
        return adaptive.adaptive_damping(tx, 1e-3, every=every, omega=0.95) if damp else tx

    def plain_time(tx):
        """Median plain step after one inverting statistics step (at count 0 a
        rule with a huge interval runs once, there)."""
        stats_step, plain_step = _adaptive_steps(cfg, frozen, probes, tx)
        tr, state, _ = stats_step(trainable, tx.init(trainable), batches[0])
        return _median_time(plain_step, tr, state, batches, reps)[0]

    t_kfac = plain_time(chain(False, False, 1))
    print()
    print(f"adaptive options on a plain K-FAC step (exact damping, post-clip; K-FAC plain "
          f"step {1e3 * t_kfac:.2f} ms = {t_kfac / t_adamw:.2f} x AdamW)")
    print(f"{'option':28s} {'due':>8s} {'skip':>8s}   {'k=1':>7s} {'k=10':>7s}   (x AdamW)")
    for name, damp, step in (("adaptive damping", True, False),
                             ("adaptive step + momentum", False, True),
                             ("both", True, True)):
        t_due, t_skip = plain_time(chain(damp, step, 1)), plain_time(chain(damp, step, 10**9))
        cells = " ".join(f"{(t_due + (k - 1) * t_skip) / k / t_adamw:7.2f}" for k in (1, 10))
        print(f"{name:28s} {1e3 * t_due:8.2f} {1e3 * t_skip:8.2f}   {cells}")


if __name__ == "__main__":
    main()
