"""Training on 2 (simulated) devices equals training on one, same global batch.

Run with ``XLA_FLAGS=--xla_force_host_platform_device_count=2``; arguments:
a checkpoint folder and a data folder. Prints ``MAX_REL_DIFF <arm> <value>``
(the largest difference of the final trainable parameters, relative to the
largest parameter of the same leaf) for K-FAC + Newton-step clipping and
for AdamW.
"""

import sys
import tempfile

import jax
import numpy as np

from kfac_jax_peft.finetune import TrainConfig, load_data, train


def main(model: str, data_dir: str) -> None:
    assert jax.local_device_count() == 2, jax.devices()
    with tempfile.TemporaryDirectory() as tmp:
        base = TrainConfig(task="rte", model=model, data_dir=data_dir, max_length=32,
                           batch_size=8, steps=8, eval_every=4, log_every=4, invert_every=2,
                           learning_rate=0.05, damping=1e-2, dropout=0.0, progress=False)
        data = load_data(base)
        for optimizer, clip in (("kfac", "post"), ("adamw", "pre")):
            runs = [train(base.replace(optimizer=optimizer, clip=clip, devices=n,
                                       output_dir=f"{tmp}/{optimizer}{n}"), data=data)
                    for n in (1, 2)]
            worst = 0.0
            for a, b in zip(jax.tree_util.tree_leaves(runs[0].trainable),
                            jax.tree_util.tree_leaves(runs[1].trainable)):
                a, b = np.asarray(a), np.asarray(b)
                worst = max(worst, float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12)))
            assert runs[0].test.keys() == runs[1].test.keys()
            print("MAX_REL_DIFF", optimizer, worst, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
