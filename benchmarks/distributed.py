"""K-FAC data parallel under ``jax.jit`` over a device mesh: step and inversion
time on 1, 2 and 4 devices, inversions replicated vs spread over the devices.

The model is the built-in LoRA encoder of ``benchmarks/step_time.py``
(default: 4 layers, hidden 256, LoRA rank 8 on query and value, global batch
16 x 64 tokens; ``--size base`` for a GPU). For each device count ``n`` the
global batch is split by rows over a ``data`` mesh axis of the first ``n``
devices, parameters and optimizer state replicated, and timed (median over
``--reps`` calls, after compilation):

* ``invert step``: statistics and an inversion (``invert_every=1``);
* ``plain step``: the stored curvature only (no statistics, no inversion);
* ``inversion``: the eigendecompositions of every factor alone
  (:func:`kfac_jax_peft.kfac.stages.decompose`), as jitted over the mesh.

each with ``distribute_inversions`` off (every device decomposes every
factor) and on (each device about ``1/n`` of them, then gathered). The
ratios printed are spread / replicated at the same ``n``, and each time
relative to one device (the first count of ``--devices``).

On CPU without ``XLA_FLAGS`` the script simulates 4 devices
(``--xla_force_host_platform_device_count=4``). Simulated CPU devices share
the machine's cores and XLA's thread pool: the figures then show the
overhead of partitioning and collectives and how the work is divided, not
the speed-up of real devices, which only separate chips (GPUs) can show.

Usage: ``python benchmarks/distributed.py [--size small|base] [--reps 10]``
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=4").strip()

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import kfac_jax_peft as kp  # noqa: E402
from kfac_jax_peft import demo, toy  # noqa: E402
from kfac_jax_peft.kfac import stages as S  # noqa: E402
from kfac_jax_peft.kfac.spread import mesh_axes  # noqa: E402
from kfac_jax_peft.peft import split_trainable  # noqa: E402

SIZES = {
    "small": (toy.ToyConfig(vocab_size=1000, hidden=256, heads=4, layers=4, mlp=1024, rank=8,
                            alpha=16.0, max_len=64), 16),
    "base": (toy.ToyConfig(vocab_size=30000, hidden=768, heads=12, layers=12, mlp=3072, rank=8,
                           alpha=16.0, max_len=128), 32),
}


def _median(fn, reps: int) -> float:
    jax.block_until_ready(fn())  # compile, warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(n: int, spread: bool, cfg, frozen, probes, trainable, batch, reps: int) -> dict:
    """Median seconds of the invert step, the plain step and the inversion on
    a mesh of the first ``n`` devices."""
    mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
    rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    tx = optax.chain(kp.kfac_precondition(1e-3, invert_every=1, distribute_inversions=spread),
                     kp.clip_by_update_norm(1.0), optax.scale(-0.05))
    stats_step, plain_step = demo.make_steps(cfg, jax.device_put(frozen, rep),
                                             jax.device_put(probes, rep), tx)
    tr = jax.device_put(trainable, rep)
    state = jax.device_put(tx.init(trainable), rep)
    batch = jax.device_put(batch, rows)

    @jax.jit
    def inversion(factors):
        return S.decompose(factors, factors, mesh_axes() if spread else None)

    with jax.set_mesh(mesh):
        tr, state, _ = stats_step(tr, state, batch)
        factors = kp.kfac_state(state).factors
        return {"invert step": _median(lambda: stats_step(tr, state, batch), reps),
                "plain step": _median(lambda: plain_step(tr, state, batch), reps),
                "inversion": _median(lambda: inversion(factors), reps)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--devices", default="1,2,4")
    args = ap.parse_args(argv)
    cfg, batch_size = SIZES[args.size]
    counts = [int(c) for c in args.devices.split(",")]
    if max(counts) > jax.device_count():
        raise SystemExit(f"--devices {args.devices}: only {jax.device_count()} devices")

    variables = toy.init(cfg, batch_shape=(batch_size, cfg.max_len))
    trainable, frozen = split_trainable(variables["params"])
    trainable = jax.tree_util.tree_map(lambda x: x + 0.01, trainable)  # non-zero LoRA B
    rng = np.random.default_rng(0)
    lengths = rng.integers(cfg.max_len // 2, cfg.max_len + 1, batch_size)
    batch = {"ids": rng.integers(0, cfg.vocab_size, (batch_size, cfg.max_len)),
             "mask": (np.arange(cfg.max_len)[None] < lengths[:, None]).astype(np.float32),
             "labels": rng.integers(0, 2, batch_size)}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    tx = kp.kfac_precondition(1e-3)
    sizes = sorted(x.shape[0] for x in jax.tree_util.tree_leaves(
        kp.kfac_state(tx.init(trainable)).factors) if x.ndim == 2)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), size {args.size}: "
          f"{cfg.layers} layers, hidden {cfg.hidden}, LoRA rank {cfg.rank}, global batch "
          f"{batch_size} x {cfg.max_len}; {len(sizes)} factors of sizes "
          f"{sorted(set(sizes))}; exact damping (eigh); median of {args.reps}, ms")
    print(f"{'devices':>7s} {'what':12s} {'replicated':>10s} {'spread':>8s} "
          f"{'spread/rep':>10s} {'rep/1 dev':>9s} {'spread/1 dev':>12s}", flush=True)
    base = None
    for n in counts:  # a row as soon as it is measured
        rep, spr = (measure(n, s, cfg, frozen, variables["kfac"], trainable, batch, args.reps)
                    for s in (False, True))
        base = base or rep
        for what in ("invert step", "plain step", "inversion"):
            r, s = rep[what], spr[what]
            print(f"{n:7d} {what:12s} {1e3 * r:10.2f} {1e3 * s:8.2f} {s / r:10.2f} "
                  f"{r / base[what]:9.2f} {s / base[what]:12.2f}", flush=True)

if __name__ == "__main__":
    main()
