"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=4 (set by the test).

K-FAC statistics captured inside ``jax.shard_map`` with its default
``check_vma=True``, the batch split over a ``data`` axis and the parameters
and probes replicated: the statistics come out summed over the axis (like
the gradient of a replicated parameter), and three K-FAC steps equal three
steps on one device with the global batch. Prints the max relative
difference of the parameters.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import kfac_jax_peft as kp

assert jax.device_count() == 4, jax.devices()

rng = np.random.default_rng(0)
n, t, d_in, d_out = 16, 5, 6, 3
params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32),
                    "bias": jnp.zeros(d_out)}}
probes = {"dense": {"kernel": kp.zeros_stats(d_in, d_out, True)}}
X = jnp.asarray(rng.normal(size=(n, t, d_in)), jnp.float32)
Y = jnp.asarray(rng.normal(size=(n, t, d_out)), jnp.float32)
mask = np.ones((n, t), np.float32)
mask[::3, 3:] = 0  # padding: devices hold different numbers of real tokens
mask = jnp.asarray(mask)


def loss(p, pr, X, Y, m):
    out = kp.dense(X, p["dense"]["kernel"], p["dense"]["bias"],
                   probe=None if pr is None else pr["dense"]["kernel"], mask=m)
    per_example = jnp.sum(jnp.sum((out - Y) ** 2, -1) * m, -1) / jnp.sum(m, -1)
    return 0.5 * jnp.mean(per_example)


grad_fn = kp.kfac_value_and_grad(loss)
tx = optax.chain(kp.kfac_precondition(1e-2, decay=0.5), kp.clip_by_update_norm(10.0),
                 optax.sgd(0.1))


def local(p, pr, X, Y, m):
    _, g, stats = grad_fn(p, pr, X, Y, m)
    # the gradient of the replicated parameters is summed over the axis; the
    # local losses are means over a quarter of the batch each
    return jax.tree_util.tree_map(lambda x: x / jax.lax.axis_size("data"), g), stats


def run(sharded: bool):
    p, s = params, tx.init(params)
    for _ in range(3):
        if sharded:
            mesh = jax.make_mesh((4,), ("data",))
            with jax.set_mesh(mesh):
                batch = [jax.reshard(a, P("data")) for a in (X, Y, mask)]
                g, stats = jax.jit(jax.shard_map(
                    local, in_specs=(P(), P(), P("data"), P("data"), P("data")),
                    out_specs=(P(), P())))(p, probes, *batch)
        else:
            _, g, stats = grad_fn(p, probes, X, Y, mask)
        u, s = tx.update(g, s, p, kfac_stats=stats)
        p = optax.apply_updates(p, u)
    return p


one, four = run(False), run(True)
diff = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
           for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(four)))
print("MAX_REL_DIFF", diff)
