"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=4 (set by the test).

Prints, for each damping mode, the max relative difference between the
parameters after 3 K-FAC steps pmapped over 4 devices and after 3 steps on
one device with the global batch.

Both damping modes run: the exact mode's eigh is the case that used to
hang here before inversions on CPU stopped using jaxlib's batched LAPACK
kernels (see ``kfac_jax_peft.kfac.inverse._over_batch``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfac_jax_peft as kp
from kfac_jax_peft import toy
from kfac_jax_peft.peft import merge_trainable, split_trainable

assert jax.local_device_count() == 4, jax.devices()

cfg = toy.ToyConfig(layers=1)
variables = toy.init(cfg, seed=0)
teacher = toy.make_teacher(cfg, variables)
data = toy.make_dataset(cfg, teacher, 48, seed=3)
trainable, frozen = split_trainable(variables["params"])
# a non-zero LoRA B so that every factor is non-trivial from the first step
trainable = jax.tree_util.tree_map(lambda x: x + 0.05, trainable)
probes = variables["kfac"]
model = toy.ToyEncoder(cfg)


def loss_fn(tr, pr, batch):
    logits = model.apply({"params": merge_trainable(tr, frozen), "kfac": pr},
                         batch["ids"], batch["mask"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]))


# Damping 1e-2: per-device partial sums add the float32 statistics in another
# order (~1e-7 relative), which the preconditioner amplifies by up to
# 1/damping; with 1e-3 the exact mode measured 1.0e-5, at the tolerance.
def make_tx(axis_name, mode):
    return optax.chain(kp.kfac_precondition(1e-2, decay=0.9, axis_name=axis_name,
                                             damping_mode=mode),
                       kp.clip_by_update_norm(0.5), optax.sgd(0.1))


grad_fn = kp.kfac_value_and_grad(loss_fn)


def step(axis_name, mode):
    tx = make_tx(axis_name, mode)

    def f(tr, s, batch):
        _, g, st = grad_fn(tr, probes, batch)
        if axis_name is not None:
            g = jax.lax.pmean(g, axis_name)
        u, s = tx.update(g, s, tr, kfac_stats=st)
        return optax.apply_updates(tr, u), s

    return tx, f


batches = [{k: v[16 * i:16 * (i + 1)] for k, v in data.items()} for i in range(3)]

for mode in ("exact", "factored"):
    tx1, f1 = step(None, mode)
    f1 = jax.jit(f1)
    p1, s1 = trainable, tx1.init(trainable)
    for b in batches:
        p1, s1 = f1(p1, s1, {k: jnp.asarray(v) for k, v in b.items()})

    tx4, f4 = step("data", mode)
    f4 = jax.pmap(f4, axis_name="data")
    rep = lambda t: jax.tree_util.tree_map(lambda x: jnp.stack([x] * 4), t)  # noqa: E731
    p4, s4 = rep(trainable), rep(tx4.init(trainable))
    for b in batches:
        shard = {k: jnp.asarray(v).reshape((4, 4) + v.shape[1:]) for k, v in b.items()}
        p4, s4 = f4(p4, s4, shard)

    tok = [int(np.asarray(b["mask"]).reshape(4, -1).sum(1).std() > 0) for b in batches]
    assert any(tok), "devices should hold different numbers of real tokens"
    worst = 0.0
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p4)):
        b = np.asarray(b)
        assert np.allclose(b[0], b[1:], rtol=0, atol=0), "replicas diverged"
        worst = max(worst, float(np.abs(np.asarray(a) - b[0]).max() / (np.abs(a).max() + 1e-12)))
    print(f"MAX_REL_DIFF {mode} {worst:.3e}")
