"""The paper's Table 8: wall-clock of K-FAC (Newton-step clipping) against
the second-order update interval, relative to AdamW in the same run.

Statistics are captured on inversion steps only (``stats_every`` defaults to
``invert_every``). Compilation is excluded from the wall-clock (every step
kind is compiled before the clock starts). Writes ``<out>/table8.md``.
"""

import os
import sys

from common import base_config, parser, run, write

from kfac_jax_peft.finetune import load_data
from kfac_jax_peft.finetune.compare import arm_config


def main(argv=None) -> int:
    p = parser(__doc__, "runs/table8")
    p.add_argument("--intervals", nargs="+", type=int, default=[1, 10, 50])
    args = p.parse_args(argv)
    base = base_config(args)
    data = load_data(base)
    adamw = arm_config(base, "adamw").replace(learning_rate=args.adamw_learning_rate,
                                              output_dir=os.path.join(args.out, "adamw"))
    ref = run(adamw, data)
    lines = ["| optimizer | interval | s/step | x AdamW | test |", "|---|---|---|---|---|",
             f"| AdamW | - | {ref['wall_clock'] / base.steps:.4f} | 1.00 | "
             f"{ref['test']['main']:.4f} |"]
    for t in args.intervals:
        cfg = arm_config(base, "kfac-post").replace(
            invert_every=t, output_dir=os.path.join(args.out, f"kfac_T{t}"))
        res = run(cfg, data)
        lines.append(f"| K-FAC post-clip | {t} | {res['wall_clock'] / base.steps:.4f} | "
                     f"{res['wall_clock'] / ref['wall_clock']:.2f} | "
                     f"{res['test']['main']:.4f} |")
    write(args.out, "table8.md", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
