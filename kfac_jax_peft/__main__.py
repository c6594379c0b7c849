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
  ``kfac-pre``, ``kfac-post``, ``sophia``, and the zeroth-order ``mezo``,
  ``mezo-adam``, ``hizoo``, ``loho-sgd-inter``, ``loho-adam-inter``,
  ``loho-adam-intra``) and seeds; prints the comparison table. Run again, it
  reads finished runs back and continues interrupted ones.
* ``sweep``: a grid over the traced hyperparameters (learning rate, max
  norm, weight decay, damping, decay) and seeds, compiled once; prints the
  table and the best point on validation, writes a plot.
* ``plot``: plot run folders (loss against step and wall-clock, validation
  metric, clip rate, Sophia's clipped fraction, HiZOO's Sigma).

Compiled steps are kept in JAX's persistent compilation cache, by default
in the folder .compilation_cache beside the run folder (``--compilation-cache
DIR`` elsewhere, ``--no-compilation-cache`` off), so a run or sweep started
again skips compilation.

A user error (a bad flag or config value, a missing or malformed file) ends
the command with one line naming the flag, key or file, and exit status 2;
an unexpected failure shows its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
import warnings


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage of ``train`` is a screenful
    of flags, which would hide the message."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _demo(args) -> int:
    from kfac_jax_peft import demo

    demo.check_args(steps=args.steps, seed=args.seed, plot=args.plot)
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


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


#: compare()'s arguments that are flags of the compare command
_COMPARE_FLAGS = ("arms", "seeds", "reference", "arm_overrides")
#: The flags of a multi-process job (``train``; not configuration keys).
_JOB_FLAGS = ("coordinator_address", "num_processes", "process_id")


def _add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """A flag for every TrainConfig key, in the sections of its docstring,
    with the help :func:`~kfac_jax_peft.finetune.config.field_help` makes
    from it (entry, choices, default)."""
    from kfac_jax_peft.finetune.config import FIELDS, RENAMED, field_docs, field_help

    p.add_argument("--config", metavar="FILE",
                   help="JSON or TOML file of configuration keys (flags override them).")
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="keep compiled steps in DIR (JAX's persistent cache). Default: "
                        ".compilation_cache beside the run folder.")
    p.add_argument("--no-compilation-cache", action="store_true",
                   help="do not keep compiled steps on disk.")
    docs, groups = field_docs(), {}
    for name, field in FIELDS.items():
        if name in skip:
            continue
        section = docs.get(name, ("Configuration", ""))[0] or "Configuration"
        if section not in groups:
            groups[section] = p.add_argument_group(section.lower())
        group, text = groups[section], field_help(name).replace("%", "%%")
        typ, nargs = _field_type(field)
        if typ is bool:
            group.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
        else:
            group.add_argument(_flag(name), dest=name, type=typ, nargs=nargs,
                               default=argparse.SUPPRESS, metavar=name.upper(), help=text)
    for old, new in RENAMED.items():  # deprecated names, read until the next release
        typ, nargs = _field_type(FIELDS[new])
        p.add_argument(_flag(old), dest=old, type=typ, nargs=nargs, default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)


def _config(args):
    """The run's config: the ``--config`` file's keys, overridden by the
    flags given. The keys read from the file are kept in ``args.file_keys``
    so that an error names a bad value the way the user wrote it."""
    from kfac_jax_peft.finetune.config import (
        FIELDS,
        RENAMED,
        from_mapping,
        load_config,
        rename_deprecated,
    )

    from_file = load_config(args.config) if args.config else {}
    flags = rename_deprecated({k: v for k, v in vars(args).items()
                               if k in FIELDS or k in RENAMED}, "flag")
    args.file_keys = set(from_file) - set(flags)
    given = {**from_file, **flags}
    return from_mapping({**_stored(args, given), **given}, source=args.config or "flags")


def _stored(args, given: dict) -> dict:
    """With ``--resume``, the run's own ``config.json`` gives the defaults, so
    that ``--resume --output-dir DIR`` continues the run as it was configured
    (and ``--steps N`` extends it); flags that change anything else are then
    refused by the trainer, naming them."""
    if not getattr(args, "resume", False):
        return {}
    from kfac_jax_peft.finetune.checkpoint import stored_config
    from kfac_jax_peft.finetune.config import FIELDS

    out = given.get("output_dir", FIELDS["output_dir"].default)
    stored = stored_config(out) if out else None
    return {k: v for k, v in (stored or {}).items() if k in FIELDS}


