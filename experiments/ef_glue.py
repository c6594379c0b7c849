"""The empirical-Fisher family on a real task: SGD, AdamW, EF, iEF, SF and K-FAC
on LoRA, with the gamma indicator logged (supporting material, Section 6).

Every optimizer trains the same LoRA model on the same batches; the
second-order ones (EF, iEF, SF, K-FAC) take their step through Newton-step
clipping (``--max-norm``) with one learning rate, SGD and AdamW clip the
gradient. At every log step the loop records gamma of the step direction
relative to SGD's (< 1: closer to the natural gradient, Fisher through the
logits on the step's batch) and the per-sample gradient-norm imbalance.
Writes ``<out>/ef.md``: test metric, final training loss, the mean gamma
and the median imbalance over the logged steps, and seconds per step
(gamma's own cost is outside the clock). A run whose training loss turns
non-finite is reported as diverged (with the gamma and imbalance it logged
before).
"""

import os
import shutil
import sys

import numpy as np
from common import base_config, parser, run, write

from kfac_jax_peft.finetune import load_data, read_log
from kfac_jax_peft.finetune.compare import finished

#: Per-optimizer settings (the damping of EF/iEF is the paper's 1e-7; SF's
#: step at such damping is dominated by the part of the gradient outside
#: the span of its sampled gradients, so it is damped relative to the
#: largest Gram diagonal).
SETTINGS = {
    "sgd": {"optimizer": "sgd", "clip": "pre", "learning_rate": 0.1},
    "adamw": {"optimizer": "adamw", "clip": "pre"},
    "ef": {"optimizer": "ef", "clip": "post"},
    "ief": {"optimizer": "ief", "clip": "post"},
    "sf": {"optimizer": "sf", "clip": "post", "fisher_damping": 1e-4,
           "fisher_damping_scale": "relative"},
    "kfac": {"optimizer": "kfac", "clip": "post"},
}


def main(argv=None) -> int:
    p = parser(__doc__, "runs/ef")
    p.set_defaults(task="sst2")
    p.add_argument("--optimizers", nargs="+", default=list(SETTINGS))
    args = p.parse_args(argv)
    base = base_config(args).replace(log_gamma=True)
    data = load_data(base)
    lines = ["| optimizer | test (mean ± std) | final train loss | gamma / SGD's | imbalance | "
             "s/step |", "|---|---|---|---|---|---|"]
    for name in args.optimizers:
        settings = dict(SETTINGS[name])
        if name == "adamw":
            settings["learning_rate"] = args.adamw_learning_rate
        tests, losses, gammas, imbalances, walls, diverged = [], [], [], [], [], []
        for seed in args.seeds:
            cfg = base.replace(**settings, seed=seed,
                               output_dir=os.path.join(args.out, name, f"seed{seed}"))
            if finished(cfg) is None and os.path.isdir(cfg.output_dir):
                shutil.rmtree(cfg.output_dir)  # an unfinished (diverged) earlier attempt
            try:
                res = run(cfg, data)
            except FloatingPointError:  # logged as an "error" record; keep going
                errors = [r for r in read_log(cfg.output_dir) if r["kind"] == "error"]
                diverged.append(errors[-1]["step"])
                continue
            recs = [r for r in read_log(cfg.output_dir) if r["kind"] == "train"]
            tests.append(res["test"]["main"])
            losses.append(res["final_loss"])
            gammas += [float(r["gamma"]) for r in recs]
            imbalances += [float(r["imbalance"]) for r in recs]
            walls.append(res["wall_clock"] / cfg.steps)
        if diverged:
            recs = [r for r in read_log(cfg.output_dir) if r["kind"] == "train"]
            lines.append(f"| {name} | diverged (loss not finite at step "
                         f"{', '.join(map(str, diverged))}) | - | "
                         f"{np.mean([float(r['gamma']) for r in recs]):.3f} | "
                         f"{np.median([float(r['imbalance']) for r in recs]):.1f} | - |")
            continue
        lines.append(f"| {name} | {np.mean(tests):.4f} ± {np.std(tests):.4f} | "
                     f"{np.mean(losses):.4f} | {np.mean(gammas):.3f} | "
                     f"{np.median(imbalances):.1f} | {np.mean(walls):.3f} |")
    write(args.out, "ef.md", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
