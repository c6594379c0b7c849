"""Command line of kfac_jax_peft (``kfac-peft``, or ``python -m kfac_jax_peft``).

Commands:

* ``demo``: AdamW against K-FAC (no clip, pre-clip, Newton-step clip) on a
  built-in task; nothing is downloaded; prints a table and writes a plot.
* ``train``: fine-tune a checkpoint on a GLUE/SuperGLUE task, e.g.
  ``kfac-peft train --task rte --model PATH --data-dir DIR --peft lora
  --optimizer kfac --clip post``. Every field of
  :class:`kfac_jax_peft.finetune.TrainConfig` is a flag; ``--config FILE``
  (JSON or TOML) sets defaults that flags override; ``--resume`` continues
  from the run folder's checkpoint.
* ``compare``: the same, for several arms (``adamw``, ``kfac-none``,
  ``kfac-pre``, ``kfac-post``) and seeds; prints the comparison table.
* ``plot``: plot run folders (loss against step and wall-clock, validation
  metric, clip rate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


def _demo(args) -> int:
    from kfac_jax_peft import demo

    print(f"Training the LoRA parameters of a built-in {args.steps}-step encoder task "
          "with each optimizer (CPU is fine; nothing is downloaded)...", flush=True)
    rows = demo.compare(steps=args.steps, seed=args.seed)
    print(demo.format_table(rows, "AdamW"))
    if args.plot:
        demo.plot(rows, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _field_type(field: dataclasses.Field):
    t = str(field.type)
    if t.startswith("tuple"):
        return str, "+"
    if t == "bool":
        return bool, None
    for name, typ in (("int", int), ("float", float), ("str", str)):
        if t.split(" | ")[0] == name:
            return typ, None
    raise TypeError(f"no flag type for {field.name}: {t}")  # pragma: no cover


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    from kfac_jax_peft.finetune.config import FIELDS

    p.add_argument("--config", help="JSON or TOML file of TrainConfig keys (flags override)")
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="keep compiled steps in DIR (JAX's persistent cache) across runs")
    for name, field in FIELDS.items():
        typ, nargs = _field_type(field)
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS)
        else:
            p.add_argument(flag, dest=name, type=typ, nargs=nargs, default=argparse.SUPPRESS,
                           metavar=name.upper(), help=f"(default: {field.default!r})")


def _config(args):
    from kfac_jax_peft.finetune.config import FIELDS, from_mapping, load_config

    values = load_config(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k in FIELDS})
    return from_mapping(values, source=args.config or "flags")


def _cache(args) -> None:
    if args.compilation_cache:
        from kfac_jax_peft.finetune import enable_compilation_cache

        enable_compilation_cache(args.compilation_cache)


def _train(args) -> int:
    from kfac_jax_peft.finetune import train

    cfg = _config(args)
    _cache(args)
    result = train(cfg, resume=args.resume)
    print(json.dumps(result.to_dict(), indent=1))
    return 0


def _compare(args) -> int:
    from kfac_jax_peft.finetune.compare import compare, format_rows

    cfg = _config(args)
    _cache(args)
    overrides = json.loads(args.arm_overrides) if args.arm_overrides else None
    rows = compare(cfg, args.arms, args.seeds, overrides=overrides, reference=args.reference)
    print(format_rows(rows))
    print(f"summary and plot in {cfg.output_dir}")
    return 0


def _plot(args) -> int:
    from kfac_jax_peft.finetune.plots import plot_runs

    out = plot_runs(args.runs, args.out, labels=args.labels, title=args.title)
    print(f"plot written to {out}")
    return 0


def main(argv=None) -> int:
    # jaxlib's CPU LAPACK runs on scipy's OpenBLAS, whose spinning threads
    # slow XLA down (see benchmarks/step_time.py); one thread is faster.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    parser = argparse.ArgumentParser(prog="kfac-peft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="AdamW vs K-FAC (no clip, pre-clip, Newton-step clip) "
                                    "on the built-in task; prints a table, writes a plot")
    d.add_argument("--steps", type=int, default=200)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--plot", default="kfac_demo.png",
                   help="where to write the loss curves ('' for none)")
    d.set_defaults(func=_demo)

    t = sub.add_parser("train", help="fine-tune on a GLUE/SuperGLUE task")
    _add_config_flags(t)
    t.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --output-dir")
    t.set_defaults(func=_train)

    c = sub.add_parser("compare", help="several arms and seeds; prints the table")
    _add_config_flags(c)
    c.add_argument("--arms", nargs="+", default=["adamw", "kfac-none", "kfac-pre",
                                                 "kfac-post"])
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    c.add_argument("--reference", default=None, help="arm whose final loss is the target "
                   "(default: the first arm)")
    c.add_argument("--arm-overrides", default=None,
                   help='JSON: per-arm config changes, e.g. \'{"adamw": {"learning_rate": '
                        '1e-3}}\'')
    c.set_defaults(func=_compare)

    pl = sub.add_parser("plot", help="plot run folders")
    pl.add_argument("runs", nargs="+")
    pl.add_argument("--out", default="runs.png")
    pl.add_argument("--labels", nargs="+", default=None)
    pl.add_argument("--title", default=None)
    pl.set_defaults(func=_plot)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