def _where(key: str, args) -> str:
    """How the user wrote ``key``: as a key of the ``--config`` file, or a flag."""
    from kfac_jax_peft.finetune.config import FIELDS

    if key in getattr(args, "file_keys", ()):
        return f"{key} in {args.config}"
    if key in FIELDS or key in _COMPARE_FLAGS or key in _JOB_FLAGS or key == "config":
        return _flag(key)
    return key


def _cache_dir(args, parent: str) -> str | None:
    """The folder of JAX's persistent compilation cache: ``--compilation-cache
    DIR``, or ``parent/.compilation_cache`` (the folder that holds the run
    folders); None with ``--no-compilation-cache``."""
    if args.no_compilation_cache:
        return None
    return args.compilation_cache or os.path.join(parent, ".compilation_cache")


def _train(args) -> int:
    from kfac_jax_peft.finetune import train
    from kfac_jax_peft.finetune.config import check_inputs
    from kfac_jax_peft.finetune.devices import initialize_distributed

    cfg = _config(args)
    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    check_inputs(cfg, resume=args.resume)
    cache = _cache_dir(args, os.path.dirname(os.path.abspath(cfg.output_dir)))
    if cache:
        from kfac_jax_peft.finetune import enable_compilation_cache

        enable_compilation_cache(cache)
    result = train(cfg, resume=args.resume)
    import jax

    if jax.process_index() == 0:  # one summary for a multi-process job
        if args.json:
            print(json.dumps(result.to_dict(), indent=1))
        else:
            print(summary(result))
    return 0


def _metrics(d: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in d.items() if k != "main") or "-"


def summary(result) -> str:
    """A few lines on a finished run: steps and training time, the best
    validation step and metrics, the test metrics of its weights, and
    where the files are."""
    out = result.output_dir
    lines = [f"trained {result.steps} steps in {result.wall_clock:.1f} s "
             f"({result.trainable_params} parameters trained), final loss "
             f"{result.final_loss:.4f}"]
    if result.validation:
        lines.append(f"best validation (step {result.best_step}): "
                     f"{_metrics(result.validation)}")
        lines.append(f"test, with those weights: {_metrics(result.test)}")
    lines.append(f"files in {out}: best.safetensors (best weights), results.json, "
                 "metrics.jsonl (the log), checkpoints/, config.json")
    return "\n".join(lines)


def _arm_overrides(text: str | None) -> dict | None:
    from kfac_jax_peft.finetune.config import ConfigError

    if not text:
        return None
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError("arm_overrides", f"must be a JSON object, got {text!r} ({e})"
                          ) from None
    if not isinstance(overrides, dict) or not all(isinstance(v, dict)
                                                  for v in overrides.values()):
        raise ConfigError("arm_overrides", 'must be a JSON object of objects, e.g. '
                          f'{{"adamw": {{"learning_rate": 1e-3}}}}, got {text!r}')
    return overrides


def _compare(args) -> int:
    from kfac_jax_peft.finetune.compare import compare, format_rows

    cfg = _config(args)
    overrides = _arm_overrides(args.arm_overrides)
    rows = compare(cfg, args.arms, args.seeds, overrides=overrides, reference=args.reference,
                   compilation_cache=_cache_dir(args, cfg.output_dir))
    print(format_rows(rows))
    print(f"summary and plot in {cfg.output_dir}")
    return 0


def _sweep(args) -> int:
    from kfac_jax_peft.finetune.sweep import format_sweep, sweep

    cfg = _config(args)
    grid = {key: values for key in _GRID_FLAGS
            if (values := getattr(args, f"grid_{key}")) is not None}
    out = sweep(cfg, grid, args.seeds, compilation_cache=_cache_dir(args, cfg.output_dir))
    print(format_sweep(out["rows"], out["best"]))
    best = out["best"]
    if best is None:
        print(f"every point diverged; table in {cfg.output_dir}/sweep.json")
        return 1
    print(f"best on validation: {best['point']} (validation {best['validation_mean']:.4f}, "
          f"test {best['test_mean']:.4f}); table in {cfg.output_dir}/sweep.json, plot in "
          f"{cfg.output_dir}/sweep.png")
    return 0


#: The sweep command's grid flags (``--learning-rate 1e-3 1e-2 ...``): the traced keys.
_GRID_FLAGS = ("learning_rate", "max_norm", "weight_decay", "damping", "decay",
               "fisher_damping")


