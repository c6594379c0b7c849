"""The paper's Fig. 4: K-FAC without clipping, with pre-clipping and with
Newton-step (post-) clipping, against AdamW with gradient clipping.

Writes ``<out>/comparison.png`` (loss against step and wall-clock,
validation metric, clip rate), ``<out>/summary.json`` and ``<out>/fig4.md``.
"""

import sys

from common import base_config, parser, write

from kfac_jax_peft.finetune.compare import compare, format_rows


def main(argv=None) -> int:
    args = parser(__doc__, "runs/fig4").parse_args(argv)
    base = base_config(args)
    arms = ["adamw", "kfac-none", "kfac-pre", "kfac-post"]
    rows = compare(base, arms, args.seeds, reference="adamw",
                   overrides={"adamw": {"learning_rate": args.adamw_learning_rate}})
    write(args.out, "fig4.md", format_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
