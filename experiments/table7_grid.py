"""The paper's Table 7: K-FAC with Newton-step clipping over a grid of
learning rate, damping and max norm (validation and test metric of each).

Writes ``<out>/table7.md`` (sorted by validation metric).
"""

import itertools
import os
import sys

from common import base_config, parser, run, write

from kfac_jax_peft.finetune import load_data
from kfac_jax_peft.finetune.compare import arm_config


def main(argv=None) -> int:
    p = parser(__doc__, "runs/table7")
    p.add_argument("--lrs", nargs="+", type=float, default=[0.1, 0.3])
    p.add_argument("--dampings", nargs="+", type=float, default=[1e-3, 1e-2])
    p.add_argument("--max-norms", nargs="+", type=float, default=[0.5, 1.0])
    args = p.parse_args(argv)
    base = base_config(args)
    data = load_data(base)
    rows = []
    for lr, damping, norm in itertools.product(args.lrs, args.dampings, args.max_norms):
        cfg = arm_config(base, "kfac-post").replace(
            learning_rate=lr, damping=damping, max_norm=norm,
            output_dir=os.path.join(args.out, f"lr{lr:g}_d{damping:g}_n{norm:g}"))
        res = run(cfg, data)
        rows.append((res["validation"]["main"], res["test"]["main"], lr, damping, norm,
                     res["final_loss"]))
    rows.sort(reverse=True)
    lines = ["| lr | damping | max norm | validation | test | final train loss |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {lr:g} | {d:g} | {n:g} | {v:.4f} | {t:.4f} | {fl:.4f} |"
              for v, t, lr, d, n, fl in rows]
    write(args.out, "table7.md", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
