"""Training on 4 (simulated) devices equals training on one, same seed and global batch.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``; arguments:
a checkpoint folder and a data folder. Dropout is on: under ``jit`` over the
mesh the masks are drawn for the global batch, as on one device. Prints
``MAX_REL_DIFF <arm> <value>`` (the largest difference of the final
trainable parameters, relative to the largest parameter of the same leaf)
against one device for:

* ``kfac``: K-FAC + Newton-step clipping, statistics (and inversion) steps
  every 2 steps and plain steps between them;
* ``kfac-spread-sharded``: the same with the inversions spread over the
  devices and the factor state split over them;
* ``adamw``.

Then the spread and sharded run is stopped at step 4 and resumed from its
checkpoint: prints ``RESUME_MAX_ABS_DIFF <value>`` of the final parameters
and optimizer state against the uninterrupted run (bit-identical: 0.0) and
``RESUMED_SPLIT <n>``, the number of factor matrices that came back split
over the devices.
"""

import sys
import tempfile

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from kfac_jax_peft import kfac_state
from kfac_jax_peft.finetune import TrainConfig, load_data, train
from kfac_jax_peft.finetune import trainer as T


def rel_diff(a_tree, b_tree) -> float:
    worst = 0.0
    for a, b in zip(jax.tree_util.tree_leaves(a_tree), jax.tree_util.tree_leaves(b_tree)):
        a, b = np.asarray(a), np.asarray(b)
        worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12)))
    return worst


def main(model: str, data_dir: str) -> None:
    assert jax.local_device_count() == 4, jax.devices()
    with tempfile.TemporaryDirectory() as tmp:
        base = TrainConfig(task="rte", model=model, data_dir=data_dir, max_length=32,
                           batch_size=8, steps=8, eval_every=4, log_every=4, invert_every=2,
                           learning_rate=0.05, damping=1e-2, dropout=0.1, progress=False)
        data = load_data(base)
        arms = {"kfac": dict(optimizer="kfac", clip="post"),
                "adamw": dict(optimizer="adamw", clip="pre", learning_rate=1e-3)}
        one = {}
        for name, arm in arms.items():
            one[name] = train(base.replace(**arm, devices=1, output_dir=f"{tmp}/{name}1"),
                              data=data)
            four = train(base.replace(**arm, devices=4, output_dir=f"{tmp}/{name}4"), data=data)
            assert one[name].test.keys() == four.test.keys()
            print("MAX_REL_DIFF", name, rel_diff(one[name].trainable, four.trainable),
                  flush=True)

        spread = base.replace(**arms["kfac"], devices=4, distribute_inversions=True,
                              shard_factors=True)
        full = _train_keeping_state(spread.replace(output_dir=f"{tmp}/spread"), data)
        print("MAX_REL_DIFF", "kfac-spread-sharded",
              rel_diff(one["kfac"].trainable, full.trainable), flush=True)

        cut = spread.replace(output_dir=f"{tmp}/cut")
        train(cut, data=data, stop_after=4)
        resumed = _train_keeping_state(cut, data, resume=True)
        worst = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                    for a, b in zip(jax.tree_util.tree_leaves(full.state),
                                    jax.tree_util.tree_leaves(resumed.state)))
        print("RESUME_MAX_ABS_DIFF", worst, flush=True)
        split = [x for x in jax.tree_util.tree_leaves(kfac_state(resumed.state.opt_state).factors)
                 if x.ndim == 2 and x.sharding.spec == P("data")]
        print("RESUMED_SPLIT", len(split), flush=True)


def _train_keeping_state(cfg, data, resume=False):
    """``train``, with the final placed TrainState kept on the result."""
    kept = {}
    finish = T._finish

    def keep(run, state, end):
        kept["state"] = state
        return finish(run, state, end)

    T._finish = keep
    try:
        result = train(cfg, data=data, resume=resume)
    finally:
        T._finish = finish
    result.state = kept["state"]
    return result


if __name__ == "__main__":
    main(*sys.argv[1:3])