def _plot(args) -> int:
    from kfac_jax_peft.finetune.plots import plot_runs

    for run in args.runs:
        if not os.path.isfile(os.path.join(run, "metrics.jsonl")):
            raise FileNotFoundError(f"run folder {run!r} has no metrics.jsonl")
    if args.labels is not None and len(args.labels) != len(args.runs):
        from kfac_jax_peft.finetune.config import ConfigError

        raise ConfigError("--labels", f"must give one label per run folder ({len(args.runs)}), "
                          f"got {len(args.labels)}")
    out = plot_runs(args.runs, args.out, labels=args.labels, title=args.title)
    print(f"plot written to {out}")
    return 0


def _influence(args) -> int:
    from kfac_jax_peft.finetune.influence import run_influence

    path = run_influence(args.run, task=args.task, method=args.method, damping=args.damping,
                         top=args.top_k, split=args.split, num_test=args.num_test,
                         batch_size=args.batch_size, out=args.out)
    print(f"influence table written to {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from kfac_jax_peft.finetune.config import FIELDS, field_docs, plain

    parser = _Parser(prog="kfac-peft", description=plain(__doc__),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="AdamW vs K-FAC (no clip, pre-clip, Newton-step clip) "
                                    "on the built-in task; prints a table, writes a plot")
    d.add_argument("--steps", type=int, default=200,
                   help="training steps of every optimizer. Default: 200.")
    d.add_argument("--seed", type=int, default=0, help="Default: 0.")
    d.add_argument("--plot", default="kfac_demo.png",
                   help="where to write the loss curves ('' for none)")
    d.set_defaults(func=_demo)

    t = sub.add_parser("train", help="fine-tune on a GLUE/SuperGLUE task",
                       description="Fine-tune a checkpoint (--model) on a GLUE/SuperGLUE "
                                   "task; every configuration key is a flag.")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its last checkpoint.")
    t.add_argument("--json", action="store_true",
                   help="print the result as JSON instead of a summary.")
    # one job over several processes (jax.distributed.initialize); where a
    # run executes, not what it is, so not keys of the run's configuration
    t.add_argument("--coordinator-address", default=None,
                   help="host:port of process 0 of a multi-process job. Default: "
                        "$JAX_COORDINATOR_ADDRESS; none: one process.")
    t.add_argument("--num-processes", type=int, default=None,
                   help="processes in the job. Default: $JAX_NUM_PROCESSES.")
    t.add_argument("--process-id", type=int, default=None,
                   help="this process, 0 .. num-processes - 1. Default: $JAX_PROCESS_ID.")
    _add_config_flags(t)
    t.set_defaults(func=_train)

    c = sub.add_parser("compare", help="several arms and seeds; prints the table (run again "
                                       "to continue an interrupted comparison)")
    _add_config_flags(c)
    c.add_argument("--arms", nargs="+", default=["adamw", "kfac-none", "kfac-pre",
                                                 "kfac-post"],
                   help="the arms to run. Choices: adamw, kfac-none, kfac-pre, kfac-post. "
                        "Default: all four.")
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                   help="the seeds of every arm. Default: 0 1 2.")
    c.add_argument("--reference", default=None, help="the arm whose final loss is the target "
                   "of 'steps to reference loss'. Default: the first arm.")
    c.add_argument("--arm-overrides", default=None,
                   help='JSON: per-arm config changes, e.g. \'{"adamw": {"learning_rate": '
                        '1e-3}}\'')
    c.set_defaults(func=_compare)

    sw = sub.add_parser("sweep", help="a grid over the traced hyperparameters and seeds, "
                                      "compiled once; prints the table and the best point",
                        description="Train every point of a grid over the traced "
                                    "hyperparameters (and every seed) into OUTPUT_DIR/"
                                    "<point>/seed<k>, with one compilation for the whole "
                                    "grid; prints the table, selects the best point on "
                                    "validation, writes sweep.json and sweep.png. Run again, "
                                    "it reads finished runs back.")
    grid = sw.add_argument_group("grid (each flag takes one or more values)")
    docs = field_docs()
    for key in _GRID_FLAGS:
        grid.add_argument(_flag(key), dest=f"grid_{key}", type=float, nargs="+", default=None,
                          metavar="X", help=f"values of {key}: {docs[key][1]}".replace(
                              "%", "%%") + f" Default: {FIELDS[key].default} alone.")
    sw.add_argument("--seeds", nargs="+", type=int, default=[0],
                    help="the seeds of every point. Default: 0.")
    _add_config_flags(sw, skip=_GRID_FLAGS + ("seed",))  # the grid and --seeds set them
    sw.set_defaults(func=_sweep)

    pl = sub.add_parser("plot", help="plot run folders")
    pl.add_argument("runs", nargs="+", help="run folders (each with its metrics.jsonl).")
    pl.add_argument("--out", default="runs.png", help="the image to write. Default: runs.png.")
    pl.add_argument("--labels", nargs="+", default=None,
                    help="one label per run folder. Default: the folder names.")
    pl.add_argument("--title", default=None, help="the plot's title. Default: none.")
    pl.set_defaults(func=_plot)

    from kfac_jax_peft.fisher.influence import METHODS

    i = sub.add_parser("influence", help="the training examples most helpful and harmful to "
                                         "a finished run's held-out predictions")
    i.add_argument("--run", required=True, help="the finished run folder (config.json, "
                   "best.safetensors, checkpoints/). Required.")
    i.add_argument("--task", default=None,
                   help="the run's task, checked against it. Default: the run's.")
    i.add_argument("--method", choices=METHODS, default="ekfac",
                   help="the curvature: the run's K-FAC factors (kfac), the same with the "
                        "diagonal refitted (ekfac), DataInf (datainf), or the dense exact "
                        f"matrix (exact; small models only). Choices: {', '.join(METHODS)}. "
                        "Default: ekfac.")
    i.add_argument("--damping", type=float, default=1e-3,
                   help="the damping lambda of (H + lambda I)^-1, the same for every "
                        "method. Default: 0.001.")
    i.add_argument("--top-k", type=int, default=10,
                   help="the most helpful and most harmful training examples listed per "
                        "test example. Default: 10.")
    i.add_argument("--split", choices=("validation", "test"), default="validation",
                   help="the held-out split scored against. Choices: validation, test. "
                        "Default: validation.")
    i.add_argument("--num-test", type=int, default=16,
                   help="score against the first N examples of --split. Default: 16.")
    i.add_argument("--batch-size", type=int, default=None,
                   help="training examples per batch of per-example gradients. "
                        "Default: the run's evaluation batch size.")
    i.add_argument("--out", default=None,
                   help="the table to write. Default: RUN/influence_METHOD.tsv.")
    i.set_defaults(func=_influence)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "fix your input", reported in one line."""
    from kfac_jax_peft.data import DataError
    from kfac_jax_peft.finetune.config import ConfigError
    from kfac_jax_peft.models.loading import CheckpointError

    return (ConfigError, DataError, CheckpointError, FileNotFoundError, FileExistsError,
            NotADirectoryError, IsADirectoryError, PermissionError)


def _again(args) -> str:
    if args.command == "compare":
        return "run the same command again to continue (finished runs are read back)"
    if args.command == "train":
        return "add --resume to continue from the last checkpoint"
    return "run it again"


def main(argv=None) -> int:
    """Run the command of ``argv``; 0 on success. A user error exits with
    status 2 (``SystemExit``) after one line on stderr."""
    # jaxlib's CPU LAPACK runs on scipy's OpenBLAS, whose spinning threads
    # slow XLA down (see benchmarks/step_time.py); one thread is faster.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # Python hides DeprecationWarnings outside __main__; a renamed flag or
    # key must still be seen by the user who wrote it.
    warnings.filterwarnings("default", category=DeprecationWarning,
                            message=r"(key|flag) .* is deprecated; use")
    from kfac_jax_peft.finetune.config import ConfigError

    parser = _parser()
    args = parser.parse_args(argv)
    prog = f"{parser.prog} {args.command}"
    try:
        return args.func(args)
    except _user_errors() as e:
        if isinstance(e, ConfigError):
            message = f"{_where(e.key, args)} {e.detail}"
        else:
            message = str(e) or type(e).__name__
        message = " ".join(message.split())  # one line, also for a listing
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except FloatingPointError as e:  # a diverged run: the message says what to change
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {_again(args)}", file=sys.stderr)
        raise SystemExit(130) from None
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        # checkpoints are written atomically: the last complete one is kept
        where = f" writing {e.filename}" if e.filename else ""
        print(f"{prog}: error: no space left on the device{where}; free some space, then "
              f"{_again(args)}", file=sys.stderr)
        raise SystemExit(1) from None


#: ``errno`` values of a full disk or an exhausted quota.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


if __name__ == "__main__":
    sys.exit(main())
