"""The paper's Fig. 6/7: test metric against the LoRA rank, AdamW and K-FAC
with Newton-step clipping. Writes ``<out>/fig6.md`` and ``<out>/fig6.png``.
"""

import os
import sys

import numpy as np
from common import base_config, parser, run, write

from kfac_jax_peft.finetune import load_data
from kfac_jax_peft.finetune.compare import arm_config


def main(argv=None) -> int:
    p = parser(__doc__, "runs/fig6")
    p.add_argument("--ranks", nargs="+", type=int, default=[2, 8, 32])
    args = p.parse_args(argv)
    base = base_config(args)
    data = load_data(base)
    table = {}
    for arm, lr in (("adamw", args.adamw_learning_rate), ("kfac-post", args.learning_rate)):
        for rank in args.ranks:
            scores = [run(arm_config(base, arm).replace(
                lora_rank=rank, lora_alpha=2.0 * rank, learning_rate=lr, seed=seed,
                output_dir=os.path.join(args.out, f"{arm}_r{rank}_seed{seed}")), data
            )["test"]["main"] for seed in args.seeds]
            table[arm, rank] = (float(np.mean(scores)), float(np.std(scores)))
    lines = ["| rank | AdamW | K-FAC post-clip |", "|---|---|---|"]
    lines += [f"| {r} | {table['adamw', r][0]:.4f} ± {table['adamw', r][1]:.4f} | "
              f"{table['kfac-post', r][0]:.4f} ± {table['kfac-post', r][1]:.4f} |"
              for r in args.ranks]
    write(args.out, "fig6.md", "\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for arm in ("adamw", "kfac-post"):
        m = [table[arm, r][0] for r in args.ranks]
        s = [table[arm, r][1] for r in args.ranks]
        ax.errorbar(args.ranks, m, yerr=s, marker="o", capsize=3, label=arm)
    ax.set(xscale="log", xlabel="LoRA rank", ylabel=f"test {data.spec.main_metric}")
    ax.set_xticks(args.ranks, [str(r) for r in args.ranks])
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "fig6.png"), dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
