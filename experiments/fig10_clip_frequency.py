"""The paper's Fig. 10: how often the clip fires during training, Newton-step
(post-) clipping against pre-clipping (and AdamW's gradient clipping).

The clip rate of a logging window is the fraction of its steps whose
update (post) or gradient (pre) norm exceeded the max norm. Writes
``<out>/fig10.png`` and ``<out>/fig10.md`` (rate in the first and last
quarter of training).
"""

import os
import sys

import numpy as np
from common import base_config, parser, run, write

from kfac_jax_peft.finetune import load_data, read_log
from kfac_jax_peft.finetune.compare import arm_config
from kfac_jax_peft.finetune.plots import plot_curves, run_curves


def main(argv=None) -> int:
    args = parser(__doc__, "runs/fig10").parse_args(argv)
    base = base_config(args)
    data = load_data(base)
    curves, lines = {}, ["| arm | clip rate, first quarter | last quarter |", "|---|---|---|"]
    for arm in ("kfac-post", "kfac-pre", "adamw"):
        lr = args.adamw_learning_rate if arm == "adamw" else args.learning_rate
        cfg = arm_config(base, arm).replace(learning_rate=lr,
                                            output_dir=os.path.join(args.out, arm))
        run(cfg, data)
        curves[arm] = run_curves(cfg.output_dir)
        rates = [r["clip_rate"] for r in read_log(cfg.output_dir) if r["kind"] == "train"]
        q = max(1, len(rates) // 4)
        lines.append(f"| {arm} | {np.mean(rates[:q]):.2f} | {np.mean(rates[-q:]):.2f} |")
    plot_curves({k: {"step": c["step"], "clip_rate": c["clip_rate"], "loss": c["loss"]}
                 for k, c in curves.items()}, os.path.join(args.out, "fig10.png"),
                title="clip frequency")
    write(args.out, "fig10.md", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
