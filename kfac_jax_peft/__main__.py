"""Command line: ``kfac-peft demo`` (also ``python -m kfac_jax_peft demo``)."""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args) -> int:
    from kfac_jax_peft import demo

    print(f"Training the LoRA parameters of a built-in {args.steps}-step encoder task "
          "with each optimizer (CPU is fine; nothing is downloaded)...", flush=True)
    rows = demo.compare(steps=args.steps, seed=args.seed)
    print(demo.format_table(rows, "AdamW"))
    return 0


def main(argv=None) -> int:
    # jaxlib's CPU LAPACK runs on scipy's OpenBLAS, whose spinning threads
    # slow XLA down (see benchmarks/step_time.py); one thread is faster.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    parser = argparse.ArgumentParser(prog="kfac-peft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="AdamW vs K-FAC (no clip, pre-clip, Newton-step clip) "
                                    "on the built-in task; prints a comparison table")
    d.add_argument("--steps", type=int, default=200)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
