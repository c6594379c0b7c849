"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=4 (set by the test).

K-FAC under ``jax.jit`` over a 4-device mesh (batch sharded over ``data``):

* ``distribute_inversions=True`` against the replicated inversion, for
  exact damping, factored damping (``cholesky_solve``, ``eigh``) and the
  curvature-only state: prints ``SPREAD <mode> <max relative difference of
  the parameters after 3 steps>``;
* the factor state split over the mesh (``kfac_state_shardings``): prints
  ``SHARDED <max relative difference>`` against the replicated state and
  ``SHARDED_ROWS <number of factor matrices split by rows>``;
* that split state saved by orbax after 2 steps, restored onto the same
  shardings and stepped once more: prints ``RESUME <max absolute difference>``
  of parameters and state against the uninterrupted run (bit-identical: 0).
"""

import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import kfac_jax_peft as kp
from kfac_jax_peft import toy
from kfac_jax_peft.peft import merge_trainable, split_trainable

assert jax.device_count() == 4, jax.devices()

cfg = toy.ToyConfig(layers=1)
variables = toy.init(cfg, seed=0)
teacher = toy.make_teacher(cfg, variables)
data = toy.make_dataset(cfg, teacher, 48, seed=3)
trainable, frozen = split_trainable(variables["params"])
trainable = jax.tree_util.tree_map(lambda x: x + 0.05, trainable)  # every factor non-trivial
probes = variables["kfac"]
model = toy.ToyEncoder(cfg)
mesh = Mesh(np.array(jax.devices()), ("data",))
replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def loss_fn(tr, pr, batch):
    logits = model.apply({"params": merge_trainable(tr, frozen), "kfac": pr},
                         batch["ids"], batch["mask"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]))


grad_fn = kp.kfac_value_and_grad(loss_fn)
batches = [{k: jax.device_put(v[16 * i:16 * (i + 1)], rows) for k, v in data.items()}
           for i in range(3)]


_compiled = {}


def compiled(kwargs, distribute, state_shardings):
    """``(tx, jitted step, state shardings)``, made once per setting."""
    key = (str(kwargs), distribute, state_shardings is not None)
    if key not in _compiled:
        tx = optax.chain(kp.kfac_precondition(1e-2, decay=0.9, distribute_inversions=distribute,
                                              **kwargs),
                         kp.clip_by_update_norm(0.5), optax.sgd(0.1))

        def step(tr, s, batch):
            _, g, st = grad_fn(tr, probes, batch)
            u, s = tx.update(g, s, tr, kfac_stats=st)
            return optax.apply_updates(tr, u), s

        s_shard = state_shardings(tx.init(trainable)) if state_shardings else replicated
        _compiled[key] = tx, jax.jit(step, out_shardings=(replicated, s_shard)), s_shard
    return _compiled[key]


def run(kwargs, distribute, state_shardings=None, steps=(0, 1, 2), start=None):
    tx, f, s_shard = compiled(kwargs, distribute, state_shardings)
    p, s = start or (trainable, tx.init(trainable))
    p, s = jax.device_put(p, replicated), jax.device_put(s, s_shard)
    with jax.set_mesh(mesh):
        for i in steps:
            p, s = f(p, s, batches[i])
    return p, s


def rel(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max() / (np.abs(x).max() + 1e-12))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


modes = {"exact": {}, "cholesky_solve": {"damping_mode": "factored"},
         "curvature_only": {"store_factors": False}}
for name, kwargs in modes.items():
    print("SPREAD", name, rel(run(kwargs, False)[0], run(kwargs, True)[0]), flush=True)

shard = lambda s: kp.kfac_state_shardings(s, mesh, "data")  # noqa: E731
p, s = run({}, True, shard)
ref_p, ref_s = run({}, False)
print("SHARDED", rel(ref_p, p))
split = [x for x in jax.tree_util.tree_leaves(kp.kfac_state(s).factors)
         if x.ndim == 2 and x.sharding.spec == P("data")]
print("SHARDED_ROWS", len(split))

# a checkpoint of the split state after 2 steps, restored onto the same shardings
p2, s2 = run({}, True, shard, steps=(0, 1))
with tempfile.TemporaryDirectory() as tmp:
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(f"{tmp}/c", {"p": p2, "s": s2})
    ckpt.wait_until_finished()
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, {"p": p2, "s": s2})
    back = ckpt.restore(f"{tmp}/c", target)
    same_layout = all(a.sharding == b.sharding for a, b in zip(
        jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves({"p": p2, "s": s2})))
    p3, s3 = run({}, True, shard, steps=(2,), start=(back["p"], back["s"]))
worst = max(float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
            for a, b in zip(
    jax.tree_util.tree_leaves((p, s)), jax.tree_util.tree_leaves((p3, s3))))
print("RESUME", worst, "same_layout", same_layout)
sys.stdout.flush()
