"""Compilation of a run and of a 9-point grid, hyperparameters compiled in
as constants (before) or traced (after).

Before, the learning rate, max norm, weight decay, damping and decay were
constants of the compiled steps, so every point of a grid compiled every
step kind for every padded length again. Traced
(:mod:`kfac_jax_peft.finetune.optim`), they are arrays in the optimizer
state and the trainer reuses the steps compiled for the first point.

For each mode, a 3 x 3 grid over ``learning_rate`` x ``damping`` (K-FAC,
post-clipping) is trained with :func:`kfac_jax_peft.finetune.train` in one
process, on data loaded once; printed: the compile seconds of the first run
(its ``"compile"`` log record: every step kind on every padded length), the
sum of the compile seconds over the grid, and the grid's wall-clock (9
runs, everything included). The traced grid runs first, so that warm-up
in the process favours the constant one, if anything. The persistent
cache is off (``traced`` runs in a new process would read it instead).

Default model: the tests' tiny BERT (2 layers, hidden 32) on the tests'
synthetic RTE folder, built in a temporary folder (needs torch and
transformers); ``--model`` and ``--data-dir`` (and ``--task``) run it on
another checkpoint and task.

Usage: ``python benchmarks/compile.py [--model DIR --data-dir DIR --task sst2]
[--steps 20] [--max-length 32] [--batch-size 8] [--points 9]``
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see benchmarks/step_time.py


def _grid(cfg, data, traced: bool, root: str, points: int) -> dict:
    from kfac_jax_peft.finetune import read_log, train, trainer

    trainer._COMPILED.clear()  # nothing compiled by the other mode is reused
    compiles = []
    t0 = time.perf_counter()
    grid = itertools.product((0.01, 0.03, 0.1), (1e-3, 1e-2, 1e-1))
    for i, (lr, damping) in enumerate(itertools.islice(grid, points)):
        mode = "traced" if traced else "constant"
        out = os.path.join(root, mode, f"point{i}")
        train(cfg.replace(learning_rate=lr, damping=damping, output_dir=out), data=data,
              traced=traced)
        compiles.append(sum(r["seconds"] for r in read_log(out) if r["kind"] == "compile"))
        print(f"{mode} point {i}: compile {compiles[-1]:.1f} s, "
              f"{time.perf_counter() - t0:.1f} s so far", file=sys.stderr, flush=True)
    return {"first": compiles[0], "compile_sum": sum(compiles),
            "wall": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--task", default="rte")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--points", type=int, default=9, help="grid points run (at most 9)")
    args = p.parse_args()

    from kfac_jax_peft.finetune import TrainConfig, load_data

    root = tempfile.mkdtemp(prefix="compile-bench-")
    model, data_dir = args.model, args.data_dir
    if model is None or data_dir is None:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from tiny_checkpoint import make_rte_folder, make_tiny_bert

        model = model or make_tiny_bert(os.path.join(root, "tiny-bert"))
        data_dir = data_dir or make_rte_folder(os.path.join(root, "glue"))
    cfg = TrainConfig(task=args.task, model=model, data_dir=data_dir, max_length=args.max_length,
                      batch_size=args.batch_size, steps=args.steps, eval_every=args.steps,
                      log_every=5, invert_every=5, optimizer="kfac", clip="post",
                      progress=False)
    data = load_data(cfg)
    rows = {"traced": _grid(cfg, data, True, root, args.points),
            "constant": _grid(cfg, data, False, root, args.points)}
    print(f"model {model}, task {args.task}, {args.steps} steps, batch {args.batch_size}, "
          f"max length {args.max_length}; {args.points} points of a 3 x 3 grid "
          "(learning_rate x damping)")
    print(f"| hyperparameters | compile, first run (s) | compile, {args.points} runs (s) | "
          "grid wall-clock (s) |")
    print("|---|---|---|---|")
    for name in ("constant", "traced"):
        r = rows[name]
        print(f"| {name} | {r['first']:.1f} | {r['compile_sum']:.1f} | {r['wall']:.1f} |")


if __name__ == "__main__":
    main()
